"""The report of a grid of runs: a table per task and algorithm, an aggregate across tasks (rliable), and figures of
the normalized score during online fine-tuning and of the calibration gap, read from the runs' TensorBoard events;
and the commit(s) the runs ran, from their provenance.json, flagged where they differ or had uncommitted changes.

    python benchmarks/report.py ROOT                  # ROOT/runs/* (and ROOT/grid.json) -> ROOT/report/
    python benchmarks/report.py ROOT --out ROOT/report --bootstrap-reps 2000

ROOT is the scripts' working directory (the grid runner's root). Partial grids work: runs still going, missing
seeds and runs without an evaluation yet are listed in the report. docs/report.md says how to read it.
"""

import json
import logging
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from scipy import stats  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator  # noqa: E402

LABELS = {"cal_ql_continuous": "Cal-QL", "cql_continuous": "CQL", "cal_ql_atari": "Cal-QL"}
STYLES = {"Cal-QL": dict(color="tab:blue"), "CQL": dict(color="tab:orange", linestyle="--")}  # dashed: overlaps show
CURVES_NOTE = ("each run's curve is linearly interpolated onto the union of the runs' evaluation points, over the range "
               "that every run covers (a run still going shortens it)")


@dataclass
class Args:
    root: tyro.conf.Positional[Path]
    """the grid's folder (the scripts' working directory): ROOT/runs/* and ROOT/grid.json are read"""
    out: Path | None = None
    """where report.md, scores.png and calibration.png go (default ROOT/report)"""
    bootstrap_reps: int = 10_000
    """bootstrap resamples of each aggregate interval (rliable's default is 50_000: tighter bounds, 5x the time)"""


@dataclass
class Run:
    """What the report needs of one run; arrays are per evaluation, in gradient-step order."""

    name: str
    env_id: str
    algorithm: str
    seed: int
    finished: bool
    normalized: bool  # False: the score is eval/return (the Atari script logs no normalized score)
    eval_steps: np.ndarray  # gradient step of each evaluation
    env_steps: np.ndarray  # online environment steps at each evaluation: 0 before and during pre-training
    scores: np.ndarray
    regret: float  # the last eval/regret (nan before the first online evaluation)
    calibration: tuple[np.ndarray, np.ndarray]  # gradient steps, calibration/q_minus_mc

    @property
    def pretrained(self) -> bool:
        return self.finished or bool((self.env_steps > 0).any())

    @property
    def offline_score(self) -> float:
        """The last evaluation of pre-training; nan without one (fine-tuning a --pretrained-checkpoint)."""
        return float(self.scores[self.env_steps == 0][-1]) if (self.env_steps == 0).any() else np.nan

    @property
    def online_start(self) -> int:
        """The gradient step of the last pre-training evaluation (online fine-tuning starts after it), else the first."""
        return int(self.eval_steps[self.env_steps == 0][-1]) if (self.env_steps == 0).any() else int(self.eval_steps[0])

    @property
    def dip(self) -> float:
        """The fine-tuning dip: the score after pre-training minus the lowest online evaluation (below 0: it never fell
        below its start); nan without both."""
        env_steps, scores = self.online_curve()
        online = scores[env_steps > 0]
        return float(self.offline_score - online.min()) if len(online) else np.nan

    def online_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Score against online environment steps, the score after pre-training at step 0 where there is one."""
        keep = (self.env_steps > 0) | (self.eval_steps == self.online_start)
        return self.env_steps[keep], self.scores[keep]


# the table's columns: name, which runs count, the value of a run
COLUMNS = [("score after pre-training", "pretrained", lambda run: run.offline_score),
           ("score after fine-tuning", "finished", lambda run: float(run.scores[-1])),
           ("cumulative regret", "finished", lambda run: run.regret),
           ("dip: score after pre-training - lowest online score", "finished", lambda run: run.dip)]


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def hyperparameters(events: EventAccumulator) -> dict[str, str]:
    """The `|param|value|` rows of the scripts' `hyperparameters` text (the last one written, if resumed)."""
    if "hyperparameters/text_summary" not in events.Tags()["tensors"]:
        return {}
    text = events.Tensors("hyperparameters/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [line.strip().strip("|").split("|", 1) for line in text.splitlines()[2:]]
    return {row[0]: row[1] for row in rows if len(row) == 2}


def algorithm_name(params: dict[str, str]) -> str:
    if params.get("calibrate") == "False":  # cal_ql_atari.py --no-calibrate is plain CQL
        return "CQL"
    return LABELS.get(params["exp_name"], params["exp_name"])


def load_run(folder: Path) -> Run | None:
    """A run's evaluations and calibration gap; None while it has no evaluation or no hyperparameters text yet."""
    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0, TENSORS: 0})  # 0: keep every point
    events.Reload()  # honours the purge of a resumed run: no duplicate steps
    params, normalized = hyperparameters(events), "eval/normalized_score" in events.Tags()["scalars"]
    scores = scalars(events, "eval/normalized_score" if normalized else "eval/return")
    if not scores or not {"exp_name", "env_id", "seed"} <= params.keys():
        return None
    steps, env_steps = np.array(sorted(scores)), scalars(events, "eval/env_steps")
    regrets, gaps = scalars(events, "eval/regret"), scalars(events, "calibration/q_minus_mc")
    return Run(name=folder.name, env_id=params["env_id"], algorithm=algorithm_name(params), seed=int(params["seed"]),
               finished=(folder / "finished.json").exists(), normalized=normalized, eval_steps=steps,
               env_steps=np.array([int(env_steps.get(s, 0)) for s in steps]), scores=np.array([scores[s] for s in steps]),
               regret=regrets[max(regrets)] if regrets else np.nan,
               calibration=(np.array(sorted(gaps)), np.array([gaps[s] for s in sorted(gaps)])))


