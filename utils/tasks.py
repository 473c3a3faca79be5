"""The tasks of the continuous scripts: the task table, and each task's environment.

The paper's tasks (Adroit binary, AntMaze, Kitchen) are rebuilt on gymnasium-robotics; each task's family decides
which wrapper its environment gets (`make_env`) and how its data is processed (`utils.datasets.load_dataset`).
Environments have flat observations: dict observations are flattened by gymnasium's `FlattenObservation` (keys in
the space's order), as the datasets are.
"""

import contextlib
import importlib
import io
import json
import warnings
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from utils.validation import DatasetError


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
POINTMAZE_TIGHT_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]  # start (r): the far arm

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
# 2 + 2), continuing_task=True, reset_target=False, the registered time limit (umaze 700 steps, others 1000). Its rewards
# mark the recording's own goals, a noisy point redrawn at every reset (in a random cell for all but umaze), so
# `utils.datasets.relabel_at_goal` labels it anew for the task's fixed goal.
ANTMAZE_ENVS = {
    "umaze": ("AntMaze_UMaze-v4", "umaze"), "umaze-diverse": ("AntMaze_UMaze-v4", "umaze"),
    "medium-play": ("AntMaze_Medium-v4", "medium"), "medium-diverse": ("AntMaze_Medium_Diverse_GR-v4", "medium"),
    "large-play": ("AntMaze_Large-v4", "large"), "large-diverse": ("AntMaze_Large_Diverse_GR-v4", "large"),
}
ANTMAZE_GOAL_RADIUS = 0.5  # D4RL's (d4rl/locomotion/goal_reaching_env.py); gymnasium-robotics' own is 0.45
# Minari D4RL/kitchen/*-v2: the 4 target sub-tasks of each dataset (those of D4RL's kitchen envs)
KITCHEN_TASKS = {
    "complete": ["microwave", "kettle", "light switch", "slide cabinet"],
    "partial": ["microwave", "kettle", "light switch", "slide cabinet"],
    "mixed": ["microwave", "kettle", "bottom burner", "light switch"],
}
ADROIT_HORIZONS = {"pen": 100, "door": 200, "relocate": 200}  # the official mj_envs `*-binary-v0` registrations

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
    "pointmaze-tight": Task(
        "pointmaze",
        "embedded, built for CQL's fine-tuning dip: PointMaze_UMaze-v3 from the far arm (cell (3,1)) to the goal (1,1), "
        "sparse reward, 200 steps (the expert needs 149-171); data: an expert with actions inside (-1, 1), noise 0.03",
        ref_min_score=0.0,
        ref_max_score=1.0,
        gym_id="PointMaze_UMaze-v3",
        env_kwargs=dict(maze_map=POINTMAZE_TIGHT_MAP, continuing_task=False, reward_type="sparse"),
        max_episode_steps=200,
    ),
    "point-bridge": Task(
        "bridge",
        "embedded, built for CQL's fine-tuning dip: a point crosses a bridge 1 long and 0.2 wide in 48 steps (the expert "
        "needs 39-42); a step off it is a fall, and the episode fails; data: an expert with actions inside (-1, 1), noise 0.03",
        ref_min_score=0.0,
        ref_max_score=1.0,
        gym_id="PointBridge-v0",
        max_episode_steps=48,  # 1.2x the expert's slowest crossing; its actions x0.8 need 50
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
            f"{gym_id}, fixed start and goal, D4RL's reward 1 within {ANTMAZE_GOAL_RADIUS} of the goal cell's centre, where "
            f"the episode ends; 29 observations (no goal); data: Minari D4RL/antmaze/{name}-v1, relabelled for that goal",
            ref_min_score=0.0,
            ref_max_score=1.0,
            gym_id=gym_id,
            # the env itself never ends an episode nor moves its goal: AntMazeGoal decides, as D4RL does
            env_kwargs=dict(maze_map=ANTMAZE_EVAL_MAPS[maze], continuing_task=True, reset_target=False),
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

gym.register("PointBridge-v0", entry_point="utils.bridge:PointBridge")  # the env of point-bridge (imported when made)


def get_task(env_id: str, dataset_path: str | None = None, dataset_id: str | None = None) -> Task:
    """The task for an id: a known task, or any registered gymnasium env (`EnvId-v0`, or `module.path:EnvId-v0`)
    together with its own dataset."""
    if env_id in TASKS:
        return TASKS[env_id]
    register_robotics_envs()
    if env_spec(env_id) is None:
        known = ", ".join(TASKS)
        raise DatasetError(f"unknown --env-id {env_id!r}: use one of {known}, or a gymnasium id (module.path:EnvId-v0 to import its module first) with --dataset-path/--dataset-id")
    if dataset_path is None and dataset_id is None:
        raise DatasetError(f"--env-id {env_id} is not a built-in task: give its data with --dataset-path FILE.hdf5 (D4RL format) or --dataset-id MINARI_ID")
    return Task("custom", f"gymnasium {env_id} with a user dataset")


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec | None:
    """The registration of an id as `gymnasium.make` reads it: `module.path:EnvId-v0` first imports module.path (which
    registers EnvId-v0); None if the id is not registered. An import that fails is one error line naming the module."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except Exception as e:  # whatever importing the user's module raises
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            raise DatasetError(f"--env-id {env_id}: importing its module {module} failed ({error}); fix the module, or put its folder on PYTHONPATH") from e
    return gym.registry.get(name)


def parse_env_kwargs(env_id: str, text: str) -> dict:
    """--env-kwargs: a JSON object of keyword arguments for gymnasium.make, for a custom id only (a task's settings are
    fixed by its entry in TASKS: its data was recorded with them)."""
    example = 'e.g. \'{"max_episode_steps": 200}\''
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"--env-kwargs {text} is not valid JSON ({e}): give a JSON object, {example}") from e
    if not isinstance(kwargs, dict):
        raise DatasetError(f"--env-kwargs {text} is not a JSON object: give keyword arguments by name, {example}")
    if kwargs and env_id in TASKS:
        raise DatasetError(f"--env-kwargs is for a custom gymnasium id: the settings of the task {env_id} are fixed by its entry in "
                           f"utils/tasks.py TASKS; drop --env-kwargs, or run {TASKS[env_id].gym_id} as a custom id with --dataset-path/--dataset-id")
    return kwargs


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
        with warnings.catch_warnings():
            # gymnasium's env checker (first two steps) finds FrankaKitchen's dict observations sharing an array from
            # one call to the next; harmless here, as FlattenObservation copies every observation into a new array
            warnings.filterwarnings("ignore", r".*The observations returned by `\w+` and the following `step` share an object", UserWarning)
            obs, reward, terminated, truncated, info = self.env.step(action)
        n_tasks = len(self.env.unwrapped.goal)
        info.update(success=reward == n_tasks, normalized_score=reward / n_tasks)
        return obs, reward, terminated, truncated, info


def make_env(env_id: str, seed: int, render_mode: str | None = None, env_kwargs: str = "{}") -> gym.Env:
    """The environment of a task, with flat observations, its action space seeded, and reset once with `seed`, so that
    every random generator it holds exists and is seeded (a resumed run restores them all). `env_kwargs`: the
    --env-kwargs JSON of a custom id, as a run's saved args hold it, passed to gymnasium.make."""
    register_robotics_envs()
    task, kwargs = TASKS.get(env_id), parse_env_kwargs(env_id, env_kwargs)
    if task is None:
        try:
            rendering = {} if render_mode is None else {"render_mode": render_mode}  # a minimal env need not take the argument
            env = gym.make(env_id, **rendering, **kwargs)
        except TypeError as e:  # an argument the env does not take
            if not kwargs:
                raise
            error = str(e).split(" was raised from the environment creator")[0]  # gymnasium appends every kwarg
            raise DatasetError(f"--env-kwargs {env_kwargs} do not fit {env_id} ({error}): give only arguments it takes") from e
    else:
        with warnings.catch_warnings():
            # AntMaze v4 rather than v5 on purpose: the Minari D4RL/antmaze data was recorded on v4
            warnings.filterwarnings("ignore", r".*The environment AntMaze_\w+-v4 is out of date", DeprecationWarning)
            env = gym.make(task.gym_id, max_episode_steps=task.max_episode_steps, render_mode=render_mode, **task.env_kwargs)
        if task.family == "adroit":
            env = AdroitBinary(env)
        elif task.family == "kitchen":
            env = KitchenScore(env)
        elif task.family == "antmaze":
            env = AntMazeGoal(gym.wrappers.FlattenObservation(env), antmaze_goal(task.env_kwargs["maze_map"]))
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    box = env.action_space
    if not isinstance(box, gym.spaces.Box) or not (np.all(box.low == -1) and np.all(box.high == 1)):
        raise DatasetError(f"{env_id}: actions must be a Box in [-1, 1] (tanh policy); wrap the env with gymnasium.wrappers.RescaleAction")
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


# ---------------------------------------------------------------------------------------------------------------
# AntMaze as D4RL defines it: a fixed goal, reward 1 within ANTMAZE_GOAL_RADIUS of it, the ant's 29 states observed


def maze_cell(maze_map, mark: str) -> tuple[int, int]:
    """The (row, col) of the one cell of a maze map marked `mark` ("r": the start, "g": the goal)."""
    (cell,) = [(r, c) for r, row in enumerate(maze_map) for c, v in enumerate(row) if v == mark]
    return cell


def antmaze_goal(maze_map) -> np.ndarray:
    """The evaluation goal: the centre (x, y) of the maze's goal cell, in gymnasium-robotics' coordinates."""
    register_robotics_envs()
    from gymnasium_robotics.envs.maze.maze_v4 import Maze

    maze = Maze(maze_map, maze_size_scaling=4, maze_height=0.5)  # AntMaze's cells are 4 wide
    return maze.cell_rowcol_to_xy(np.array(maze_cell(maze_map, "g")))


def ant_state(flat_obs: np.ndarray) -> np.ndarray:
    """A flat AntMaze observation [achieved_goal (x, y), desired_goal, 27 ant states] without the desired goal: D4RL's 29
    numbers, qpos (x, y first) and qvel. The goal is fixed, so it carries nothing, and D4RL's policies never saw it."""
    return np.delete(flat_obs, [2, 3], axis=-1)


def at_goal(xy: np.ndarray, goal: np.ndarray) -> np.ndarray:
    return np.linalg.norm(xy - goal, axis=-1) <= ANTMAZE_GOAL_RADIUS


class AntMazeGoal(gym.Wrapper):
    """A flattened gymnasium-robotics AntMaze with D4RL's task: observation `ant_state`; reward 1, `terminated` and
    info["success"] where the ant's (x, y) ends a step within ANTMAZE_GOAL_RADIUS of `goal`, reward 0 elsewhere. The
    env's own goal (redrawn with noise at every reset, radius 0.45) is replaced by this fixed one."""

    def __init__(self, env: gym.Env, goal: np.ndarray):
        super().__init__(env)
        self.goal = goal
        size = env.observation_space.shape[0] - 2
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), env.observation_space.dtype)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.env.unwrapped.goal = self.goal.copy()  # the target sphere then marks the real goal (rendering only)
        self.env.unwrapped.update_target_site_pos()
        return ant_state(obs), {**info, "success": bool(at_goal(obs[:2], self.goal))}

    def step(self, action):
        obs, _, _, truncated, info = self.env.step(action)
        success = bool(at_goal(obs[:2], self.goal))
        return ant_state(obs), float(success), success, truncated, {**info, "success": success}


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
