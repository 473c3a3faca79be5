"""The scripts' provenance.json: the code's commit and state, the arguments, the versions, one record per start."""

import inspect
import json
import platform
import subprocess
import time
from dataclasses import asdict

import pytest
import torch

import cal_ql_atari
import cal_ql_continuous
import cql_continuous


def git(repo, *command) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *command]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_each_start_appends_a_record_of_the_code_arguments_and_versions(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "cal_ql_continuous.py").write_text("# the script\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    monkeypatch.setattr(cal_ql_continuous, "__file__", str(repo / "cal_ql_continuous.py"))  # the script as if run from there
    args, run_dir = cal_ql_continuous.Args(q_hidden=[8, 8]), str(tmp_path / "runs" / "run")

    (first,) = cal_ql_continuous.write_provenance(run_dir, args, torch.device("cpu"))
    assert (first["commit"], first["dirty"]) == (git(repo, "rev-parse", "HEAD"), False)
    assert first["args"] == asdict(args) and first["args"]["q_hidden"] == [8, 8]
    assert first["versions"]["torch"] == torch.__version__ and set(first["versions"]) >= {"numpy", "gymnasium", "minari", "mujoco", "ale-py", "tyro"}
    assert (first["python"], first["host"], first["device"]) == (platform.python_version(), platform.node(), "cpu")
    assert abs(time.mktime(time.strptime(first["start_time"], "%Y-%m-%dT%H:%M:%S%z")) - time.time()) < 60

    (repo / "untracked.txt").write_text("not code\n")  # untracked files do not count
    assert cal_ql_continuous.write_provenance(run_dir, args, torch.device("cpu"))[-1]["dirty"] is False
    (repo / "cal_ql_continuous.py").write_text("# the script, changed\n")
    assert cal_ql_continuous.write_provenance(run_dir, args, torch.device("cpu"))[-1]["dirty"] is True
    monkeypatch.setattr(cal_ql_continuous, "__file__", str(tmp_path / "elsewhere" / "cal_ql_continuous.py"))  # no checkout
    cal_ql_continuous.write_provenance(run_dir, args, torch.device("cpu"))

    records = json.loads((tmp_path / "runs" / "run" / "provenance.json").read_text())
    assert records[0] == first and [(r["commit"] == first["commit"], r["dirty"]) for r in records[1:]] == [(True, False), (True, True), (False, "unknown")]
    assert records[-1]["commit"] == "unknown"


@pytest.mark.parametrize("script", [cql_continuous, cal_ql_atari])
def test_the_scripts_share_one_text_of_it(script):
    assert inspect.getsource(script.write_provenance) == inspect.getsource(cal_ql_continuous.write_provenance)
