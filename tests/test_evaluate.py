"""benchmarks/evaluate.py: a saved agent of each script, evaluated again, scores what its run logged; bad input."""

import json
import re

import numpy as np
import pytest
import torch

from benchmarks import evaluate
from conftest import TINY, run_in, scalars

ATARI = ["--dataset-size", "300", "--offline-steps", "20", "--offline-eval-every", "10", "--online-env-steps", "150", "--max-episode-steps", "150",
         "--online-eval-every", "150", "--eval-episodes", "2", "--eval-epsilon", "0", "--batch-size", "8", "--log-every", "5"]


@pytest.fixture(scope="module")
def atari_run(tmp_path_factory):
    """A finished tiny run of cal_ql_atari.py (its greedy policy crosses the road at least once in 150 steps); its folder."""
    root = tmp_path_factory.mktemp("evaluate")
    run_in(root, "cal_ql_atari.py", *ATARI, "--run-name", "atari")
    return root / "runs" / "atari"


def assert_scores_what_its_run_logged(run_dir, episodes, metrics):
    """With the run's own evaluation seed and episodes, the agent after pre-training (20 gradient steps) and the final
    one (the run folder's) score exactly what the run logged at the end of each phase."""
    logged = scalars(run_dir, with_values=True)
    for path, step in ((run_dir / "pretrained.pt", 20), (run_dir, logged["eval/return"][-1][0])):
        about, per_episode = evaluate.run_episodes(evaluate.Args(path, episodes=episodes))
        assert f"after {step} gradient steps; {episodes} episodes" in about
        for metric in metrics:
            assert per_episode[metric].mean() == pytest.approx(dict(logged[f"eval/{metric}"])[step], rel=1e-6), (path, metric)
    return per_episode


def test_continuous_agent_plays_its_runs_own_env(run_script, env_module, drift_data, tmp_path):
    """A custom env from a module, with --env-kwargs (goal 0.3 instead of 0.5): the saved kwargs make the same env."""
    flags = ["--env-id", "tiny_envs:Drift-v0", "--env-kwargs", '{"goal": 0.3}', "--dataset-path", drift_data, *TINY, "--offline-steps", "20",
             "--offline-eval-every", "10", "--online-env-steps", "100", "--online-eval-every", "100", "--eval-episodes", "20", "--run-name", "drift"]
    run_script("cal_ql_continuous.py", *flags, env=env_module)
    per_episode = assert_scores_what_its_run_logged(tmp_path / "runs" / "drift", 20, ("return", "success_rate", "length"))
    assert 0 < per_episode["success_rate"].mean() < 1 and np.isnan(per_episode["normalized_score"]).all()  # no reference returns
    _, other_starts = evaluate.run_episodes(evaluate.Args(tmp_path / "runs" / "drift", episodes=20, seed=5))
    assert other_starts["length"].mean() != per_episode["length"].mean()
    # the forgiveness screen: actions x0 never move the point (an episode ends at its first step, where it starts at the
    # goal, or at the time limit); noise changes the episodes
    about, frozen = evaluate.run_episodes(evaluate.Args(tmp_path / "runs" / "drift", episodes=20, action_scale=0.0))
    assert about.endswith("actions x0 + noise 0") and set(frozen["length"]) <= {1, 20} and 20 in frozen["length"]
    _, noisy = evaluate.run_episodes(evaluate.Args(tmp_path / "runs" / "drift", episodes=20, action_noise=0.5))
    assert noisy["length"].mean() != per_episode["length"].mean()


def test_atari_agent_scores_what_its_run_logged(atari_run):
    per_episode = assert_scores_what_its_run_logged(atari_run, 2, ("return",))
    assert per_episode["return"].mean() > 0 and "success_rate" not in per_episode  # Atari games report no success
    (record,) = json.loads((atari_run / "provenance.json").read_text())  # the Atari script records its start too
    assert record["args"]["eval_epsilon"] == 0 and record["versions"]["ale-py"]


def test_command_line_prints_intervals_and_records_videos(atari_run, run_script, tmp_path):
    out = run_script("benchmarks/evaluate.py", str(atari_run / "final.pt"), "--episodes", "3", "--seed", "5", "--capture-video").stdout
    assert "cal_ql_atari on ALE/Freeway-v5 (seed 1) after" in out and "3 episodes from seed 5" in out
    assert "normalized score  - (the task has no reference returns)" in out
    (returns,) = [line for line in out.splitlines() if line.strip().startswith("return")]
    mean, low, high = map(float, returns.replace("[", " ").replace("]", " ").replace(",", " ").split()[1:])
    assert low <= mean <= high
    assert sorted(p.name for p in (tmp_path / "videos" / "atari-eval").glob("*.mp4")) == [f"rl-video-episode-{i}.mp4" for i in range(3)]


