"""Tasks, environments and offline datasets for the Cal-QL scripts.

Every loader returns one flat dict of numpy arrays (all trajectories concatenated):
`observations`, `actions`, `rewards` (raw, unscaled), `next_observations`, `terminals` (the environment ended the
episode: no bootstrapping) and `episode_ends` (true on the last stored transition of each trajectory).
Dict observations are flattened the way gymnasium's `FlattenObservation` does (keys in the space's order), so data
and environment always agree.
"""

import os
import socket
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "episode_ends")


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or does not fit the environment; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    family: str  # selects the hyperparameter preset in the scripts
    description: str
    ref_min_score: float | None = None  # return of a failing policy, for the normalized score
    ref_max_score: float | None = None  # return of a successful policy


TASKS = {
    "pointmaze-umaze": Task(
        "pointmaze",
        "embedded: PointMaze_UMaze-v3, sparse reward, fixed goal cell (1,1); data collected by a scripted controller",
        ref_min_score=0.0,
        ref_max_score=1.0,
    ),
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
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


def make_env(env_id: str, seed: int, render_mode: str | None = None) -> gym.Env:
    """The environment of a task, with flat observations and its action space seeded."""
    register_robotics_envs()
    if env_id == "pointmaze-umaze":
        env = gym.make("PointMaze_UMaze-v3", maze_map=POINTMAZE_EVAL_MAP, continuing_task=False, max_episode_steps=300, render_mode=render_mode)
    else:
        env = gym.make(env_id, render_mode=render_mode)
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
    """The offline data of a task: an explicit file or Minari id wins; otherwise the task's own data."""
    if dataset_path is not None:
        return load_d4rl_hdf5(dataset_path)
    if dataset_id is not None:
        return load_minari(dataset_id)
    if env_id == "pointmaze-umaze":
        path = os.path.join(dataset_dir, "pointmaze-umaze.hdf5")
        if not os.path.exists(path):
            collect_pointmaze_dataset(path)
        return load_d4rl_hdf5(path)
    raise DatasetError(f"no dataset known for {env_id}")


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
    import minari

    if dataset_id not in minari.list_local_datasets():
        download_minari(dataset_id)
    try:
        data = minari.load_dataset(dataset_id)
    except Exception as e:  # minari raises several types for corrupt stores
        raise DatasetError(f"Minari dataset {dataset_id} could not be read ({e}); delete it and download it again") from e
    episodes = [episode_arrays(ep, data.observation_space) for ep in data.iterate_episodes()]
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in FIELDS}


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
    return {
        "observations": obs[:-1],
        "actions": np.asarray(episode.actions, np.float32).reshape(len(terminals), -1),
        "rewards": np.asarray(episode.rewards, np.float32),
        "next_observations": obs[1:],
        "terminals": terminals,
        "episode_ends": np.arange(len(terminals)) == len(terminals) - 1,
    }


def flatten_observations(obs, space: gym.spaces.Space) -> np.ndarray:
    """Batched `gymnasium.spaces.flatten`: dict observations are concatenated in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(obs[k], s) for k, s in space.spaces.items()], axis=-1)
    obs = np.asarray(obs, np.float32)
    return obs.reshape(len(obs), -1)


def write_d4rl_hdf5(path: str, data: dict):
    """Write arrays under their D4RL keys (used for the embedded dataset)."""
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path + ".tmp", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v, compression="gzip")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a half file behind


# ---------------------------------------------------------------------------------------------------------------
# The embedded task: sparse PointMaze UMaze with a fixed goal, data from a scripted waypoint controller

POINTMAZE_EVAL_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
POINTMAZE_GOAL_CELL = (1, 1)


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
