#!/usr/bin/env bash
# Every GPU check of the fast path in one run, the headline figure first so that a run cut short still yields it:
# 1. W-antmaze updates/s in all four modes (the target: >= 750 on an H200 for the fastest);
# 2. the tests that skip without CUDA: each fast mode gives the losses and parameters of eager;
# 3. the Adroit and Atari shapes.
# Usage: bash benchmarks/gpu_checks.sh [LOG]   (LOG also receives everything printed)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 benchmarks/update_throughput.py --workloads W-antmaze --modes eager compile cudagraphs compile+cudagraphs --steps 1000
    python3 -m pytest -q -rs tests/test_losses.py tests/test_atari.py -k "fast_train_step or reads_nothing"
    python3 benchmarks/update_throughput.py --workloads adroit atari --modes eager compile cudagraphs compile+cudagraphs --steps 500
} 2>&1 | tee "${1:-/dev/null}"
