"""The embedded task's data: sparse PointMaze UMaze with a fixed goal, collected by a scripted waypoint controller."""

from collections import deque

import gymnasium as gym
import numpy as np

from utils.tasks import POINTMAZE_GOAL_CELL, register_robotics_envs


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
    return {k: np.asarray(v, np.float32 if k not in ("terminals", "timeouts") else bool) for k, v in columns.items()}
