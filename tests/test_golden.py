"""Our losses equal the official implementation's (nakamotoo/Cal-QL @ ac6eafe, JAX), number for number.

`tests/golden/` holds, per configuration, the official initial parameters, a batch with its MC returns, the exact
random draws of one update and the official step-1 metrics, at 32-wide layers and 64-row batches (see its README):
AntMaze (Lagrange), Adroit, and Kitchen-style data with importance sampling off, each for Cal-QL and, where the
twin is recorded, CQL. They run in every clone. The full-size recordings (`../shared/golden/`, beside the
checkout of the project's own sessions) run too where that folder exists. The official step evaluates the loss
once per parameter group with fresh draws: policy (pass 1), qf1 (pass 2), qf2 (pass 3), ...; every metric except
the gradient norms comes from the last pass.
"""

from pathlib import Path

import pytest
import torch

import cal_ql_continuous
import cql_continuous
from golden_common import LOSSES, as_batch, build_agent, load_recording

SMALL = Path(__file__).resolve().parent / "golden"
FULL_SIZE = Path(__file__).resolve().parents[2] / "shared" / "golden"
CASES = [
    *(pytest.param(SMALL / name, id=name) for name in ("antmaze_calql", "antmaze_cql", "adroit_calql", "kitchen_calql", "kitchen_cql")),
    *(
        pytest.param(FULL_SIZE / name, id=f"full-size-{name}", marks=pytest.mark.skipif(not FULL_SIZE.is_dir(), reason=f"no {FULL_SIZE}"))
        for name in ("antmaze_calql", "antmaze_cql", "adroit_calql")
    ),
]


def load_golden(folder: Path):
    """A recorded configuration; a missing file fails the test (the small recordings ship with the project)."""
    return load_recording(folder, "batch", "noise", "params")


def losses_of_pass(script, agent, args, arrays, prefix):
    batch = as_batch(arrays["batch"])
    noise = {k: torch.as_tensor(arrays["noise"][prefix + k]) for k in ("new_actions_eps", "backup_eps", "current_eps", "next_eps", "random_actions")}
    return script.cal_ql_losses(agent, batch, noise, args)


def grad_norm(loss, params, critic=None):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [g if critic is None else g[critic] for g in grads if g is not None]
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


@pytest.mark.parametrize("folder", CASES)
def test_step1_losses_and_gradients_equal_the_official_implementation(folder):
    expected, arrays = load_golden(folder)
    metrics = expected["metrics"]
    script = cal_ql_continuous if expected["config"]["enable_calql"] else cql_continuous
    agent, args = build_agent(script, expected["config"], arrays["params"])
    last = losses_of_pass(script, agent, args, arrays, prefix="")
    for official, (ours, critic) in LOSSES.items():
        value = last[ours] if critic is None else last[ours][critic]
        assert value.item() == pytest.approx(metrics[official], rel=1e-5, abs=1e-6), official
    assert last["alpha_prime"].item() == pytest.approx(metrics["cql/alpha_prime"], rel=1e-5)

    # each group's gradient norm from its own pass's draws (these see what step-1 losses barely do)
    policy = losses_of_pass(script, agent, args, arrays, prefix="pass1_")
    assert grad_norm(policy["actor_loss"], list(agent.actor.parameters())) == pytest.approx(metrics["policy_loss_gradient"], rel=1e-5)
    for k in range(2):
        critic = losses_of_pass(script, agent, args, arrays, prefix=f"pass{k + 2}_")
        norm = grad_norm(critic["qf_loss"][k], list(agent.qf.parameters()), critic=k)
        assert norm == pytest.approx(metrics[f"qf{k + 1}_loss_gradient"], rel=1e-5), f"qf{k + 1}"


def test_calibration_changes_losses_exactly_where_the_bound_binds():
    """Same parameters, batch and draws: Cal-QL and CQL differ only in policy-action entries with Q < mc_return."""
    expected, arrays = load_golden(SMALL / "antmaze_calql")
    agent, args = build_agent(cal_ql_continuous, expected["config"], arrays["params"])
    calibrated = losses_of_pass(cal_ql_continuous, agent, args, arrays, prefix="")
    plain = losses_of_pass(cql_continuous, agent, args, arrays, prefix="")
    assert calibrated["bound_rate"].item() == pytest.approx(expected["metrics"]["cql/bound_rate_cql_q1_current_actions"])
    assert 0.1 < calibrated["bound_rate"].item() < 0.9  # the golden batch makes the bound bind on a fair fraction
    for key in ("td_loss", "actor_loss", "alpha_loss"):  # untouched by the calibration
        torch.testing.assert_close(calibrated[key], plain[key], rtol=0, atol=0)
    assert torch.all(calibrated["cql_diff"] > plain["cql_diff"])  # raising Q-values only raises the logsumexp
    cql_golden, _ = load_golden(SMALL / "antmaze_cql")
    assert plain["qf_loss"][0].item() == pytest.approx(cql_golden["metrics"]["qf1_loss"], rel=1e-5)
