"""Resumable runs: a run stopped by a signal (what SLURM sends before preemption or the time limit) and started again
ends exactly as the same run done in one go: same parameters, same logged values, no duplicate TensorBoard points."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, run_outcome, script_env

CONTINUOUS = [*TINY, "--offline-steps", "150", "--offline-eval-every", "50", "--online-env-steps", "900", "--online-eval-every", "300",
              "--eval-episodes", "1", "--checkpoint-every", "100"]
ATARI = ["--dataset-size", "300", "--offline-steps", "150", "--offline-eval-every", "50", "--online-env-steps", "600", "--max-episode-steps", "40",
         "--online-eval-every", "200", "--eval-episodes", "1", "--batch-size", "8", "--log-every", "5", "--target-update-period", "10", "--checkpoint-every", "100"]


def start(script, cwd, *flags):
    return subprocess.Popen([sys.executable, str(REPO / script), *flags], cwd=cwd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_when(proc, path, sig=signal.SIGUSR1):
    """Send `sig` as soon as `path` exists; the run must then save its state and exit with status 75."""
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.communicate()[1][-2000:]}"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "state saved to" in err.strip().splitlines()[-1]
    return out


@pytest.mark.parametrize("script", ["cal_ql_continuous.py", "cal_ql_atari.py"])
def test_run_stopped_in_both_phases_and_resumed_equals_the_run_done_in_one_go(script, run_script, pointmaze_data_dir, tmp_path):
    flags = ATARI if script == "cal_ql_atari.py" else ["--dataset-dir", pointmaze_data_dir, *CONTINUOUS]
    run_script(script, *flags, "--run-name", "whole")

    run_dir = tmp_path / "runs" / "stopped"
    stop_when(start(script, tmp_path, *flags, "--run-name", "stopped"), run_dir)  # during pre-training (SIGUSR1)
    assert not (run_dir / "pretrained.pt").exists() and (run_dir / "checkpoint.pt").exists()
    out = stop_when(start(script, tmp_path, *flags, "--run-name", "stopped"), run_dir / "pretrained.pt", signal.SIGTERM)  # online
    assert "resuming stopped from gradient step" in out
    out = run_script(script, *flags, "--run-name", "stopped").stdout
    assert "(online," in out.split("resuming stopped from gradient step")[1].splitlines()[0]

    (whole, whole_params), (resumed, resumed_params) = run_outcome(tmp_path / "runs" / "whole"), run_outcome(run_dir)
    assert resumed == whole
    assert resumed_params.keys() == whole_params.keys()
    for key in whole_params:
        assert torch.equal(resumed_params[key], whole_params[key]), key
    assert (run_dir / "finished.json").exists() and not (run_dir / "checkpoint.pt").exists()
    assert "run stopped is already finished" in run_script(script, *flags, "--run-name", "stopped").stdout
