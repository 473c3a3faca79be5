"""benchmarks/update_throughput.py runs the scripts' own train steps and prints one line per configuration;
benchmarks/side_by_side.py times them in turns with d3rlpy's CalQL where d3rlpy is installed."""

import re

import torch

TINY_SHAPES = ["--obs-dim", "3", "--action-dim", "2", "--policy-hidden", "8", "--q-hidden", "8", "--batch-size", "8", "--steps", "2", "--warmup", "1"]
TINY = ["--workloads", "custom", "atari", *TINY_SHAPES]


def test_benchmark_prints_one_measured_line_per_workload_and_mode(run_script):
    lines = run_script("benchmarks/update_throughput.py", *TINY, "--modes", "eager", "cudagraphs").stdout.strip().splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["custom", "eager"], ["custom", "cudagraphs"], ["atari", "eager"], ["atari", "cudagraphs"]]
    for line in lines:
        if "cudagraphs" in line and not torch.cuda.is_available():
            assert "skipped: CUDA graphs need a CUDA device" in line
        else:
            assert float(re.search(r"([\d.]+) updates/s", line).group(1)) > 0 and "peak memory" in line


def test_benchmark_reports_a_broken_configuration_and_goes_on(run_script):
    """Each configuration that raises prints its error on its own line; the rest still run; the exit status is 1.
    (The meta device holds no data, so every step breaks there.)"""
    proc = run_script("benchmarks/update_throughput.py", *TINY, "--device", "meta", check=False)
    lines = proc.stdout.strip().splitlines()[1:]
    assert proc.returncode == 1
    assert [line.split()[:4] for line in lines] == [["custom", "eager", "meta", "FAILED:"], ["atari", "eager", "meta", "FAILED:"]]


def test_side_by_side_alternates_rounds_and_prints_medians_with_the_machine_state(run_script):
    """In a Python without d3rlpy (the tests' own) the d3rlpy side is skipped with one line; ours still runs."""
    out = run_script("benchmarks/side_by_side.py", "--workloads", "custom", *TINY_SHAPES, "--rounds", "2", "--threads", "1").stdout
    lines = out.strip().splitlines()
    try:
        import d3rlpy  # noqa: F401

        systems = ["ours eager", "d3rlpy"]
    except ImportError:
        assert lines[1].startswith("d3rlpy skipped: not installed in") and "docs/performance-cpu.md" in lines[1]
        systems = ["ours eager"]
    rate = r"([\d.]+) updates/s +([\d.]+) per CPU-s"
    rounds = [line for line in lines if " round " in line]
    assert [line.split("updates/s")[0].split()[1:-1] for line in rounds] == [["round", r, *s.split()] for r in "12" for s in systems]
    assert all(re.search(rate + r" +threads 1, load [\d.]+ [\d.]+ [\d.]+$", line) for line in rounds)
    medians = [line for line in lines if " median " in line]
    assert len(medians) == len(systems) and all(min(map(float, re.search(rate, m).groups())) > 0 for m in medians)


def test_side_by_side_refuses_atari_in_one_line(run_script):
    proc = run_script("benchmarks/side_by_side.py", "--workloads", "atari", check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: d3rlpy's CalQL is for continuous actions; choose --workloads among W-antmaze, adroit, custom"


def test_matmul_rate_prints_fp32_and_bf16_per_hidden_width(run_script):
    out = run_script("benchmarks/update_throughput.py", "--matmul", "--q-hidden", "16", "8", "16", "--batch-size", "4", "--cql-n-actions", "2", "--steps", "2").stdout
    lines = out.strip().splitlines()[1:]
    assert [line.split()[:9] for line in lines] == [
        ["baddbmm", "[2,", "28,", f"{w}]", "x", "[2,", f"{w},", f"{w}]", p] for w in (8, 16) for p in ("ieee", "bf16")]
    assert all(float(re.search(r"([\d.]+) GFLOP/s$", line).group(1)) > 0 for line in lines)
