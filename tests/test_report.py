"""benchmarks/report.py: the table's numbers, partial grids, the figures, resumed runs, bad input."""

import json
import re
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmarks import report
from conftest import COMMIT

CAL_QL, CQL, TASK = "cal_ql_continuous", "cql_continuous", "pointmaze-umaze"


def finished_run(fake_run, root, exp_name, env_id, seed, offline_score, final_score):
    """Pre-trained to offline_score, two online evaluations: 0.5 at 100 env steps, final_score at 200."""
    return fake_run(root, exp_name, env_id, seed, offline=(0.0, offline_score), online=((100, 0.5), (200, final_score)))


def test_table_shows_hand_computed_means_and_intervals(fake_run, run_script, tmp_path):
    finals = {(CAL_QL, TASK): [0.6, 0.7, 0.8, 0.9], (CAL_QL, "task-b"): [0.1, 0.2, 0.3, 1.0], (CQL, TASK): [0.5] * 4, (CQL, "task-b"): [0.5] * 4}
    for (exp_name, task), scores in finals.items():
        for seed, final in enumerate(scores, 1):
            finished_run(fake_run, tmp_path, exp_name, task, seed, offline_score=0.1 * seed, final_score=final)
    for seed, final in ((1, 0.5), (2, 0.7)):  # Atari: returns 10 x score, no normalized score nor regret
        fake_run(tmp_path, "cal_ql_atari", "ALE/Pong-v5", seed, offline=(0.0, 0.1 * seed), online=((100, 0.5), (200, final)), atari=True)
    run_script("benchmarks/report.py", str(tmp_path), "--bootstrap-reps", "200")
    text = (tmp_path / "report" / "report.md").read_text()

    # Cal-QL on pointmaze-umaze, 4 seeds, t(0.975, 3) = 3.18245:
    # offline 0.1, 0.2, 0.3, 0.4: mean 0.25, s = 0.12910, half width 3.18245 * 0.12910 / 2 = 0.20543
    # final 0.6 .. 0.9: mean 0.75, the same spread; regret = mean(1 - 0.5, 1 - final) = 0.45, 0.4, 0.35, 0.3:
    # mean 0.375, s = 0.06455, half width 0.10271
    # dip = offline - lowest online (0.5 at 100 env steps) = -0.4, -0.3, -0.2, -0.1: never below the start
    row = ("| pointmaze-umaze | Cal-QL | 1, 2, 3, 4 | 0.250 [0.045, 0.455] (n=4) | 0.750 [0.545, 0.955] (n=4) | 0.375 [0.272, 0.478] (n=4) "
           "| -0.250 [-0.455, -0.045] (n=4) |")
    assert row in text
    # per seed: task-b Cal-QL seed 2 fell from 0.2 to its final 0.2 via 0.5; seed 1 of pointmaze-umaze rose
    assert "| pointmaze-umaze | Cal-QL | 1 | 0.10 | 0.50 (100), 0.60 (200) | 0.50 | -0.40 | 0.60 | 0.450 |" in text
    assert "| task-b | Cal-QL | 2 | 0.20 | 0.50 (100), 0.20 (200) | 0.20 | 0.00 | 0.20 | 0.650 |" in text
    assert "| task-b | CQL | 1, 2, 3, 4 | 0.250 [0.045, 0.455] (n=4) | 0.500 [0.500, 0.500] (n=4) | 0.500 [0.500, 0.500] (n=4) |" in text

    # Atari returns, one decimal, t(0.975, 1) = 12.706: offline 1, 2: mean 1.5 -+ 12.706 * 0.7071 / sqrt(2) = 6.353;
    # final 5, 7: mean 6 -+ 12.706; no regret; no CQL run, so not in the aggregate
    assert "| ALE/Pong-v5 | Cal-QL | 1, 2 | 1.5 [-4.9, 7.9] (n=2) | 6.0 [-6.7, 18.7] (n=2) | – |" in text
    assert "| ALE/Pong-v5 | CQL | none | – | – | – |" in text
    assert "Finished runs on 2 task(s): pointmaze-umaze, task-b;" in text

    # aggregate of Cal-QL's final scores over 8 (task, seed): sorted 0.1 0.2 0.3 0.6 0.7 0.8 0.9 1.0,
    # IQM = mean of the middle four = 0.6, mean = 4.6 / 8 = 0.575
    iqm, iqm_low, iqm_high, mean, mean_low, mean_high = map(float, re.search(
        r"\| score after fine-tuning \| Cal-QL \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", text).groups())
    assert (iqm, mean) == (0.6, 0.575)
    assert 0.1 < iqm_low < iqm < iqm_high < 1.0 and 0.1 < mean_low < mean < mean_high < 1.0
    assert "| score after fine-tuning | CQL | 0.500 [0.500, 0.500] | 0.500 [0.500, 0.500] |" in text


