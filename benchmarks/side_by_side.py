"""Updates/s of the scripts' train step and of d3rlpy's CalQL on the same workload, side by side in one process.

    ~/venvs/d3rlpy/bin/python benchmarks/side_by_side.py                       # W-antmaze and Adroit shapes, 2 threads
    ~/venvs/d3rlpy/bin/python benchmarks/side_by_side.py --modes eager compile --rounds 5 --steps 20

d3rlpy is no dependency of the scripts: install it in its own environment (docs/performance-cpu.md); in a Python
without it, only the scripts' modes are timed. The systems take turns (ours, d3rlpy, ours, d3rlpy, ...) for --rounds
rounds of --steps timed updates each, so a machine shared with other jobs slows them alike; every line carries the
machine's state (threads, load averages), and the summary gives the median over rounds and the ratio to d3rlpy.
Each figure comes twice: updates per wall-clock second, and updates per second of this process's CPU time, which
other jobs on the machine disturb much less (with one thread it is the cost of an update on a free core).

d3rlpy does the same work: the same networks (2 critics), batch, learning rates, 10 sampled actions per set,
importance sampling, max-target backup, the Lagrange multiplier (alpha threshold) where the workload has it, and
samples its batches from the same resident synthetic buffer. Its step is `impl.update` on that batch.
"""

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from update_throughput import Workload, continuous_step, synthetic_buffer, time_updates, workload_args  # noqa: E402

@dataclass
class Args(Workload):
    modes: list[Literal["eager", "compile"]] = field(default_factory=lambda: ["eager"])
    """the scripts' modes to time (eager: the default path; compile: --compile)"""
    rounds: int = 3
    """alternating rounds; the summary is the median over them"""
    threads: int = 2
    """torch intra-op threads, for every system"""


def d3rlpy_step(args: Args, name: str, device: torch.device):
    """d3rlpy's CalQL configured to do the scripts' work on the workload; one call is one update."""
    import d3rlpy
    from d3rlpy.models.encoders import VectorEncoderFactory
    from d3rlpy.torch_utility import TorchMiniBatch

    obs_dim, action_dim, a = workload_args(args, name, {})
    if not a.cql_importance_sample:
        raise SystemExit(f"error: workload {name} turns importance sampling off, which d3rlpy's CalQL always does")
    config = d3rlpy.algos.CalQLConfig(
        actor_encoder_factory=VectorEncoderFactory(a.policy_hidden), critic_encoder_factory=VectorEncoderFactory(a.q_hidden),
        batch_size=a.batch_size, gamma=a.gamma, tau=a.tau, n_critics=2, n_action_samples=a.cql_n_actions,
        max_q_backup=True, soft_q_backup=False, actor_learning_rate=a.policy_lr, temp_learning_rate=a.policy_lr,
        critic_learning_rate=a.q_lr, conservative_weight=a.cql_weight,
        # the scripts' alpha' * weight * (gap - target) with alpha' tuned from e; without Lagrange alpha' = 1
        alpha_learning_rate=a.q_lr if a.cql_lagrange else 0.0, initial_alpha=math.e if a.cql_lagrange else 1.0,
        alpha_threshold=a.cql_target_action_gap if a.cql_lagrange else 0.0,
    )
    d3rlpy_device = f"{device.type}:0"
    algo = config.create(device=d3rlpy_device)
    algo.create_impl((obs_dim,), action_dim)
    buffer, steps_done = synthetic_buffer(obs_dim, action_dim, device), 0

    def step() -> dict:
        nonlocal steps_done
        b = {k: v if v.dim() > 1 else v.unsqueeze(-1) for k, v in buffer.sample(a.batch_size).items()}  # d3rlpy: [B, 1]
        batch = TorchMiniBatch(
            observations=b["obs"], actions=b["actions"], rewards=b["rewards"], next_observations=b["next_obs"],
            next_actions=b["actions"], returns_to_go=b["mc_returns"], terminals=b["terminals"],
            intervals=torch.ones_like(b["rewards"]), device=d3rlpy_device)
        steps_done += 1
        return {k: torch.tensor(v) for k, v in algo.impl.update(batch, steps_done).items()}

    return step


def format_rates(wall_rate: float, cpu_rate: float) -> str:
    return f"{wall_rate:8.2f} updates/s {cpu_rate:8.2f} per CPU-s"


def machine_state() -> str:
    return f"threads {torch.get_num_threads()}, load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def d3rlpy_version() -> str | None:
    try:
        import d3rlpy
    except ImportError:
        return None
    return d3rlpy.__version__


def side_by_side(args: Args, name: str, device: torch.device, with_d3rlpy: bool):
    """Build every system, warm each up, then time them in turns; print each round and the medians."""
    systems = {f"ours {mode}": continuous_step(args, name, device, {"compile": mode == "compile"}) for mode in args.modes}
    if with_d3rlpy:
        systems["d3rlpy"] = d3rlpy_step(args, name, device)
    for step in systems.values():
        time_updates(step, replace(args, warmup=0, steps=args.warmup), device)
    rates = {system: [] for system in systems}
    for round_ in range(1, args.rounds + 1):
        for system, step in systems.items():
            cpu_start = time.process_time()
            wall_rate = time_updates(step, replace(args, warmup=0), device)[0]
            rates[system].append((wall_rate, args.steps / (time.process_time() - cpu_start)))
            print(f"{name:10s} round {round_}  {system:12s} {format_rates(*rates[system][-1])}   {machine_state()}", flush=True)
    medians = {system: [statistics.median(column) for column in zip(*r)] for system, r in rates.items()}
    for system, median in medians.items():
        ratio = ""
        if "d3rlpy" in medians and system != "d3rlpy":
            ratio = "   ratio to d3rlpy " + " and ".join(f"{ours / theirs:.2f}x" for ours, theirs in zip(median, medians["d3rlpy"]))
        print(f"{name:10s} median       {system:12s} {format_rates(*median)}{ratio}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if "atari" in args.workloads:
        raise SystemExit("error: d3rlpy's CalQL is for continuous actions; choose --workloads among W-antmaze, adroit, custom")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {machine_state()}, {args.rounds} rounds of {args.steps} updates")
    version = d3rlpy_version()
    if version is None:
        print(f"d3rlpy skipped: not installed in {sys.executable}; install it in its own venv (docs/performance-cpu.md)")
    else:
        print(f"d3rlpy {version}")
    for name in args.workloads:
        side_by_side(args, name, device, with_d3rlpy=version is not None)
