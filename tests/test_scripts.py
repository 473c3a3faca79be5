"""End-to-end runs of both continuous scripts with tiny networks: offline updates, online episodes with
updates, evaluations, TensorBoard logs and checkpoints; plus the twin-sync check and bad-input errors."""

import ctypes.util
import difflib
import re

import pytest
import torch

from conftest import REPO, TINY, scalars
from utils.tasks import make_env

SHORT = ["--offline-steps", "20", "--offline-eval-every", "10", "--online-env-steps", "400", "--online-eval-every", "200", "--eval-episodes", "2"]
EXPECTED_KEYS = {
    "losses/qf_loss", "losses/td_loss", "losses/cql_loss", "losses/actor_loss", "losses/alpha", "losses/alpha_prime",
    "calibration/bound_rate", "calibration/q_minus_mc", "charts/SPS", "charts/episodic_return", "charts/episodic_success",
    "charts/train_regret", "eval/return", "eval/success_rate", "eval/normalized_score", "eval/regret",
}


@pytest.mark.parametrize("script", ["cal_ql_continuous.py", "cql_continuous.py"])
def test_offline_then_online_run_logs_evaluates_and_checkpoints(script, run_script, pointmaze_data_dir, tmp_path):
    run_script(script, "--dataset-dir", pointmaze_data_dir, *TINY, *SHORT)
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert EXPECTED_KEYS <= set(logged), EXPECTED_KEYS - set(logged)
    assert logged["eval/return"][:3] == [0, 10, 20]  # before training, then every 10 offline steps
    assert max(logged["losses/qf_loss"]) > 20  # online gradient steps ran after the 20 offline ones
    assert len(logged["eval/regret"]) >= 2
    assert (run_dir / "pretrained.pt").exists() and (run_dir / "final.pt").exists()

    # fine-tune from the saved pre-training: no offline phase, online updates continue its step count
    proc = run_script(script, "--dataset-dir", pointmaze_data_dir, *TINY, *SHORT, "--pretrained-checkpoint", str(run_dir / "pretrained.pt"), "--exp-name", "finetune")
    assert "pre-trained for 20 gradient steps" in proc.stdout
    (finetune_dir,) = (tmp_path / "runs").glob("*finetune*")
    logged = scalars(finetune_dir)
    assert min(logged["losses/qf_loss"]) > 20 and min(logged["eval/return"]) > 20


def test_own_env_from_a_module_with_env_kwargs_runs_and_saves_them(run_script, env_module, drift_data, tmp_path):
    """`--env-id module:EnvId` imports the module first, as gymnasium.make does; --env-kwargs reach gymnasium.make and
    are saved with the run's args, from which an evaluator builds the same env."""
    kwargs = '{"goal": 0.3, "max_episode_steps": 7}'
    flags = ["--env-id", "tiny_envs:Drift-v0", "--env-kwargs", kwargs, "--dataset-path", drift_data, *TINY, *SHORT, "--online-env-steps", "60"]
    run_script("cal_ql_continuous.py", *flags, env=env_module)
    (run_dir,) = (tmp_path / "runs").iterdir()
    lengths = [length for _, length in scalars(run_dir, with_values=True)["charts/episodic_length"]]
    assert sum(lengths) >= 60 and max(lengths) <= 7 < 20  # the kwargs' time limit, not the registered one
    saved = torch.load(run_dir / "final.pt", weights_only=False)["args"]
    assert (saved["env_id"], saved["env_kwargs"]) == ("tiny_envs:Drift-v0", kwargs)
    env = make_env(saved["env_id"], seed=0, env_kwargs=saved["env_kwargs"])
    assert (env.unwrapped.goal, env.spec.max_episode_steps) == (0.3, 7)


def test_capture_video_records_the_first_episode_of_each_evaluation(run_script, pointmaze_data_dir, tmp_path, monkeypatch):
    if not ctypes.util.find_library("OSMesa"):
        pytest.skip("headless rendering needs libOSMesa (apt-get install libosmesa6)")
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    flags = ["--offline-steps", "10", "--offline-eval-every", "10", "--online-env-steps", "0", "--eval-episodes", "2"]
    run_script("cal_ql_continuous.py", "--dataset-dir", pointmaze_data_dir, *TINY, *flags, "--capture-video")
    videos = sorted(path.name for path in (tmp_path / "videos").glob("*/*.mp4"))
    assert videos == ["rl-video-episode-0.mp4", "rl-video-episode-2.mp4"]  # evaluations at steps 0 and 10


