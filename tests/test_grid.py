"""benchmarks/grid.py: a tiny grid (2 scripts x 2 seeds) run by the local executor and on a real single-node SLURM
cluster started by the test (tests/slurm/up.sh), where one job is interrupted as SLURM does before a time limit and
its runs resume from their checkpoints to the very same results."""

import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from conftest import REPO, TINY, run_in, run_outcome, scalars

GRID = "benchmarks/grid.py"
# checkpoints every 10 gradient steps; an online phase of one episode (300 steps) keeps a run going long enough to be
# interrupted after its first checkpoint
FEW = ["--offline-steps", "40", "--offline-eval-every", "20", "--online-env-steps", "300", "--online-eval-every", "150", "--eval-episodes", "1", "--checkpoint-every", "10"]
NAMES = [f"pointmaze-umaze__{script}__{seed}" for seed in (1, 2) for script in ("cal_ql_continuous", "cql_continuous")]  # the grid's order


def tiny_grid(data_dir) -> list[str]:
    return ["--seeds", "1", "2", "--", "--dataset-dir", data_dir, *TINY, *FEW]


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, pointmaze_data_dir):
    """The tiny grid run once by the local executor (2 workers); returns (its root, grid.py's output)."""
    root = tmp_path_factory.mktemp("local") / "grid"
    proc = run_in(root.parent, GRID, "--root", str(root), "--workers", "2", *tiny_grid(pointmaze_data_dir))
    return root, proc.stdout


def assert_finished_with_logs(root):
    for name in NAMES:
        run_dir = root / "runs" / name
        assert (run_dir / "finished.json").exists(), (root / "logs" / f"{name}.log").read_text()[-2000:]
        assert len(scalars(run_dir)["eval/normalized_score"]) >= 4  # before, during, after pre-training, online


def test_local_grid_runs_every_run_and_writes_its_manifest(local_grid):
    root, output = local_grid
    assert_finished_with_logs(root)
    assert sorted(line.split(": ")[1] for line in output.splitlines()) == ["finished"] * 4
    manifest = json.loads((root / "grid.json").read_text())["runs"]
    assert [run["name"] for run in manifest] == NAMES
    assert manifest[1] == {"name": NAMES[1], "script": "cql_continuous.py", "env_id": "pointmaze-umaze", "seed": 1, "flags": manifest[0]["flags"]}
    assert manifest[0]["flags"][-2:] == ["--checkpoint-every", "10"]


def test_relaunch_skips_finished_runs_even_with_other_flags(local_grid, pointmaze_data_dir):
    root, _ = local_grid
    before = {name: (root / "runs" / name / "finished.json").stat().st_mtime_ns for name in NAMES}
    manifest = (root / "grid.json").read_text()
    proc = run_in(root.parent, GRID, "--root", str(root), *tiny_grid(pointmaze_data_dir), "--eval-episodes", "2")
    assert [line for line in proc.stdout.splitlines() if line.startswith("skip")] == [f"skip {name}: finished" for name in NAMES]
    assert "nothing to run" in proc.stdout
    assert before == {name: (root / "runs" / name / "finished.json").stat().st_mtime_ns for name in NAMES}
    assert (root / "grid.json").read_text() == manifest  # the entries say how the runs were actually run


def test_grid_runs_seed_by_seed_so_an_early_stop_leaves_every_script_for_the_first_seeds(tmp_path):
    proc = run_in(tmp_path, GRID, "--root", str(tmp_path), "--seeds", "1", "2", "--dry-run")
    names = [line.split(": ")[0].split()[1] for line in proc.stdout.splitlines() if line.startswith("run  ")]
    assert names == NAMES  # seed 1 of every script, then seed 2


