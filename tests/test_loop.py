"""What the pipeline does between the losses: labelling with each paper preset, how online batches are mixed, the
online loop's accounting (updates, evaluations, regret), the labels of an online episode, and the evaluation policy."""

import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import cal_ql_continuous as calql
from conftest import TINY, reference_mc_returns, scalars
from utils.evaluation import deterministic

GAMMA = 0.99


def preset(monkeypatch, env_id, *flags):
    monkeypatch.setattr(sys, "argv", ["cal_ql_continuous.py", "--env-id", env_id, *flags])
    return calql.parse_args()


def transitions(rewards, terminals, episode_ends, action_scale=1.5):
    n = len(rewards)
    return {"observations": np.zeros((n, 2), np.float32), "next_observations": np.ones((n, 2), np.float32),
            "actions": np.linspace(-action_scale, action_scale, 2 * n, dtype=np.float32).reshape(n, 2),
            "rewards": np.asarray(rewards, np.float32), "terminals": np.asarray(terminals, bool), "episode_ends": np.asarray(episode_ends, bool)}


# raw rewards of a successful trajectory (ending at a terminal) and a failed one cut by the time limit
SPARSE_DATA = {"antmaze-medium-play-v2": ([0, 0, 1], [0, 0, 0]), "pointmaze-umaze": ([0, 0, 1], [0, 0, 0]), "pen-binary-v0": ([-1, -1, 0], [-1, -1, -1])}


@pytest.mark.parametrize("env_id", SPARSE_DATA)
def test_each_sparse_preset_scales_rewards_and_labels_a_failure_as_failing_forever(env_id, monkeypatch):
    args = preset(monkeypatch, env_id)
    success, failure = SPARSE_DATA[env_id]
    data = transitions(success + failure, [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 1])
    labelled = calql.label_transitions(data, args)
    scaled = np.asarray(success + failure) * 10 + (-5 if env_id != "pen-binary-v0" else 5)
    np.testing.assert_array_equal(labelled["rewards"], scaled)
    assert set(scaled) == {-5, 5}  # the official scaling: -5 away from the goal, +5 at it, in both families
    np.testing.assert_allclose(labelled["mc_returns"][:3], reference_mc_returns(scaled[:3], [0, 0, 1], [0, 0, 1], GAMMA), rtol=1e-6)
    np.testing.assert_allclose(labelled["mc_returns"][3:], -5 / (1 - GAMMA))  # -500 from the *scaled* failure reward
    assert np.abs(labelled["actions"]).max() == np.float32(0.99999) and labelled["actions"][0, 0] == np.float32(-0.99999)
    np.testing.assert_array_equal(labelled["terminals"], data["terminals"])


def test_kitchen_preset_keeps_raw_rewards_and_bootstraps_the_time_limited_tail(monkeypatch):
    args = preset(monkeypatch, "kitchen-mixed")
    data = transitions([0, 1, 1, 2, 0, 0], [0] * 6, [0, 0, 0, 1, 0, 1])
    labelled = calql.label_transitions(data, args)
    np.testing.assert_array_equal(labelled["rewards"], data["rewards"])
    tail = 2 / (1 - GAMMA)  # the last reward, kept forever
    expected = [GAMMA * (1 + GAMMA * (1 + GAMMA * tail)), 1 + GAMMA * (1 + GAMMA * tail), 1 + GAMMA * tail, tail, 0, 0]
    np.testing.assert_allclose(labelled["mc_returns"], expected, rtol=1e-6)  # no failure rule: all-zero stays 0


def constant_buffer(value, rows=64):
    buffer = calql.ReplayBuffer(rows, 2, 1, "cpu")
    buffer.add({"obs": np.zeros((rows, 2)), "actions": np.zeros((rows, 1)), "rewards": np.full(rows, value), "next_obs": np.zeros((rows, 2)),
                "terminals": np.zeros(rows), "mc_returns": np.zeros(rows)})
    return buffer


@pytest.mark.parametrize("env_id, offline_rows", [("kitchen-mixed", 64), ("antmaze-large-play-v2", 128)])
def test_online_batches_take_the_presets_share_of_offline_rows(env_id, offline_rows, monkeypatch):
    args = preset(monkeypatch, env_id)
    batches = []
    monkeypatch.setattr(calql, "update", lambda agent, optimizer, batch, noise, args: batches.append(batch["rewards"]))
    calql.make_train_step(None, None, args, constant_buffer(0.0), constant_buffer(1.0))()
    assert len(batches[0]) == args.batch_size == 256
    assert (batches[0] == 0).sum() == offline_rows and (batches[0][offline_rows:] == 1).all()  # offline rows first
    calql.make_train_step(None, None, args, constant_buffer(0.0))()  # pre-training: offline rows only
    assert len(batches[1]) == 256 and (batches[1] == 0).all()


def test_regrets_are_running_means_of_one_minus_the_score():
    progress = calql.Progress(phase="online")
    assert [calql.running_regret(progress.eval_regrets, s) for s in (0.2, 0.6, 1.0)] == pytest.approx([0.8, 0.6, 0.4])
    assert [calql.running_regret(progress.train_regrets, s) for s in (0.0, 1.0, 1.0, 1.0)] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert progress.eval_regrets == pytest.approx([0.8, 0.4, 0.0])  # what a checkpoint keeps


