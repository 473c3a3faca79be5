"""The calibrated CQL loss: where the bound acts, and which parameters each loss trains."""

import math
from dataclasses import replace

import pytest
import torch

import cal_ql_continuous as calql
import cql_continuous as cql
from conftest import FAST_MODES, assert_same_training, host_reads

OBS, ACT, B = 5, 3, 16


def make(args_overrides=None, seed=0):
    torch.manual_seed(seed)
    args = replace(calql.Args(), policy_hidden=[32, 32], q_hidden=[32, 32], cql_n_actions=4, **(args_overrides or {}))
    agent = calql.Agent(OBS, ACT, args)
    batch = {
        "obs": torch.randn(B, OBS), "actions": torch.rand(B, ACT) * 2 - 1, "rewards": torch.randn(B),
        "next_obs": torch.randn(B, OBS), "terminals": (torch.rand(B) < 0.2).float(), "mc_returns": torch.zeros(B),
    }
    return agent, args, batch, calql.draw_noise(B, args.cql_n_actions, ACT, "cpu")


def test_bound_floors_only_policy_action_q_values():
    """Recompute the CQL difference by hand: the max with mc_return applies to the pi(s) and pi(s') samples,
    never to the random actions or to the data action."""
    agent, args, batch, noise = make()
    with torch.no_grad():
        q_rand = agent.qf(batch["obs"], noise["random_actions"])
        cur, cur_logp = agent.actor.sample(batch["obs"], noise["current_eps"])
        nxt, nxt_logp = agent.actor.sample(batch["next_obs"], noise["next_eps"])
        q_cur, q_next, q_data = agent.qf(batch["obs"], cur), agent.qf(batch["obs"], nxt), agent.qf(batch["obs"], batch["actions"])
    # a bound between the policy-sample Q-values, so about half the entries bind; random Q-values sit well below it
    batch["mc_returns"] = torch.cat([q_cur, q_next], -1).median(-1).values.mean(0)
    mc = batch["mc_returns"][:, None]
    terms = [q_rand - ACT * math.log(0.5), torch.maximum(q_next, mc) - nxt_logp, torch.maximum(q_cur, mc) - cur_logp]
    expected = (torch.logsumexp(torch.cat(terms, -1), -1) - q_data).mean(-1)
    losses = calql.cal_ql_losses(agent, batch, noise, args)
    torch.testing.assert_close(losses["cql_diff"], expected, rtol=1e-5, atol=1e-5)
    assert 0.2 < losses["bound_rate"] < 0.8


def test_calibration_equals_cql_when_the_bound_is_far_below_q():
    agent, args, batch, noise = make()
    batch["mc_returns"] = torch.full((B,), -1e6)
    calibrated, plain = calql.cal_ql_losses(agent, batch, noise, args), cql.cal_ql_losses(agent, batch, noise, args)
    for key in ("qf_loss", "cql_diff", "actor_loss"):
        torch.testing.assert_close(calibrated[key], plain[key], rtol=0, atol=0)
    assert calibrated["bound_rate"] == 0


def test_calibration_only_raises_the_regularizer():
    agent, args, batch, noise = make()
    batch["mc_returns"] = torch.linspace(-1, 1, B)
    calibrated, plain = calql.cal_ql_losses(agent, batch, noise, args), cql.cal_ql_losses(agent, batch, noise, args)
    assert torch.all(calibrated["cql_diff"] > plain["cql_diff"])
    torch.testing.assert_close(calibrated["td_loss"], plain["td_loss"], rtol=0, atol=0)


