"""Tasks, environments and offline datasets for the Cal-QL scripts.

Every loader returns one flat dict of numpy arrays (all trajectories concatenated):
`observations`, `actions`, `rewards` (raw, unscaled), `next_observations`, `terminals` (the environment ended the
episode: no bootstrapping) and `episode_ends` (true on the last stored transition of each trajectory).
Dict observations are flattened the way gymnasium's `FlattenObservation` does (keys in the space's order), so data
and environment always agree.

The paper's tasks (Adroit binary, AntMaze, Kitchen) are rebuilt on gymnasium-robotics; each task's family decides how
its data is processed (`load_dataset`) and which wrapper its environment gets (`make_env`).
"""

import contextlib
import io
import os
import pickle
import socket
from collections import deque
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "episode_ends")


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or does not fit the environment; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    family: str  # selects the hyperparameter preset in the scripts, the data processing and the env wrapper
    description: str
    ref_min_score: float | None = None  # return of a failing policy, for the normalized score
    ref_max_score: float | None = None  # return of a successful policy (None: the env reports info["normalized_score"])
    gym_id: str | None = None  # the gymnasium-robotics environment the task is built on
    env_kwargs: dict = field(default_factory=dict)  # passed to gym.make
    max_episode_steps: int | None = None  # the task's horizon (TimeLimit)
    dataset_id: str | None = None  # its Minari dataset, downloaded where a network exists
    data_files: tuple[str, ...] = ()  # its files in --dataset-dir/offpolicy_hand_data (Adroit binary, the paper's data)


POINTMAZE_EVAL_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
POINTMAZE_GOAL_CELL = (1, 1)

# AntMaze evaluation mazes: the maze the Minari data was recorded in, with D4RL's fixed start (r) and goal (g). For
# medium and large these are the eval maps stored with the Minari datasets. For umaze, Minari's stored eval map is the
# mirror image of the recorded maze (Farama-Foundation/Minari#304), so the recorded umaze map is used instead.
ANTMAZE_EVAL_MAPS = {
    "umaze": [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]],
    "medium": [
        [1, 1, 1, 1, 1, 1, 1, 1], [1, "r", 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0, "g", 1], [1, 1, 1, 1, 1, 1, 1, 1],
    ],
    "large": [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, "r", 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1, 0, "g", 0, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
}
# Minari D4RL/antmaze/*-v1: recorded on these gymnasium-robotics v4 envs (observation 27 + achieved and desired goal
# 2 + 2), continuing_task=True, reset_target=False, the registered time limit (umaze 700 steps, others 1000)
ANTMAZE_ENVS = {
    "umaze": ("AntMaze_UMaze-v4", "umaze"), "umaze-diverse": ("AntMaze_UMaze-v4", "umaze"),
    "medium-play": ("AntMaze_Medium-v4", "medium"), "medium-diverse": ("AntMaze_Medium_Diverse_GR-v4", "medium"),
    "large-play": ("AntMaze_Large-v4", "large"), "large-diverse": ("AntMaze_Large_Diverse_GR-v4", "large"),
}
# Minari D4RL/kitchen/*-v2: the 4 target sub-tasks of each dataset (those of D4RL's kitchen envs)
KITCHEN_TASKS = {
    "complete": ["microwave", "kettle", "light switch", "slide cabinet"],
    "partial": ["microwave", "kettle", "light switch", "slide cabinet"],
    "mixed": ["microwave", "kettle", "bottom burner", "light switch"],
}
ADROIT_HORIZONS = {"pen": 100, "door": 200, "relocate": 200}  # the official mj_envs `*-binary-v0` registrations
AWAC_FOLDER = "offpolicy_hand_data"
AWAC_URL = "https://drive.google.com/file/d/1SsVaQKZnY5UkuR78WrInp9XxTdKHbF0x/view"  # the official Cal-QL README's link

