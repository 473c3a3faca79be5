"""The embedded tasks' data, collected by a scripted waypoint controller in sparse PointMaze UMaze: `pointmaze-umaze`'s
(it wanders to random goals) and `pointmaze-tight`'s (an expert with interior actions, from the far arm to the goal)."""

from collections import deque

import gymnasium as gym
import numpy as np

from utils.tasks import POINTMAZE_GOAL_CELL, TASKS, register_robotics_envs


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


def waypoint_action(maze, distances, pos, vel, goal, rng, noise_std=0.5, kp=10.0, force_limit=None):
    """PD control towards the centre of the next cell on the shortest path to the goal, plus Gaussian noise
    (the recipe of the D4RL maze2d / Minari pointmaze data). `distances[goal_cell]` is `bfs_distances` to it.
    force_limit clips the PD force before the noise (an expert whose actions stay inside (-1, 1))."""
    goal_cell = tuple(int(i) for i in maze.cell_xy_to_rowcol(goal))
    dist = distances[goal_cell]
    cell = tuple(int(i) for i in maze.cell_xy_to_rowcol(pos))
    neighbours = [(cell[0] + dr, cell[1] + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    nxt = min((n for n in neighbours if n in dist), key=dist.get, default=goal_cell)
    target = goal if cell == goal_cell or nxt == goal_cell else maze.cell_rowcol_to_xy(np.array(nxt))
    force = kp * (target - pos) - 1.0 * vel
    if force_limit is not None:
        force = np.clip(force, -force_limit, force_limit)
    return np.clip(force + rng.normal(0.0, noise_std, 2), -1.0, 1.0).astype(np.float32)


def as_d4rl(rows: list[tuple]) -> dict:
    """Rows (observation, action, reward, terminal, timeout, next observation) as arrays under their D4RL keys."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    return {k: np.asarray(column, bool if k in ("terminals", "timeouts") else np.float32) for k, column in zip(keys, zip(*rows))}


def flat(obs: dict, goal=None) -> np.ndarray:
    """A PointMaze observation flattened as the eval env's: [achieved_goal, desired_goal (or `goal`), observation]."""
    return np.concatenate([obs["achieved_goal"], obs["desired_goal"] if goal is None else goal, obs["observation"]])


def path_distances(maze) -> dict:
    free = [(r, c) for r, row in enumerate(maze.maze_map) for c, v in enumerate(row) if v != 1]
    return {cell: bfs_distances(maze.maze_map, cell) for cell in free}


def collect_pointmaze_dataset(n_transitions: int = 100_000, seed: int = 0, radius: float = 0.45) -> dict:
    """The embedded dataset as arrays under their D4RL keys (about 10 s).

    The controller wanders to random goals in the UMaze (raw episodes of 300 steps, random starts); each raw episode
    is relabelled against the fixed evaluation goal (cell (1,1) plus uniform noise, as in the eval env): a step that
    ends within `radius` of it gets reward 1 and is terminal, every other step reward 0. Raw episode ends are
    timeouts. Observations are flattened like the eval env's: [achieved_goal, desired_goal, observation].
    """
    register_robotics_envs()
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=300)
    maze, rng = env.unwrapped.maze, np.random.default_rng(seed)
    goal_centre = maze.cell_rowcol_to_xy(np.array(POINTMAZE_GOAL_CELL))
    distances, rows, episode = path_distances(maze), [], 0
    while len(rows) < n_transitions:
        obs, _ = env.reset(seed=seed + episode)
        goal = goal_centre + rng.uniform(-0.25, 0.25, 2)
        done = False
        while not done:
            pos, vel = obs["observation"][:2], obs["observation"][2:]
            action = waypoint_action(maze, distances, pos, vel, obs["desired_goal"], rng)
            next_obs, _, _, truncated, _ = env.step(action)
            reached = np.linalg.norm(next_obs["achieved_goal"] - goal) <= radius
            done = truncated or len(rows) + 1 == n_transitions
            rows.append((flat(obs, goal), action, float(reached), reached, done and not reached, flat(next_obs, goal)))
            obs = next_obs
        episode += 1
    env.close()
    return as_d4rl(rows)


# pointmaze-tight's expert: gentle gains, its force inside +-0.6 (interior actions), small noise
TIGHT_EXPERT = dict(kp=5.0, force_limit=0.6, noise_std=0.03)


def episode_rows(env: gym.Env, seed: int, act, observe=lambda obs: obs) -> list[tuple]:
    """One episode of the policy `act(obs)` from reset(seed); returns its rows (see `as_d4rl`), each observation as
    `observe` makes it (the flat vector of a dict observation)."""
    obs, _ = env.reset(seed=seed)
    rows, done = [], False
    while not done:
        action = act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((observe(obs), action, float(reward), terminated, truncated and not terminated, observe(next_obs)))
        obs, done = next_obs, terminated or truncated
    return rows


def expert_episode(env: gym.Env, seed: int, rng: np.random.Generator, action_scale: float = 1.0, **expert) -> list[tuple]:
    """One episode of the waypoint controller in a PointMaze env (dict observations), its actions times
    `action_scale`; returns its rows (see `as_d4rl`)."""
    maze = env.unwrapped.maze
    distances = path_distances(maze)

    def act(obs):
        pos, vel = obs["observation"][:2], obs["observation"][2:]
        return action_scale * waypoint_action(maze, distances, pos, vel, obs["desired_goal"], rng, **expert)

    return episode_rows(env, seed, act, flat)


def collect_tight_dataset(episodes: int = 200, seed: int = 0, time_limit: int = 400) -> dict:
    """pointmaze-tight's data (about 4 s): `episodes` episodes of TIGHT_EXPERT from the task's start (the far arm) to
    its goal, under a loose time limit; every one reaches the goal, in 149-171 steps (the task allows 200)."""
    task = TASKS["pointmaze-tight"]
    register_robotics_envs()
    env = gym.make(task.gym_id, max_episode_steps=time_limit, **task.env_kwargs)
    rng = np.random.default_rng(seed)
    rows = [row for episode in range(episodes) for row in expert_episode(env, seed * 100_000 + episode, rng, **TIGHT_EXPERT)]
    env.close()
    return as_d4rl(rows)
