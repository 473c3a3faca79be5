"""Learned vs true Q on point-bridge: saved agents' Q at the bridge's start for a sweep of one action (speed a_x or
steering a_y, the other as the agent's policy chooses), and of the policy's own action across the bridge halfway
(y from edge to edge at x = 0.5; the data keeps within 0.02 of the centre line), against the true value of that
action followed by the agent's deterministic policy (a rollout without time limit, the rewards as the agent was
trained on: x scale + bias).

    python benchmarks/bridge_q.py grids/bridge/runs/point-bridge__cql_continuous__1/pretrained.pt \\
        grids/bridge/runs/point-bridge__cal_ql_continuous__1/pretrained.pt --plot docs/effect-bridge/q_true.png

Only this task allows it: its dynamics are known and deterministic, so one rollout is the true value.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts and utils/, wherever this is started from
from benchmarks.evaluate import load_agent_file, saving_script  # noqa: E402
from benchmarks.report import panels  # noqa: E402
from utils.bridge import HALF_WIDTH, PointBridge  # noqa: E402
from utils.evaluation import deterministic  # noqa: E402

GRID = np.linspace(-1, 1, 21)
SWEEPS = ("a_x (speed) at the start", "a_y (steering) at the start", "y at x = 0.5, the policy's action")
HORIZON = 400  # rollout steps; a point not across by then is counted as failing forever


@dataclass
class Args:
    agents: tyro.conf.Positional[list[Path]]
    """agent files saved by cal_ql_continuous.py or cql_continuous.py on point-bridge (pretrained.pt, final.pt, ...)"""
    plot: Path | None = None
    """also draw learned (solid) and true (dashed) Q over each sweep into this PNG"""


def true_q(policy, start: np.ndarray, action: np.ndarray, gamma: float, scale: float, bias: float) -> float:
    """The discounted return of `action` at `start`, then `policy`, rewards x scale + bias; the tail of a point not
    across within HORIZON steps is its failure reward forever, bias / (1 - gamma)."""
    env = PointBridge()
    env.reset(seed=0)
    env.pos, env.fallen = start.astype(np.float64), False
    value, discount = 0.0, 1.0
    for _ in range(HORIZON):
        obs, reward, terminated, _, _ = env.step(action)
        value, discount = value + discount * (reward * scale + bias), discount * gamma
        if terminated:
            return value
        action = policy(obs)
    return value + discount * bias / (1 - gamma)


def load(path: Path) -> tuple:
    """The agent saved in `path` and its run's Args, by the script that saved it."""
    path, saved = load_agent_file(path)
    module, args = saving_script(saved)
    if args.env_id != "point-bridge" or "agent" not in saved:
        raise SystemExit(f"error: {path} is an agent of {args.env_id}: give agents saved on point-bridge")
    agent = module.Agent(2, 2, args)
    agent.load_state_dict(saved["agent"])
    return agent, args


def sweep(agent, args, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The swept values, learned Q (the smaller critic, as the actor sees it) and true Q, for one of SWEEPS."""
    policy = deterministic(agent.actor.act, torch.device("cpu"))
    if which == SWEEPS[2]:
        values = np.linspace(-HALF_WIDTH, HALF_WIDTH, 21)
        states = np.stack([np.full_like(values, 0.5), values], 1).astype(np.float32)
        actions = np.stack([policy(s) for s in states])
    else:
        column, values = SWEEPS.index(which), GRID
        states = np.zeros((len(values), 2), np.float32)
        actions = np.repeat(policy(states[0])[None], len(values), 0).astype(np.float32)
        actions[:, column] = values
    with torch.no_grad():
        learned = agent.qf(torch.as_tensor(states), torch.as_tensor(actions)).min(0).values.numpy()
    true = np.array([true_q(policy, s, a, args.gamma, args.reward_scale, args.reward_bias) for s, a in zip(states, actions)])
    return values, learned, true


def main(cli: Args):
    curves = {}
    for path in cli.agents:
        agent, args = load(path)
        for which in SWEEPS:
            values, learned, true = curves[path, which] = sweep(agent, args, which)
            print(f"{path.parent.name}/{path.name}, {which}: learned - true at " +
                  ", ".join(f"{v:+.2f}: {q - t:+.1f}" for v, q, t in zip(values[::5], learned[::5], true[::5])))
    if cli.plot:
        fig, axes = panels(len(SWEEPS), "point-bridge: Q learned (solid) and true (dashed)")
        for ax, which in zip(axes, SWEEPS):
            for k, path in enumerate(cli.agents):
                values, learned, true = curves[path, which]
                ax.plot(values, learned, color=f"C{k}", label=f"{path.parent.name}/{path.name}")
                ax.plot(values, true, color=f"C{k}", linestyle="--")
            ax.set(xlabel=which, ylabel="Q")
        axes[0].legend(fontsize=7)
        cli.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(cli.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {cli.plot}")


if __name__ == "__main__":
    main(tyro.cli(Args))
