"""Dataset loaders on small files written in the real formats, the embedded task, and their error messages."""

import os

import h5py
import numpy as np
import pytest

from conftest import pointmaze_env
from utils import bridge, datasets, pointmaze
from utils.datasets import load_d4rl_hdf5, load_dataset, load_minari, write_d4rl_hdf5
from utils.tasks import check_dataset_fits_env, get_task, make_env
from utils.validation import DatasetError


def d4rl_arrays(n=6, with_next=True):
    obs = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    arrays = {
        "observations": obs, "actions": np.zeros((n, 1), np.float32), "rewards": np.arange(n, dtype=np.float32),
        # trajectory 0: rows 0-1 (terminal at 1); trajectory 1: rows 2-4 (timeout at 4); trajectory 2: row 5
        "terminals": np.array([0, 1, 0, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 0, 1, 0], bool),
    }
    if with_next:
        arrays["next_observations"] = obs + 100
    return arrays


def test_d4rl_hdf5_drops_timeout_transitions_and_marks_trajectory_ends(d4rl_file):
    data = load_d4rl_hdf5(d4rl_file(**d4rl_arrays()))
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 3])  # row 4 (the timeout) is gone, row 5 never ends
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0])
    np.testing.assert_array_equal(data["episode_ends"], [0, 1, 0, 1])
    np.testing.assert_array_equal(data["next_observations"], data["observations"] + 100)
    assert all(data[k].dtype == np.float32 for k in ("observations", "actions", "rewards", "next_observations"))


def test_d4rl_hdf5_without_next_observations_uses_the_following_row(d4rl_file):
    data = load_d4rl_hdf5(d4rl_file(**d4rl_arrays(with_next=False)))
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 3])
    np.testing.assert_array_equal(data["next_observations"][2], data["observations"][3])


@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize(
    "terminals, timeouts, rows, episode_ends",
    [  # the official Cal-QL code's rows; d4rl.qlearning_dataset stores the same, but for the trailing trajectory
        ([0, 0, 1, 0, 0, 1], [0] * 6, [0, 1, 2, 3, 4], [2, 4]),  # the last row is never stored, even a terminal one
        ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 1, 2, 3, 4], [4]),  # nor a timeout
        ([0, 1, 0, 0, 0, 0], [0] * 6, [0, 1], [1]),  # a trailing trajectory without an end: dropped (d4rl: rows 0-4)
        ([0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1], [1, 2, 3, 4], [3, 4]),  # a timeout row is dropped anywhere
    ],
)
def test_d4rl_hdf5_end_of_file_follows_the_official_cal_ql_code(d4rl_file, terminals, timeouts, rows, episode_ends, with_next):
    arrays = {**d4rl_arrays(with_next=with_next), "terminals": np.array(terminals, bool), "timeouts": np.array(timeouts, bool)}
    data = load_d4rl_hdf5(d4rl_file(**arrays))
    np.testing.assert_array_equal(data["rewards"], rows)  # reward i is written on row i
    np.testing.assert_array_equal(data["terminals"], np.array(terminals, bool)[rows])
    np.testing.assert_array_equal(np.array(rows)[data["episode_ends"]], episode_ends)
    expected_next = arrays["next_observations"][rows] if with_next else arrays["observations"][np.array(rows) + 1]
    np.testing.assert_array_equal(data["next_observations"], expected_next)