@pytest.mark.parametrize("lagrange", [False, True])
def test_each_loss_trains_only_its_own_parameters(lagrange):
    agent, args, batch, noise = make({"cql_lagrange": lagrange})
    losses = calql.cal_ql_losses(agent, batch, noise, args)
    groups = {
        "actor": list(agent.actor.parameters()), "qf": list(agent.qf.parameters()),
        "log_alpha": [agent.log_alpha], "log_alpha_prime": [agent.log_alpha_prime],
    }
    owner = {"actor_loss": "actor", "qf_loss": "qf", "alpha_loss": "log_alpha", "alpha_prime_loss": "log_alpha_prime"}
    for loss_name, own in owner.items():
        if loss_name == "alpha_prime_loss" and not lagrange:
            assert losses[loss_name] == 0
            continue
        for group, params in groups.items():
            grads = torch.autograd.grad(losses[loss_name].sum(), params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (group == own), f"{loss_name} -> {group}"
    assert not any(p.requires_grad for p in agent.qf_target.parameters())


def test_update_steps_every_group_and_polyak_averages_the_targets():
    agent, args, batch, noise = make({"cql_lagrange": True})
    optimizer = agent.make_optimizer(args)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = calql.update(agent, optimizer, batch, noise, args)
    after = agent.state_dict()
    for name in ("actor.layers.0.weight", "qf.weights.0", "log_alpha", "log_alpha_prime", "actor.log_std_offset"):
        assert not torch.equal(before[name], after[name]), name
    expected_target = before["qf_target.weights.0"].lerp(after["qf.weights.0"], args.tau)
    torch.testing.assert_close(after["qf_target.weights.0"], expected_target)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_same_seed_gives_identical_losses_on_cpu():
    def run():
        agent, args, batch, _ = make(seed=3)
        optimizer = agent.make_optimizer(args)
        return [calql.update(agent, optimizer, batch, calql.draw_noise(B, args.cql_n_actions, ACT, "cpu"), args) for _ in range(5)]

    for first, second in zip(run(), run()):
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_critics_evaluate_both_networks_in_one_batched_call():
    agent, _, batch, noise = make()
    q = agent.qf(batch["obs"], noise["random_actions"])
    assert q.shape == (2, B, 4)
    assert not torch.allclose(q[0], q[1])  # independently initialised


def make_buffer(n, device, seed):
    torch.manual_seed(seed)
    buffer = calql.ReplayBuffer(n, OBS, ACT, device)
    buffer.add({"obs": torch.randn(n, OBS), "actions": torch.rand(n, ACT) * 2 - 1, "rewards": torch.randn(n),
                "next_obs": torch.randn(n, OBS), "terminals": (torch.rand(n) < 0.2).float(), "mc_returns": torch.randn(n)})
    return buffer


def test_buffer_samples_only_filled_rows_and_sees_growth_without_a_host_read():
    buffer = calql.ReplayBuffer(10, 1, 1, "cpu")

    def add(rewards):
        buffer.add({**{k: torch.zeros(len(rewards), *v.shape[1:]) for k, v in buffer.data.items()}, "rewards": torch.tensor(rewards)})

    add([1.0, 2.0])
    assert set(buffer.sample(200)["rewards"].tolist()) == {1.0, 2.0}
    add([3.0] * 9)  # 11 rows into 10: FIFO overwrites the oldest
    assert set(buffer.sample(500)["rewards"].tolist()) == {2.0, 3.0}
    assert buffer.size_on_device.item() == buffer.size == 10


@pytest.mark.parametrize("mode, device", FAST_MODES)
def test_fast_train_step_matches_eager(mode, device):
    """--compile and --cudagraphs wrap the same update: from one seed, same losses and parameters as the eager
    step for warm-up, capture and replays, batches mixed from two buffers as online."""

    def run(flags):
        offline, online = make_buffer(64, device, seed=1), make_buffer(8, device, seed=2)
        agent, args, _, _ = make({"cql_lagrange": True, "batch_size": B, **flags}, seed=4)
        agent.to(device)
        step = calql.make_train_step(agent, agent.make_optimizer(args), args, offline, online)
        torch.manual_seed(5)
        metrics = [{k: v.clone() for k, v in step().items()} for _ in range(6)]
        return metrics, agent.state_dict()

    assert_same_training(run(mode), reference=run({}))


def test_train_step_reads_nothing_on_the_host_but_cpu_adams_step_count():
    """What --cudagraphs captures must not sync with the host: sampling (against the device-side buffer size),
    noise, losses, backward and Polyak read no value. The one read left on CPU is Adam's step counter, which the
    capturable Adam of --cudagraphs keeps on the GPU."""
    offline, online = make_buffer(64, "cpu", seed=1), make_buffer(8, "cpu", seed=2)
    agent, args, _, _ = make({"cql_lagrange": True, "batch_size": B})
    step = calql.make_train_step(agent, agent.make_optimizer(args), args, offline, online)
    step()  # Adam's state exists from here on, as after the warm-up of --cudagraphs
    reads = host_reads(step)
    assert reads and all("torch/optim/adam.py" in where for where in reads), reads
