"""Run a grid of training runs (scripts x tasks x seeds) on this machine or on a SLURM cluster, resumably.

    python benchmarks/grid.py --root grids/pointmaze                     # the embedded task: Cal-QL and CQL x 5 seeds
    python benchmarks/grid.py --root grids/pointmaze --dry-run           # what would run, and what is finished
    python benchmarks/grid.py --root grids/paper --env-ids antmaze-large-diverse-v2 kitchen-mixed --seeds 1 2 3 4 \\
        --executor slurm --slurm-partition gpu --gpus-per-job 1 --runs-per-job 4 --cpus-per-job 8 --mem-gb 64
    python benchmarks/grid.py --root grids/quick -- --offline-steps 2000 # flags after `--` go to every run

Every run is `python SCRIPT --env-id ENV --seed SEED --run-name NAME [flags after --]`, started in the folder ROOT, so
it writes ROOT/runs/NAME/ (NAME = ENV__SCRIPT-STEM__SEED, '/' in ENV as '_'); its output goes to ROOT/logs/NAME.log.
ROOT/grid.json lists the runs for benchmarks/report.py. Launching the same command again skips the finished runs
(runs/NAME/finished.json) and restarts the others, which resume from their checkpoints by themselves.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("cal_ql_continuous.py", "cql_continuous.py", "cal_ql_atari.py")
EXECUTORS = ("local", "slurm")
GRID_FLAGS = ("--env-id", "--seed", "--run-name")  # set per run by the grid
STOPPED = 75  # the scripts' exit status after saving their state on SIGTERM/SIGUSR1/SIGUSR2 (EX_TEMPFAIL)


@dataclass
class Args:
    root: str = "grids/pointmaze"
    """the grid's folder: the runs' working directory (ROOT/runs/NAME), their output (ROOT/logs/NAME.log), ROOT/grid.json"""
    scripts: list[str] = field(default_factory=lambda: ["cal_ql_continuous.py", "cql_continuous.py"])
    """training scripts of this repository: cal_ql_continuous.py, cql_continuous.py, cal_ql_atari.py"""
    env_ids: list[str] = field(default_factory=lambda: ["pointmaze-umaze"])
    """tasks (--env-id of the scripts)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """seeds (--seed of the scripts)"""
    executor: str = "local"
    """local: a pool of --workers processes on this machine; slurm: a SLURM job array through submitit"""
    dry_run: bool = False
    """print what would run, and what is finished, and start nothing"""

    # local
    workers: int = len(os.sched_getaffinity(0))
    """local: runs at a time; each gets OMP_NUM_THREADS = cores // workers (at least 1)"""

    # slurm (per job; a job runs --runs-per-job runs side by side)
    runs_per_job: int = 1
    """slurm: runs packed into one job, sharing its CPUs and GPUs (several small runs per GPU)"""
    slurm_partition: str | None = None
    """slurm: the partition (None: the cluster's default)"""
    time_min: int = 24 * 60
    """slurm: time limit of a job in minutes; a job still running then saves its runs, is requeued and resumes them"""
    gpus_per_job: int = 0
    """slurm: GPUs per job (--gpus-per-node)"""
    cpus_per_job: int = 4
    """slurm: CPUs per job (--cpus-per-task); each run gets OMP_NUM_THREADS = cpus // runs-per-job (at least 1)"""
    mem_gb: int = 0
    """slurm: memory per job in GB (0: the partition's default)"""
    max_requeues: int = 20
    """slurm: how many times a job may reach its time limit and be requeued before it gives up"""