def test_missing_corrupt_and_incomplete_files_name_the_problem(tmp_path, d4rl_file):
    with pytest.raises(DatasetError, match="not found.*--dataset-path"):
        load_d4rl_hdf5(str(tmp_path / "absent.hdf5"))
    (tmp_path / "corrupt.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        load_d4rl_hdf5(str(tmp_path / "corrupt.hdf5"))
    arrays = d4rl_arrays()
    del arrays["timeouts"]
    with pytest.raises(DatasetError, match=r"lacks the D4RL keys \['timeouts'\]"):
        load_d4rl_hdf5(d4rl_file(**arrays))


def test_minari_dataset_is_flattened_like_the_environment(minari_pointmaze):
    dataset_id, episodes = minari_pointmaze
    data = load_minari(dataset_id)
    lengths = [len(ep.rewards) for ep in episodes]
    assert len(data["rewards"]) == sum(lengths)
    np.testing.assert_array_equal(np.flatnonzero(data["episode_ends"]), np.cumsum(lengths) - 1)
    env = make_env("PointMaze_UMaze-v3", seed=0)  # FlattenObservation: achieved_goal, desired_goal, observation
    check_dataset_fits_env(data, env, dataset_id)
    first = episodes[0].observations
    np.testing.assert_allclose(data["observations"][0], np.concatenate([first["achieved_goal"][0], first["desired_goal"][0], first["observation"][0]]))
    np.testing.assert_allclose(data["next_observations"][0], data["observations"][1])


def test_missing_minari_dataset_fails_fast_with_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(DatasetError, match="minari download D4RL/pen/human-v2"):
        load_minari("D4RL/pen/human-v2")


def test_shape_mismatch_is_caught_before_training(d4rl_file):
    data = load_d4rl_hdf5(d4rl_file(**d4rl_arrays()))
    with pytest.raises(DatasetError, match=r"observations \(2,\).*do not match.*\(8,\)"):
        check_dataset_fits_env(data, make_env("pointmaze-umaze", seed=0), "data.hdf5")


def test_unknown_env_id_lists_the_supported_ones():
    with pytest.raises(DatasetError, match="unknown --env-id 'NoSuchEnv-v0': use one of pointmaze-umaze"):
        get_task("NoSuchEnv-v0")
    with pytest.raises(DatasetError, match="--dataset-path"):
        get_task("Hopper-v5")


def test_embedded_pointmaze_data_is_relabelled_to_the_fixed_goal(pointmaze_data_dir):
    data = load_dataset("pointmaze-umaze", None, None, pointmaze_data_dir)
    env = make_env("pointmaze-umaze", seed=0)
    check_dataset_fits_env(data, env, "embedded")
    goal = data["observations"][:, 2:4]
    assert np.all(np.abs(goal - [-1.0, 1.0]) <= 0.25 + 1e-6)  # cell (1,1) centre plus the eval env's noise
    reached = np.linalg.norm(data["next_observations"][:, :2] - goal, axis=1) <= 0.45
    np.testing.assert_array_equal(data["terminals"], reached)
    np.testing.assert_array_equal(data["rewards"], reached.astype(np.float32))
    assert 0 < data["terminals"].mean() < 0.5


def collected_expert_data(env_id: str, collect, tmp_path, monkeypatch) -> tuple[dict, np.ndarray]:
    """An embedded task's data from `collect` (4 expert episodes), collected into tmp_path by `load_dataset` and read
    back, checked against the task's env; returns it and the lengths of its 3 whole episodes (the file's last row is
    not stored, the D4RL rule), each of which must end at the goal, the only reward."""
    monkeypatch.setitem(datasets.EMBEDDED, env_id, collect)
    data = load_dataset(env_id, None, None, str(tmp_path))
    assert (tmp_path / f"{env_id}.hdf5").exists()
    check_dataset_fits_env(data, make_env(env_id, seed=0), "embedded")
    ends = np.flatnonzero(data["episode_ends"])
    assert len(ends) == 4 and np.all(data["terminals"][ends[:3]]) and data["terminals"].sum() == 3  # each at the goal
    np.testing.assert_array_equal(data["rewards"], data["terminals"])  # sparse: 1 at the goal only
    return data, np.diff(ends, prepend=-1)[:3]


def test_tight_task_data_is_expert_episodes_reaching_the_goal_with_interior_actions(tmp_path, monkeypatch):
    data, lengths = collected_expert_data("pointmaze-tight", lambda: pointmaze.collect_tight_dataset(episodes=4), tmp_path, monkeypatch)
    assert np.all((0.7 * 200 < lengths) & (lengths <= 200))  # within the task's limit, with little to spare
    assert np.abs(data["actions"]).max() < 0.75  # inside (-1, 1): not in tanh's flat part
    np.testing.assert_allclose(data["observations"][0, 2:4], [-1.0, 1.0], atol=0.25)  # the goal: cell (1,1)
    np.testing.assert_allclose(data["observations"][0, :2], [-1.0, -1.0], atol=0.25)  # the start: the far arm, (3,1)


def test_tight_task_fails_an_expert_at_half_strength():
    import gymnasium as gym

    from utils.tasks import TASKS, register_robotics_envs

    register_robotics_envs()
    task, rng = TASKS["pointmaze-tight"], np.random.default_rng(0)
    env = gym.make(task.gym_id, max_episode_steps=task.max_episode_steps, **task.env_kwargs)
    for strength, reaches in ((1.0, True), (0.45, False)):
        for seed in range(3):
            rows = pointmaze.expert_episode(env, seed, rng, action_scale=strength, **pointmaze.TIGHT_EXPERT)
            assert rows[-1][3] == reaches and len(rows) <= task.max_episode_steps  # terminal: at the goal


def test_bridge_task_data_is_expert_crossings_with_interior_actions(tmp_path, monkeypatch):
    data, lengths = collected_expert_data("point-bridge", lambda: bridge.collect_bridge_dataset(episodes=4), tmp_path, monkeypatch)
    assert np.all((39 <= lengths) & (lengths <= 42))  # the task allows 48
    assert np.abs(data["actions"]).max() < 0.7  # inside (-1, 1): not in tanh's flat part
    assert np.abs(data["next_observations"][:, 1]).max() < bridge.HALF_WIDTH / 4  # near the centre line: falls are new online


def test_bridge_task_fails_a_slower_expert_and_a_fall():
    """What makes a drifting policy lose episodes: 0.8x the expert's speed runs out of time, and a step off the bridge
    leaves the point where it fell, reward 0, until the time limit."""
    env, rng = make_env("point-bridge", seed=0), np.random.default_rng(0)
    for scale, crosses in ((1.0, True), (0.9, True), (0.8, False)):
        for seed in range(3):
            rows = bridge.expert_episode(env, seed, rng, scale=scale)
            assert (rows[-1][3], len(rows) == bridge.TIME_LIMIT) == (crosses, not crosses)  # terminal: across
    env.reset(seed=0)
    steps = [env.step(np.array([0.5, 1.0], np.float32))]  # 0.05 sideways per step
    while not steps[-1][-1]["fallen"]:
        steps.append(env.step(np.array([0.5, 1.0], np.float32)))
    assert abs(steps[-1][0][1]) > bridge.HALF_WIDTH >= abs(steps[-2][0][1]) and len(steps) <= 3
    rest = [env.step(np.array([1.0, -1.0], np.float32)) for _ in range(bridge.TIME_LIMIT - len(steps))]
    image = env.unwrapped.render()  # 100 pixels per unit from (-0.2, 0.3): the point red, the water beyond it blue
    row, col = int(round((0.3 - steps[-1][0][1]) * 100)), int(round((steps[-1][0][0] + 0.2) * 100))
    assert tuple(image[row, col]) == (220, 40, 40) and tuple(image[row - 5 * int(np.sign(steps[-1][0][1])), col]) == (40, 90, 170)
    assert all(np.array_equal(obs, steps[-1][0]) and reward == 0 and not terminated for obs, reward, terminated, *_ in rest)
    assert rest[-1][3] and not rest[-2][3] and not any(info["success"] for *_, info in steps + rest)  # truncated at 48


# ---------------------------------------------------------------------------------------------------------------
# Every loader checks its arrays once, right after reading them: one line naming the source, the field and the fix


def error_line(load, *args) -> str:
    with pytest.raises(DatasetError) as error:
        load(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


def with_nan(array, row):
    array = array.astype(np.float32)
    array[row] = np.nan
    return array


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rewards=np.zeros(5, np.float32)), "rewards has 5 rows but observations has 6: every field needs one row per transition"),
        (dict(rewards=with_nan(np.zeros(6), 3)), "rewards is not finite at row 3 (1 of 6 rows): repair or drop those transitions"),
        (dict(next_observations=with_nan(np.zeros((6, 2)), 4)), "next_observations is not finite at row 4"),
        (dict(observations=np.zeros(6, np.float32)), "observations has shape (6,), expected (n, d): one row per transition"),
        (dict(next_observations=np.zeros((6, 3), np.float32)), "next_observations has shape (6, 3), expected (n, 2) like observations"),
        (dict(actions=np.array([b"up"] * 6)), "actions has dtype |S2, expected bool or int or unsigned int or float"),
        ({k: v[:0] for k, v in d4rl_arrays().items()}, "holds no transition: it is empty"),
        (dict(terminals=np.zeros(6, bool), timeouts=np.array([1, 1, 1, 1, 1, 1], bool)), "holds no complete transition: end each trajectory"),
    ],
    ids=["lengths", "nan_rewards", "nan_next_observations", "rank", "next_observations_size", "dtype", "empty", "no_complete_transition"],
)
def test_malformed_d4rl_file_is_one_line_naming_the_file_the_field_and_the_fix(d4rl_file, change, message):
    path = d4rl_file(**{**d4rl_arrays(), **change})
    line = error_line(load_d4rl_hdf5, path)
    assert line.startswith(f"dataset file {path}") and message in line, line


