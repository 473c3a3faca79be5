"""Fixtures that write datasets in their real on-disk formats, and a runner for the scripts."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from utils.datasets import write_d4rl_hdf5
from utils.pointmaze import collect_pointmaze_dataset
from utils.tasks import register_robotics_envs

REPO = Path(__file__).resolve().parents[1]
COMMIT = "5d41402abc4b2a76b9719d911017c592ae2b3c4f"  # the code of fake_run's runs

# --compile runs anywhere; --cudagraphs (alone or on top of --compile) needs a CUDA GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST_MODES = [
    pytest.param({"compile": True}, "cpu", id="compile"),
    pytest.param({"cudagraphs": True}, "cuda", id="cudagraphs", marks=needs_cuda),
    pytest.param({"compile": True, "cudagraphs": True}, "cuda", id="compile+cudagraphs", marks=needs_cuda),
]


def assert_same_training(run, reference):
    """Two runs, each (metrics of every step, final state_dict), took the same steps up to float tolerance."""
    (metrics, params), (ref_metrics, ref_params) = run, reference
    for step, ref_step in zip(metrics, ref_metrics, strict=True):
        for key in ref_step:
            torch.testing.assert_close(step[key], ref_step[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in ref_params:
        torch.testing.assert_close(params[key], ref_params[key], rtol=1e-4, atol=1e-6, msg=key)


def host_reads(fn) -> list[str]:
    """Run fn() and return where each op that reads a tensor value on the host (a GPU sync, which CUDA-graph
    capture forbids) was called from: the innermost frame outside torch's dispatch and dynamo wrappers."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "equal")

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in syncing):
                wrappers = ("torch/utils/_python_dispatch", "torch/_dynamo", "torch/_compile", "torch/optim/optimizer.py")
                frames = [f for f in traceback.extract_stack()[:-1] if not any(w in f.filename for w in wrappers)]
                reads.append(f"{frames[-1].filename}:{frames[-1].lineno}")
            return func(*args, **(kwargs or {}))

    reads = []
    with Recorder():
        fn()
    return reads


def reference_mc_returns(rewards, terminals, episode_ends, gamma, failure_reward=None):
    """Straightforward per-trajectory loop, for comparison."""
    out, start = np.zeros(len(rewards)), 0
    for end in np.flatnonzero(episode_ends):
        r, d = rewards[start : end + 1], terminals[start : end + 1]
        if failure_reward is not None and np.all(r == failure_reward):
            out[start : end + 1] = failure_reward / (1 - gamma)
        else:
            g = 0.0
            for t in reversed(range(len(r))):
                g = r[t] + gamma * (1 - d[t]) * g
                out[start + t] = g
        start = end + 1
    return out


@pytest.fixture
def d4rl_file(tmp_path):
    """Write a D4RL-format HDF5 file from arrays; returns its path."""

    def write(name="data.hdf5", **arrays):
        path = str(tmp_path / name)
        write_d4rl_hdf5(path, arrays)
        return path

    return write


@pytest.fixture
def awac_files(tmp_path):
    """Write the AWAC Adroit-binary files of a task into tmp_path/datasets/offpolicy_hand_data, in their real format:
    pickled numpy object arrays of trajectory dicts. `{name}2_sparse.npy`: every observation a dict holding the vector
    under `state_observation`, one extra trailing reward, terminals (T,); `{name}_bc_sparse4.npy`: plain vectors,
    rewards and terminals (T, 1). One trajectory per raw-reward sequence (-1 / 0 at success), with random states of
    `obs_dim` (next_observations[t] = observations[t+1]) and actions of `act_dim`. Returns the --dataset-dir."""
    folder = tmp_path / "datasets" / "offpolicy_hand_data"

    def trajectory(rewards, obs_dim, act_dim, rng, expert):
        n = len(rewards)
        states = rng.normal(size=(n + 1, obs_dim))
        rewards, terminals = np.asarray(rewards, np.float64), np.zeros(n, bool)
        if expert:
            dicts = np.array([{"state_observation": v, "desired_goal": v[:3]} for v in states], dtype=object)
            observations, next_observations = dicts[:-1], dicts[1:]
            rewards = np.append(rewards, rewards[-1])
        else:
            observations, next_observations = states[:-1], states[1:]
            rewards, terminals = rewards[:, None], terminals[:, None]
        actions = rng.uniform(-1, 1, (n, act_dim))
        return dict(observations=observations, next_observations=next_observations, actions=actions, rewards=rewards, terminals=terminals, agent_infos=[{}] * n, env_infos=[{}] * n)

    def write(name, obs_dim, act_dim, expert_rewards, bc_rewards):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for file, rewards, expert in ((f"{name}2_sparse.npy", expert_rewards, True), (f"{name}_bc_sparse4.npy", bc_rewards, False)):
            trajectories = np.array([trajectory(r, obs_dim, act_dim, rng, expert) for r in rewards], dtype=object)
            np.save(folder / file, trajectories, allow_pickle=True)
        return str(folder.parent)

    return write