def test_dry_run_prints_what_would_run_and_starts_nothing(tmp_path):
    done = tmp_path / "runs" / "pointmaze-umaze__cql_continuous__1"
    done.mkdir(parents=True)
    (done / "finished.json").write_text("{}")
    proc = run_in(tmp_path, GRID, "--root", str(tmp_path), "--scripts", "cql_continuous.py", "--seeds", "1", "2", "--dry-run", "--", "--offline-steps", "3")
    lines = proc.stdout.splitlines()
    assert lines[0] == "skip pointmaze-umaze__cql_continuous__1: finished"
    assert lines[1].startswith("run  pointmaze-umaze__cql_continuous__2: cd ")
    assert lines[1].endswith("cql_continuous.py --env-id pointmaze-umaze --seed 2 --run-name pointmaze-umaze__cql_continuous__2 --offline-steps 3")
    assert lines[2:] == [f"would run 1 runs, {len(os.sched_getaffinity(0))} at a time, in {tmp_path}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no grid.json, no logs


def test_a_module_env_id_runs_with_the_pythonpath_grid_py_was_launched_with(env_module, drift_data, tmp_path):
    """`--env-ids module.path:EnvId-v0`: each run, started in ROOT, imports the module through a PYTHONPATH entry that
    was relative to where grid.py was launched."""
    flags = ["--dataset-path", drift_data, "--env-kwargs", '{"max_episode_steps": 5}', *TINY, "--offline-steps", "10", "--online-env-steps", "10", "--eval-episodes", "1"]
    proc = run_in(tmp_path, GRID, "--root", "grid", "--scripts", "cal_ql_continuous.py", "--env-ids", "tiny_envs:Drift-v0", "--seeds", "1", "--", *flags,
                  env={"PYTHONPATH": f"{REPO}{os.pathsep}modules"})  # env_module wrote tmp_path/modules/tiny_envs.py
    assert proc.stdout.splitlines() == ["[1/1] tiny_envs:Drift-v0__cal_ql_continuous__1: finished"]
    assert (tmp_path / "grid" / "runs" / "tiny_envs:Drift-v0__cal_ql_continuous__1" / "finished.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--scripts", "sac.py"], "unknown script 'sac.py'"),
    (["--seeds"], "--seeds is empty"),
    (["--executor", "pbs"], "unknown --executor 'pbs'"),
    (["--runs-per-job", "0"], "--runs-per-job must be at least 1"),
    (["--", "--seed", "3"], "--seed is set per run by the grid"),
])
def test_bad_input_stops_with_one_clear_line(flags, message, tmp_path):
    proc = run_in(tmp_path, GRID, "--root", str(tmp_path), *flags, check=False)
    assert proc.returncode != 0 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "grid.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# a real SLURM cluster
# ---------------------------------------------------------------------------------------------------------------
def slurm_missing() -> str | None:
    """Why this machine cannot start the test's own cluster, or None."""
    if not all(shutil.which(tool, path="/usr/sbin:/usr/bin:" + os.environ["PATH"]) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return "SLURM is not installed (Debian: apt-get install --no-install-recommends slurm-wlm munge; .ci/run does it)"
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    if subprocess.run(["pidof", "slurmctld"], capture_output=True).returncode == 0:
        return "a slurmctld is already running here; the test starts its own cluster"
    return None


@pytest.fixture
def slurm(tmp_path):
    """A single-node SLURM cluster for this test, its files in tmp_path/cluster; yields the env its commands need.
    Every daemon it started is stopped afterwards, also when the test fails."""
    reason = slurm_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI is set, so the SLURM test must run, but {reason}")
    if reason:
        pytest.skip(reason)
    cluster = tmp_path / "cluster"
    env = {**os.environ, "SLURM_CONF": str(cluster / "slurm.conf")}
    try:
        subprocess.run([REPO / "tests/slurm/up.sh", cluster], check=True, env=env, timeout=120)
        yield env
    finally:
        subprocess.run([REPO / "tests/slurm/down.sh", cluster], env=env, timeout=120)


def wait_for(condition, what: str, env: dict, timeout: float = 240):
    """Poll until condition() holds or the queue is empty (every job over: the asserts after say what went wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env).stdout
        if not queue.strip():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; squeue:\n{queue}")
        time.sleep(0.2)


def assert_same_results(run_dir, reference_dir):
    """Same final parameters bit for bit, same logged values at the same steps (timings aside)."""
    (values, params), (reference_values, reference) = run_outcome(run_dir), run_outcome(reference_dir)
    assert all(torch.equal(params[k], reference[k]) for k in reference)
    assert values.keys() == reference_values.keys()
    for tag in reference_values:
        assert values[tag] == reference_values[tag], tag


def test_slurm_grid_finishes_and_an_interrupted_job_resumes_to_the_same_results(slurm, local_grid, pointmaze_data_dir, tmp_path):
    root = tmp_path / "grid"
    flags = ["--root", str(root), "--executor", "slurm", "--runs-per-job", "2", "--cpus-per-job", "1", "--time-min", "10"]
    proc = run_in(tmp_path, GRID, *flags, *tiny_grid(pointmaze_data_dir), env=slurm)
    assert "submitted 4 runs as 2 jobs" in proc.stdout
    again = run_in(tmp_path, GRID, *flags, *tiny_grid(pointmaze_data_dir), env=slurm)  # never the same run twice at once
    assert again.stdout.count("is still queued or running") == 4 and "submitted" not in again.stdout
    jobs = json.loads((root / "slurm" / "jobs.json").read_text())
    first = root / "runs" / NAMES[0]

    # interrupt the first job as SLURM does before its time limit (submitit's signal): it saves its runs and requeues
    wait_for(lambda: (first / "checkpoint.pt").exists(), "the first checkpoint", slurm)
    subprocess.run(["scancel", "--signal=USR2", jobs[NAMES[0]]], env=slurm)
    wait_for(lambda: False, "every job to end", slurm)  # until the queue is empty

    assert_finished_with_logs(root)
    log = (root / "logs" / f"{NAMES[0]}.log").read_text()
    assert "stopped by SIGUSR" in log and f"resuming {NAMES[0]} from gradient step" in log
    for name in NAMES:
        assert_same_results(root / "runs" / name, local_grid[0] / "runs" / name)