TASKS = {
    "pointmaze-umaze": Task(
        "pointmaze",
        "embedded: PointMaze_UMaze-v3, sparse reward, fixed goal cell (1,1); data collected by a scripted controller",
        ref_min_score=0.0,
        ref_max_score=1.0,
        gym_id="PointMaze_UMaze-v3",
        env_kwargs=dict(maze_map=POINTMAZE_EVAL_MAP, continuing_task=False),
        max_episode_steps=300,
    ),
    **{
        f"{name}-binary-v0": Task(
            "adroit",
            f"AdroitHand{name.title()}-v1 with the binary reward success - 1, ending at the first success, {steps} steps; "
            f"data: the AWAC files {name}2_sparse.npy + {name}_bc_sparse4.npy (or --dataset-id D4RL/{name}/human-v2, binarised)",
            gym_id=f"AdroitHand{name.title()}-v1",
            max_episode_steps=steps,
            data_files=(f"{name}2_sparse.npy", f"{name}_bc_sparse4.npy"),
        )
        for name, steps in ADROIT_HORIZONS.items()
    },
    **{
        f"antmaze-{name}-v2": Task(
            "antmaze",
            f"{gym_id}, fixed start and goal, sparse reward 1 at the goal where the episode ends; data: Minari D4RL/antmaze/{name}-v1",
            ref_min_score=0.0,
            ref_max_score=1.0,
            gym_id=gym_id,
            env_kwargs=dict(maze_map=ANTMAZE_EVAL_MAPS[maze], continuing_task=False, reset_target=False),
            max_episode_steps=700 if maze == "umaze" else 1000,
            dataset_id=f"D4RL/antmaze/{name}-v1",
        )
        for name, (gym_id, maze) in ANTMAZE_ENVS.items()
    },
    **{
        f"kitchen-{name}": Task(
            "kitchen",
            f"FrankaKitchen-v1, sub-tasks {', '.join(tasks)}; reward = sub-tasks solved (0-4), 1000 steps, no early end; "
            f"data: Minari D4RL/kitchen/{name}-v2",
            gym_id="FrankaKitchen-v1",
            env_kwargs=dict(tasks_to_complete=tasks, remove_task_when_completed=False, terminate_on_tasks_completed=False),
            max_episode_steps=1000,
            dataset_id=f"D4RL/kitchen/{name}-v2",
        )
        for name, tasks in KITCHEN_TASKS.items()
    },
}


def get_task(env_id: str, dataset_path: str | None = None, dataset_id: str | None = None) -> Task:
    """The task for an id: a known task, or any registered gymnasium env together with its own dataset."""
    if env_id in TASKS:
        return TASKS[env_id]
    register_robotics_envs()
    if env_id not in gym.registry:
        known = ", ".join(TASKS)
        raise DatasetError(f"unknown --env-id {env_id!r}: use one of {known}, or a gymnasium id with --dataset-path/--dataset-id")
    if dataset_path is None and dataset_id is None:
        raise DatasetError(f"--env-id {env_id} is not a built-in task: give its data with --dataset-path FILE.hdf5 (D4RL format) or --dataset-id MINARI_ID")
    return Task("custom", f"gymnasium {env_id} with a user dataset")


def register_robotics_envs():
    # its import prints a notice on the dense Adroit rewards of v1.2.1, which no task here uses
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


class AdroitBinary(gym.Wrapper):
    """The official `*-binary-v0` Adroit tasks: reward success - 1 (0 at the goal, -1 otherwise), and the episode ends
    (terminated) at the first success, for training and evaluation alike. info["normalized_score"] = success."""

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        success = bool(info["success"])
        info["normalized_score"] = float(success)
        return obs, float(success) - 1.0, terminated or success, truncated, info


