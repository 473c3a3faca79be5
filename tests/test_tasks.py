"""The paper's tasks on gymnasium-robotics (Adroit binary, AntMaze, Kitchen): their environments, their data written in
the real on-disk formats and loaded through the real code path, the Adroit-binary processing rules, missing-data
errors, the presets, and end-to-end runs with offline and online updates on each family."""

import socket
import sys
import tempfile
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium_robotics.envs.franka_kitchen.kitchen_env import OBS_ELEMENT_GOALS, OBS_ELEMENT_INDICES
from gymnasium_robotics.utils.rotations import euler2quat

from conftest import TINY, reference_mc_returns, scalars
from utils.datasets import load_dataset
from utils.evaluation import evaluate
from utils.tasks import ANTMAZE_EVAL_MAPS, TASKS, check_dataset_fits_env, make_env, maze_cell, register_robotics_envs
from utils.validation import DatasetError

SHAPES = {  # observation dim, action dim, horizon
    "pen-binary-v0": (45, 24, 100), "door-binary-v0": (39, 28, 200), "relocate-binary-v0": (39, 30, 200),
    **{f"antmaze-{name}-v2": (15 + 14, 8, 700) for name in ("umaze", "umaze-diverse")},  # D4RL's qpos + qvel
    **{f"antmaze-{size}-{kind}-v2": (15 + 14, 8, 1000) for size in ("medium", "large") for kind in ("play", "diverse")},
    "kitchen-complete": (11 + 11 + 59, 9, 1000), "kitchen-partial": (11 + 11 + 59, 9, 1000), "kitchen-mixed": (12 + 12 + 59, 9, 1000),
}


@pytest.fixture(autouse=True)
def maze_files_in_tmp_path(tmp_path, monkeypatch):
    """AntMaze writes its maze XML into the temp dir and never deletes it: keep those files in tmp_path, here and in
    the scripts run in a subprocess."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def recording_env(env_id: str) -> gym.Env:
    """The environment the task's Minari dataset was recorded on (the env spec in its metadata)."""
    register_robotics_envs()
    task = TASKS[env_id]
    if task.family == "antmaze":  # continuing, the goal never moves; umaze with its fixed start and goal
        maze = ANTMAZE_EVAL_MAPS["umaze"] if env_id == "antmaze-umaze-v2" else gym.spec(task.gym_id).kwargs["maze_map"]
        return gym.make(task.gym_id, **{**task.env_kwargs, "maze_map": maze})
    if task.family == "kitchen":  # the task's own sub-tasks, never removed, no early end
        return gym.make(task.gym_id, **task.env_kwargs, max_episode_steps=280 if env_id == "kitchen-complete" else 450)
    return gym.make(task.gym_id)  # Adroit: dense reward, the success flag in info


# ---------------------------------------------------------------------------------------------------------------
# Environments


@pytest.mark.parametrize("env_id", SHAPES)
def test_every_paper_task_builds_its_environment_without_warnings(env_id):
    """No warning a user would see: e.g. AntMaze v4 is out of date (chosen on purpose), Kitchen's shared arrays."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make_env(env_id, seed=0)
        obs, _ = env.reset(seed=0)
        for _ in range(2):  # gymnasium's env checker looks at the reset and the first two steps
            env.step(env.action_space.sample())
    assert [str(w.message) for w in caught] == []
    assert (obs.shape[0], env.action_space.shape[0], env.spec.max_episode_steps) == SHAPES[env_id]


def test_antmaze_evaluates_in_the_recorded_maze_from_a_fixed_start_to_a_fixed_goal():
    register_robotics_envs()
    for env_id in ("antmaze-umaze-v2", "antmaze-medium-play-v2", "antmaze-large-diverse-v2"):
        recorded = recording_env(env_id).unwrapped.maze.maze_map
        evaluated = TASKS[env_id].env_kwargs["maze_map"]
        assert [[cell == 1 for cell in row] for row in evaluated] == [[cell == 1 for cell in row] for row in recorded]
        env = make_env(env_id, seed=0)
        maze = env.unwrapped.maze
        assert tuple(maze.cell_xy_to_rowcol(env.goal)) == maze_cell(evaluated, "g")
        for seed in range(3):  # the ant's x, y lead its 29 states
            obs, _ = env.reset(seed=seed)
            assert tuple(maze.cell_xy_to_rowcol(obs[:2])) == maze_cell(evaluated, "r")


def place_ant(env, xy):
    """Put the ant (at rest, as after a reset) at xy."""
    ant = env.unwrapped.ant_env
    qpos = ant.data.qpos.copy()
    qpos[:2] = xy
    ant.set_state(qpos, ant.data.qvel.copy())


@pytest.mark.parametrize("env_id", ["antmaze-umaze-v2", "antmaze-medium-play-v2", "antmaze-large-diverse-v2"])
def test_antmaze_reaching_the_goal_gives_reward_terminated_and_success(env_id):
    env = make_env(env_id, seed=0)
    centre = env.unwrapped.maze.cell_rowcol_to_xy(np.array(maze_cell(TASKS[env_id].env_kwargs["maze_map"], "g")))
    for offset, reached in ((0.48, True), (0.55, False)):  # D4RL's radius 0.5, not the env's own 0.45
        env.reset(seed=0)
        place_ant(env, centre + [offset, 0.0])
        obs, reward, terminated, truncated, info = env.step(np.zeros(8))
        np.testing.assert_allclose(obs[:2], centre + [offset, 0.0], atol=1e-3)  # a still ant stays where it was put
        assert (reward, terminated, truncated, info["success"]) == (float(reached), reached, False, reached)


def aligned_pen_state(env):
    """A Pen start state whose pen already sits at the target with the target's orientation: the next step succeeds."""
    env.reset(seed=0)
    state = env.unwrapped.get_env_state()
    return {**state, "desired_orien": euler2quat(np.array([0.0, np.pi / 2, 0.0]))}