@pytest.fixture
def fake_run():
    """Write a run's TensorBoard events in the scripts' tag layout into root/runs/NAME (NAME as the grid names it):
    the `hyperparameters` text as the scripts write it; one evaluation (eval/normalized_score, eval/success_rate,
    eval/return, eval/env_steps) per entry of `offline` (gradient steps 0, 10, 20, ..., env steps 0) and of
    `online` ((env_steps, score) pairs, at gradient step offline_steps + env_steps, with the running eval/regret);
    calibration/q_minus_mc = seed + step / 100 every 5 gradient steps up to the last evaluation; finished.json
    when `finished`; `atari`: only eval/return and eval/env_steps, as cal_ql_atari.py logs them. `resume_at` (gradient step S, step T > S): written as a run stopped at T whose checkpoint is
    at S and resumed, as the scripts do it: a first SummaryWriter writes every point up to T, those after S one
    step late (the lost attempt, as a run that is not bitwise reproducible would log them, so that a reader
    ignoring the purge shows them), a second one (purge_step=S + 1) every point after S. `code`: the (commit, dirty) of each
    start, written to provenance.json as the scripts write it (none: no file). Returns the run folder."""
    from torch.utils.tensorboard import SummaryWriter

    def write(root, exp_name, env_id, seed, offline=(0.1, 0.3), online=((100, 0.5), (200, 0.7)), finished=True, resume_at=None, atari=False,
              code=((COMMIT, False),)):
        name, offline_steps = f"{env_id.replace('/', '_')}__{exp_name}__{seed}", 10 * (len(offline) - 1)
        args = {"exp_name": exp_name, "seed": seed, "env_id": env_id, "offline_steps": offline_steps}
        points, regrets = [], []  # (tag, value, gradient step)
        for i, score in enumerate(offline):
            points += [(f"eval/{k}", v, 10 * i) for k, v in (("normalized_score", score), ("success_rate", score), ("return", 10 * score), ("env_steps", 0))]
        for env_steps, score in online:
            regrets.append(1 - score)
            values = (("normalized_score", score), ("success_rate", score), ("return", 10 * score), ("env_steps", env_steps), ("regret", np.mean(regrets)))
            points += [(f"eval/{k}", v, offline_steps + env_steps) for k, v in values]
        points += [("calibration/q_minus_mc", seed + step / 100, step) for step in range(5, max(p[2] for p in points) + 1, 5)]
        points = [p for p in points if not atari or p[0] in ("eval/return", "eval/env_steps", "calibration/q_minus_mc")]
        (folder := Path(root) / "runs" / name).mkdir(parents=True)

        def log(purge_step, at):  # at(step): the step to log a point at, None to leave it out
            writer = SummaryWriter(str(folder), purge_step=purge_step)
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in args.items()))
            for tag, value, step in sorted(points, key=lambda p: p[2]):
                if at(step) is not None:
                    writer.add_scalar(tag, value, at(step))
            writer.close()

        if resume_at is None:
            log(None, lambda step: step)
        else:
            checkpoint, stop = resume_at
            log(None, lambda step: step if step <= checkpoint else step + 1 if step <= stop else None)
            log(checkpoint + 1, lambda step: step if step > checkpoint else None)
        if code:
            (folder / "provenance.json").write_text(json.dumps([{"commit": commit, "dirty": dirty, "args": args} for commit, dirty in code]))
        if finished:
            (folder / "finished.json").write_text(json.dumps({"global_step": offline_steps + online[-1][0], "env_steps": online[-1][0]}))
        return folder

    return write


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    """A temp Minari store ($MINARI_DATASETS_PATH). Returns record(dataset_id, env, lengths, rewards=None, infos=None):
    one episode of uniform random actions on `env` per entry of `lengths` (reset with seed = its index; it stops
    earlier if the env ends it), saved with minari.create_dataset_from_buffers. `rewards` (one sequence per episode)
    replace the recorded rewards and `infos` (one dict of T+1 entries per episode, reset included) are stored as
    the episodes' infos. Returns the EpisodeBuffers."""
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))

    def record(dataset_id, env, lengths, rewards=None, infos=None):
        rng, episodes = np.random.default_rng(0), []
        for i, length in enumerate(lengths):
            obs, _ = env.reset(seed=i)
            buffer = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
            done = False
            while not done and len(buffer["actions"]) < length:
                action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                for key, value in zip(buffer, (obs, action, reward, terminated, truncated)):
                    buffer[key].append(value)
                done = terminated or truncated
            if rewards is not None:
                buffer["rewards"] = list(rewards[i])
            observations = stack(buffer.pop("observations"))
            episodes.append(EpisodeBuffer(id=i, observations=observations, infos=None if infos is None else infos[i], **buffer))
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, algorithm_name="random", author="tests", author_email="tests@example.com", code_permalink="tests/conftest.py", eval_env=env, description="test data")
        return episodes

    return record


