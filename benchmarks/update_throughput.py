"""Gradient updates per second of the scripts' offline update, on synthetic data (no environment).

    python benchmarks/update_throughput.py                                  # W-antmaze and Adroit shapes, eager
    python benchmarks/update_throughput.py --workloads W-antmaze --modes eager compile
    python benchmarks/update_throughput.py --modes eager compile cudagraphs compile+cudagraphs   # on a GPU
    python benchmarks/update_throughput.py --workloads custom --obs-dim 17 --action-dim 6 --q-hidden 256 256
    python benchmarks/update_throughput.py --workloads atari                # cal_ql_atari.py's update
    python benchmarks/update_throughput.py --data                           # MC labelling and D4RL loading of 1M

Each mode is the scripts' own code path: the `make_train_step` of cal_ql_continuous.py / cal_ql_atari.py with the
flags --compile and --cudagraphs, so what is timed is what the scripts run. Each line: workload, mode, device,
updates/s over --steps timed updates (warm-up, compilation and graph capture excluded and reported separately), and
peak memory (GPU: max allocated; CPU: the process's max resident set so far).
"""

import gc
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
class Workload:
    """What is timed: shared by this benchmark and benchmarks/side_by_side.py."""

    workloads: list[Literal["W-antmaze", "adroit", "custom", "atari"]] = field(default_factory=lambda: ["W-antmaze", "adroit"])
    """named workloads: W-antmaze, adroit, custom (the shape flags below), atari (cal_ql_atari.py, batch 32)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """where to run"""
    steps: int = 20
    """timed updates per configuration"""
    warmup: int = 5
    """untimed updates first (compilation, and the 3 eager steps and capture of --cudagraphs, happen here)"""
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


@dataclass
class Args(Workload):
    modes: list[Literal["eager", "compile", "cudagraphs", "compile+cudagraphs"]] = field(default_factory=lambda: ["eager"])
    """eager: the scripts' default path; compile: --compile; cudagraphs: --cudagraphs (GPU only); compile+cudagraphs: both"""
    tf32: bool = True
    """GPU: TF32 matmuls, as the scripts' default --tf32"""
    data: bool = False
    """instead: time MC labelling of 1M transitions and loading a synthetic 1M-transition D4RL HDF5 file"""
    matmul: bool = False
    """instead: the rate of one hidden layer of the critics' big pass (both critics, 1 + 3N actions per state) in fp32,
    and with oneDNN's bf16 matmuls (a lower precision the scripts never use; it shows what AMX CPUs could give)"""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def workload_args(args: Workload, name: str, flags: dict) -> tuple[int, int, calql.Args]:
    """A continuous workload's observation size, action size and the scripts' Args for it."""
    obs_dim, action_dim, overrides = WORKLOADS.get(name, (args.obs_dim, args.action_dim, {}))
    if name == "custom":
        overrides = dict(policy_hidden=args.policy_hidden, q_hidden=args.q_hidden)
    return obs_dim, action_dim, replace(calql.Args(), batch_size=args.batch_size, cql_n_actions=args.cql_n_actions, **overrides, **flags)


def synthetic_buffer(obs_dim: int, action_dim: int, device: torch.device, n: int = 100_000) -> calql.ReplayBuffer:
    """The scripts' replay buffer, resident on the device, filled with random AntMaze-like transitions."""
    buffer = calql.ReplayBuffer(n, obs_dim, action_dim, device)
    rng = np.random.default_rng(0)
    buffer.add({"obs": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, action_dim)),
                "rewards": rng.choice([-5.0, 5.0], n), "next_obs": rng.normal(size=(n, obs_dim)),
                "terminals": rng.random(n) < 0.01, "mc_returns": rng.uniform(-500, 5, n)})
    return buffer