@dataclass
class Run:
    name: str
    script: str
    env_id: str
    seed: int
    flags: list[str]

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / self.script), "--env-id", self.env_id, "--seed", str(self.seed), "--run-name", self.name, *self.flags]


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """grid.py's own flags, and the flags after `--` that every run gets."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def check(args: Args, flags: list[str]):
    """Stop with one line on input that would only fail later (or on the cluster)."""
    problems = [f"unknown script {s!r}: use {', '.join(SCRIPTS)}" for s in args.scripts if s not in SCRIPTS]
    if args.executor not in EXECUTORS:
        problems.append(f"unknown --executor {args.executor!r}: use local or slurm")
    for name, values in (("--scripts", args.scripts), ("--env-ids", args.env_ids), ("--seeds", args.seeds)):
        if not values:
            problems.append(f"{name} is empty: give at least one value")
    for name in ("workers", "runs_per_job", "cpus_per_job", "time_min"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    problems += [f"{flag} is set per run by the grid: use grid.py's --env-ids/--seeds, not {flag} after --" for flag in flags if flag.split("=")[0] in GRID_FLAGS]
    if problems:
        raise SystemExit(f"error: {problems[0]}")


def plan(args: Args, flags: list[str]) -> list[Run]:
    """Every (script, task, seed) once, with its deterministic run name; seed by seed, so that a grid stopped
    early holds every script and task for its first seeds."""
    runs = {}
    for seed in args.seeds:
        for env_id in args.env_ids:
            for script in args.scripts:
                name = f"{env_id.replace('/', '_')}__{Path(script).stem}__{seed}"
                runs[name] = Run(name, script, env_id, seed, flags)
    return list(runs.values())


def is_finished(root: Path, run: Run) -> bool:
    return (root / "runs" / run.name / "finished.json").exists()


def write_manifest(root: Path, runs: list[Run], todo: list[Run]):
    """ROOT/grid.json: the runs of every launch into this root. A run started now is recorded as it is started now;
    a skipped one (finished or queued) keeps the entry of the launch that started it."""
    path = root / "grid.json"
    entries = {e["name"]: e for e in json.loads(path.read_text())["runs"]} if path.exists() else {}
    for run in runs:
        entries.setdefault(run.name, asdict(run))
    entries.update({run.name: asdict(run) for run in todo})
    lines = ",\n".join(f"  {json.dumps(entry)}" for entry in entries.values())  # one run a line
    path.with_suffix(".tmp").write_text(f'{{"runs": [\n{lines}\n]}}\n')
    path.with_suffix(".tmp").replace(path)


def start(run: Run, root: Path, threads: int, **popen) -> subprocess.Popen:
    """Start a run in ROOT, its output appended to ROOT/logs/NAME.log (a resumed run continues the same log)."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    # TQDM_MININTERVAL: progress bars that set no interval (the Atari script's) write a line a minute, not ten a second
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "60"}
    with open(root / "logs" / f"{run.name}.log", "a") as log:
        return subprocess.Popen(run.command(), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)


def outcome(root: Path, run: Run, code: int) -> str:
    """What became of a run, in a few words, with the last line of its log when it failed."""
    if code == 0:
        return "finished"
    if code == STOPPED:
        return "stopped with its state saved (launch again to resume)"
    lines = (root / "logs" / f"{run.name}.log").read_text(errors="replace").strip().splitlines() or ["(no output)"]
    return f"FAILED (exit {code}): {lines[-1][-200:]}  [log: {root / 'logs' / (run.name + '.log')}]"


# ---------------------------------------------------------------------------------------------------------------
# local: a pool of workers on this machine
# ---------------------------------------------------------------------------------------------------------------
def run_local(args: Args, root: Path, runs: list[Run]) -> bool:
    """Run everything, --workers at a time; Ctrl-C stops the runs with their state saved. True if all finished."""
    threads = max(1, len(os.sched_getaffinity(0)) // args.workers)
    live, ok = set(), True

    def run_one(run: Run) -> int:
        # a session of its own: Ctrl-C reaches only grid.py, which then stops the runs by SIGTERM (they save first)
        proc = start(run, root, threads, start_new_session=True)
        live.add(proc)
        code = proc.wait()
        live.discard(proc)
        return code

    with ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, run): run for run in runs}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                run = futures[future]
                ok &= future.result() == 0
                print(f"[{done}/{len(runs)}] {run.name}: {outcome(root, run, future.result())}", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"stopping {len(live)} running runs: they save their state (launch again to resume)", flush=True)
            for proc in list(live):
                proc.send_signal(signal.SIGTERM)
            return False
    return ok


# ---------------------------------------------------------------------------------------------------------------
# slurm: a job array through submitit, each job running --runs-per-job runs side by side
# ---------------------------------------------------------------------------------------------------------------
class SlurmJob:
    """One SLURM job: its runs as subprocesses side by side. Before the time limit or a preemption, SLURM signals the
    job (submitit asks for SIGUSR2) and submitit calls checkpoint(): the runs save their state and stop, and the job
    is requeued with the same runs, which resume from their checkpoints (a finished one exits at once)."""

    def __init__(self, runs: list[Run], root: Path, threads: int):
        self.runs, self.root, self.threads = runs, root, threads
        self.procs = []

    def __call__(self) -> dict:
        self.procs = []
        for run in self.runs:
            self.procs.append(start(run, self.root, self.threads))
        # poll, not wait(): wait() holds a lock that checkpoint(), run by a signal in this thread, would wait on
        while any(proc.poll() is None for proc in self.procs):
            time.sleep(1)
        results = {run.name: outcome(self.root, run, proc.returncode) for run, proc in zip(self.runs, self.procs)}
        if any(proc.returncode != 0 for proc in self.procs):
            raise RuntimeError("; ".join(f"{name}: {result}" for name, result in results.items()))
        return results

    def checkpoint(self):
        import submitit

        for proc in self.procs:  # they may have got the signal from SLURM already; a second one changes nothing
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        for proc in self.procs:  # wait until each has saved and exited (without reaping it, see __call__)
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        return submitit.helpers.DelayedSubmission(SlurmJob(self.runs, self.root, self.threads))


