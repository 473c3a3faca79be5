"""Evaluate a saved agent: N episodes of its evaluation policy on its run's task, with 95% intervals.

    python benchmarks/evaluate.py runs/NAME                    # the run's latest agent: final.pt, checkpoint.pt or pretrained.pt
    python benchmarks/evaluate.py runs/NAME/pretrained.pt --episodes 100 --seed 7 --capture-video

The agent is rebuilt from the arguments saved with it, by the script that saved it (cal_ql_continuous.py,
cql_continuous.py or cal_ql_atari.py), and plays on the environment that script makes for its task: the continuous
scripts' deterministic policy tanh(mean), the Atari script's --eval-epsilon-greedy one. Episode i starts from seed + i,
by default the run's own evaluation seed, so `--episodes` equal to the run's --eval-episodes repeats its evaluation of
that agent (continuous scripts). The offline data is not needed. docs/provenance.md says more.
"""

import importlib
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts and utils/, wherever this is started from
from benchmarks.report import mean_ci  # noqa: E402
from utils.evaluation import deterministic, epsilon_greedy, evaluate  # noqa: E402
from utils.validation import DatasetError  # noqa: E402

AGENT_FILES = ("final.pt", "checkpoint.pt", "pretrained.pt")  # a run folder's agents, latest first
SCRIPTS = ("cal_ql_continuous", "cql_continuous", "cal_ql_atari")
HINT = "give a run folder (runs/NAME) or an agent file a script saved in one (final.pt, checkpoint.pt, pretrained.pt)"


@dataclass
class Args:
    path: tyro.conf.Positional[Path]
    """a run folder (its final.pt, else checkpoint.pt, else pretrained.pt is evaluated) or one of those agent files"""
    episodes: int = 50
    """evaluation episodes"""
    seed: int | None = None
    """episode i starts from seed + i (default: the run's own evaluation seed, as its logged evaluations)"""
    capture_video: bool = False
    """record every episode to videos/{run folder name}-eval/ (needs moviepy; MuJoCo tasks also a GL backend)"""
    action_scale: float = 1.0
    """continuous agents: play every action times this (a screen of how forgiving a task is: docs/effect.md)"""
    action_noise: float = 0.0
    """continuous agents: add Gaussian noise of this standard deviation to every action (kept in [-1, 1])"""


def load_agent_file(path: Path) -> tuple[Path, dict]:
    """The agent file at `path` (or the latest one in the run folder `path`) and what it holds."""
    if path.is_dir():
        found = [path / name for name in AGENT_FILES if (path / name).is_file()]
        if not found:
            raise SystemExit(f"error: {path} holds no agent file ({', '.join(AGENT_FILES)}): {HINT}")
        path = found[0]
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: {HINT}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (anything can be in a file that is not a torch file)
        raise SystemExit(f"error: {path} is not a torch file ({type(e).__name__}): {HINT}")
    if not (isinstance(saved, dict) and isinstance(saved.get("args"), dict) and ("agent" in saved or "qf" in saved)):
        raise SystemExit(f"error: {path} holds no agent saved by the scripts (no 'args' and 'agent' or 'qf'): {HINT}")
    return path, saved


def continuous_agent(module, args, saved: dict, render_mode: str | None) -> tuple:
    """cal_ql_continuous.py / cql_continuous.py: the task's env, the deterministic policy tanh(mean), the evaluation seed
    of the run, the task's reference returns."""
    task = module.get_task(args.env_id, args.dataset_path, args.dataset_id)
    env = module.make_env(args.env_id, args.seed, render_mode, args.env_kwargs)
    agent = module.Agent(env.observation_space.shape[0], env.action_space.shape[0], args)
    agent.load_state_dict(saved["agent"])
    return env, lambda seed: deterministic(agent.actor.act, torch.device("cpu")), args.seed + 1_000_000, task.ref_min_score, task.ref_max_score


def atari_agent(module, args, saved: dict, render_mode: str | None) -> tuple:
    """cal_ql_atari.py: its evaluation env and frame stack, the --eval-epsilon-greedy policy, its evaluation seed."""
    env = module.make_env(args.env_id, args.seed + 1, args.max_episode_steps, render_mode)
    env = gym.wrappers.FrameStackObservation(env, module.FRAME_STACK, padding_type="zero")
    qf = module.QNetwork(env.action_space.n)
    qf.load_state_dict(saved["qf"])
    return env, lambda seed: epsilon_greedy(qf.act, env.action_space.n, args.eval_epsilon, np.random.default_rng(seed)), args.seed + 1, None, None