def test_a_stopped_runs_folder_evaluates_its_checkpoint(atari_run, tmp_path):
    saved = torch.load(atari_run / "final.pt", weights_only=False)
    (tmp_path / "stopped").mkdir()
    torch.save({"qf": saved["qf"], "args": saved["args"], "progress": {"global_step": 7}}, tmp_path / "stopped" / "checkpoint.pt")
    about, _ = evaluate.run_episodes(evaluate.Args(tmp_path / "stopped", episodes=1))
    assert about.startswith(f"{tmp_path / 'stopped' / 'checkpoint.pt'}: cal_ql_atari on ALE/Freeway-v5 (seed 1) after 7 gradient steps")


def changed(saved, **args):
    return {**saved, "args": {**saved["args"], **args}}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("folder", "holds no agent file (final.pt, checkpoint.pt, pretrained.pt)"),
    (b"not a torch file", "is not a torch file (UnpicklingError)"),
    ({"weights": torch.zeros(1)}, "holds no agent saved by the scripts"),
    (lambda saved: changed(saved, env_id="NoSuchEnv-v0"), "the agent's task NoSuchEnv-v0 cannot be made here (unknown Atari env id"),
    (lambda saved: changed(saved, env_id="ALE/Pong-v5"), "the agent does not fit ALE/Pong-v5 as made here (size mismatch for network.9.weight"),
], ids=["missing", "no-agent-in-folder", "not-torch", "not-agent", "unknown-env", "other-game"])
def test_bad_input_gets_one_line_saying_what_to_do(content, message, atari_run, tmp_path):
    path = tmp_path / "agent.pt"
    if content == "folder":
        path = tmp_path
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content(torch.load(atari_run / "final.pt", weights_only=False)) if callable(content) else content, path)
    with pytest.raises(SystemExit) as stop:
        evaluate.run_episodes(evaluate.Args(path, episodes=1))
    assert str(stop.value).startswith("error: ") and message in str(stop.value) and "\n" not in str(stop.value)


def test_no_episodes_is_refused(atari_run):
    with pytest.raises(SystemExit, match=r"error: --episodes 0: evaluate at least 1 episode"):
        evaluate.run_episodes(evaluate.Args(atari_run, episodes=0))


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/bridge_q.py: learned vs true Q on point-bridge


def test_bridge_true_q_is_the_discounted_return_of_the_action_then_the_policy():
    from benchmarks.bridge_q import true_q

    start, forward = np.zeros(2, np.float32), lambda obs: np.array([0.6, 0.0], np.float32)  # 0.03 per step: across in 34
    crossing = sum(-5 * 0.99**t for t in range(33)) + 5 * 0.99**33  # -5 per step, +5 on the step that ends it
    assert true_q(forward, start, np.array([0.6, 0.0]), 0.99, 10, -5) == pytest.approx(crossing)
    sideways = lambda obs: np.array([0.6, 1.0], np.float32)  # noqa: E731 (off the bridge at the third step)
    assert true_q(sideways, start, np.array([0.6, 1.0]), 0.99, 10, -5) == pytest.approx(-500)  # -5 forever
    assert true_q(forward, start, np.array([-1.0, 0.0]), 0.99, 10, -5) < crossing  # a step back costs


def test_bridge_q_compares_a_saved_agents_q_with_the_truth(run_script, tmp_path):
    from utils.bridge import collect_bridge_dataset
    from utils.datasets import write_d4rl_hdf5

    write_d4rl_hdf5(str(tmp_path / "data" / "point-bridge.hdf5"), collect_bridge_dataset(episodes=2))
    run_script("cql_continuous.py", "--env-id", "point-bridge", "--dataset-dir", "data", *TINY, "--offline-steps", "4", "--offline-eval-every", "4",
               "--online-env-steps", "1", "--online-eval-every", "1", "--eval-episodes", "1", "--run-name", "bridge")
    out = run_script("benchmarks/bridge_q.py", "runs/bridge/pretrained.pt", "runs/bridge/final.pt", "--plot", "q.png").stdout.splitlines()
    sweeps = ["a_x (speed) at the start", "a_y (steering) at the start", "y at x = 0.5, the policy's action"]
    assert [line.split(":")[0] for line in out] == [f"bridge/{name}, {sweep}" for name in ("pretrained.pt", "final.pt") for sweep in sweeps] + ["wrote q.png"]
    assert all(len(re.findall(r"[+-]\d\.\d\d: [+-]\d+\.\d", line)) == 5 for line in out[:-1])  # learned - true at 5 swept values
    assert (tmp_path / "q.png").stat().st_size > 10_000
    run_script("benchmarks/evaluate.py", "runs/bridge", "--episodes", "2", "--capture-video")  # the task renders without a GL backend
    assert sorted(p.name for p in (tmp_path / "videos" / "bridge-eval").glob("*.mp4")) == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4"]
    torch.save({"args": {"env_id": "pointmaze-umaze", "exp_name": "cal_ql_continuous"}, "agent": {}}, tmp_path / "maze.pt")
    proc = run_script("benchmarks/bridge_q.py", "maze.pt", check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: maze.pt is an agent of pointmaze-umaze: give agents saved on point-bridge"