def test_scalar_columns_stored_as_n_by_1_are_accepted(d4rl_file):
    arrays = d4rl_arrays()
    column = {k: arrays[k][:, None] for k in ("rewards", "terminals", "timeouts")}
    np.testing.assert_array_equal(load_d4rl_hdf5(d4rl_file(**{**arrays, **column}))["rewards"], load_d4rl_hdf5(d4rl_file("flat.hdf5", **arrays))["rewards"])


def test_minari_episode_with_nan_rewards_is_named_by_its_index(minari_store):
    minari_store("test/pointmaze/nan-v0", pointmaze_env(), [3, 3], rewards=[[0, 0, 0], [0, float("nan"), 0]])
    assert error_line(load_minari, "test/pointmaze/nan-v0") == (
        "Minari dataset test/pointmaze/nan-v0, trajectory 1: rewards is not finite at row 1 (1 of 3 rows): repair or drop those transitions")


def test_awac_trajectory_with_a_missing_action_is_named_by_file_and_index(awac_files):
    dataset_dir = awac_files("pen", 45, 24, [[-1, 0]], [[-1, 0], [-1, -1, 0]])
    path = f"{dataset_dir}/offpolicy_hand_data/pen_bc_sparse4.npy"
    trajectories = np.load(path, allow_pickle=True)
    trajectories[1]["actions"] = trajectories[1]["actions"][:2]
    np.save(path, trajectories, allow_pickle=True)
    assert error_line(load_dataset, "pen-binary-v0", None, None, dataset_dir) == (
        f"{path}, trajectory 1: actions has 2 rows but observations has 3: every field needs one row per transition")


