"""benchmarks/update_throughput.py runs the scripts' own train steps and prints one line per configuration."""

import re

import torch


def test_benchmark_prints_one_measured_line_per_workload_and_mode(run_script):
    flags = ["--workloads", "custom", "atari", "--obs-dim", "3", "--action-dim", "2", "--policy-hidden", "8",
             "--q-hidden", "8", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--modes", "eager", "cudagraphs"]
    lines = run_script("benchmarks/update_throughput.py", *flags).stdout.strip().splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["custom", "eager"], ["custom", "cudagraphs"], ["atari", "eager"], ["atari", "cudagraphs"]]
    for line in lines:
        if "cudagraphs" in line and not torch.cuda.is_available():
            assert "skipped: CUDA graphs need a CUDA device" in line
        else:
            assert float(re.search(r"([\d.]+) updates/s", line).group(1)) > 0 and "peak memory" in line