def test_adroit_binary_reward_and_episode_end_at_the_first_success():
    env = make_env("pen-binary-v0", seed=0)
    env.reset(seed=0)
    length, done = 0, False
    while not done:  # random actions: every step pays success - 1 and ends the episode exactly when it succeeds
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        length, done = length + 1, terminated or truncated
        assert reward == float(info["success"]) - 1 and terminated == info["success"]
    assert terminated or length == 100

    env.reset(seed=0, options={"initial_state_dict": aligned_pen_state(env)})
    _, reward, terminated, truncated, info = env.step(np.zeros(24))
    assert (reward, terminated, info["success"], info["normalized_score"]) == (0.0, True, True, 1.0)


class PenAtTargetFirst(gym.Wrapper):
    """Pen whose first episode starts with the pen at the target (it succeeds at once); later ones start as usual."""

    def reset(self, *, seed=None, options=None):
        if getattr(self, "started", False):
            return self.env.reset(seed=seed, options=options)
        self.started = True
        return self.env.reset(seed=seed, options={"initial_state_dict": aligned_pen_state(self.env)})


def test_adroit_evaluation_scores_success_without_reference_returns():
    env = PenAtTargetFirst(make_env("pen-binary-v0", seed=0))
    # the first episode succeeds at its first step; the second, pushed by full actions, never does
    result = evaluate(env, lambda obs: np.ones(24), n_episodes=2, seed=0)  # no ref scores: the env reports the score
    assert (result["success_rate"], result["normalized_score"], result["length"]) == (0.5, 0.5, (1 + 100) / 2)


def test_kitchen_reward_counts_the_solved_subtasks_and_scores_their_fraction():
    env = make_env("kitchen-complete", seed=0)
    tasks = TASKS["kitchen-complete"].env_kwargs["tasks_to_complete"]
    for solved in range(len(tasks) + 1):
        env.reset(seed=0)
        for task in tasks[:solved]:
            env.unwrapped.data.qpos[OBS_ELEMENT_INDICES[task]] = OBS_ELEMENT_GOALS[task]
        _, reward, terminated, _, info = env.step(np.zeros(9))
        assert (reward, info["normalized_score"], info["success"], terminated) == (solved, solved / 4, solved == 4, False)


# ---------------------------------------------------------------------------------------------------------------
# Data of each family, in its real format, through load_dataset