def test_a_script_given_a_malformed_file_stops_with_the_one_error_line(run_script, d4rl_file):
    path = d4rl_file(**{**d4rl_arrays(), "rewards": np.zeros(5, np.float32)})
    proc = run_script("cal_ql_continuous.py", "--env-id", "PointMaze_UMaze-v3", "--dataset-path", path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: dataset file {path}: rewards has 5 rows but observations has 6: every field needs one row per transition"


def test_concurrent_writers_of_one_file_each_rename_their_own_complete_file(tmp_path, monkeypatch):
    """Two grid workers collecting the embedded dataset at once: each writes a temporary file of its own in the target
    folder and renames it; the reader always finds a complete file, and no temporary file is left."""
    renamed, real_replace = [], os.replace

    def replace(src, dst):
        renamed.append(src)
        assert_file_holds(src, d4rl_arrays())  # complete before it is renamed
        if len(renamed) == 1:  # the other worker renames its file while this one is still writing
            write_d4rl_hdf5(dst, d4rl_arrays())
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "pointmaze-umaze.hdf5"
    write_d4rl_hdf5(str(target), d4rl_arrays())
    assert len(set(renamed)) == 2 and all(os.path.dirname(src) == str(tmp_path) for src in renamed)
    assert_file_holds(target, d4rl_arrays())
    assert os.listdir(tmp_path) == [target.name]


def assert_file_holds(path, arrays):
    with h5py.File(path, "r") as f:
        assert sorted(f) == sorted(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(f[k][()], v)