def expected_names(root: Path) -> list[str] | None:
    """The run names of ROOT/grid.json, None without one."""
    path = root / "grid.json"
    if not path.exists():
        return None
    try:
        return [run["name"] for run in json.loads(path.read_text())["runs"]]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {path} is not a grid manifest ({{'runs': [{{'name': ...}}, ...]}}); fix or delete it")


def mean_ci(values) -> tuple:
    """Mean and 95% Student-t interval over seeds (axis 0): mean -+ t(0.975, n-1) s / sqrt(n); one seed: no width."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(axis=0, ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean, low, high = mean_ci(values)
    interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{interval} (n={len(values)})"


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """task -> algorithm -> runs (by seed); every algorithm of the grid under every task, perhaps with no runs."""
    algorithms = sorted({run.algorithm for run in runs}, key=lambda a: (list(STYLES).index(a) if a in STYLES else len(STYLES), a))
    return {task: {a: sorted((r for r in runs if (r.env_id, r.algorithm) == (task, a)), key=lambda r: r.seed) for a in algorithms}
            for task in sorted({run.env_id for run in runs})}


def task_table(groups: dict) -> list[str]:
    lines = ["| task | algorithm | seeds finished | " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|-" * (3 + len(COLUMNS)) + "|"]
    for task, by_algorithm in groups.items():
        for algorithm, runs in by_algorithm.items():
            digits = 3 if all(r.normalized for r in runs) else 1
            cells = [cell([value(r) for r in runs if getattr(r, which) and np.isfinite(value(r))], digits) for _, which, value in COLUMNS]
            seeds = ", ".join(str(r.seed) for r in runs if r.finished) or "none"
            lines.append(f"| {task} | {algorithm} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def seed_table(groups: dict) -> list[str]:
    """Every run past pre-training, seed by seed: what a mean hides (how many seeds dipped, and how far)."""
    lines = ["| task | algorithm | seed | score after pre-training | online scores (env steps) | lowest online | dip | final | regret |",
             "|-|-|-|-|-|-|-|-|-|"]
    for task, by_algorithm in groups.items():
        for algorithm, runs in by_algorithm.items():
            for run in (r for r in runs if r.pretrained):
                env_steps, scores = run.online_curve()
                online = [f"{score:.2f} ({steps})" for steps, score in zip(env_steps, scores) if steps > 0]
                final = f"{run.scores[-1]:.2f}" if run.finished else "running"
                lowest = f"{scores[env_steps > 0].min():.2f}" if online else "–"
                lines.append(f"| {task} | {algorithm} | {run.seed} | {run.offline_score:.2f} | {', '.join(online) or '–'} | {lowest} | "
                             f"{run.dip:.2f} | {final} | {run.regret:.3f} |")
    return lines


def aggregate_table(groups: dict, reps: int) -> list[str]:
    """IQM and mean over tasks x seeds of each column, with rliable's stratified-bootstrap 95% percentile intervals.
    Tasks: those with a normalized score where every algorithm has a finished run; per algorithm the same number
    of finished seeds on each task (its smallest count, lowest seeds first), as rliable takes a seeds x tasks matrix."""
    tasks = [t for t, by_alg in groups.items() if all(any(r.finished for r in runs) and all(r.normalized for r in runs) for runs in by_alg.values())]
    if not tasks:
        return ["No task has a normalized score with a finished run of every algorithm yet: no aggregate."]
    finished = {a: [[r for r in groups[t][a] if r.finished] for t in tasks] for a in groups[tasks[0]]}
    n_seeds = {a: min(map(len, per_task)) for a, per_task in finished.items()}
    lines = [f"Finished runs on {len(tasks)} task(s): {', '.join(tasks)}; seeds per task: "
             + ", ".join(f"{a} {n}" for a, n in n_seeds.items()) + ".", "",
             "| metric | algorithm | IQM [95% CI] | mean [95% CI] |", "|-|-|-|-|"]
    for name, _, value in COLUMNS:
        scores = {a: np.array([[value(r) for r in runs[:n_seeds[a]]] for runs in per_task]).T for a, per_task in finished.items()}
        np.random.seed(0)  # rliable draws its resamples from numpy's global generator: a report is reproducible
        point, interval = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), reps=reps)
        for a in scores:
            (iqm, mean), (low, high) = point[a], interval[a]
            lines.append(f"| {name} | {a} | {iqm:.3f} [{low[0]:.3f}, {high[0]:.3f}] | {mean:.3f} [{low[1]:.3f}, {high[1]:.3f}] |")
    return lines


def one_per_seed(runs: list[Run], expected: list[str] | None) -> tuple[list[Run], list[str]]:
    """Several runs of one task, algorithm and seed (e.g. a rerun under a new name) count once: the finished one,
    else the grid's, else the last by name. Returns the runs kept and the names of those set aside."""
    key = lambda r: (r.env_id, r.algorithm, r.seed)  # noqa: E731
    rank = lambda r: (r.finished, r.name in (expected or []), r.name)  # noqa: E731
    kept = {key(r): r for r in sorted(runs, key=rank)}
    return list(kept.values()), [r.name for r in runs if kept[key(r)] is not r]