def saving_script(saved: dict) -> tuple:
    """The script that saved the agent (its module) and the Args saved with it, as that script's Args."""
    exp_name = saved["args"].get("exp_name")
    module = importlib.import_module(exp_name if exp_name in SCRIPTS else "cal_ql_atari" if "qf" in saved else "cal_ql_continuous")
    return module, replace(module.Args(), **{f.name: saved["args"][f.name] for f in fields(module.Args) if f.name in saved["args"]})


def rebuild(saved: dict, render_mode: str | None) -> tuple:
    """The Args saved with the agent (`saving_script`), then what `continuous_agent` or `atari_agent` returns."""
    module, args = saving_script(saved)
    try:
        return args, *(atari_agent if "qf" in saved else continuous_agent)(module, args, saved, render_mode)
    except (DatasetError, gym.error.Error, ImportError) as e:
        raise SystemExit(f"error: the agent's task {args.env_id} cannot be made here ({str(e).splitlines()[0]}); install what it needs (docs/tasks.md)")
    except RuntimeError as e:  # load_state_dict: other network sizes or spaces; its first mismatch
        mismatch = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise SystemExit(f"error: the agent does not fit {args.env_id} as made here ({mismatch}); use the code that trained it")


def run_episodes(args: Args) -> tuple[str, dict[str, np.ndarray]]:
    """Play the episodes; returns a line saying what was evaluated, and each metric per episode."""
    if args.episodes < 1:
        raise SystemExit(f"error: --episodes {args.episodes}: evaluate at least 1 episode (50 by default)")
    path, saved = load_agent_file(args.path)
    run_args, env, make_policy, run_seed, ref_min, ref_max = rebuild(saved, "rgb_array" if args.capture_video else None)
    if args.capture_video:
        env = gym.wrappers.RecordVideo(env, f"videos/{path.parent.name}-eval", episode_trigger=lambda i: True)
    seed = run_seed if args.seed is None else args.seed
    policy = make_policy(seed)
    if (args.action_scale, args.action_noise) != (1.0, 0.0):
        if "qf" in saved:
            raise SystemExit("error: --action-scale and --action-noise perturb continuous actions; the Atari agent's are discrete")
        policy = perturbed(policy, args.action_scale, args.action_noise, np.random.default_rng(seed))
    results = [evaluate(env, policy, 1, seed + i, ref_min, ref_max) for i in range(args.episodes)]
    env.close()
    step = saved.get("global_step", saved.get("progress", {}).get("global_step"))
    about = (f"{path}: {run_args.exp_name} on {run_args.env_id} (seed {run_args.seed}) after {step} gradient steps; "
             f"{args.episodes} episodes from seed {seed}"
             + (f"; actions x{args.action_scale:g} + noise {args.action_noise:g}" if (args.action_scale, args.action_noise) != (1.0, 0.0) else ""))
    names = ("return", "normalized_score", "length") if "qf" in saved else ("success_rate", "return", "normalized_score", "length")
    return about, {name: np.array([r[name] for r in results]) for name in names}  # Atari games report no success


def perturbed(policy, scale: float, noise: float, rng: np.random.Generator):
    """A continuous policy whose actions are scaled by `scale`, plus Gaussian noise of std `noise`, kept in [-1, 1]."""

    def act(obs):
        action = scale * policy(obs)
        return np.clip(action + rng.normal(0.0, noise, action.shape), -1.0, 1.0).astype(np.float32)

    return act


def summary(about: str, per_episode: dict[str, np.ndarray]) -> str:
    """The mean of each metric and its 95% Student-t interval over the episodes."""
    lines = [about, "mean [95% t-interval over episodes]:"]
    for name, values in per_episode.items():
        mean, low, high = mean_ci(values)
        value = "- (the task has no reference returns)" if np.isnan(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"
        lines.append(f"  {name.replace('_', ' '):<17} {value}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(*run_episodes(tyro.cli(Args))))