class KitchenScore(gym.Wrapper):
    """FrankaKitchen with the reward as recorded in the Minari data: the number of target sub-tasks solved at this step.
    info: "success" (all solved) and "normalized_score" (the fraction solved; the official code scores a Kitchen
    episode by its final-step reward / 4)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        n_tasks = len(self.env.unwrapped.goal)
        info.update(success=reward == n_tasks, normalized_score=reward / n_tasks)
        return obs, reward, terminated, truncated, info


def make_env(env_id: str, seed: int, render_mode: str | None = None) -> gym.Env:
    """The environment of a task, with flat observations and its action space seeded."""
    register_robotics_envs()
    task = TASKS.get(env_id)
    if task is None:
        env = gym.make(env_id, render_mode=render_mode)
    else:
        env = gym.make(task.gym_id, max_episode_steps=task.max_episode_steps, render_mode=render_mode, **task.env_kwargs)
        if task.family == "adroit":
            env = AdroitBinary(env)
        elif task.family == "kitchen":
            env = KitchenScore(env)
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    box = env.action_space
    if not isinstance(box, gym.spaces.Box) or not (np.all(box.low == -1) and np.all(box.high == 1)):
        raise DatasetError(f"{env_id}: actions must be a Box in [-1, 1] (tanh policy); wrap the env with gymnasium.wrappers.RescaleAction")
    env.action_space.seed(seed)
    return env


def check_dataset_fits_env(dataset: dict, env: gym.Env, source: str):
    """Fail before training when the data's shapes do not match the environment's spaces."""
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    got_obs, got_act = dataset["observations"].shape[1:], dataset["actions"].shape[1:]
    if got_obs != (obs_dim,) or got_act != (act_dim,):
        raise DatasetError(
            f"{source}: observations {got_obs} / actions {got_act} do not match the environment's ({obs_dim},) / ({act_dim},); "
            "is it the dataset of this --env-id?"
        )


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
            episodes = [end_at_goal(ep, goal_reward=1.0) for ep in episodes]
        return concatenate(episodes)
    if env_id == "pointmaze-umaze":
        path = os.path.join(dataset_dir, "pointmaze-umaze.hdf5")
        if not os.path.exists(path):
            collect_pointmaze_dataset(path)
        return load_d4rl_hdf5(path)
    raise DatasetError(f"no dataset known for {env_id}")


def concatenate(episodes: list[dict]) -> dict:
    """Per-trajectory arrays -> the flat dataset dict."""
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in FIELDS}


# ---------------------------------------------------------------------------------------------------------------
# D4RL HDF5 and Minari


def load_d4rl_hdf5(path: str) -> dict:
    """A D4RL-format HDF5 file, processed as `d4rl.qlearning_dataset` does (without importing d4rl).

    Keys `observations`, `actions`, `rewards`, `terminals`, `timeouts`, optional `next_observations`. A trajectory
    ends at a terminal or a timeout; the timeout transition itself is dropped (its next observation is unreliable),
    and without `next_observations` the last row is dropped too.
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
    n = len(raw["rewards"])
    terminals, timeouts = raw["terminals"].astype(bool).reshape(n), raw["timeouts"].astype(bool).reshape(n)
    if "next_observations" in raw:
        next_obs = raw["next_observations"]
        keep = ~timeouts
    else:
        next_obs = np.concatenate([raw["observations"][1:], raw["observations"][-1:]])
        keep = ~timeouts & (np.arange(n) < n - 1)
    trajectory = np.concatenate([[0], np.cumsum(terminals | timeouts)[:-1]])[keep]
    return {
        "observations": raw["observations"][keep].astype(np.float32),
        "actions": raw["actions"][keep].astype(np.float32),
        "rewards": raw["rewards"].reshape(n)[keep].astype(np.float32),
        "next_observations": next_obs[keep].astype(np.float32),
        "terminals": terminals[keep],
        "episode_ends": np.append(trajectory[1:] != trajectory[:-1], True),
    }


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
    return [episode_arrays(ep, data.observation_space) for ep in data.iterate_episodes()]


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
        "actions": np.asarray(episode.actions, np.float32).reshape(len(terminals), -1),
        "rewards": np.asarray(episode.rewards, np.float32),
        "next_observations": obs[1:],
        "terminals": terminals,
        "episode_ends": np.arange(len(terminals)) == len(terminals) - 1,
    }
    if "success" in (episode.infos or {}):  # recorded after reset (T+1 entries) or per step (T): keep the steps'
        arrays["success"] = np.asarray(episode.infos["success"], bool).reshape(-1)[-len(terminals) :]
    return arrays


