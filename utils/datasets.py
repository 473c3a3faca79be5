"""Offline datasets of the continuous scripts: the on-disk formats and each task family's data rules.

Every loader returns one flat dict of numpy arrays (all trajectories concatenated):
`observations`, `actions`, `rewards` (raw, unscaled), `next_observations`, `terminals` (the environment ended the
episode: no bootstrapping) and `episode_ends` (true on the last stored transition of each trajectory).
Dict observations are flattened the way gymnasium's `FlattenObservation` does (keys in the space's order), so data
and environment always agree.
"""

import os
import pickle
import socket
import tempfile

import gymnasium as gym
import numpy as np

from utils.bridge import collect_bridge_dataset
from utils.pointmaze import collect_pointmaze_dataset, collect_tight_dataset
from utils.tasks import TASKS, ant_state, antmaze_goal, at_goal
from utils.validation import NUMBERS, DatasetError, check_arrays

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "episode_ends")
# what `check_arrays` expects of a loaded trajectory, and of the raw arrays of a D4RL file
TRANSITIONS = {"observations": ((None,), "f"), "actions": ((None,), "f"), "rewards": ((), "f"),
               "next_observations": ("observations", "f"), "terminals": ((), "b"), "episode_ends": ((), "b")}
D4RL_LAYOUT = {"observations": ((None,), NUMBERS), "actions": ((None,), NUMBERS), "rewards": ((), NUMBERS),
               "terminals": ((), NUMBERS), "timeouts": ((), NUMBERS), "next_observations": ("observations", NUMBERS)}
AWAC_FOLDER = "offpolicy_hand_data"
AWAC_URL = "https://drive.google.com/file/d/1SsVaQKZnY5UkuR78WrInp9XxTdKHbF0x/view"  # the official Cal-QL README's link
EMBEDDED = {"pointmaze-umaze": collect_pointmaze_dataset, "pointmaze-tight": collect_tight_dataset,  # tasks whose data is collected here
            "point-bridge": collect_bridge_dataset}


def load_dataset(env_id: str, dataset_path: str | None, dataset_id: str | None, dataset_dir: str) -> dict:
    """The offline data of a task: an explicit file is used as it is; a Minari id (explicit, or the task's own) is
    processed by the rules of the task's family; the Adroit-binary tasks default to the paper's AWAC files."""
    task = TASKS.get(env_id)
    family = task.family if task else "custom"
    if dataset_path is not None:
        return load_d4rl_hdf5(dataset_path)
    dataset_id = dataset_id or (task.dataset_id if task else None)
    if family == "adroit":
        if dataset_id is None:
            folder = os.path.join(dataset_dir, AWAC_FOLDER)
            return concatenate(successful_prefixes(load_awac_episodes(folder, task.data_files), folder))
        episodes = [binarised(ep, dataset_id) for ep in minari_episodes(dataset_id)]
        return concatenate(successful_prefixes(episodes, dataset_id))
    if dataset_id is not None:
        episodes = minari_episodes(dataset_id)
        if family == "antmaze":
            goal = antmaze_goal(task.env_kwargs["maze_map"])
            episodes = [relabel_at_goal(ep, goal) for ep in episodes]
        elif family == "kitchen":
            episodes = [terminal_demo_end(ep) for ep in episodes]
        return concatenate(episodes)
    if env_id in EMBEDDED:
        path = os.path.join(dataset_dir, f"{env_id}.hdf5")
        if not os.path.exists(path):  # collected once, then cached; workers collecting at once write identical files
            print(f"collecting the embedded dataset into {path} (done once, then reused)")
            write_d4rl_hdf5(path, EMBEDDED[env_id]())
        return load_d4rl_hdf5(path)
    raise DatasetError(f"no dataset known for {env_id}")


def concatenate(episodes: list[dict]) -> dict:
    """Per-trajectory arrays -> the flat dataset dict."""
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in FIELDS}


# ---------------------------------------------------------------------------------------------------------------
# D4RL HDF5 and Minari


