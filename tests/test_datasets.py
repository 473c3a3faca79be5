"""Dataset loaders on small files written in the real formats, the embedded task, and their error messages."""

import numpy as np
import pytest

from utils import DatasetError
from utils.datasets import load_d4rl_hdf5, load_dataset, load_minari
from utils.tasks import check_dataset_fits_env, get_task, make_env


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
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 3, 5])  # row 4 (the timeout) is gone
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(data["episode_ends"], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(data["next_observations"], data["observations"] + 100)
    assert all(data[k].dtype == np.float32 for k in ("observations", "actions", "rewards", "next_observations"))


def test_d4rl_hdf5_without_next_observations_uses_the_following_row(d4rl_file):
    data = load_d4rl_hdf5(d4rl_file(**d4rl_arrays(with_next=False)))
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 3])  # the last row has no successor
    np.testing.assert_array_equal(data["next_observations"][2], data["observations"][3])


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
