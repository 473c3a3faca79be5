"""What the golden tests share: reading a recording of the official code (nakamotoo/Cal-QL @ ac6eafe), building the
script's Agent from the official parameters and reading them back, in the PyTorch layout of tests/golden/README.md.
Used by test_golden.py (step 1) and test_golden_trajectory.py (100 steps)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

LOSSES = {  # official metric -> (our loss, critic index or None)
    "cql/qf1_bellman_loss": ("td_loss", 0),
    "cql/qf2_bellman_loss": ("td_loss", 1),
    "cql/cql_qf1_diff": ("cql_diff", 0),
    "cql/cql_qf2_diff": ("cql_diff", 1),
    "cql/cql_min_qf1_loss": ("cql_loss", 0),
    "cql/cql_min_qf2_loss": ("cql_loss", 1),
    "qf1_loss": ("qf_loss", 0),
    "qf2_loss": ("qf_loss", 1),
    "policy_loss": ("actor_loss", None),
    "alpha_loss": ("alpha_loss", None),
    "cql/alpha_prime_loss": ("alpha_prime_loss", None),
}


def load_recording(folder: Path, *files: str):
    """expected.json and the named .npz files of a recorded configuration; a missing file fails the test."""
    expected = json.loads((folder / "expected.json").read_text())
    return expected, {f: dict(np.load(folder / f"{f}.npz")) for f in files}


def as_batch(arrays: dict) -> dict:
    """A recorded batch (official names) as the scripts' batch dict."""
    b = {k: torch.as_tensor(v) for k, v in arrays.items()}
    return {"obs": b["observations"], "actions": b["actions"], "rewards": b["rewards"],
            "next_obs": b["next_observations"], "terminals": b["dones"], "mc_returns": b["mc_returns"]}


def build_agent(script, config, params):
    """The script's Agent and Args with the recorded shapes and settings, holding the official parameters (the
    targets from `target_qf*` where recorded, else equal to the critics, as at step 1)."""
    assert config["cql_temp"] == 1.0, "the scripts fix the logsumexp temperature at 1 (every official run)"
    args = replace(
        script.Args(),
        policy_hidden=[int(h) for h in config["policy_arch"].split("-")],
        q_hidden=[int(h) for h in config["qf_arch"].split("-")],
        gamma=config["discount"],
        cql_n_actions=config["cql_n_actions"],
        cql_weight=config["cql_min_q_weight"],
        cql_importance_sample=config["cql_importance_sample"],
        cql_lagrange=config["cql_lagrange"],
        cql_target_action_gap=config["cql_target_action_gap"],
    )
    agent = script.Agent(config["obs_dim"], config["act_dim"], args)
    t = {k: torch.as_tensor(v) for k, v in params.items()}
    with torch.no_grad():
        for name, param in agent_params(agent).items():
            source = name if name in t else name.removeprefix("target_")  # the targets equal the critics at step 1
            if source in t:
                param.copy_(t[source])
            else:
                assert name == "log_alpha_prime", f"the recording has no {name}"  # recorded only with Lagrange on
    return agent, args


def agent_params(agent) -> dict[str, torch.Tensor]:
    """The agent's parameters under their official names, as views in the official [out, in] layout (copying into
    one writes the agent's parameter); log_alpha_prime is included even where the recording has none."""
    actor = agent.actor
    views = {f"policy.layers.{i}.{k}": getattr(layer, k) for i, layer in enumerate(actor.layers) for k in ("weight", "bias")}
    views["policy.log_std_multiplier"], views["policy.log_std_offset"] = actor.log_std_multiplier, actor.log_std_offset
    for prefix, critics in (("", agent.qf), ("target_", agent.qf_target)):
        for i, (w, b) in enumerate(zip(critics.weights, critics.biases)):
            for k in range(2):
                views[f"{prefix}qf{k + 1}.layers.{i}.weight"] = w[k].T
                views[f"{prefix}qf{k + 1}.layers.{i}.bias"] = b[k, 0]
    views["log_alpha"], views["log_alpha_prime"] = agent.log_alpha, agent.log_alpha_prime
    return views
