"""Gradient updates per second of the scripts' offline update, on synthetic data (no environment).

    python benchmarks/update_throughput.py                                  # W-antmaze and Adroit shapes, eager
    python benchmarks/update_throughput.py --workloads W-antmaze --modes eager compile
    python benchmarks/update_throughput.py --workloads custom --obs-dim 17 --action-dim 6 --q-hidden 256 256
    python benchmarks/update_throughput.py --workloads atari                # cal_ql_atari.py's update
    python benchmarks/update_throughput.py --data                           # MC labelling and D4RL loading of 1M

Each line: workload, mode, device, updates/s over --steps timed updates (warm-up and compilation excluded and
reported separately), and peak memory (GPU: max allocated; CPU: the process's max resident set so far).
"""

import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cal_ql_atari  # noqa: E402
import cal_ql_continuous as calql  # noqa: E402
from utils.datasets import load_d4rl_hdf5, write_d4rl_hdf5  # noqa: E402

WORKLOADS = {  # name -> (obs_dim, action_dim, Args overrides)
    # CORL's AntMaze shapes, so results compare with its Cal-QL: policy 3x256, critics 5x256, Lagrange on
    "W-antmaze": (29, 8, dict(policy_hidden=[256] * 3, q_hidden=[256] * 5, cql_lagrange=True, cql_target_action_gap=0.8)),
    # the official Adroit-binary shapes (spec §6)
    "adroit": (45, 24, dict(policy_hidden=[512] * 2, q_hidden=[512] * 3, cql_weight=1.0)),
}


@dataclass
class Args:
    workloads: list[str] = field(default_factory=lambda: ["W-antmaze", "adroit"])
    """named workloads: W-antmaze, adroit, custom (the shape flags below), atari (cal_ql_atari.py, batch 32)"""
    modes: list[Literal["eager", "compile"]] = field(default_factory=lambda: ["eager"])
    """eager: the scripts' default path; compile: torch.compile of the same update function (--compile)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """where to run"""
    steps: int = 20
    """timed updates per configuration"""
    warmup: int = 3
    """untimed updates first (compilation happens here)"""
    batch_size: int = 256
    """transitions per update (continuous workloads)"""
    cql_n_actions: int = 10
    """sampled actions per set"""
    obs_dim: int = 29
    """custom workload: observation size"""
    action_dim: int = 8
    """custom workload: action size"""
    policy_hidden: list[int] = field(default_factory=lambda: [256, 256])
    """custom workload: actor widths"""
    q_hidden: list[int] = field(default_factory=lambda: [256, 256])
    """custom workload: critic widths"""
    data: bool = False
    """instead: time MC labelling of 1M transitions and loading a synthetic 1M-transition D4RL HDF5 file"""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def continuous_step(args: Args, name: str, device: torch.device, compiled: bool):
    """A closure doing one update of cal_ql_continuous.py on a resident synthetic dataset."""
    obs_dim, action_dim, overrides = WORKLOADS.get(name, (args.obs_dim, args.action_dim, {}))
    if name == "custom":
        overrides = dict(policy_hidden=args.policy_hidden, q_hidden=args.q_hidden)
    script_args = replace(calql.Args(), batch_size=args.batch_size, cql_n_actions=args.cql_n_actions, **overrides)
    n = 100_000
    buffer = calql.ReplayBuffer(n, obs_dim, action_dim, device)
    rng = np.random.default_rng(0)
    buffer.add({"obs": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, action_dim)),
                "rewards": rng.choice([-5.0, 5.0], n), "next_obs": rng.normal(size=(n, obs_dim)),
                "terminals": rng.random(n) < 0.01, "mc_returns": rng.uniform(-500, 5, n)})
    agent = calql.Agent(obs_dim, action_dim, script_args).to(device)
    optimizer = agent.make_optimizer(script_args)
    update = torch.compile(calql.update) if compiled else calql.update

    def step():
        noise = calql.draw_noise(script_args.batch_size, script_args.cql_n_actions, action_dim, device)
        return update(agent, optimizer, buffer.sample(script_args.batch_size), noise, script_args)

    return step


def atari_step(args: Args, device: torch.device, compiled: bool):
    """A closure doing one update of cal_ql_atari.py (Nature CNN, batch 32 of 4x84x84 stacks)."""
    script_args = cal_ql_atari.Args()
    n, rng = 10_000, np.random.default_rng(0)
    store = cal_ql_atari.FrameStore(
        frames=rng.integers(0, 255, (n, 84, 84), dtype=np.uint8), actions=rng.integers(0, 6, n),
        rewards=rng.choice([0.0, 1.0], n).astype(np.float32), terminals=rng.random(n) < 0.001,
        episode_ends=rng.random(n) < 0.001, mc_returns=rng.uniform(0, 10, n).astype(np.float32))
    qf, qf_target = cal_ql_atari.QNetwork(6).to(device), cal_ql_atari.QNetwork(6).to(device)
    optimizer = torch.optim.Adam(qf.parameters(), lr=script_args.learning_rate, eps=0.01 / 32)
    update = torch.compile(cal_ql_atari.update) if compiled else cal_ql_atari.update

    def step():
        batch = cal_ql_atari.to_torch(store.sample(script_args.batch_size, rng), device)
        return update(qf, qf_target, optimizer, batch, script_args)

    return step


def time_updates(step, args: Args, device: torch.device) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(args.warmup):
        metrics = step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = step()
    torch.stack(list(metrics.values())).cpu()  # the queue drains before the clock stops
    synchronize(device)
    return args.steps / (time.perf_counter() - start), warmup_s


def benchmark_data():
    """MC labelling and D4RL-HDF5 loading of 1M transitions (AntMaze-like shapes)."""
    n, rng = 1_000_000, np.random.default_rng(0)
    rewards, terminals, ends = rng.choice([-5.0, 5.0], n, p=[0.99, 0.01]), rng.random(n) < 0.001, rng.random(n) < 0.001
    start = time.perf_counter()
    calql.calc_mc_returns(rewards, terminals, ends, 0.99, failure_reward=-5.0)
    print(f"calc_mc_returns, 1M transitions: {time.perf_counter() - start:.3f} s")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "synthetic.hdf5")
        write_d4rl_hdf5(path, {"observations": rng.normal(size=(n, 29)).astype(np.float32),
                               "actions": rng.uniform(-1, 1, (n, 8)).astype(np.float32),
                               "rewards": (rng.random(n) < 0.01).astype(np.float32),
                               "terminals": rng.random(n) < 0.001, "timeouts": rng.random(n) < 0.001})
        start = time.perf_counter()
        load_d4rl_hdf5(path)
        print(f"load_d4rl_hdf5, 1M transitions (obs 29, action 8, gzip): {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.data:
        benchmark_data()
        sys.exit()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    for name in args.workloads:
        for mode in args.modes:
            torch.manual_seed(0)
            compiled = mode == "compile"
            step = atari_step(args, device, compiled) if name == "atari" else continuous_step(args, name, device, compiled)
            updates_per_s, warmup_s = time_updates(step, args, device)
            print(f"{name:10s} {mode:8s} {device.type:5s} {updates_per_s:9.1f} updates/s   "
                  f"warm-up {args.warmup} steps {warmup_s:6.1f} s   peak memory {peak_memory_mb(device):8.0f} MB")