def load_d4rl_hdf5(path: str) -> dict:
    """A D4RL-format HDF5 file, processed as the official Cal-QL code processes D4RL data (see `stored_rows`).

    Keys `observations`, `actions`, `rewards`, `terminals`, `timeouts`, optional `next_observations` (where absent,
    a row's next observation is the following row's observation).
    """
    import h5py

    if not os.path.exists(path):
        raise DatasetError(f"dataset file {path} not found: download the D4RL .hdf5 file for this task and pass it with --dataset-path")
    try:
        with h5py.File(path, "r") as f:
            raw = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations") if k in f}
    except (OSError, KeyError) as e:
        raise DatasetError(f"dataset file {path} is not a readable HDF5 file ({e}); download it again") from e
    missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in raw]
    if missing:
        raise DatasetError(f"dataset file {path} lacks the D4RL keys {missing}; expected observations, actions, rewards, terminals, timeouts")
    for k in ("rewards", "terminals", "timeouts"):  # a scalar per row may be stored as a column
        if raw[k].ndim == 2 and raw[k].shape[1] == 1:
            raw[k] = raw[k][:, 0]
    check_arrays(raw, f"dataset file {path}", D4RL_LAYOUT)
    terminals, timeouts = raw["terminals"].astype(bool), raw["timeouts"].astype(bool)
    ends = terminals | timeouts
    rows = stored_rows(ends, timeouts)
    if not len(rows):
        raise DatasetError(f"dataset file {path} holds no complete transition: end each trajectory with terminals or timeouts = 1 on its last row (see docs/data.md)")
    trajectory = np.concatenate([[0], np.cumsum(ends)[:-1]])[rows]
    next_obs = raw["next_observations"][rows] if "next_observations" in raw else raw["observations"][rows + 1]
    return {
        "observations": raw["observations"][rows].astype(np.float32),
        "actions": raw["actions"][rows].astype(np.float32),
        "rewards": raw["rewards"][rows].astype(np.float32),
        "next_observations": next_obs.astype(np.float32),
        "terminals": terminals[rows],
        "episode_ends": np.append(trajectory[1:] != trajectory[:-1], True),
    }