def status_lines(folders: dict[str, Run | None], expected: list[str] | None, groups: dict, set_aside: list[str]) -> list[str]:
    """What the tables and figures leave out or hold only in part: missing, empty, set-aside and unfinished runs."""
    runs = [run for by_alg in groups.values() for runs in by_alg.values() for run in runs]
    if expected is not None:
        missing = [f"{name} (no folder in runs/)" for name in expected if name not in folders]
    else:  # no manifest: a seed that some run has is expected of every task and algorithm
        seeds = sorted({run.seed for run in runs})
        missing = [f"{task} {a} seed {s} (inferred: no grid.json)" for task, by_alg in groups.items() for a, runs_of in by_alg.items()
                   for s in seeds if s not in {r.seed for r in runs_of}]
    empty = [name for name, run in folders.items() if run is None]
    unfinished = [f"{run.name}: last evaluation at gradient step {run.eval_steps[-1]}, online env step {run.env_steps[-1]}"
                  for run in sorted(runs, key=lambda r: r.name) if not run.finished]
    sections = [("Missing runs", missing), ("Runs with no evaluation logged yet (not in the tables or figures)", empty),
                ("Set aside: another run of the same task, algorithm and seed counts instead", set_aside),
                ("Unfinished runs (running, stopped or failed): in the figures up to their last evaluation and in the score "
                 "after pre-training once that is done; not in the other columns nor the aggregate", unfinished)]
    lines = [line for title, items in sections if items for line in ["", f"{title}:", *[f"- {item}" for item in items]]]
    return lines or ["None: every expected run finished."]


