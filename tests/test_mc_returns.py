"""Monte-Carlo return labelling (spec §4): the function Cal-QL's bound rests on. Each single-file script has its
own copy, so every test runs on each of them."""

import numpy as np
import pytest

import cal_ql_atari
import cal_ql_continuous
from conftest import reference_mc_returns

GAMMA = 0.99


@pytest.fixture(params=[cal_ql_continuous, cal_ql_atari], ids=["continuous", "atari"])
def calc_mc_returns(request):
    return request.param.calc_mc_returns


def one_trajectory(rewards, terminals):
    ends = np.zeros(len(rewards), bool)
    ends[-1] = True
    return np.asarray(rewards, np.float32), np.asarray(terminals, bool), ends


@pytest.mark.parametrize(
    "rewards, terminals, expected",
    [
        ([-5, -5, 5], [0, 0, 1], [-5.0495, -0.05, 5.0]),
        ([-5, 5, -5, 5], [0, 1, 0, 1], [-0.05, 5.0, -0.05, 5.0]),  # adroit: every success step is terminal
        ([-5, -5, -5], [0, 0, 1], [-500.0, -500.0, -500.0]),  # never succeeded: failing forever
        ([-5, -5, -5, 5], [0, 0, 0, 0], [-9.9990, -5.0495, -0.05, 5.0]),  # timeout: nothing bootstrapped
    ],
)
def test_spec_test_vectors(rewards, terminals, expected, calc_mc_returns):
    returns = calc_mc_returns(*one_trajectory(rewards, terminals), GAMMA, failure_reward=-5.0)
    np.testing.assert_allclose(returns, expected, atol=1e-4)


def test_terminal_in_mid_trajectory_cuts_the_sum(calc_mc_returns):
    returns = calc_mc_returns(*one_trajectory([1, 2, 3, 4], [0, 1, 0, 0]), GAMMA)
    np.testing.assert_allclose(returns, [1 + GAMMA * 2, 2, 3 + GAMMA * 4, 4], rtol=1e-6)


def test_trajectories_in_one_flat_array_do_not_leak_into_each_other(calc_mc_returns):
    rewards = np.array([1, 1, 10, 10], np.float32)
    returns = calc_mc_returns(rewards, np.zeros(4, bool), np.array([0, 1, 0, 1], bool), GAMMA)
    np.testing.assert_allclose(returns, [1 + GAMMA, 1, 10 + 10 * GAMMA, 10], rtol=1e-6)


def test_failed_trajectory_gets_infinite_horizon_value_and_successful_neighbour_does_not(calc_mc_returns):
    rewards = np.array([-5, -5, -5, 5], np.float32)
    returns = calc_mc_returns(rewards, np.array([0, 0, 0, 1], bool), np.array([0, 1, 0, 1], bool), GAMMA, failure_reward=-5.0)
    np.testing.assert_allclose(returns, [-500, -500, -5 + GAMMA * 5, 5], rtol=1e-6)


def test_dense_rewards_ignore_the_failure_rule(calc_mc_returns):
    returns = calc_mc_returns(*one_trajectory([-5, -5], [0, 0]), GAMMA, failure_reward=None)
    np.testing.assert_allclose(returns, [-5 - 5 * GAMMA, -5], rtol=1e-6)


def test_output_is_float32_and_agrees_with_a_per_trajectory_loop(calc_mc_returns):
    rng = np.random.default_rng(0)
    n = 5_000
    rewards = rng.choice([-5.0, 5.0], n, p=[0.9, 0.1]).astype(np.float32)
    rewards[1000:1300] = -5.0  # a guaranteed failed stretch
    terminals, ends = rng.random(n) < 0.05, rng.random(n) < 0.01
    ends[[999, 1299, n - 1]] = True
    terminals[1000:1300] = False
    returns = calc_mc_returns(rewards, terminals, ends, GAMMA, failure_reward=-5.0)
    assert returns.dtype == np.float32 and returns.shape == (n,)
    np.testing.assert_allclose(returns, reference_mc_returns(rewards, terminals, ends, GAMMA, -5.0), rtol=1e-5, atol=1e-4)
    assert np.all(returns[1000:1300] == -500.0)