def flatten_observations(obs, space: gym.spaces.Space) -> np.ndarray:
    """Batched `gymnasium.spaces.flatten`: dict observations are concatenated in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(obs[k], s) for k, s in space.spaces.items()], axis=-1)
    obs = np.asarray(obs, np.float32)
    return obs.reshape(len(obs), -1)


# ---------------------------------------------------------------------------------------------------------------
# The paper's tasks: how each family's data is processed (spec §4, §7, §8)


def end_at_goal(episode: dict, goal_reward: float) -> dict:
    """AntMaze: a step that reaches the goal is terminal and ends its trajectory segment, as the D4RL AntMaze files
    mark them (the official code splits trajectories there). The Minari recordings never terminate: the ant keeps
    collecting reward 1 at the goal until the time limit."""
    goal = episode["rewards"] >= goal_reward
    return {**episode, "terminals": episode["terminals"] | goal, "episode_ends": episode["episode_ends"] | goal}


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
            episodes += [awac_episode(trajectory) for trajectory in np.load(path, allow_pickle=True)]
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError) as e:
            raise DatasetError(f"{path} is not an AWAC trajectory file ({type(e).__name__}: {e}); download it again") from e
    return episodes


def awac_episode(trajectory: dict) -> dict:
    """One AWAC trajectory as arrays. `*2_sparse.npy`: every observation is a dict holding the vector under
    `state_observation`, and rewards may have one extra trailing entry; `*_bc_sparse4.npy`: plain vectors, rewards and
    terminals shaped (T, 1). Terminals are left to `successful_prefixes`."""
    obs, next_obs = state_vectors(trajectory["observations"]), state_vectors(trajectory["next_observations"])
    n = len(obs)
    return {
        "observations": obs,
        "actions": np.asarray(trajectory["actions"], np.float32).reshape(n, -1),
        "rewards": np.asarray(trajectory["rewards"], np.float32).reshape(-1)[:n],
        "next_observations": next_obs,
        "terminals": np.zeros(n, bool),
        "episode_ends": np.arange(n) == n - 1,
    }


def state_vectors(observations) -> np.ndarray:
    return np.stack([o["state_observation"] if isinstance(o, dict) else o for o in observations]).astype(np.float32)


def write_d4rl_hdf5(path: str, data: dict):
    """Write arrays under their D4RL keys (used for the embedded dataset)."""
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: runs of a grid may cache the same dataset at once
    with h5py.File(tmp, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v, compression="gzip")
    os.replace(tmp, path)  # a crash mid-write never leaves a half file behind


# ---------------------------------------------------------------------------------------------------------------
# The embedded task: sparse PointMaze UMaze with a fixed goal, data from a scripted waypoint controller

def bfs_distances(maze_map, goal: tuple[int, int]) -> dict:
    """Steps from every free cell to the goal cell (4-neighbour moves)."""
    dist, queue = {goal: 0}, deque([goal])
    while queue:
        r, c = queue.popleft()
        for nxt in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if maze_map[nxt[0]][nxt[1]] != 1 and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


def waypoint_action(maze, distances, pos, vel, goal, rng, noise_std=0.5):
    """PD control towards the centre of the next cell on the shortest path to the goal, plus Gaussian noise
    (the recipe of the D4RL maze2d / Minari pointmaze data). `distances[goal_cell]` is `bfs_distances` to it."""
    goal_cell = tuple(int(i) for i in maze.cell_xy_to_rowcol(goal))
    dist = distances[goal_cell]
    cell = tuple(int(i) for i in maze.cell_xy_to_rowcol(pos))
    neighbours = [(cell[0] + dr, cell[1] + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    nxt = min((n for n in neighbours if n in dist), key=dist.get, default=goal_cell)
    target = goal if cell == goal_cell or nxt == goal_cell else maze.cell_rowcol_to_xy(np.array(nxt))
    action = 10.0 * (target - pos) - 1.0 * vel + rng.normal(0.0, noise_std, 2)
    return np.clip(action, -1.0, 1.0).astype(np.float32)


def collect_pointmaze_dataset(path: str, n_transitions: int = 100_000, seed: int = 0, radius: float = 0.45):
    """Collect and cache the embedded dataset (about 10 s, once).

    The controller wanders to random goals in the UMaze (raw episodes of 300 steps, random starts); each raw episode
    is relabelled against the fixed evaluation goal (cell (1,1) plus uniform noise, as in the eval env): a step that
    ends within `radius` of it gets reward 1 and is terminal, every other step reward 0. Raw episode ends are
    timeouts. Observations are flattened like the eval env's: [achieved_goal, desired_goal, observation].
    """
    register_robotics_envs()
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=300)
    maze, rng = env.unwrapped.maze, np.random.default_rng(seed)
    goal_centre = maze.cell_rowcol_to_xy(np.array(POINTMAZE_GOAL_CELL))
    free = [(r, c) for r, row in enumerate(maze.maze_map) for c, v in enumerate(row) if v != 1]
    distances = {cell: bfs_distances(maze.maze_map, cell) for cell in free}
    columns = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    episode = 0
    while len(columns["rewards"]) < n_transitions:
        obs, _ = env.reset(seed=seed + episode)
        goal = goal_centre + rng.uniform(-0.25, 0.25, 2)
        done = False
        while not done:
            pos, vel = obs["observation"][:2], obs["observation"][2:]
            action = waypoint_action(maze, distances, pos, vel, obs["desired_goal"], rng)
            next_obs, _, _, truncated, _ = env.step(action)
            reached = np.linalg.norm(next_obs["achieved_goal"] - goal) <= radius
            done = truncated or len(columns["rewards"]) + 1 == n_transitions
            for key, value in (
                ("observations", np.concatenate([obs["achieved_goal"], goal, obs["observation"]])),
                ("actions", action),
                ("rewards", float(reached)),
                ("terminals", reached),
                ("timeouts", done and not reached),
                ("next_observations", np.concatenate([next_obs["achieved_goal"], goal, next_obs["observation"]])),
            ):
                columns[key].append(value)
            obs = next_obs
        episode += 1
    env.close()
    write_d4rl_hdf5(path, {k: np.asarray(v, np.float32 if k not in ("terminals", "timeouts") else bool) for k, v in columns.items()})