def test_online_loop_updates_len_times_utd_per_episode_and_evaluates_at_each_crossing(run_script, pointmaze_data_dir, tmp_path):
    flags = ["--offline-steps", "10", "--offline-eval-every", "10", "--online-env-steps", "700", "--online-eval-every", "250",
             "--utd-ratio", "2", "--eval-episodes", "1", "--run-name", "loop"]
    run_script("cal_ql_continuous.py", "--dataset-dir", pointmaze_data_dir, *TINY, *flags)
    logged = scalars(tmp_path / "runs" / "loop", with_values=True)
    episodes = logged["charts/env_steps"]  # (gradient step after the episode's updates, env steps so far)
    lengths = [length for _, length in logged["charts/episodic_length"]]
    assert np.diff([10] + [step for step, _ in episodes]).tolist() == [2 * length for length in lengths]
    assert np.diff([0] + [env for _, env in episodes]).tolist() == lengths and episodes[-1][1] >= 700 > episodes[-2][1]

    before = [0] + [env for _, env in episodes[:-1]]
    expected = [(step, env) for (step, env), prev in zip(episodes, before) if env // 250 > prev // 250 or env >= 700]
    online_evals = [(step, env) for step, env in logged["eval/env_steps"] if env > 0]
    assert online_evals == expected and len(expected) >= 3
    assert [step for step, env in logged["eval/env_steps"] if env == 0] == [0, 10]  # before and after pre-training

    scores = [score for step, score in logged["eval/normalized_score"] if step > 10]
    regrets = [regret for _, regret in logged["eval/regret"]]
    np.testing.assert_allclose(regrets, np.cumsum(1 - np.array(scores)) / np.arange(1, len(scores) + 1), rtol=1e-6)


def test_a_fractional_utd_ratio_carries_its_remainder_so_a_run_does_round_env_steps_times_utd_updates(run_script, env_module, drift_data, tmp_path):
    never_reached = '{"goal": 100, "max_episode_steps": 5}'  # 4 online episodes of 5 steps, 2.5 updates each
    flags = ["--env-id", "tiny_envs:Drift-v0", "--env-kwargs", never_reached, "--dataset-path", drift_data, *TINY, "--offline-steps", "10",
             "--offline-eval-every", "10", "--online-env-steps", "20", "--utd-ratio", "0.5", "--eval-episodes", "1", "--run-name", "utd"]
    run_script("cal_ql_continuous.py", *flags, env=env_module)
    episodes = scalars(tmp_path / "runs" / "utd", with_values=True)["charts/env_steps"]
    assert [env_steps for _, env_steps in episodes] == [5, 10, 15, 20]
    # round(2.5) = 2, round(5) - 2, round(7.5) - 5, round(10) - 8: 10 updates in all (int(5 * 0.5) would do 8)
    assert np.diff([10] + [step for step, _ in episodes]).tolist() == [2, 3, 3, 2]


class Corridor(gym.Env):
    """One step right per positive action; reaching x = 3 pays raw reward 1 and ends the episode (0 elsewhere)."""

    observation_space = gym.spaces.Box(-10, 10, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += float(action[0] > 0)
        return np.array([self.x], np.float32), float(self.x == 3), self.x == 3, False, {"success": self.x == 3}


@pytest.mark.parametrize("reached", [True, False])
def test_online_episode_is_labelled_with_its_own_returns(reached, monkeypatch):
    """A finished episode is labelled by the same rules as the data: reaching the goal (terminal) or, cut by the time
    limit without success, the value of failing forever."""
    args = preset(monkeypatch, "antmaze-umaze-v2")
    actor = calql.Actor(1, 1, [8])
    with torch.no_grad():  # a near-deterministic policy that always moves right (or left)
        actor.layers[-1].bias.copy_(torch.tensor([5.0 if reached else -5.0, 0.0]))
        actor.log_std_offset.fill_(-20.0)
    episode, stats = calql.collect_episode(gym.wrappers.TimeLimit(Corridor(), 5), actor, torch.device("cpu"))
    labelled = calql.label_transitions(episode, args)
    assert episode["episode_ends"].tolist() == [False] * (stats["length"] - 1) + [True]
    if reached:
        assert (stats["length"], stats["success"], episode["terminals"].tolist()) == (3, 1.0, [False, False, True])
        np.testing.assert_allclose(labelled["mc_returns"], [-5 + GAMMA * (-5 + GAMMA * 5), -5 + GAMMA * 5, 5], rtol=1e-6)
    else:
        assert (stats["length"], stats["success"], episode["terminals"].any()) == (5, 0.0, False)
        np.testing.assert_allclose(labelled["mc_returns"], -500.0)


def test_evaluation_acts_with_tanh_of_the_mean():
    torch.manual_seed(0)
    actor = calql.Actor(3, 2, [8])
    obs = np.array([0.5, -1.0, 2.0], np.float32)
    mean, _ = actor(torch.as_tensor(obs)[None])
    action = deterministic(actor.act, torch.device("cpu"))(obs)
    np.testing.assert_allclose(action, torch.tanh(mean)[0].detach().numpy(), rtol=1e-6)
    sampled = actor.sample(torch.as_tensor(obs)[None], torch.randn(1, 2))[0][0].detach().numpy()
    assert not np.allclose(action, sampled)  # the stochastic policy differs: evaluation does not sample
