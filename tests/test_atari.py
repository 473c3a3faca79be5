"""Tests of cal_ql_atari.py (its MC labels: tests/test_mc_returns.py) and its utils: the DQN Replay loader, frame
stacking, evaluation, the Cal-QL loss, and a smoke run."""

import gzip

import gymnasium
import numpy as np
import pytest
import torch

import cal_ql_atari as atari
from conftest import FAST_MODES, assert_same_training, host_reads, scalars
from utils.atari_data import load_replay_logs, make_env
from utils.evaluation import epsilon_greedy, evaluate
from utils.validation import DatasetError

GAMMA = 0.99


def numbered_replay(n, terminal_at=()):
    """A replay checkpoint whose frame i is filled with i + 1 (0 is the padding value) and whose reward i is i."""
    terminal = np.zeros(n, np.uint8)
    terminal[list(terminal_at)] = 1
    return dict(
        observation=np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None], (n, 84, 84)).copy(),
        action=(np.arange(n) % 3).astype(np.int32),
        reward=np.arange(n, dtype=np.float32),
        terminal=terminal,
    )


def frame_store(n, terminal_at=(), episode_end_at=()):
    data = numbered_replay(n, terminal_at)
    terminals = data["terminal"].astype(bool)
    episode_ends = terminals.copy()
    episode_ends[list(episode_end_at)] = True
    return atari.FrameStore(frames=data["observation"], actions=data["action"].astype(np.int64), rewards=data["reward"],
                            terminals=terminals, episode_ends=episode_ends, mc_returns=np.zeros(n, np.float32))


def frame_ids(stacks):
    """The number written in each stacked frame (frame i holds i + 1; 0 = padding)."""
    return stacks[:, :, 0, 0].astype(int).tolist()


# ---------------- DQN Replay loader ----------------