def stack(frames):
    """Per-step observations (arrays or nested dicts of arrays) -> one array per leaf, time first."""
    if isinstance(frames[0], dict):
        return {k: stack([frame[k] for frame in frames]) for k in frames[0]}
    return np.stack(frames)


@pytest.fixture
def minari_pointmaze(minari_store):
    """A two-episode Minari dataset recorded on the embedded PointMaze env (dict observations), in a temp store."""
    return "test/pointmaze/random-v0", minari_store("test/pointmaze/random-v0", pointmaze_env(), [5, 5])


def pointmaze_env() -> gym.Env:
    """The embedded task's gymnasium env, raw (dict observations), 5 steps per episode."""
    register_robotics_envs()
    return gym.make("PointMaze_UMaze-v3", continuing_task=False, max_episode_steps=5)


ENV_MODULE = '''"""A test's own environments, registered on import (as `--env-id tiny_envs:Drift-v0` imports this module)."""
import gymnasium as gym
import numpy as np


class Drift(gym.Env):
    """A point on a line, moved 0.2 * action per step from a random start; within 0.1 of `goal` it gets reward 1 and the
    episode ends. Observed as [x, goal] plus sensor noise drawn from a generator of its own (seeded by reset(seed))."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, goal=0.5):  # no render_mode: a minimal env runs as well
        self.goal, self.sensor = goal, np.random.default_rng()

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.sensor = np.random.default_rng(seed + 1)
        self.x = self.np_random.uniform(-1, 1)
        return self.observe(), {}

    def step(self, action):
        self.x += 0.2 * float(action[0])
        success = abs(self.x - self.goal) < 0.1
        return self.observe(), float(success), success, False, {"success": success}

    def observe(self):
        return (np.array([self.x, self.goal]) + self.sensor.normal(0, 0.01, 2)).astype(np.float32)


gym.register("Drift-v0", entry_point=Drift, max_episode_steps=20)
gym.register("FreewayAgain-v0", entry_point="ale_py.env:AtariEnv", kwargs={"game": "freeway"})
'''


@pytest.fixture
def env_module(tmp_path, monkeypatch):
    """ENV_MODULE written to tmp_path/modules/tiny_envs.py, that folder put on this process's sys.path; returns the
    environment variables that make it importable in a script run by `run_script` (its PYTHONPATH)."""
    (folder := tmp_path / "modules").mkdir()
    (folder / "tiny_envs.py").write_text(ENV_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{folder}"}


@pytest.fixture
def drift_data(d4rl_file):
    """A D4RL file of 100 random Drift-v0 transitions in trajectories of 10 (goal 0.5: reward 1 and terminal there)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 101)
    reached = np.abs(x[1:] - 0.5) < 0.1
    return d4rl_file(observations=np.stack([x[:-1], np.full(100, 0.5)], 1), actions=rng.uniform(-1, 1, (100, 1)),
                     next_observations=np.stack([x[1:], np.full(100, 0.5)], 1), rewards=reached.astype(float),
                     terminals=reached, timeouts=np.arange(100) % 10 == 9)


@pytest.fixture(scope="session")
def pointmaze_data_dir(tmp_path_factory):
    """The embedded task's dataset, collected once per test session (a smaller one than the default)."""
    folder = tmp_path_factory.mktemp("datasets")
    write_d4rl_hdf5(str(folder / "pointmaze-umaze.hdf5"), collect_pointmaze_dataset(n_transitions=5_000))
    return str(folder)


TINY = ["--policy-hidden", "16", "16", "--q-hidden", "16", "16", "--batch-size", "32", "--cql-n-actions", "3", "--log-every", "5"]


def script_env(**extra) -> dict:
    """The environment of a script run by a test: the repo importable, one thread (tiny networks: threads only add overhead)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_in(cwd, script, *flags, check=True, env=None) -> subprocess.CompletedProcess:
    """Run a script of the repo (a path from the repo root) in the working directory cwd; returns the finished process."""
    env = script_env(**(env or {}))
    proc = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def run_script(tmp_path):
    """Run a script of the repo in a temp working directory (runs/ lands there); returns the finished process."""
    return functools.partial(run_in, tmp_path)


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


def scalars(run_dir, with_values=False) -> dict:
    """The steps (or (step, value) pairs) at which each TensorBoard scalar of a run was written, as TensorBoard shows
    them: points that a resumed run rewrote (purge_step) are dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) if with_values else e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_outcome(run_dir) -> tuple[dict, dict]:
    """What a finished run produced: every logged (step, value) but the wall-clock ones, and its final parameters."""
    logged = {tag: points for tag, points in scalars(run_dir, with_values=True).items() if tag != "charts/SPS"}
    final = torch.load(run_dir / "final.pt", weights_only=False)
    return logged, final.get("agent", final.get("qf"))