def code_lines(root: Path, names: list[str]) -> list[str]:
    """Which code the runs ran, from their runs/NAME/provenance.json (one record per start: a resumed run has several):
    the commit(s), with a warning where the runs differ in commit or ran with uncommitted changes to tracked files."""
    runs_of, dirty, unrecorded = {}, [], []  # runs_of: commit -> names of the runs that ran it (at any start)
    for name in names:
        try:
            records = json.loads((root / "runs" / name / "provenance.json").read_text())
            commits, ran_dirty = [r["commit"] for r in records], any(r["dirty"] is True for r in records)
        except (OSError, ValueError, KeyError, TypeError):
            unrecorded.append(name)
            continue
        for commit in dict.fromkeys(commits):
            runs_of.setdefault(commit, []).append(name)
        dirty += [name] if ran_dirty else []
    paragraphs = []
    if len(runs_of) == 1:
        commit = next(iter(runs_of))
        paragraphs.append(["The runs ran outside a git checkout: commit unknown." if commit == "unknown" else f"The runs ran commit `{commit}`."])
    elif runs_of:
        paragraphs.append(["**Warning: the runs ran different code** (a run resumed on other code is listed under each commit):",
                           *[f"- `{commit}`: {', '.join(runs)}" for commit, runs in runs_of.items()]])
    if dirty:
        paragraphs.append([f"**Warning: {len(dirty)} run(s) ran with uncommitted changes to tracked files**, which no commit reproduces: {', '.join(dirty)}"])
    if unrecorded:
        paragraphs.append([f"No readable provenance.json (started before it was recorded): {', '.join(unrecorded)}"])
    return "\n\n".join(map("\n".join, paragraphs)).split("\n") if paragraphs else ["No run has started yet."]