def test_awac_files_are_processed_like_the_official_code(awac_files):
    env = make_env("pen-binary-v0", seed=0)
    # expert file: a success then a failure step, and a trajectory that never succeeds; BC file: two successes
    dataset_dir = awac_files("pen", 45, 24, [[-1, -1, 0, 0, -1], [-1, -1, -1]], [[-1, 0, -1, 0, -1, -1], [-1] * 4])
    data = load_dataset("pen-binary-v0", None, None, dataset_dir)
    check_dataset_fits_env(data, env, "AWAC files")
    np.testing.assert_array_equal(data["rewards"], [-1, -1, 0, 0, -1, 0, -1, 0])  # cut after the last success
    np.testing.assert_array_equal(data["terminals"], data["rewards"] == 0)  # every success step is terminal
    np.testing.assert_array_equal(np.flatnonzero(data["episode_ends"]), [3, 7])
    expert = np.load(f"{dataset_dir}/offpolicy_hand_data/pen2_sparse.npy", allow_pickle=True)
    bc = np.load(f"{dataset_dir}/offpolicy_hand_data/pen_bc_sparse4.npy", allow_pickle=True)
    np.testing.assert_allclose(data["observations"][:4], [o["state_observation"] for o in expert[0]["observations"][:4]], rtol=1e-6)
    np.testing.assert_allclose(data["next_observations"][4:8], bc[0]["next_observations"][:4], rtol=1e-6)
    np.testing.assert_allclose(data["actions"][4:8], bc[0]["actions"][:4], rtol=1e-6)


def test_minari_adroit_reward_is_binarised_from_the_success_flag(minari_store, minari_pointmaze):
    successes = [[False, False, False, True, True, False], [False] * 6]  # after reset, then 5 steps each
    minari_store("D4RL/pen/human-v2", recording_env("pen-binary-v0"), [5, 5], infos=[{"success": np.array(s)} for s in successes])
    data = load_dataset("pen-binary-v0", None, "D4RL/pen/human-v2", "unused")
    check_dataset_fits_env(data, make_env("pen-binary-v0", seed=0), "D4RL/pen/human-v2")
    np.testing.assert_array_equal(data["rewards"], [-1, -1, 0, 0])  # the failed episode is dropped
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 1])
    with pytest.raises(DatasetError, match=r"test/pointmaze/random-v0 has no recorded infos\['success'\]"):
        load_dataset("pen-binary-v0", None, minari_pointmaze[0], "unused")