def test_checkpoint_of_other_network_sizes_is_refused(run_script, pointmaze_data_dir, tmp_path):
    run_script("cal_ql_continuous.py", "--dataset-dir", pointmaze_data_dir, *TINY, "--offline-steps", "1", "--online-env-steps", "0", "--eval-episodes", "1")
    (checkpoint,) = (tmp_path / "runs").glob("*/pretrained.pt")
    flags = [*TINY, "--q-hidden", "8", "--online-env-steps", "0", "--pretrained-checkpoint", str(checkpoint)]
    proc = run_script("cal_ql_continuous.py", "--dataset-dir", pointmaze_data_dir, *flags, check=False)
    assert proc.returncode != 0 and "does not fit this run" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchEnv-v0"], "error: unknown --env-id 'NoSuchEnv-v0': use one of"),
        (["--env-id", "Hopper-v5"], "--dataset-path FILE.hdf5"),
        (["--dataset-path", "missing.hdf5"], "error: dataset file missing.hdf5 not found"),
        (["--reward-scale", "1e39", "--offline-steps", "10"], "error: losses/qf_loss became nan by gradient step 5"),
        (["--mixing-ratio", "1.5"], "error: --mixing-ratio 1.5 is the offline share of a batch"),
        (["--env-id", "no_such_module:Drift-v0", "--dataset-path", "data.hdf5"],
         "error: --env-id no_such_module:Drift-v0: importing its module no_such_module failed (ModuleNotFoundError: No module named 'no_such_module')"),
        (["--env-kwargs", '{"continuing_task": true}'], "error: --env-kwargs is for a custom gymnasium id: the settings of the task pointmaze-umaze are fixed"),
        (["--env-id", "PointMaze_UMaze-v3", "--dataset-path", "data.hdf5", "--env-kwargs", "{continuing_task: true}"], "is not valid JSON"),
        (["--env-id", "PointMaze_UMaze-v3", "--dataset-path", "data.hdf5", "--env-kwargs", '{"colour": 1}'],
         "error: --env-kwargs {\"colour\": 1} do not fit PointMaze_UMaze-v3 (MujocoEnv.__init__() got an unexpected keyword argument 'colour'): give only"),
        pytest.param(["--cudagraphs"], "error: --cudagraphs replays CUDA graphs and needs a CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    ],
)
def test_bad_input_stops_with_one_clear_line(flags, message, run_script, pointmaze_data_dir):
    proc = run_script("cal_ql_continuous.py", "--dataset-dir", pointmaze_data_dir, *TINY, "--eval-episodes", "1", *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]


def flag_comments(script: str) -> tuple[list[str], dict[str, str]]:
    """The fields of a script's Args and the `# help` comment after each, read from its source."""
    args_class = (REPO / script).read_text().split("\nclass Args:\n")[1].split("\n\n\n")[0]
    fields = re.findall(r"^    (\w+): ", args_class, re.M)
    return fields, dict(re.findall(r"^    (\w+): [^#\n]*  # (.+)$", args_class, re.M))


@pytest.mark.parametrize("script", ["cal_ql_continuous.py", "cql_continuous.py", "cal_ql_atari.py"])
def test_help_documents_every_flag(script, run_script):
    fields, comments = flag_comments(script)
    assert len(fields) > 30 and set(comments) == set(fields), set(fields) - set(comments)
    out = run_script(script, "--help", env={"COLUMNS": "400"}).stdout
    text = " ".join(" ".join(line.strip("│╭╮╰╯─ ").split()) for line in out.splitlines())
    for name in fields:  # the flag, its metavar (or its --no- form), then the comment as its help text
        places = re.finditer(rf"(^| ){re.escape('--' + name.replace('_', '-'))}[ ,]", text)  # its entry, or a mention
        assert any(comments[name] in text[at.end() : at.end() + len(comments[name]) + 80] for at in places), name


def test_help_shows_the_task_preset_as_defaults(run_script):
    out = run_script("cal_ql_continuous.py", "--help", env={"COLUMNS": "400"}).stdout
    assert "--q-hidden" in out and "(default: 128 128)" in out  # the embedded task's preset is the default shown


def test_cql_twin_differs_from_cal_ql_only_in_the_calibration_line():
    cal = (REPO / "cal_ql_continuous.py").read_text().splitlines()
    cql = (REPO / "cql_continuous.py").read_text().splitlines()
    diff = [line for line in difflib.unified_diff(cql, cal, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    only_cal = [line[1:] for line in diff if line.startswith("+")]
    only_cql = [line[1:] for line in diff if line.startswith("-")]
    assert only_cql == ['"""CQL for continuous actions: offline pre-training, then online fine-tuning, in one file (Cal-QL without calibration).']
    assert len(only_cal) == 2 and only_cal[0].startswith('"""Cal-QL')
    assert "torch.maximum(q_cur, mc_returns)" in only_cal[1] and "# Cal-QL:" in only_cal[1]
