"""Fixtures that write datasets in their real on-disk formats, and a runner for the scripts."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from utils.datasets import collect_pointmaze_dataset, make_env, register_robotics_envs, write_d4rl_hdf5

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def d4rl_file(tmp_path):
    """Write a D4RL-format HDF5 file from arrays; returns its path."""

    def write(name="data.hdf5", **arrays):
        path = str(tmp_path / name)
        write_d4rl_hdf5(path, arrays)
        return path

    return write


@pytest.fixture
def minari_pointmaze(tmp_path, monkeypatch):
    """A two-episode Minari dataset recorded on the embedded PointMaze env (dict observations), in a temp store."""
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    register_robotics_envs()
    env = gym.make("PointMaze_UMaze-v3", continuing_task=False, max_episode_steps=5)
    rng, episodes = np.random.default_rng(0), []
    for seed in range(2):
        obs, _ = env.reset(seed=seed)
        buffer = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(buffer, (obs, action, reward, terminated, truncated)):
                buffer[key].append(value)
            done = terminated or truncated
        frames = buffer.pop("observations")
        observations = {k: np.stack([o[k] for o in frames]) for k in obs}
        episodes.append(EpisodeBuffer(id=seed, observations=observations, **buffer))
    minari.create_dataset_from_buffers("test/pointmaze/random-v0", episodes, env=env, algorithm_name="random", author="tests", author_email="tests@example.com", eval_env=env, description="test data")
    return "test/pointmaze/random-v0", episodes


@pytest.fixture(scope="session")
def pointmaze_data_dir(tmp_path_factory):
    """The embedded task's dataset, collected once per test session (a smaller one than the default)."""
    folder = tmp_path_factory.mktemp("datasets")
    collect_pointmaze_dataset(str(folder / "pointmaze-umaze.hdf5"), n_transitions=5_000)
    return str(folder)


TINY = ["--policy-hidden", "16", "16", "--q-hidden", "16", "16", "--batch-size", "32", "--cql-n-actions", "3", "--log-every", "5"]


@pytest.fixture
def run_script(tmp_path):
    """Run a script of the repo in a temp working directory (runs/ lands there); returns the finished process."""

    def run(script, *flags, check=True):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny networks: threads only add overhead
        proc = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture
def atari_replay_logs(tmp_path):
    """Write DQN Replay Dataset checkpoints into tmp_path/replay_logs: each array np.save'd through gzip as
    $store$_<name>_ckpt.<N>.gz (observation uint8 [n,84,84], action int32, reward float32, terminal uint8 [n]);
    returns the folder."""
    import gzip

    folder = tmp_path / "replay_logs"

    def write(ckpt=0, **arrays):
        folder.mkdir(exist_ok=True)
        for name, array in arrays.items():
            with gzip.open(folder / f"$store$_{name}_ckpt.{ckpt}.gz", "wb") as f:
                np.save(f, array)
        return folder

    return write