def panels(n: int, title: str):
    """A figure with one panel per task, three a row, and its title."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5 * cols, 7), 3.8 * rows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    fig.suptitle(title, fontsize="medium")
    return fig, axes.flat


def band(ax, x, ys, label):
    mean, low, high = mean_ci(ys)
    ax.plot(x, mean, **STYLES.get(label, {}), label=f"{label} ({len(ys)} seeds)")
    ax.fill_between(x, low, high, color=ax.lines[-1].get_color(), alpha=0.2, linewidth=0)


def plot_scores(groups: dict, path: Path):
    """Score against online environment steps per task: mean and 95% t-interval over the runs past pre-training."""
    fig, axes = panels(len(groups), "Score during online fine-tuning (step 0: after offline pre-training)\n"
                                    "mean and 95% t-interval over seeds")
    for ax, (task, by_algorithm) in zip(axes, groups.items()):
        for algorithm, runs in by_algorithm.items():
            curves = [run.online_curve() for run in runs if run.pretrained]
            if curves:
                start, end = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
                grid = np.unique(np.concatenate([x for x, _ in curves]))
                grid = grid[(start <= grid) & (grid <= end)]
                band(ax, grid, [np.interp(grid, x, y) for x, y in curves], algorithm)
        normalized = all(r.normalized for runs in by_algorithm.values() for r in runs)
        ax.set(title=task, xlabel="online environment steps", ylabel="normalized score" if normalized else "return")
        if normalized and ax.lines:  # [0, 1] and every mean in view; a wide band of few seeds may run off it
            means = np.concatenate([line.get_ydata() for line in ax.lines])
            ax.set_ylim(min(0, means.min()) - 0.05, max(1, means.max()) + 0.05)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(groups: dict, path: Path):
    """calibration/q_minus_mc against gradient steps per task, over the logging steps common to the runs."""
    fig, axes = panels(len(groups), "Calibration gap: mean Q(s, pi(s)) - MC return(s) on the training batch\n"
                                    "mean and 95% t-interval over seeds")
    for ax, (task, by_algorithm) in zip(axes, groups.items()):
        for algorithm, runs in by_algorithm.items():
            runs = [run for run in runs if len(run.calibration[0])]
            if runs:
                common = reduce(np.intersect1d, [run.calibration[0] for run in runs])
                band(ax, common, [values[np.isin(steps, common)] for steps, values in (r.calibration for r in runs)], algorithm)
        starts = [run.online_start for runs in by_algorithm.values() for run in runs if run.pretrained]
        if starts:
            ax.axvline(min(starts), color="gray", linestyle="--", label="online fine-tuning starts")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(title=task, xlabel="gradient steps", ylabel="Q - MC return")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TABLE_NOTE = ("Mean over seeds [95% Student-t interval: mean -+ t(0.975, n-1) s / sqrt(n)] (n seeds); n=1: no interval. "
              "Score after pre-training: every run past pre-training; the other columns: finished runs. Cumulative regret: "
              "the last eval/regret, the mean of 1 - normalized score over the online evaluations (lower is better). Dip: "
              "the score after pre-training minus the lowest online evaluation (CQL's unlearning; below 0: never fell below it).")


def write_report(root: Path, out: Path, reps: int) -> Path:
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder; give the grid's root folder (the one holding runs/)")
    if reps < 1:
        raise SystemExit(f"error: --bootstrap-reps {reps}: the bootstrap needs at least 1 resample (10000 by default)")
    names = sorted(p.name for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    expected = expected_names(root)
    if not names and not expected:
        raise SystemExit(f"error: {root / 'runs'} holds no run folder; give the grid's root folder (the scripts' working directory)")
    folders = {name: load_run(root / "runs" / name) for name in names}
    runs, set_aside = one_per_seed([run for run in folders.values() if run is not None], expected)
    groups = group(runs)
    count = f"{len(expected)} in grid.json" if expected is not None else f"{len(folders)} in runs/ (no grid.json)"
    lines = [f"# Report of {root.resolve()}", "", f"{sum(r.finished for r in runs)} finished run(s) of {count}.", "",
             "## Code", "", *code_lines(root, names), "", "## Missing and unfinished runs", *status_lines(folders, expected, groups, set_aside), ""]
    out.mkdir(parents=True, exist_ok=True)
    if groups:
        plot_scores(groups, out / "scores.png")
        plot_calibration(groups, out / "calibration.png")
        lines += ["## Per task", "", TABLE_NOTE, "", *task_table(groups), "", "## Per seed", "", *seed_table(groups), "",
                  "## Aggregate across tasks (rliable)", "",
                  f"Interquartile mean and mean over all (task, seed) scores, 95% stratified-bootstrap percentile intervals "
                  f"({reps} resamples of the seeds within each task).", "", *aggregate_table(groups, reps), "",
                  "## Figures", "", f"Curves: {CURVES_NOTE}; the calibration gap is averaged over the gradient steps common to the runs.",
                  "", "![score during fine-tuning](scores.png)", "", "![calibration gap](calibration.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


if __name__ == "__main__":
    args = tyro.cli(Args)
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # a resumed run's purge is expected, not news
    print(f"report written to {write_report(args.root, args.out or args.root / 'report', args.bootstrap_reps)}")