def test_partial_grid_names_what_is_missing_and_counts_what_is_there(fake_run, tmp_path):
    grid = [{"name": f"{TASK}__{exp_name}__{seed}", "script": f"{exp_name}.py", "env_id": TASK, "seed": seed, "flags": []}
            for exp_name in (CAL_QL, CQL) for seed in (1, 2, 3, 4)]
    (tmp_path / "grid.json").write_text(json.dumps({"runs": grid}))
    for seed in (1, 2):
        finished_run(fake_run, tmp_path, CAL_QL, TASK, seed, offline_score=0.3, final_score=0.8)
    (tmp_path / "runs" / f"{TASK}__{CAL_QL}__4").mkdir()  # started, nothing logged yet; seed 3 missing
    finished_run(fake_run, tmp_path, CQL, TASK, 1, offline_score=0.3, final_score=0.6)
    fake_run(tmp_path, CQL, TASK, 2, offline=(0.0, 0.5), online=((100, 0.9),), finished=False)  # fine-tuning
    fake_run(tmp_path, CQL, TASK, 3, offline=(0.0,), online=(), finished=False)  # pre-training; seed 4 missing
    rerun = shutil.copytree(tmp_path / "runs" / f"{TASK}__{CQL}__1", tmp_path / "runs" / f"{TASK}__{CQL}__1__1795961164")
    (rerun / "finished.json").unlink()  # a stopped earlier run of seed 1 under the scripts' default name

    text = report.write_report(tmp_path, tmp_path / "report", reps=100).read_text()
    missing, no_events, set_aside, unfinished = (text.split(title)[1].split("\n\n")[0] for title in
                                                 ("Missing runs:", "no evaluation logged yet", "Set aside", "Unfinished runs"))
    assert re.findall(r"- (\S+) \(no folder", missing) == [f"{TASK}__{CAL_QL}__3", f"{TASK}__{CQL}__4"]
    assert re.findall(r"- (\S+)", no_events) == [f"{TASK}__{CAL_QL}__4"]
    assert re.findall(r"- (\S+)", set_aside) == [f"{TASK}__{CQL}__1__1795961164"]
    assert re.findall(r"- (\S+):", unfinished) == [f"{TASK}__{CQL}__2", f"{TASK}__{CQL}__3"]
    assert "- pointmaze-umaze__cql_continuous__2: last evaluation at gradient step 110, online env step 100" in unfinished
    # CQL: the fine-tuning run's pre-training score counts (0.3 and 0.5), its last score does not; the one still
    # pre-training counts nowhere
    assert "| pointmaze-umaze | CQL | 1 | 0.400 [-0.871, 1.671] (n=2) | 0.600 (n=1) | 0.450 (n=1) |" in text
    assert "| pointmaze-umaze | Cal-QL | 1, 2 |" in text

    (tmp_path / "grid.json").unlink()  # without a manifest, a seed some run has is expected everywhere
    text = report.write_report(tmp_path, tmp_path / "report", reps=100).read_text()
    assert re.findall(r"- (.+) \(inferred", text) == [f"{TASK} Cal-QL seed 3"]
    for figure in ("scores.png", "calibration.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = plt.imread(tmp_path / "report" / figure).shape
        assert height > 300 and width > 400


def test_resumed_run_reads_as_the_uninterrupted_one(fake_run, tmp_path):
    """Stopped at gradient step 125 (after the first online evaluation at 120), resumed from its checkpoint at 15:
    the lost attempt's points after 15 are purged, so nothing is doubled."""
    online = ((100, 0.5), (200, 0.6), (300, 0.9))
    once = report.load_run(fake_run(tmp_path / "once", CAL_QL, TASK, 1, offline=(0.0, 0.2, 0.4), online=online))
    resumed = report.load_run(fake_run(tmp_path / "resumed", CAL_QL, TASK, 1, offline=(0.0, 0.2, 0.4), online=online, resume_at=(15, 125)))
    assert list(resumed.eval_steps) == [0, 10, 20, 120, 220, 320]
    for field in ("eval_steps", "env_steps", "scores"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(once, field))
    np.testing.assert_array_equal(resumed.calibration, once.calibration)
    assert resumed.regret == once.regret == pytest.approx((0.5 + 0.4 + 0.1) / 3)


def test_code_section_states_the_commit_and_flags_runs_of_other_or_uncommitted_code(fake_run, tmp_path):
    def code_section():
        text = report.write_report(tmp_path, tmp_path / "report", reps=10).read_text()
        return text.split("## Code\n\n")[1].split("\n\n## ")[0]

    for seed in (1, 2):
        fake_run(tmp_path, CAL_QL, TASK, seed)
    assert code_section() == f"The runs ran commit `{COMMIT}`."

    other = "f" * 40
    fake_run(tmp_path, CQL, TASK, 1, code=((other, False),))
    fake_run(tmp_path, CQL, TASK, 2, code=((COMMIT, False), (other, True)))  # resumed on other code, with changes
    fake_run(tmp_path, CQL, TASK, 3, code=())  # started before provenance was recorded
    name = lambda exp_name, seed: f"{TASK}__{exp_name}__{seed}"  # noqa: E731
    assert code_section().splitlines() == [
        "**Warning: the runs ran different code** (a run resumed on other code is listed under each commit):",
        f"- `{COMMIT}`: {name(CAL_QL, 1)}, {name(CAL_QL, 2)}, {name(CQL, 2)}",
        f"- `{other}`: {name(CQL, 1)}, {name(CQL, 2)}",
        "",
        f"**Warning: 1 run(s) ran with uncommitted changes to tracked files**, which no commit reproduces: {name(CQL, 2)}",
        "",
        f"No readable provenance.json (started before it was recorded): {name(CQL, 3)}",
    ]


def test_bad_input_gets_one_line(fake_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad" / "runs").mkdir(parents=True)
    (tmp_path / "bad" / "grid.json").write_text("[1, 2]")
    fake_run(tmp_path / "good", CAL_QL, TASK, 1)
    for root, reps, message in (("nowhere", 10, "is not a folder"), ("empty", 10, "holds no run folder"),
                                ("bad", 10, "is not a grid manifest"), ("good", 0, "at least 1 resample")):
        with pytest.raises(SystemExit, match=message) as stop:
            report.write_report(tmp_path / root, tmp_path / "out", reps)
        assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
