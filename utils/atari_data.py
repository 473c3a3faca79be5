"""Atari data for cal_ql_atari.py: the environment the DQN Replay Dataset was recorded on, its file reader, and a
small built-in Freeway dataset collected by a noisy heuristic.

The loader returns single 84x84 frames (stacked into 4-frame observations by the script's frame store):
`frames` uint8 [n,84,84] (frames[i] is the frame at which actions[i] was taken), `actions` int64, `rewards` raw
float32, `terminals` (the game ended: no bootstrapping) and `episode_ends` (the last stored step of each trajectory).
"""

import gzip
import os
import shutil
from pathlib import Path

import ale_py
import gymnasium as gym
import numpy as np
from tqdm import tqdm

from utils.tasks import env_spec
from utils.validation import DatasetError, check_arrays

gym.register_envs(ale_py)
REPLAY_LAYOUT = (
    "expected <replay-dir>/$store$_{observation,action,reward,terminal}_ckpt.<N>.gz, each np.save output written "
    "through gzip: observation uint8 [n,84,84], action int32 [n], reward float32 [n], terminal uint8 [n]"
)
FILE_DTYPES = dict(observation=np.uint8, action=np.int32, reward=np.float32, terminal=np.uint8)  # as written
REPLAY_ROWS = dict(observation=((84, 84), np.dtype(np.uint8)), action=((), "iu"), reward=((), "iuf"), terminal=((), "biu"))


def make_env(env_id, seed, max_episode_steps=None, render_mode=None):
    """The ALE game as the DQN Replay Dataset played it: sticky actions (p=0.25), frame skip 4, 84x84 grey frames.
    `module.path:EnvId-v0` imports module.path first, as gymnasium.make does."""
    spec = env_spec(env_id)
    if spec is None or "ale_py" not in str(spec.entry_point):
        raise DatasetError(f"unknown Atari env id {env_id!r}; use an ALE id such as ALE/Pong-v5")
    env = gym.make(env_id, frameskip=1, repeat_action_probability=0.25, render_mode=render_mode)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=0, frame_skip=4, screen_size=84, grayscale_obs=True)
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps)  # after the frame skip: counts agent steps
    env.reset(seed=seed)  # seeds the emulator; later resets continue its random stream
    return env


def read_npy_gz(path: Path, max_rows: int | None = None) -> np.ndarray:
    """np.load of a gzipped .npy file that reads only the first max_rows rows (1M frames are 7 GB)."""
    if not path.exists():
        raise DatasetError(f"missing {path}; {REPLAY_LAYOUT}")
    try:
        with gzip.open(path) as f:
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            rows = shape[0] if max_rows is None else min(max_rows, shape[0])
            count = rows * int(np.prod(shape[1:]))
            array = np.frombuffer(f.read(count * dtype.itemsize), dtype)
        if fortran or array.size != count:
            raise ValueError("Fortran-ordered" if fortran else f"only {array.size} of {count} values")
        return array.reshape((rows, *shape[1:]))
    except Exception as e:  # bad gzip, bad header, short file: all mean the same for the user
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); {REPLAY_LAYOUT}") from e


