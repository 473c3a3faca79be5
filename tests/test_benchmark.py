"""benchmarks/update_throughput.py runs the scripts' own train steps and prints one line per configuration."""

import re

import torch

TINY = ["--workloads", "custom", "atari", "--obs-dim", "3", "--action-dim", "2", "--policy-hidden", "8", "--q-hidden", "8",
        "--batch-size", "8", "--steps", "2", "--warmup", "1"]


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