def test_replay_loader_concatenates_checkpoints_and_ends_a_trajectory_at_each(atari_replay_logs):
    atari_replay_logs(0, **numbered_replay(6, terminal_at=[2]))
    folder = atari_replay_logs(1, **numbered_replay(5))
    data = load_replay_logs(folder, checkpoints=(0, 1), transitions_per_checkpoint=4)
    assert data["frames"].shape == (8, 84, 84) and data["frames"].dtype == np.uint8
    assert data["frames"][:, 0, 0].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert data["rewards"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert data["actions"].tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    assert np.flatnonzero(data["terminals"]).tolist() == [2]
    assert np.flatnonzero(data["episode_ends"]).tolist() == [2, 3, 7]


def test_replay_loader_cuts_a_full_circular_buffer_at_its_cursor(atari_replay_logs):
    folder = atari_replay_logs(0, **numbered_replay(8))
    with gzip.open(folder / "add_count_ckpt.0.gz", "wb") as f:
        np.save(f, np.array(8 + 3))  # the cursor stands at index 3: index 2 is the newest step, index 3 the oldest
    assert np.flatnonzero(load_replay_logs(folder, (0,))["episode_ends"]).tolist() == [2, 7]


BROKEN_REPLAY = {  # what is broken -> (the file named, the problem stated)
    "missing": ("reward", "missing"),
    "not_gzip": ("terminal", "cannot read"),
    "wrong_frame_shape": ("observation", "has shape (5, 64, 64), expected (n, 84, 84)"),
    "wrong_frame_dtype": ("observation", "has dtype float32, expected uint8"),
    "short_rewards": ("reward", "has 3 rows but $store$_observation_ckpt.0.gz has 5"),
    "nan_rewards": ("reward", "is not finite at row 2 (1 of 5 rows)"),
    "actions_of_rank_2": ("action", "has shape (5, 1), expected (n)"),
}


@pytest.mark.parametrize("broken", BROKEN_REPLAY)
def test_unreadable_replay_file_is_one_error_line_naming_the_file_and_layout(atari_replay_logs, broken):
    data = numbered_replay(5)
    data["observation"] = data["observation"][:, :64, :64] if broken == "wrong_frame_shape" else data["observation"]
    data["observation"] = data["observation"].astype(np.float32) if broken == "wrong_frame_dtype" else data["observation"]
    data["reward"] = data["reward"][:3] if broken == "short_rewards" else data["reward"]
    data["reward"][2] = np.nan if broken == "nan_rewards" else data["reward"][2]
    data["action"] = data["action"][:, None] if broken == "actions_of_rank_2" else data["action"]
    folder = atari_replay_logs(0, **data)
    if broken == "missing":
        (folder / "$store$_reward_ckpt.0.gz").unlink()
    if broken == "not_gzip":
        (folder / "$store$_terminal_ckpt.0.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DatasetError) as error:
        load_replay_logs(folder, (0,))
    message = str(error.value)
    assert "\n" not in message and "expected <replay-dir>/$store$_" in message
    bad_file, problem = BROKEN_REPLAY[broken]
    assert f"$store$_{bad_file}_ckpt.0.gz" in message and problem in message, message


def test_corrupt_buffer_cursor_is_one_error_line(atari_replay_logs):
    folder = atari_replay_logs(0, **numbered_replay(5))
    (folder / "add_count_ckpt.0.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DatasetError, match=r"^cannot read \S+/add_count_ckpt.0.gz \(BadGzipFile: .*delete it to load every row$"):
        load_replay_logs(folder, (0,))


def test_the_script_stops_on_bad_replay_data_with_the_one_error_line(atari_replay_logs, run_script):
    data = numbered_replay(5)
    data["reward"][2] = np.nan
    proc = run_script("cal_ql_atari.py", "--replay-dir", str(atari_replay_logs(0, **data)), check=False)
    assert proc.returncode == 1
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "$store$_reward_ckpt.0.gz is not finite at row 2" in last_line


@pytest.mark.parametrize("rows", [0, 1])
def test_replay_without_a_complete_transition_is_refused(atari_replay_logs, rows):
    folder = atari_replay_logs(0, **numbered_replay(rows))  # one row without a terminal has no next frame
    with pytest.raises(DatasetError, match="holds no transition: it is empty" if rows == 0 else "hold no complete transition"):
        load_replay_logs(folder, (0,))


# ---------------- frame stacks ----------------


def test_frame_stack_holds_the_four_latest_frames_and_the_next_ones():
    obs, next_obs = frame_store(10, episode_end_at=[9]).stacks(np.array([5, 8]))
    assert frame_ids(obs) == [[3, 4, 5, 6], [6, 7, 8, 9]]
    assert frame_ids(next_obs) == [[4, 5, 6, 7], [7, 8, 9, 10]]


def test_frame_stack_does_not_leak_across_episodes():
    store = frame_store(10, terminal_at=[3], episode_end_at=[9])  # episodes: steps 0-3 and 4-9
    obs, next_obs = store.stacks(np.array([0, 4, 5, 3]))
    assert frame_ids(obs) == [[0, 0, 0, 1], [0, 0, 0, 5], [0, 0, 5, 6], [1, 2, 3, 4]]
    assert frame_ids(next_obs)[:3] == [[0, 0, 1, 2], [0, 0, 5, 6], [0, 5, 6, 7]]


def test_trajectory_end_without_terminal_is_never_sampled():
    store = frame_store(10, terminal_at=[3], episode_end_at=[6, 9])  # 6 and 9 end without a next frame
    rewards = store.sample(2000, np.random.default_rng(0))["rewards"]
    assert set(rewards.astype(int).tolist()) == {0, 1, 2, 3, 4, 5, 7, 8}


def test_online_buffer_grows_by_labelled_episodes():
    store, rng = atari.FrameStore.empty(), np.random.default_rng(0)
    for length in (3, 5):
        last = np.arange(length) == length - 1
        episode = dict(frames=np.full((length, 84, 84), length, np.uint8), actions=np.zeros(length, np.int64),
                       rewards=np.full(length, 2.0, np.float32), terminals=last, episode_ends=last)
        store.add(**atari.label(episode, GAMMA))
    assert store.size == 8
    np.testing.assert_allclose(store.data["mc_returns"][:3], [1 + GAMMA + GAMMA**2, 1 + GAMMA, 1])  # clipped to 1
    obs, _ = store.stacks(np.array([3]))
    assert frame_ids(obs) == [[0, 0, 0, 5]]
    assert store.sample(4, rng)["obs"].shape == (4, 4, 84, 84)


# ---------------- evaluation ----------------


def test_evaluation_plays_zero_padded_frame_stacks_and_reports_the_raw_return():
    """The evaluation env stacks frames as the frame store does, and evaluate() sums the raw, unclipped rewards."""
    env = gymnasium.wrappers.FrameStackObservation(make_env("ALE/Freeway-v5", seed=0, max_episode_steps=4), 4, padding_type="zero")
    seen = []

    def policy(stack):
        seen.append(stack.copy())
        return 1  # UP

    result = evaluate(env, epsilon_greedy(policy, 3, epsilon=0.0, rng=np.random.default_rng(0)), n_episodes=2, seed=0)
    assert len(seen) == 8 and result["length"] == 4
    first = seen[0]
    assert first.shape == (4, 84, 84) and not first[:3].any() and first[3].any()  # zeros before the first frame
    np.testing.assert_array_equal(seen[1][2], first[3])  # the stack shifts by one frame per step
    np.testing.assert_array_equal(seen[4], first)  # every evaluation episode starts from the same seeded reset


def test_epsilon_greedy_takes_random_actions_at_rate_epsilon():
    policy = epsilon_greedy(lambda obs: 7, n_actions=3, epsilon=0.25, rng=np.random.default_rng(0))
    actions = np.array([policy(None) for _ in range(4000)])
    assert abs(np.mean(actions != 7) - 0.25) < 0.03 and set(actions[actions != 7].tolist()) == {0, 1, 2}


# ---------------- the Cal-QL loss ----------------


def test_calibration_only_raises_the_q_values_below_the_mc_return():
    q = torch.tensor([[0.0, 1.0, 3.0], [2.0, -1.0, 4.0]], requires_grad=True)
    q_data, mc_returns = torch.tensor([1.0, 2.0]), torch.tensor([2.0, -10.0])
    loss = atari.cql_loss(q, q_data, mc_returns, calibrate=True)
    bounded = torch.tensor([[2.0, 2.0, 3.0], [2.0, -1.0, 4.0]])
    torch.testing.assert_close(loss, (torch.logsumexp(bounded, 1) - q_data).mean())
    loss.backward()
    assert (q.grad[0, :2] == 0).all() and (q.grad[0, 2] > 0) and (q.grad[1] > 0).all()


def test_calibrated_update_equals_plain_cql_when_the_bound_is_very_low():
    torch.manual_seed(0)
    store = frame_store(12, terminal_at=[5], episode_end_at=[11])
    batch = atari.to_torch(store.sample(6, np.random.default_rng(0)), "cpu")
    batch["mc_returns"] = torch.full((6,), -1e6)
    results = []
    for calibrate in (True, False):
        torch.manual_seed(1)
        qf, qf_target = atari.QNetwork(3), atari.QNetwork(3)
        args = atari.Args(calibrate=calibrate)
        metrics = atari.update(qf, qf_target, torch.optim.Adam(qf.parameters(), lr=1e-3), batch, args)
        results.append((metrics, torch.nn.utils.parameters_to_vector(qf.parameters())))
    (calibrated, calibrated_params), (plain, plain_params) = results
    assert calibrated["calibration/bound_rate"] == 0
    for key in ("losses/td_loss", "losses/cql_loss", "losses/q_values"):
        torch.testing.assert_close(calibrated[key], plain[key])
    torch.testing.assert_close(calibrated_params, plain_params)


@pytest.mark.parametrize("mode, device", FAST_MODES)
def test_fast_train_step_matches_eager(mode, device):
    """--compile and --cudagraphs wrap the same update: same metrics and parameters over warm-up, capture and replays."""
    store, rng = frame_store(40, terminal_at=[19], episode_end_at=[39]), np.random.default_rng(0)
    batches = [atari.to_torch(store.sample(4, rng), device) for _ in range(6)]

    def run(flags):
        torch.manual_seed(1)
        qf, qf_target = atari.QNetwork(3).to(device), atari.QNetwork(3).to(device)
        args = atari.Args(**flags)
        optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, eps=0.01 / 32, capturable=args.cudagraphs)  # the script's
        step = atari.make_train_step(qf, qf_target, optimizer, args)
        return [{k: v.clone() for k, v in step(batch).items()} for batch in batches], qf.state_dict()

    assert_same_training(run(mode), reference=run({}))


def test_non_finite_loss_stops_the_run_naming_the_loss_and_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    metrics = {"losses/td_loss": torch.tensor(1.0), "losses/cql_loss": torch.tensor(float("nan"))}
    with SummaryWriter(tmp_path) as writer, pytest.raises(SystemExit, match="error: losses/cql_loss became nan by gradient step 7"):
        atari.log_metrics(writer, metrics, global_step=7, steps_per_second=1.0)


def test_update_reads_nothing_on_the_host_but_cpu_adams_step_count():
    """The update --cudagraphs captures must not sync with the host (capturable Adam keeps its counter on the GPU)."""
    store = frame_store(40, terminal_at=[19], episode_end_at=[39])
    qf, qf_target = atari.QNetwork(3), atari.QNetwork(3)
    args = atari.Args()
    step = atari.make_train_step(qf, qf_target, torch.optim.Adam(qf.parameters(), lr=args.learning_rate), args)
    batch = atari.to_torch(store.sample(4, np.random.default_rng(0)), "cpu")
    step(batch)
    reads = host_reads(lambda: step(batch))
    assert reads and all("torch/optim/adam.py" in where for where in reads), reads


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cudagraphs_without_a_gpu_is_one_clear_error(run_script):
    proc = run_script("cal_ql_atari.py", "--cudagraphs", check=False)
    assert proc.returncode != 0 and "error: --cudagraphs replays CUDA graphs and needs a CUDA GPU" in proc.stderr.strip().splitlines()[-1]


def test_unknown_env_id_is_one_clear_error():
    with pytest.raises(DatasetError, match="unknown Atari env id 'ALE/NoSuchGame-v5'"):
        make_env("ALE/NoSuchGame-v5", seed=0)


def test_module_env_id_imports_its_module_first(env_module, run_script):
    env = make_env("tiny_envs:FreewayAgain-v0", seed=0)  # registered by the module, as an ALE game
    assert env.unwrapped.spec.id == "FreewayAgain-v0" and env.reset()[0].shape == (84, 84)
    proc = run_script("cal_ql_atari.py", "--env-id", "no_such_module:Pong-v5", check=False)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --env-id no_such_module:Pong-v5: importing its module no_such_module failed (ModuleNotFoundError: No module named "
        "'no_such_module'); fix the module, or put its folder on PYTHONPATH")


# ---------------- end to end on the real ALE ----------------

SMOKE = ["--dataset-size", "300", "--offline-steps", "20", "--offline-eval-every", "10", "--online-env-steps", "100",
         "--max-episode-steps", "40", "--utd-ratio", "0.5", "--online-eval-every", "50", "--eval-episodes", "1", "--batch-size", "8",
         "--log-every", "5", "--target-update-period", "10"]


def test_smoke_run_pretrains_finetunes_evaluates_and_saves(run_script, tmp_path):
    run_script("cal_ql_atari.py", *SMOKE, "--capture-video")
    replay_logs = tmp_path / "datasets/atari/Freeway/replay_logs"
    assert load_replay_logs(replay_logs, (0,))["frames"].shape == (300, 84, 84)
    (run_dir,) = (tmp_path / "runs").iterdir()
    for checkpoint in ("pretrained.pt", "final.pt"):
        atari.QNetwork(3).load_state_dict(torch.load(run_dir / checkpoint)["qf"])
    logged = scalars(run_dir)
    keys = {"charts/SPS", "charts/episodic_return", "losses/td_loss", "losses/cql_loss", "losses/q_values",
            "calibration/bound_rate", "calibration/q_minus_mc", "eval/return"}
    assert keys <= set(logged)
    # 3 online episodes of 40 steps, 20 updates after each: gradient steps 21..80 happen online
    assert logged["losses/td_loss"][-1] == 80
    assert logged["eval/return"] == [0, 10, 20, 60, 80]
    assert len(list((tmp_path / "videos").glob("*/*.mp4"))) == 5  # the first episode of each evaluation
    # a second run reuses the collected dataset
    rerun = run_script("cal_ql_atari.py", *SMOKE, "--offline-steps", "0", "--online-env-steps", "0")
    assert "reusing the built-in dataset" in rerun.stdout