def load_replay_logs(replay_dir, checkpoints, transitions_per_checkpoint=None) -> dict:
    """Concatenate checkpoints of a DQN Replay `replay_logs` folder; every checkpoint's last step ends a trajectory."""
    replay_dir, chunks = Path(replay_dir), []
    for ckpt in checkpoints:
        file = {k: replay_dir / f"$store$_{k}_ckpt.{ckpt}.gz" for k in FILE_DTYPES}
        small = {k: read_npy_gz(file[k]) for k in ("action", "reward", "terminal")}
        n = len(small["action"])
        rows = n if transitions_per_checkpoint is None else min(n, transitions_per_checkpoint)
        count_file = replay_dir / f"add_count_ckpt.{ckpt}.gz"  # Dopamine's circular-buffer cursor, when present
        try:
            add_count = int(np.load(gzip.open(count_file))) if count_file.exists() else n
        except Exception as e:  # as in read_npy_gz
            raise DatasetError(f"cannot read {count_file} ({type(e).__name__}: {e}): Dopamine's buffer cursor, one "
                               "integer np.save'd through gzip; download it again, or delete it to load every row") from e
        rows = min(rows, add_count)  # a buffer that never filled up: the rest is empty
        arrays = {"observation": read_npy_gz(file["observation"], rows), **{k: v[:rows] for k, v in small.items()}}
        check_arrays({file[k].name: v for k, v in arrays.items()}, str(replay_dir),
                     {file[k].name: REPLAY_ROWS[k] for k in arrays}, hint=REPLAY_LAYOUT)
        episode_ends = np.zeros(n, bool)
        if add_count > n:  # a full circular buffer: its newest step is followed by its oldest one
            episode_ends[add_count % n - 1] = True
        episode_ends[rows - 1] = True
        chunks.append(list(arrays.values()) + [episode_ends[:rows]])
    # a single checkpoint is used as read: no second copy of the frames
    frames, actions, rewards, terminals, ends = (np.concatenate(c) if len(c) > 1 else c[0] for c in zip(*chunks))
    terminals, ends = terminals.astype(bool), ends | terminals.astype(bool)
    if not (terminals | ~ends).any():  # what the frame store can sample: a terminal, or a step with a next frame
        raise DatasetError(f"{replay_dir}: checkpoints {checkpoints} hold no complete transition (every trajectory is one "
                           "step without a terminal); load more rows per checkpoint")
    returns = np.add.reduceat(rewards, np.flatnonzero(np.r_[True, ends[:-1]]))[terminals[ends]]  # finished episodes
    print(f"offline data: {len(actions)} transitions, {len(returns)} finished episodes"
          + (f", mean return {returns.mean():.1f}" if len(returns) else ""))
    return dict(frames=frames, actions=actions.astype(np.int64), rewards=rewards.astype(np.float32),
                terminals=terminals, episode_ends=ends)


def builtin_replay_dir(env_id: str, size: int, epsilon: float, seed: int) -> Path:
    """Collect once, then reuse, a Freeway dataset in the DQN Replay layout (datasets/atari/<game>/replay_logs)."""
    game = env_id.split("/")[-1].split("-")[0]
    replay_dir = Path("datasets/atari") / game / "replay_logs"
    if replay_dir.exists():
        print(f"reusing the built-in dataset in {replay_dir} (delete it to collect a new one)")
        return replay_dir
    if game != "Freeway":
        raise DatasetError(f"the built-in dataset exists only for ALE/Freeway-v5; pass --replay-dir for {env_id}")
    columns = collect_up_presses(make_env(env_id, seed), size, epsilon, np.random.default_rng(seed))
    # written under a name of its own, renamed when complete: an interrupted run leaves no cache, and of two runs
    # collecting at once (the same data) the first rename wins
    tmp_dir = replay_dir.with_name(f"replay_logs.tmp{os.getpid()}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for name, values in columns.items():
        with gzip.open(tmp_dir / f"$store$_{name}_ckpt.0.gz", "wb", compresslevel=1) as f:
            np.save(f, np.asarray(values, FILE_DTYPES[name]))
    try:
        tmp_dir.rename(replay_dir)
    except OSError:
        if not replay_dir.exists():
            raise
        shutil.rmtree(tmp_dir)
    return replay_dir


def collect_up_presses(env, size: int, epsilon: float, rng) -> dict:
    """`size` steps of Freeway's UP, or with probability epsilon a uniform random action; episodes back to back, the
    last one cut at `size`. Columns under the DQN Replay file names."""
    up = env.unwrapped.get_action_meanings().index("UP")
    columns = {name: [] for name in FILE_DTYPES}
    frame, _ = env.reset()
    for _ in tqdm(range(size), desc="collecting built-in dataset"):
        action = rng.integers(env.action_space.n) if rng.random() < epsilon else up
        next_frame, reward, terminated, truncated, _ = env.step(action)
        for name, value in zip(columns, (frame, action, reward, terminated)):
            columns[name].append(value)
        frame = env.reset()[0] if terminated or truncated else next_frame
    env.close()
    return columns