def stored_rows(ends: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """The rows of a D4RL file that become transitions, as in the official Cal-QL code (`qlearning_dataset_and_calc_mc`,
    built on `d4rl.qlearning_dataset`): a trajectory ends at a terminal or a timeout (`ends`); not stored are timeout
    rows (the step into the time limit), the file's last row (nothing follows it) and, where that last row ends no
    trajectory, the whole trailing trajectory (the official code never closes it; d4rl.qlearning_dataset keeps it)."""
    keep = ~timeouts
    keep[-1] = False
    if not ends[-1]:
        keep[np.flatnonzero(ends)[-1] + 1 if ends.any() else 0 :] = False
    return np.flatnonzero(keep)


def load_minari(dataset_id: str) -> dict:
    """A Minari dataset from the local store ($MINARI_DATASETS_PATH), downloaded first where a network exists."""
    return concatenate(minari_episodes(dataset_id))


def minari_episodes(dataset_id: str) -> list[dict]:
    """The episodes of a Minari dataset as per-trajectory arrays (see `episode_arrays`)."""
    import minari

    if dataset_id not in minari.list_local_datasets():
        download_minari(dataset_id)
    try:
        data = minari.load_dataset(dataset_id)
    except Exception as e:  # minari raises several types for corrupt stores
        raise DatasetError(f"Minari dataset {dataset_id} could not be read ({e}); delete it and download it again") from e
    return check_episodes([episode_arrays(ep, data.observation_space) for ep in data.iterate_episodes()], f"Minari dataset {dataset_id}")


def download_minari(dataset_id: str):
    how = f'pip install "minari[hf]" && minari download {dataset_id}'
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        import minari

        minari.download_dataset(dataset_id)
    except (OSError, ImportError) as e:
        raise DatasetError(f"Minari dataset {dataset_id} is not in the local store and could not be downloaded ({type(e).__name__}); run: {how}") from e


def episode_arrays(episode, observation_space: gym.spaces.Space) -> dict:
    """One Minari episode (T steps, T+1 observations) as flat transition arrays."""
    obs = flatten_observations(episode.observations, observation_space)
    terminals = np.asarray(episode.terminations, bool)
    arrays = {
        "observations": obs[:-1],
        "actions": as_rows(episode.actions),
        "rewards": np.asarray(episode.rewards, np.float32),
        "next_observations": obs[1:],
        "terminals": terminals,
        "episode_ends": np.arange(len(terminals)) == len(terminals) - 1,
    }
    if "success" in (episode.infos or {}):  # recorded after reset (T+1 entries) or per step (T): keep the steps'
        arrays["success"] = np.asarray(episode.infos["success"], bool).reshape(-1)[-len(terminals) :]
    return arrays


def as_rows(values) -> np.ndarray:
    """float32, one row per step (a checked dataset can then tell a wrong row count from a wrong row size)."""
    array = np.asarray(values, np.float32)
    return array.reshape(len(array), -1)


def check_episodes(episodes: list[dict], source: str) -> list[dict]:
    """Each trajectory as `check_arrays` checks it, named by its index in the source."""
    for i, episode in enumerate(episodes):
        check_arrays(episode, f"{source}, trajectory {i}", TRANSITIONS)
    return episodes


def flatten_observations(obs, space: gym.spaces.Space) -> np.ndarray:
    """Batched `gymnasium.spaces.flatten`: dict observations are concatenated in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(obs[k], s) for k, s in space.spaces.items()], axis=-1)
    return as_rows(obs)


# ---------------------------------------------------------------------------------------------------------------
# The paper's tasks: how each family's data is processed (spec §4, §7, §8)


def relabel_at_goal(episode: dict, goal: np.ndarray) -> dict:
    """A Minari AntMaze episode labelled the way D4RL labels its files (scripts/generation/relabel_antmaze_rewards.py):
    reward 1 and terminal where a step ends within ANTMAZE_GOAL_RADIUS of the task's goal, 0 elsewhere; each goal step
    ends its trajectory segment (the official code splits trajectories at terminals); observations `ant_state`. The
    recorded rewards, terminations and desired goal refer to the recording's own goals and are dropped."""
    reached = at_goal(episode["next_observations"][:, :2], goal)
    return {
        **episode,
        "observations": ant_state(episode["observations"]),
        "next_observations": ant_state(episode["next_observations"]),
        "rewards": reached.astype(np.float32),
        "terminals": reached,
        "episode_ends": episode["episode_ends"] | reached,
    }


def terminal_demo_end(episode: dict) -> dict:
    """A Minari Kitchen demonstration read as the official Kitchen code reads D4RL's Kitchen files, whose last step of
    every demonstration is terminal (D4RL generate_kitchen_datasets.py: `terminals = arange(len) >= len - 1`): its MC
    return is r_T and its TD target is not bootstrapped. The Minari data records no terminations."""
    return {**episode, "terminals": episode["terminals"] | episode["episode_ends"]}


def binarised(episode: dict, source: str) -> dict:
    """Adroit from Minari: the binary reward success - 1 from the recorded success flag (the data's rewards are dense)."""
    if "success" not in episode:
        raise DatasetError(f"{source} has no recorded infos['success'] to binarise the reward with; use a D4RL/{{pen,door,relocate}}/*-v2 dataset")
    return {**episode, "rewards": episode["success"].astype(np.float32) - 1.0}


def successful_prefixes(episodes: list[dict], source: str) -> list[dict]:
    """Adroit binary, as the official code prepares the AWAC data: raw rewards are -1, or 0 at a success step. A
    trajectory that never succeeds is dropped; the others are cut after their last success, e.g. [-1,-1,0,0,-1] ->
    [-1,-1,0,0], and every success step is terminal (the files' own terminals are ignored)."""
    kept = []
    for episode in episodes:
        success = episode["rewards"] == 0
        if success.any():
            end = int(np.flatnonzero(success)[-1]) + 1
            kept.append({**{k: v[:end] for k, v in episode.items()}, "terminals": success[:end], "episode_ends": np.arange(end) == end - 1})
    if not kept:
        raise DatasetError(f"{source}: no trajectory ever succeeds (reward 0), so there is nothing to learn from")
    return kept


def load_awac_episodes(folder: str, files: tuple[str, ...]) -> list[dict]:
    """The AWAC Adroit-binary files the paper uses (`{pen,door,relocate}2_sparse.npy`, `*_bc_sparse4.npy`): pickled
    numpy object arrays of trajectory dicts with observations, next_observations, actions, rewards, terminals."""
    missing = [name for name in files if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise DatasetError(
            f"{' and '.join(missing)} not found in {folder}/: download the Adroit data of the official Cal-QL code "
            f"({AWAC_URL}), unzip it and put its {' and '.join(files)} there (or in DIR/{AWAC_FOLDER}/ with "
            f"--dataset-dir DIR); or train on Minari data instead, e.g. --dataset-id D4RL/pen/human-v2"
        )
    episodes = []
    for name in files:
        path = os.path.join(folder, name)
        try:
            trajectories = [awac_episode(trajectory) for trajectory in np.load(path, allow_pickle=True)]
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError) as e:
            raise DatasetError(f"{path} is not an AWAC trajectory file ({type(e).__name__}: {e}); download it again") from e
        episodes += check_episodes(trajectories, path)
    return episodes


def awac_episode(trajectory: dict) -> dict:
    """One AWAC trajectory as arrays. `*2_sparse.npy`: every observation is a dict holding the vector under
    `state_observation`, and rewards may have one extra trailing entry; `*_bc_sparse4.npy`: plain vectors, rewards and
    terminals shaped (T, 1). Terminals are left to `successful_prefixes`."""
    obs, next_obs = state_vectors(trajectory["observations"]), state_vectors(trajectory["next_observations"])
    n = len(obs)
    return {
        "observations": obs,
        "actions": as_rows(trajectory["actions"]),
        "rewards": np.asarray(trajectory["rewards"], np.float32).reshape(-1)[:n],
        "next_observations": next_obs,
        "terminals": np.zeros(n, bool),
        "episode_ends": np.arange(n) == n - 1,
    }


def state_vectors(observations) -> np.ndarray:
    return np.stack([o["state_observation"] if isinstance(o, dict) else o for o in observations]).astype(np.float32)


def write_d4rl_hdf5(path: str, data: dict):
    """Write arrays under their D4RL keys (used for the embedded dataset), atomically: into a temporary file of its
    own in the same folder, then renamed. A crash mid-write leaves no half file behind, and processes that write the
    same file at once (grid workers collecting the embedded dataset) each rename a complete file: the last one wins."""
    import h5py

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")  # unique, even across hosts
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v, compression="gzip")
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