def continuous_step(args: Workload, name: str, device: torch.device, flags: dict):
    """cal_ql_continuous.py's train step (batch sampling, noise, update) on a resident synthetic dataset."""
    obs_dim, action_dim, script_args = workload_args(args, name, flags)
    buffer = synthetic_buffer(obs_dim, action_dim, device)
    agent = calql.Agent(obs_dim, action_dim, script_args).to(device)
    return calql.make_train_step(agent, agent.make_optimizer(script_args), script_args, buffer)


def atari_step(args: Args, device: torch.device, flags: dict):
    """cal_ql_atari.py's train step (Nature CNN, batch 32 of 4x84x84 stacks sampled on the CPU and copied over)."""
    script_args = replace(cal_ql_atari.Args(), **flags)
    n, rng = 10_000, np.random.default_rng(0)
    store = cal_ql_atari.FrameStore(
        frames=rng.integers(0, 255, (n, 84, 84), dtype=np.uint8), actions=rng.integers(0, 6, n),
        rewards=rng.choice([0.0, 1.0], n).astype(np.float32), terminals=rng.random(n) < 0.001,
        episode_ends=rng.random(n) < 0.001, mc_returns=rng.uniform(0, 10, n).astype(np.float32))
    qf, qf_target = cal_ql_atari.QNetwork(6).to(device), cal_ql_atari.QNetwork(6).to(device)
    optimizer = torch.optim.Adam(qf.parameters(), lr=script_args.learning_rate, eps=0.01 / 32, capturable=script_args.cudagraphs)
    train_step = cal_ql_atari.make_train_step(qf, qf_target, optimizer, script_args)
    return lambda: train_step(cal_ql_atari.to_torch(store.sample(script_args.batch_size, rng), device))


def time_updates(step, args: Workload, device: torch.device) -> tuple[float, float]:
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


def benchmark_matmul(args: Workload):
    """GFLOP/s of `baddbmm` on [2, B * (1 + 3N), width] x [2, width, width] for each distinct hidden width."""
    rows = args.batch_size * (1 + 3 * args.cql_n_actions)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for width in sorted(set(args.q_hidden)):
        x, w, b = torch.randn(2, rows, width), torch.randn(2, width, width), torch.zeros(2, 1, width)
        for precision in ("ieee", "bf16"):
            torch.backends.mkldnn.matmul.fp32_precision = precision
            for _ in range(3):
                torch.baddbmm(b, x, w)
            start = time.perf_counter()
            for _ in range(args.steps):
                torch.baddbmm(b, x, w)
            rate = 2 * x.numel() * width * args.steps / (time.perf_counter() - start) / 1e9
            print(f"baddbmm [2, {rows}, {width}] x [2, {width}, {width}]  {precision:4s}  {rate:7.1f} GFLOP/s")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.data:
        benchmark_data()
        sys.exit()
    if args.matmul:
        benchmark_matmul(args)
        sys.exit()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if args.tf32 else "ieee"
    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    failures = 0
    for name in args.workloads:
        for mode in args.modes:
            flags = {"compile": "compile" in mode, "cudagraphs": "cudagraphs" in mode}
            line = f"{name:10s} {mode:18s} {device.type:5s}"
            if flags["cudagraphs"] and device.type != "cuda":
                print(f"{line} skipped: CUDA graphs need a CUDA device")
                continue
            step = None  # free the previous configuration first, so each peak memory is its own
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            try:
                step = atari_step(args, device, flags) if name == "atari" else continuous_step(args, name, device, flags)
                updates_per_s, warmup_s = time_updates(step, args, device)
            except Exception as e:  # one broken mode must not hide the figures of the others
                failures += 1
                print(f"{line} FAILED: {type(e).__name__}: {(str(e) or '-').splitlines()[0]}")
                continue
            print(f"{line} {updates_per_s:9.1f} updates/s   "
                  f"warm-up {args.warmup} steps {warmup_s:6.1f} s   peak memory {peak_memory_mb(device):8.0f} MB")
    sys.exit(1 if failures else 0)
