"""Resumable runs: a run stopped by a signal (what SLURM sends before preemption or the time limit) and started again
ends exactly as the same run done in one go: same parameters, same logged values, no duplicate TensorBoard points; on
PointMaze, on FrankaKitchen (whose robot draws observation noise from a generator of its own) and on Atari."""

import json
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import cal_ql_continuous as calql
from conftest import REPO, TINY, run_outcome, script_env
from utils.tasks import make_env, register_robotics_envs

CONTINUOUS = [*TINY, "--offline-steps", "150", "--offline-eval-every", "50", "--online-env-steps", "900", "--online-eval-every", "300",
              "--eval-episodes", "1", "--checkpoint-every", "100"]
# FrankaKitchen as a custom id with 50-step episodes (the task's own are 1000 steps: a minute per run here)
KITCHEN = [*CONTINUOUS, "--env-id", "FrankaKitchen-v1", "--env-kwargs", '{"max_episode_steps": 50}', "--dataset-id", "test/kitchen/random-v0",
           "--online-env-steps", "150", "--online-eval-every", "100"]
ATARI = ["--dataset-size", "300", "--offline-steps", "150", "--offline-eval-every", "50", "--online-env-steps", "600", "--max-episode-steps", "40",
         "--online-eval-every", "200", "--eval-episodes", "1", "--batch-size", "8", "--log-every", "5", "--target-update-period", "10", "--checkpoint-every", "100"]


def test_every_generator_of_an_env_is_saved_and_restored_in_place():
    env = make_env("kitchen-complete", seed=0)
    robot = env.unwrapped.robot_env.np_random  # the observation noise's, besides the env's own np_random
    found = list(calql.env_generators(env).values())
    assert any(g is robot for g in found) and any(g is env.unwrapped.np_random for g in found)
    states = calql.env_generator_states(env)
    drawn = robot.random(3)
    calql.restore_env_generators(states, env)
    assert env.unwrapped.robot_env.np_random is robot and robot.random(3).tolist() == drawn.tolist()
    with pytest.raises(SystemExit, match="error: the checkpoint holds the random state of env.gone, which this env lacks"):
        calql.restore_env_generators({**states, "env.gone": robot.bit_generator.state}, env)


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


@pytest.mark.parametrize("script, task", [("cal_ql_continuous.py", "pointmaze"), ("cal_ql_continuous.py", "kitchen"), ("cal_ql_atari.py", "freeway")])
def test_run_stopped_in_both_phases_and_resumed_equals_the_run_done_in_one_go(script, task, run_script, pointmaze_data_dir, minari_store, tmp_path):
    if task == "kitchen":
        register_robotics_envs()
        minari_store("test/kitchen/random-v0", gym.make("FrankaKitchen-v1", max_episode_steps=50), [50, 50])
    flags = {"pointmaze": ["--dataset-dir", pointmaze_data_dir, *CONTINUOUS], "kitchen": KITCHEN, "freeway": ATARI}[task]
    run_script(script, *flags, "--run-name", "whole")

    run_dir = tmp_path / "runs" / "stopped"
    stop_when(start(script, tmp_path, *flags, "--run-name", "stopped"), run_dir)  # during pre-training (SIGUSR1)
    assert not (run_dir / "pretrained.pt").exists() and (run_dir / "checkpoint.pt").exists()
    out = stop_when(start(script, tmp_path, *flags, "--run-name", "stopped"), run_dir / "pretrained.pt", signal.SIGTERM)  # online
    assert "resuming stopped from gradient step" in out
    out = run_script(script, *flags, "--run-name", "stopped").stdout
    assert "(online," in out.split("resuming stopped from gradient step")[1].splitlines()[0]

    (whole, whole_params), (resumed, resumed_params) = run_outcome(tmp_path / "runs" / "whole"), run_outcome(run_dir)
    np.testing.assert_equal(resumed, whole)  # NaN equals NaN: a custom id has no normalized score
    assert resumed_params.keys() == whole_params.keys()
    for key in whole_params:
        assert torch.equal(resumed_params[key], whole_params[key]), key
    assert (run_dir / "finished.json").exists() and not (run_dir / "checkpoint.pt").exists()
    assert "run stopped is already finished" in run_script(script, *flags, "--run-name", "stopped").stdout


def test_tracked_run_resumed_continues_its_wandb_run_and_its_provenance(pointmaze_data_dir, tmp_path, monkeypatch):
    """W&B offline: the start that was stopped and the one that resumed log to one W&B run (the same id), and
    provenance.json holds a record of each start, of this checkout's commit."""
    flags = ["--dataset-dir", pointmaze_data_dir, *TINY, "--offline-steps", "20", "--online-env-steps", "0", "--eval-episodes", "1", "--track"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    for start_no in (1, 2):  # each start's W&B files in a folder of its own
        (tmp_path / f"wandb{start_no}").mkdir()
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"wandb{start_no}"))
        proc = start("cal_ql_continuous.py", tmp_path, *flags, "--run-name", "tracked")
        if start_no == 1:
            stop_when(proc, tmp_path / "runs" / "tracked")
        else:
            err = proc.communicate(timeout=300)[1]
            assert proc.returncode == 0 and (tmp_path / "runs" / "tracked" / "finished.json").exists(), err[-2000:]
    ids = [folder.name.rsplit("-", 1)[1] for start_no in (1, 2) for folder in (tmp_path / f"wandb{start_no}" / "wandb").glob("offline-run-*")]
    assert len(ids) == 2 and ids[0] == ids[1]

    records = json.loads((tmp_path / "runs" / "tracked" / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert [r["commit"] for r in records] == [head.stdout.strip() if head.returncode == 0 else "unknown"] * 2
    assert records[0]["start_time"] <= records[1]["start_time"] and records[0]["args"]["track"] is True


def test_fine_tuning_starts_from_a_checkpoint_file_too(run_script, pointmaze_data_dir, tmp_path):
    """--pretrained-checkpoint takes a stopped run's checkpoint.pt, whose gradient-step count is in its progress, as it
    takes pretrained.pt (tests/test_scripts.py) and final.pt (the same format)."""
    flags = ["--dataset-dir", pointmaze_data_dir, *CONTINUOUS]
    checkpoint = tmp_path / "runs" / "stopped" / "checkpoint.pt"
    stop_when(start("cal_ql_continuous.py", tmp_path, *flags, "--run-name", "stopped"), checkpoint)  # the first, at step 100
    steps = torch.load(checkpoint, weights_only=False)["progress"]["global_step"]
    out = run_script("cal_ql_continuous.py", *flags, "--pretrained-checkpoint", str(checkpoint), "--online-env-steps", "0").stdout
    assert steps >= 100 and f"fine-tuning {checkpoint} (pre-trained for {steps} gradient steps)" in out
