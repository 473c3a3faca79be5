"""Our update, step after step, follows the official learner (nakamotoo/Cal-QL @ ac6eafe, JAX) for 100 steps.

`tests/golden_trajectory/` holds five recordings (the configurations of tests/golden: AntMaze with the Lagrange
multiplier and its CQL twin, Adroit, Kitchen-style data with importance sampling off and its twin) of 100 calls of the
official `ConservativeSAC.train`: the initial parameters, a 256-row dataset, every step's metrics and the parameters
after steps 1, 5 and 100 (see its README). Each replay loads the initial parameters into the script's `Agent`, builds
the script's own optimizer (`Agent.make_optimizer`), regenerates every step's batch and draws with the recording's
numpy recipe and calls the script's `update`, Cal-QL or the CQL twin as recorded. Step-1 golden data checks losses
and gradients; this checks what only later steps show: Adam's settings, each group's learning rate, the Polyak rate,
how the temperature and the Lagrange multiplier move. `test_the_replay_fails_on_each_injected_error` shows it does.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cal_ql_continuous
import cql_continuous
from golden_common import LOSSES, agent_params, as_batch, build_agent, load_recording

RECORDINGS = Path(__file__).resolve().parent / "golden_trajectory"
NAMES = ("antmaze_calql", "antmaze_cql", "adroit_calql", "kitchen_calql", "kitchen_cql")
METRICS = {**LOSSES, "alpha": ("alpha", None), "cql/alpha_prime": ("alpha_prime", None)}  # official -> ours
LOSS_RTOL = 1e-4  # |ours - official| <= LOSS_RTOL * max(1, |official|), every step
# Parameters, per tensor: ||ours - official|| <= tol * ||official - initial|| (Frobenius norms), the share of the
# recorded change that the replay gets wrong, with tol = (for the actor, critics, log_alpha and log_alpha_prime, for
# the target critics). After steps 1 and 5 only float32 rounding differs; a target moves by tau times its critic's
# step (about 1e-6 on values of about 0.1), so its rounding is a larger share of that. After step 100 Adam's sign
# flips add up too: elements whose gradient is near zero move a few lr the other way (the README).
PARAM_TOL = {1: (2e-3, 3e-2), 5: (2e-3, 3e-2), 100: (3e-2, 3e-2)}


def ratio(error, tolerance) -> float:
    """error / tolerance, and anything that is not a number fails."""
    r = error / tolerance if tolerance > 0 else (0.0 if error == 0 else np.inf)
    return float(np.inf if np.isnan(r) else r)


def draws(config, data):
    """Every step's batch and random draws, by the recording's recipe (the order of the draws matters)."""
    rng = np.random.default_rng(config["schedule_seed"])
    B, R, A = config["batch_size"], config["cql_n_actions"], config["act_dim"]
    for _ in range(config["steps"]):
        idx = rng.integers(0, config["rows"], size=B)
        noise = {
            "new_actions_eps": rng.standard_normal((B, A), dtype=np.float32),
            "backup_eps": rng.standard_normal((B, R, A), dtype=np.float32),
            "random_actions": rng.uniform(-1, 1, (B, R, A)).astype(np.float32),
            "current_eps": rng.standard_normal((B, R, A), dtype=np.float32),
            "next_eps": rng.standard_normal((B, R, A), dtype=np.float32),
        }
        yield as_batch({k: v[idx] for k, v in data.items()}), {k: torch.as_tensor(v) for k, v in noise.items()}


def replay(name: str, inject=None) -> dict[str, float]:
    """Replays a recording with the script's own update and optimizer; returns, per comparison, the worst error over
    the steps as a multiple of its tolerance (<= 1 passes). inject(agent, args, optimizer) -> args plants an error."""
    expected, arrays = load_recording(RECORDINGS / name, "data", "params", *(f"params_step{s}" for s in PARAM_TOL))
    config = expected["config"]
    script = cal_ql_continuous if config["enable_calql"] else cql_continuous
    agent, args = build_agent(script, config, arrays["params"])
    optimizer = agent.make_optimizer(args)
    if inject is not None:
        args = inject(agent, args, optimizer)

    losses = {}  # what update's own call of cal_ql_losses returned: per-critic values, where update logs their mean
    original = script.cal_ql_losses
    worst = dict.fromkeys(METRICS, 0.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(script, "cal_ql_losses", lambda *a: losses.update(original(*a)) or losses)
        for step, (batch, noise) in enumerate(draws(config, arrays["data"]), start=1):
            script.update(agent, optimizer, batch, noise, args)
            for official, (ours, critic) in METRICS.items():
                value, reference = losses[ours][() if critic is None else critic].item(), expected["metrics"][step - 1][official]
                worst[official] = max(worst[official], ratio(abs(value - reference), LOSS_RTOL * max(1.0, abs(reference))))
            if step in PARAM_TOL:
                recorded, initial = arrays[f"params_step{step}"], arrays["params"]
                for key, ours in agent_params(agent).items():
                    if key in recorded:  # log_alpha_prime only where the Lagrange multiplier is on
                        target = key.startswith("target_")
                        check = f"{'targets' if target else 'parameters'} after step {step}"
                        error = np.linalg.norm(ours.detach().numpy() - recorded[key])
                        tolerance = PARAM_TOL[step][target] * np.linalg.norm(recorded[key] - initial[key])
                        worst[check] = max(worst.get(check, 0.0), ratio(error, tolerance))
    return worst


@pytest.mark.parametrize("name", NAMES)
def test_100_steps_follow_the_official_learner(name):
    worst = replay(name)
    assert max(worst.values()) <= 1, {k: round(v, 3) for k, v in worst.items() if v > 1}


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def set_lr(param_of, lr):
    def inject(agent, args, optimizer):
        group_of(optimizer, param_of(agent))["lr"] = lr
        return args
    return inject


def set_adam(**settings):
    def inject(agent, args, optimizer):
        for group in optimizer.param_groups:
            group.update(settings)
        return args
    return inject


INJECTED = {  # the official values: Polyak 5e-3, lr 3e-4 (critics, alpha'), 1e-4 (policy, temperature), betas (0.9, 0.999)
    "Polyak rate 4e-3": lambda agent, args, optimizer: replace(args, tau=4e-3),
    "critic lr 2.5e-4": set_lr(lambda agent: agent.qf.weights[0], 2.5e-4),
    "policy lr 8e-5": set_lr(lambda agent: agent.actor.layers[0].weight, 8e-5),
    "temperature lr 3e-4": set_lr(lambda agent: agent.log_alpha, 3e-4),  # shares the policy lr in make_optimizer
    "Adam betas (0.9, 0.99)": set_adam(betas=(0.9, 0.99)),
}
SEEN_BY_THE_PARAMETERS = {"Adam eps 1e-6": set_adam(eps=1e-6)}  # official 1e-8; the losses barely move (README)


@pytest.mark.parametrize("error", [*INJECTED, *SEEN_BY_THE_PARAMETERS])
@pytest.mark.parametrize("name", ["antmaze_calql", "kitchen_cql"])  # Cal-QL with alpha', the CQL twin without IS
def test_the_replay_fails_on_each_injected_error(name, error):
    """Each error fails the losses and the parameters (on every recording: the margins are in the README)."""
    worst = replay(name, {**INJECTED, **SEEN_BY_THE_PARAMETERS}[error])
    assert error not in INJECTED or max(worst[k] for k in METRICS) > 1, worst  # the losses see it
    assert max(v for k, v in worst.items() if k not in METRICS) > 1, worst  # and so do the parameters