def queued_runs(root: Path) -> dict:
    """The runs of this root whose SLURM job is still pending or running: {run name: job id}."""
    path = root / "slurm" / "jobs.json"
    if not path.exists():
        return {}
    queue = set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split())
    return {name: job for name, job in json.loads(path.read_text()).items() if job in queue}


def submit_slurm(args: Args, root: Path, runs: list[Run]):
    """Submit the runs as one job array; record which job runs which run, for the next launch."""
    import submitit

    executor = submitit.AutoExecutor(folder=root / "slurm" / "%j", cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    resources = dict(gpus_per_node=args.gpus_per_job or None, mem_gb=args.mem_gb or None)  # none asked: none requested
    executor.update_parameters(name=f"grid-{root.name}", timeout_min=args.time_min, cpus_per_task=args.cpus_per_job, slurm_partition=args.slurm_partition, **{k: v for k, v in resources.items() if v})
    threads = max(1, args.cpus_per_job // args.runs_per_job)
    groups = [runs[i : i + args.runs_per_job] for i in range(0, len(runs), args.runs_per_job)]
    with executor.batch():
        jobs = [executor.submit(SlurmJob(group, root, threads)) for group in groups]
    path = root / "slurm" / "jobs.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded.update({run.name: job.job_id for job, group in zip(jobs, groups) for run in group})
    path.write_text(json.dumps(recorded, indent=1))
    print(f"submitted {len(runs)} runs as {len(jobs)} jobs of array {jobs[0].job_id.split('_')[0]}; submitit's logs: {root / 'slurm'}")


def check_slurm_tools():
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise SystemExit("error: --executor slurm needs submitit: pip install -r requirements.txt")
    if shutil.which("sbatch") is None:
        raise SystemExit("error: --executor slurm needs SLURM's sbatch and squeue on PATH: launch on the cluster's login node")


def describe(args: Args, root: Path, todo: list[Run]) -> str:
    if args.executor == "local":
        return f"would run {len(todo)} runs, {args.workers} at a time, in {root}"
    jobs = -(-len(todo) // args.runs_per_job)
    return (f"would submit {jobs} jobs ({args.runs_per_job} runs each) to partition {args.slurm_partition or '(default)'}: "
            f"{args.time_min} min, {args.gpus_per_job} GPUs, {args.cpus_per_job} CPUs, {args.mem_gb or 'default'} GB each")


def main():
    own, flags = split_argv(sys.argv[1:])
    args = tyro.cli(Args, args=own)
    check(args, flags)
    if args.executor == "slurm" and not args.dry_run:
        check_slurm_tools()
    root = Path(args.root).resolve()
    # the runs start in ROOT: relative PYTHONPATH entries (the folder of a module.path:EnvId-v0 id's module) made absolute
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(entry) for entry in os.environ["PYTHONPATH"].split(os.pathsep))
    runs = plan(args, flags)
    busy = queued_runs(root) if args.executor == "slurm" and not args.dry_run else {}
    todo = []
    for run in runs:
        if is_finished(root, run):
            print(f"skip {run.name}: finished")
        elif run.name in busy:
            print(f"skip {run.name}: its SLURM job {busy[run.name]} is still queued or running")
        else:
            todo.append(run)
    if args.dry_run:
        for run in todo:
            print(f"run  {run.name}: cd {shlex.quote(str(root))} && {shlex.join(run.command())}")
        print(describe(args, root, todo))
        return
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, runs, todo)
    if not todo:
        print(f"nothing to run: all {len(runs)} runs are finished or queued")
    elif args.executor == "local":
        sys.exit(0 if run_local(args, root, todo) else 1)
    else:
        submit_slurm(args, root, todo)


if __name__ == "__main__":
    main()