def test_minari_antmaze_observations_are_the_envs_29_ant_states(minari_store):
    minari_store("D4RL/antmaze/umaze-v1", recording_env("antmaze-umaze-v2"), [3, 3])
    data = load_dataset("antmaze-umaze-v2", None, None, "unused")  # the task's own dataset id
    env = make_env("antmaze-umaze-v2", seed=0)
    check_dataset_fits_env(data, env, "D4RL/antmaze/umaze-v1")
    np.testing.assert_allclose(data["observations"][0], env.reset(seed=0)[0], rtol=1e-6, atol=1e-6)  # same reset
    np.testing.assert_allclose(data["observations"][0], np.concatenate([env.unwrapped.data.qpos, env.unwrapped.data.qvel]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("env_id, elsewhere", [("antmaze-umaze-v2", (1, 3)), ("antmaze-medium-play-v2", (4, 4))])
def test_minari_antmaze_is_relabelled_at_the_evaluation_goal_only(env_id, elsewhere, minari_store):
    """Recorded with its own goal in another cell and reward 1 at every step, from the start cell or the goal cell:
    after loading, reward 1 and terminal exactly within 0.5 of the evaluation goal cell's centre, and each ends a segment."""
    task, lengths = TASKS[env_id], [5] * 12
    recorded_map = [[{"g": "r"}.get(v, v) for v in row] for row in task.env_kwargs["maze_map"]]
    recorded_map[elsewhere[0]][elsewhere[1]] = "g"
    recorder = gym.make(task.gym_id, **{**task.env_kwargs, "maze_map": recorded_map})
    recorder.unwrapped.position_noise_range = 0.1  # starts within 0.4 of a cell's centre (x, y), as some reach the goal
    minari_store(task.dataset_id, recorder, lengths, rewards=[[1.0] * n for n in lengths])
    data = load_dataset(env_id, None, None, "unused")
    check_dataset_fits_env(data, make_env(env_id, seed=0), task.dataset_id)

    maze = recorder.unwrapped.maze
    goal_cell = maze_cell(task.env_kwargs["maze_map"], "g")
    xy = data["next_observations"][:, :2]
    reached = np.linalg.norm(xy - maze.cell_rowcol_to_xy(np.array(goal_cell)), axis=1) <= 0.5
    cells = [tuple(int(i) for i in maze.cell_xy_to_rowcol(p)) for p in xy]
    assert reached.any() and {cell for cell, r in zip(cells, reached) if r} == {goal_cell}  # successes only there
    assert len(set(cells)) > 1  # the data also lies elsewhere, where the recorded reward 1 must become 0
    np.testing.assert_array_equal(data["rewards"], reached)
    np.testing.assert_array_equal(data["terminals"], reached)
    recorded_ends = np.cumsum(lengths) - 1
    np.testing.assert_array_equal(np.flatnonzero(data["episode_ends"]), np.union1d(np.flatnonzero(reached), recorded_ends))


def test_minari_kitchen_is_flattened_like_the_env_and_each_demo_ends_at_a_terminal(minari_store):
    """As D4RL's Kitchen files mark it, for the official code: a demo's last step has MC return r_T and no bootstrap
    (the tail r_T / (1 - gamma) is for online episodes cut by the time limit)."""
    minari_store("D4RL/kitchen/mixed-v2", recording_env("kitchen-mixed"), [4, 4], rewards=[[0, 1, 1, 2], [1, 2, 3, 4]])
    data = load_dataset("kitchen-mixed", None, None, "unused")
    env = make_env("kitchen-mixed", seed=0)
    check_dataset_fits_env(data, env, "D4RL/kitchen/mixed-v2")
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"]), [3, 7])
    np.testing.assert_array_equal(data["episode_ends"], data["terminals"])
    np.testing.assert_allclose(data["observations"][0], env.reset(seed=0)[0], rtol=1e-6, atol=1e-6)
    from dataclasses import replace

    from cal_ql_continuous import PRESETS, Args, label_transitions

    mc_returns = label_transitions(data, replace(Args(), **PRESETS["kitchen"]))["mc_returns"]  # with --mc-bootstrap-tail
    assert (mc_returns[3], mc_returns[7]) == (2, 4)
    np.testing.assert_allclose(mc_returns, reference_mc_returns(data["rewards"], data["terminals"], data["episode_ends"], 0.99), rtol=1e-6)


def test_missing_or_corrupt_paper_data_fails_fast_saying_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))

    def no_network(*args, **kwargs):  # offline, as here: one failed connection, no download retries
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    link = "drive.google.com/file/d/1SsVaQKZnY5UkuR78WrInp9XxTdKHbF0x"
    with pytest.raises(DatasetError, match=rf"door2_sparse.npy and door_bc_sparse4.npy not found in \S+/offpolicy_hand_data/: .*{link}"):
        load_dataset("door-binary-v0", None, None, str(tmp_path))
    for env_id in ("antmaze-large-diverse-v2", "kitchen-partial"):
        with pytest.raises(DatasetError, match=f"minari download {TASKS[env_id].dataset_id}"):
            load_dataset(env_id, None, None, str(tmp_path))
    folder = tmp_path / "offpolicy_hand_data"
    folder.mkdir()
    for name in TASKS["relocate-binary-v0"].data_files:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="relocate2_sparse.npy is not an AWAC trajectory file"):
        load_dataset("relocate-binary-v0", None, None, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Presets, the Kitchen labelling, and the script end to end


def test_presets_are_the_official_settings_of_each_family(monkeypatch):
    from cal_ql_continuous import PRESETS, parse_args

    assert {task.family for task in TASKS.values()} <= set(PRESETS)

    def args(env_id):
        monkeypatch.setattr(sys, "argv", ["cal_ql_continuous.py", "--env-id", env_id])
        return parse_args()

    pen, door, ant, kitchen = args("pen-binary-v0"), args("door-binary-v0"), args("antmaze-large-play-v2"), args("kitchen-mixed")
    assert (pen.online_env_steps, door.online_env_steps) == (200_000, 1_000_000)  # a task's own entry refines its family's
    assert (door.reward_scale, door.reward_bias, door.failure_reward, door.cql_weight, door.cql_lagrange) == (10, 5, -1, 1, False)
    assert (door.policy_hidden, door.q_hidden, door.offline_steps, door.offline_eval_every) == ([512] * 2, [512] * 3, 20_000, 2_000)
    assert (ant.reward_scale, ant.reward_bias, ant.failure_reward, ant.cql_lagrange, ant.cql_target_action_gap) == (10, -5, 0, True, 0.8)
    assert (ant.policy_hidden, ant.q_hidden, ant.offline_steps, ant.online_env_steps) == ([256] * 2, [256] * 4, 1_000_000, 1_000_000)
    assert (kitchen.cql_importance_sample, kitchen.mixing_ratio, kitchen.failure_reward, kitchen.mc_bootstrap_tail) == (False, 0.25, None, True)
    assert (kitchen.q_hidden, kitchen.offline_steps, kitchen.online_env_steps, kitchen.online_eval_every) == ([512] * 3, 500_000, 1_500_000, 5_000)


@pytest.mark.parametrize("env_id, preset", [
    ("pointmaze-tight", dict(cql_weight=5, cql_lagrange=False, q_hidden=[64, 64], tau=0.02, offline_steps=20_000, online_env_steps=3_000, online_eval_every=500)),
    ("point-bridge", dict(cql_lagrange=True, cql_target_action_gap=0.8, q_hidden=[64, 64], tau=0.02, offline_steps=10_000, online_env_steps=3_000, online_eval_every=250)),
])
def test_dip_tasks_run_with_their_presets_on_their_collected_data(env_id, preset, run_script, tmp_path, monkeypatch):
    """The tasks built for the fine-tuning dip: AntMaze's rewards under their own regularizer, networks, targets and
    phases; a tiny run end to end on a few of their expert episodes, written where the script caches the collected data."""
    from cal_ql_continuous import parse_args

    from utils.datasets import EMBEDDED, write_d4rl_hdf5

    monkeypatch.setattr(sys, "argv", ["cal_ql_continuous.py", "--env-id", env_id])
    args = parse_args()
    assert (args.reward_scale, args.reward_bias, args.failure_reward) == (10, -5, 0)
    assert {name: getattr(args, name) for name in preset} == preset
    write_d4rl_hdf5(str(tmp_path / "data" / f"{env_id}.hdf5"), EMBEDDED[env_id](episodes=2))
    run_script("cql_continuous.py", "--env-id", env_id, "--dataset-dir", "data", *RUN)
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert logged["eval/success_rate"][:2] == [0, 4] and torch.load(run_dir / "final.pt")["global_step"] > 4


def test_kitchen_labels_continue_the_last_reward_of_a_time_limited_trajectory():
    from dataclasses import replace

    from cal_ql_continuous import Args, label_transitions

    gamma = 0.99  # trajectory 1 stops at the time limit: G_T = r_T / (1 - gamma); trajectory 2 ends at a terminal
    data = {"observations": np.zeros((5, 1)), "actions": np.zeros((5, 1)), "next_observations": np.zeros((5, 1)),
            "rewards": np.array([0.0, 1.0, 2.0, 3.0, 4.0]), "terminals": np.array([0, 0, 0, 0, 1], bool),
            "episode_ends": np.array([0, 0, 1, 0, 1], bool)}
    args = replace(Args(), gamma=gamma, reward_scale=1.0, reward_bias=0.0, failure_reward=None, mc_bootstrap_tail=True)
    returns = label_transitions(data, args)["mc_returns"]
    tail = 2 / (1 - gamma)
    np.testing.assert_allclose(returns, [gamma * (1 + gamma * tail), 1 + gamma * tail, tail, 3 + gamma * 4, 4], rtol=1e-6)
    np.testing.assert_array_equal(label_transitions(data, args)["rewards"], data["rewards"])  # the TD rewards stay raw


RUN = [*TINY, "--offline-steps", "4", "--offline-eval-every", "4", "--online-env-steps", "1", "--online-eval-every", "1", "--eval-episodes", "1"]


@pytest.mark.parametrize("env_id", ["pen-binary-v0", "antmaze-umaze-v2", "kitchen-complete"])
def test_script_pretrains_and_finetunes_each_family(env_id, run_script, awac_files, minari_store, tmp_path):
    if TASKS[env_id].family == "adroit":  # the task's AWAC files, two successful trajectories in each
        env = make_env(env_id, seed=0)
        dataset_dir = awac_files("pen", env.observation_space.shape[0], env.action_space.shape[0], [[-1, -1, 0, 0, -1]] * 2, [[-1, 0, -1, 0]] * 2)
    else:
        dataset_dir = str(tmp_path / "unused")
        minari_store(TASKS[env_id].dataset_id, recording_env(env_id), [8, 8], rewards=[[0] * 5 + [1] * 3, [0] * 8])
    run_script("cal_ql_continuous.py", "--env-id", env_id, "--dataset-dir", dataset_dir, *RUN)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert torch.load(run_dir / "pretrained.pt")["global_step"] == 4  # offline updates
    final_step = torch.load(run_dir / "final.pt")["global_step"]
    assert final_step > 4  # one whole online episode, then as many updates as its steps
    logged = scalars(run_dir)
    assert logged["eval/normalized_score"] == [0, 4, final_step] and max(logged["losses/qf_loss"]) > 4
