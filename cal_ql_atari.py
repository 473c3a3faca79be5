"""Cal-QL on Atari from pixels: discrete CQL(H) plus the Cal-QL calibration; offline pre-training, online fine-tuning.

Paper: Nakamoto et al., "Cal-QL: Calibrated Offline RL Pre-Training for Efficient Online Fine-Tuning" (NeurIPS 2023).
The official code has no Atari version; the discrete form used here is this project's own (calql-spec.md §9):

    loss = TD(Q(s, a), r + gamma * max_a' Q_target(s', a')) + cql_weight * (logsumexp_a Q~(s, a) - Q(s, a_data))

with Q~(s, a) = max(Q(s, a), mc_return(s)) for every action (the Cal-QL line, search "Cal-QL") and Q~ = Q for plain
CQL (`--no-calibrate`). mc_return(s) is the Monte-Carlo discounted return-to-go of the logged trajectory (clipped
rewards), a value estimate of the behaviour policy that Q must not fall below. Data: the DQN Replay Dataset layout, or
a small built-in dataset of a noisy heuristic on Freeway that the script collects and caches itself.
"""

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.atari_data import builtin_replay_dir, load_replay_logs, make_env
from utils.evaluation import epsilon_greedy, evaluate
from utils.validation import DatasetError

FRAME_STACK = 4


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be enabled by default
    track: bool = False  # if toggled, this experiment will be tracked with Weights and Biases
    wandb_project_name: str = "cal-ql"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project
    capture_video: bool = False  # record the first episode of every evaluation to `videos/{run_name}` (needs moviepy; MuJoCo tasks also a GL backend)
    save_model: bool = True  # save the agent to `runs/{run_name}/pretrained.pt` after pre-training and `final.pt` at the end
    run_name: str | None = None  # the run's folder in runs/ (default `{env_id}__{exp_name}__{seed}__{time}`); a folder holding a checkpoint is resumed
    checkpoint_every: int = 5_000  # save the whole run state to `runs/{run_name}/checkpoint.pt` every this many gradient steps (0: only on SIGTERM/SIGUSR1/2)

    # data
    env_id: str = "ALE/Freeway-v5"  # the ALE game (module.path:EnvId-v0 imports module.path first); played with sticky actions (p=0.25), frame skip 4, 84x84 grey frames, as the DQN Replay Dataset
    replay_dir: str | None = None  # a DQN Replay `replay_logs` folder; if None, the built-in Freeway dataset (datasets/atari/<game>/replay_logs)
    checkpoints: tuple[int, ...] = (0,)  # which checkpoint files N (`..._ckpt.N.gz`) of the replay folder to load
    transitions_per_checkpoint: int | None = None  # load only the first this-many transitions of each checkpoint (None: all)
    dataset_size: int = 50_000  # transitions of the built-in dataset (used only when it is collected)
    dataset_epsilon: float = 0.5  # built-in dataset: probability of a uniformly random action instead of the heuristic's UP

    # network
    learning_rate: float = 5e-5  # Adam learning rate (eps 0.01/32, Dopamine's offline-Atari setting)
    target_update_period: int = 2000  # gradient steps between copies of the Q-network into the target network

    # CQL / Cal-QL
    cql_weight: float = 1.0  # weight of the conservative CQL(H) regularizer (CQL alpha)
    calibrate: bool = True  # Cal-QL: bound the Q-values inside the logsumexp from below by the MC return; --no-calibrate gives plain CQL
    td_loss: Literal["huber", "mse"] = "huber"  # TD loss against the DQN target r + gamma * max_a' Q_target(s', a')
    gamma: float = 0.99  # the discount factor
    batch_size: int = 32  # transitions per gradient step

    # offline
    offline_steps: int = 10_000  # gradient steps of offline pre-training
    offline_eval_every: int = 2_500  # evaluate every this many offline gradient steps

    # online
    online_env_steps: int = 4_096  # environment steps of online fine-tuning (Freeway episodes are 2048 steps)
    utd_ratio: float = 1.0  # gradient steps per environment step, done in one go after each finished episode
    mixing_ratio: float = 0.5  # fraction of every online-phase batch drawn from the offline data (the rest from the online buffer)
    online_epsilon: float = 0.01  # epsilon of the epsilon-greedy policy that collects online episodes
    max_episode_steps: int | None = None  # cap on agent steps of online and evaluation episodes (None: ALE's 27,000)

    # evaluation
    online_eval_every: int = 2048  # evaluate when the environment-step count crosses a multiple of this (checked at episode ends)
    eval_episodes: int = 3  # episodes per evaluation
    eval_epsilon: float = 0.001  # epsilon of the evaluation policy
    log_every: int = 100  # write the training metrics (one device-to-host copy, non-finite check) every this many gradient steps
    compile: bool = False  # run the update through torch.compile (same function, fused kernels; the first steps compile for a minute)
    cudagraphs: bool = False  # GPU only: capture the update (forward, backward, Adam) as one CUDA graph; each step copies its batch in and replays
    tf32: bool = True  # GPU only: TF32 matmuls and convolutions (Ampere and newer)


def calc_mc_returns(rewards, terminals, episode_ends, gamma, failure_reward=None) -> np.ndarray:
    """Monte-Carlo return-to-go of every transition of a flat dataset (trajectories concatenated):
    G_t = r_t + gamma * (1 - terminal_t) * G_{t+1}, with nothing bootstrapped past a trajectory's last step.
    Sparse failure rule (official): a trajectory whose every reward equals failure_reward never reached the goal,
    so each of its steps gets the value of failing forever, failure_reward / (1 - gamma)."""
    rewards, episode_ends = np.asarray(rewards, np.float64), np.asarray(episode_ends, bool)
    returns = rewards.copy()
    decay = gamma * (1.0 - np.asarray(terminals, np.float64)) * ~episode_ends
    # Suffix scan in log2(N) vectorised passes: after the pass with shift k, returns[t] holds the discounted sum
    # of rewards t..t+2k-1 (cut at terminals and trajectory ends) and decay[t] the discount onto t+2k.
    shift = 1
    while shift < len(returns):
        returns[:-shift] += decay[:-shift] * returns[shift:]
        decay[:-shift] *= decay[shift:]
        shift *= 2
    if failure_reward is not None:
        trajectory = np.concatenate([[0], np.cumsum(episode_ends[:-1])]).astype(np.int64)
        failed = np.bincount(trajectory, weights=rewards != failure_reward) == 0
        returns[failed[trajectory]] = failure_reward / (1 - gamma)
    return returns.astype(np.float32)


class FrameStore:
    """Transitions whose single 84x84 frames are stored once (uint8); 4-frame stacks are assembled when sampling.

    frames[i] is the frame at which actions[i] was taken. Stack slots before an episode's first frame are zeros (as
    Dopamine's agent state at an episode start), so no frame leaks from the previous episode. The last step of a
    trajectory that ends without a terminal has no next frame and is never sampled.
    """

    FIELDS = ("frames", "actions", "rewards", "terminals", "episode_ends", "mc_returns")

    def __init__(self, **data):
        self.data = {k: data[k] for k in self.FIELDS}  # no copy: the offline frames may be gigabytes
        self.size = len(self.data["actions"])
        self._index()

    @classmethod
    def empty(cls):
        shapes = dict(frames=(0, 84, 84))
        dtypes = dict(frames=np.uint8, actions=np.int64, terminals=bool, episode_ends=bool)
        return cls(**{k: np.zeros(shapes.get(k, (0,)), dtypes.get(k, np.float32)) for k in cls.FIELDS})

    def add(self, **episode):
        """Append whole episodes, growing the arrays geometrically."""
        n = len(episode["actions"])
        if self.size + n > len(self.data["actions"]):
            capacity = max(2 * len(self.data["actions"]), self.size + n)
            for k, v in self.data.items():
                grown = np.zeros((capacity, *v.shape[1:]), v.dtype)
                grown[: self.size] = v[: self.size]
                self.data[k] = grown
        for k in self.FIELDS:
            self.data[k][self.size : self.size + n] = episode[k]
        self.size += n
        self._index()

    def state_dict(self) -> dict:
        return {k: v[: self.size] for k, v in self.data.items()}

    def _index(self):
        ends, steps = self.data["episode_ends"][: self.size], np.arange(self.size)
        is_start = np.concatenate([[True], ends[:-1]])
        self.episode_start = np.maximum.accumulate(np.where(is_start, steps, 0))
        self.sampleable = np.flatnonzero(self.data["terminals"][: self.size] | ~ends)

    def stacks(self, idx):
        """(obs, next_obs) frame stacks [len(idx), 4, 84, 84] of transitions idx."""
        frame_idx = idx[:, None] + np.arange(-FRAME_STACK + 1, 2)  # t-3 .. t+1; t+1 matters only if not terminal
        frames = self.data["frames"][np.clip(frame_idx, 0, self.size - 1)]
        frames[frame_idx < self.episode_start[idx, None]] = 0
        return frames[:, :-1], frames[:, 1:]

    def sample(self, n, rng) -> dict:
        idx = self.sampleable[rng.integers(len(self.sampleable), size=n)]
        obs, next_obs = self.stacks(idx)
        d = self.data
        return dict(obs=obs, actions=d["actions"][idx], rewards=d["rewards"][idx], next_obs=next_obs,
                    terminals=d["terminals"][idx].astype(np.float32), mc_returns=d["mc_returns"][idx])


def run_episode(env, policy, epsilon, rng) -> dict:
    """Play one episode epsilon-greedily around policy(stack); returns its transitions with raw rewards."""
    frame, _ = env.reset()
    stack = np.zeros((FRAME_STACK, 84, 84), np.uint8)  # zeros before the first frame, as in the FrameStore
    frames, actions, rewards, terminals = [], [], [], []
    while True:
        stack[:-1], stack[-1] = stack[1:], frame
        action = rng.integers(env.action_space.n) if rng.random() < epsilon else policy(stack)
        frames.append(frame)
        actions.append(action)
        frame, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        terminals.append(terminated)
        if terminated or truncated:
            return dict(frames=np.stack(frames), actions=np.array(actions), rewards=np.array(rewards, np.float32),
                        terminals=np.array(terminals), episode_ends=np.arange(len(actions)) == len(actions) - 1)


def label(transitions, gamma) -> dict:
    """Clip rewards to [-1, 1] (the learning signal, as in DQN) and add their MC returns; no failure rule on Atari."""
    rewards = np.clip(transitions["rewards"], -1, 1)
    mc_returns = calc_mc_returns(rewards, transitions["terminals"], transitions["episode_ends"], gamma)
    return {**transitions, "rewards": rewards, "mc_returns": mc_returns}


class QNetwork(nn.Module):
    """Nature-DQN CNN: a uint8 stack of 4 frames 84x84 -> one Q-value per action."""

    def __init__(self, n_actions):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(FRAME_STACK, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, n_actions),
        )

    def forward(self, x):
        return self.network(x / 255.0)

    @torch.no_grad()
    def act(self, stack):
        """Greedy action for one frame stack."""
        return self(torch.as_tensor(stack, device=self.network[0].weight.device)[None]).argmax().item()


def cql_loss(q, q_data, mc_returns, calibrate):
    """CQL(H): logsumexp over all actions minus the data action's Q-value, batch mean."""
    if calibrate:
        q = torch.maximum(q, mc_returns[:, None])  # Cal-QL: no action's Q-value is pushed below the MC return
    return (torch.logsumexp(q, dim=1) - q_data).mean()


def update(qf, qf_target, optimizer, batch, args) -> dict:
    """One gradient step of TD + cql_weight * CQL on a batch; returns detached metric tensors (no host sync)."""
    q = qf(batch["obs"])
    q_data = q.gather(1, batch["actions"][:, None]).squeeze(1)
    with torch.no_grad():
        next_q = qf_target(batch["next_obs"]).max(dim=1).values
        td_target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * next_q
    td_loss = (F.smooth_l1_loss if args.td_loss == "huber" else F.mse_loss)(q_data, td_target)
    cql = cql_loss(q, q_data, batch["mc_returns"], args.calibrate)
    optimizer.zero_grad()
    (td_loss + args.cql_weight * cql).backward()
    optimizer.step()
    q, mc = q.detach(), batch["mc_returns"]
    return {"losses/td_loss": td_loss.detach(), "losses/cql_loss": cql.detach(),
            "losses/q_values": q_data.detach().mean(), "calibration/bound_rate": (q < mc[:, None]).float().mean(),
            "calibration/q_minus_mc": (q.max(dim=1).values - mc).mean()}


class CudaGraphStep:
    """Replays `step(*inputs)` as one captured CUDA graph, so the ~400 kernel launches of an update cost one. Each
    input is a dict of tensors, copied into the captured ones before a replay (a step that samples its own batch on
    the GPU has none). The first `warmup` calls run eagerly on a side stream, as capture requires (they create Adam's
    state and pick cuBLAS kernels); they are real steps. Every call is one step."""

    def __init__(self, step, warmup: int = 3):
        self.step, self.warmup, self.graph, self.side_stream = step, warmup, None, torch.cuda.Stream()

    def __call__(self, *inputs: dict) -> dict:
        if self.warmup > 0:
            self.warmup -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                metrics = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return metrics
        if self.graph is None:  # capture records the kernels without running them; the replay below runs them
            self.inputs, self.graph = [{k: v.clone() for k, v in d.items()} for d in inputs], torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.metrics = self.step(*self.inputs)  # static outputs, overwritten by every replay
        else:
            for static, new in zip(self.inputs, inputs):
                for k, v in new.items():
                    static[k].copy_(v)
        self.graph.replay()
        return self.metrics


def make_train_step(qf, qf_target, optimizer, args):
    """step(batch) -> metrics: the update, compiled with --compile and replayed as a CUDA graph with --cudagraphs."""
    update_fn = torch.compile(update) if args.compile else update

    def step(batch):
        return update_fn(qf, qf_target, optimizer, batch, args)

    return CudaGraphStep(step) if args.cudagraphs else step


def to_torch(batch, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


@dataclass
class Progress:
    """Where the run stands: what a resumed run needs besides the networks, the buffers and the random states."""

    phase: str = "offline"  # then "online"
    global_step: int = 0  # gradient steps
    env_steps: int = 0  # online environment steps


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a counter going from `before` to `after` passed a multiple of `every` (never for every <= 0)."""
    return every > 0 and after // every > before // every


def log_metrics(writer: SummaryWriter, metrics: dict, global_step: int, steps_per_second: float):
    """Write the training metrics (one device-to-host copy for all); stop at the first non-finite value."""
    for tag, value in zip(metrics, torch.stack(list(metrics.values())).tolist()):
        if not math.isfinite(value):
            raise SystemExit(f"error: {tag} became {value} by gradient step {global_step}; lower the learning rates or check the data's rewards")
        writer.add_scalar(tag, value, global_step)
    writer.add_scalar("charts/SPS", int(steps_per_second), global_step)


def atomic_save(state: dict, path: str):
    """torch.save through a temporary file and a rename: a kill mid-write leaves the previous file intact."""
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def write_provenance(run_dir: str, args, device: torch.device) -> list[dict]:
    """Append this start of the run to `run_dir/provenance.json`, a list (the first start, then one record per resume):
    the git commit of this code and whether tracked files differ from it ("unknown" outside a git checkout), the
    resolved arguments, the installed versions of the packages used, the device, host and time. Returns the list."""
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        commit = dirty = "unknown"
    installed = {d.name.lower().replace("_", "-"): d.version for d in importlib.metadata.distributions()}
    packages = ("torch", "numpy", "gymnasium", "gymnasium-robotics", "minari", "mujoco", "ale-py", "tyro")
    record = {"commit": commit, "dirty": dirty, "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "python": platform.python_version(),
              "versions": {name: installed[name] for name in packages if name in installed}, "args": asdict(args)}
    path = f"{run_dir}/provenance.json"
    records = [*(json.load(open(path)) if os.path.exists(path) else []), record]
    os.makedirs(run_dir, exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(records, f, indent=1, default=str)
    os.replace(f"{path}.tmp", path)
    return records


def env_generators(env: gym.Env) -> dict:
    """Every numpy random generator an env holds, by attribute path: its own, its wrappers' and those of the objects
    inside it (FrankaKitchen's robot draws its observation noise from one of its own). Found by walking instance
    attributes, lists and dicts (not classes or modules), each object once."""
    found, seen, todo = {}, set(), [("env", env)]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, (np.random.Generator, np.random.RandomState)):
            found[path] = obj
        elif isinstance(obj, dict):
            todo += [(f"{path}[{key!r}]", value) for key, value in obj.items()]
        elif isinstance(obj, (list, tuple)):
            todo += [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
        elif hasattr(obj, "__dict__"):
            todo += [(f"{path}.{name}", value) for name, value in vars(obj).items()]
    return found


def env_generator_states(env: gym.Env) -> dict:
    generators = env_generators(env).items()
    return {path: g.bit_generator.state if isinstance(g, np.random.Generator) else g.get_state(legacy=False) for path, g in generators}


def restore_env_generators(states: dict, env: gym.Env):
    """Each generator of the env set to its saved state in place (one shared by two objects stays shared)."""
    generators = env_generators(env)
    missing = sorted(states.keys() - generators.keys())
    if missing:
        raise SystemExit(f"error: the checkpoint holds the random state of {missing[0]}, which this env lacks: resume with the --env-id and --env-kwargs the run started with")
    for path, state in states.items():
        if isinstance(generators[path], np.random.Generator):
            generators[path].bit_generator.state = state
        else:
            generators[path].set_state(state)


def random_states(env: gym.Env, rng: np.random.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda,
            "rng": rng.bit_generator.state, "env": env_generator_states(env), "ale": env.unwrapped.ale.cloneState(include_rng=True)}  # sticky actions' RNG


def restore_random_states(states: dict, env: gym.Env, rng: np.random.Generator):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["rng"]
    restore_env_generators(states["env"], env)
    env.unwrapped.ale.restoreState(states["ale"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0 <= args.mixing_ratio <= 1:
        raise SystemExit(f"error: --mixing-ratio {args.mixing_ratio} is the offline share of a batch: give a value in [0, 1]")
    run_name = args.run_name or f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, stopped_by = f"runs/{run_name}", []
    # SIGTERM, SIGUSR1, SIGUSR2 (SLURM's notice before preemption or the time limit; submitit's is SIGUSR2) are only
    # noted: the loops finish the current gradient step (offline) or episode (online), save and exit
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signal.Signals(signum).name))
    if os.path.exists(f"{run_dir}/finished.json"):
        print(f"run {run_name} is already finished ({run_dir}/finished.json)")
        raise SystemExit(0)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        raise SystemExit("error: --cudagraphs replays CUDA graphs and needs a CUDA GPU (with --cuda on); drop the flag on CPU")
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if args.tf32 else "ieee"
    rng = np.random.default_rng(args.seed)

    # environment and offline data: clipped rewards, MC labels per trajectory, frames stored once (before the run
    # folder: bad data leaves none)
    try:
        env = make_env(args.env_id, args.seed, args.max_episode_steps)
        eval_env = make_env(args.env_id, args.seed + 1, args.max_episode_steps, "rgb_array" if args.capture_video else None)
        replay_dir = args.replay_dir or builtin_replay_dir(args.env_id, args.dataset_size, args.dataset_epsilon, args.seed + 2)
        data = load_replay_logs(replay_dir, args.checkpoints, args.transitions_per_checkpoint)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    eval_env = gym.wrappers.FrameStackObservation(eval_env, FRAME_STACK, padding_type="zero")  # as the frame store
    if args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, f"videos/{run_name}", lambda i: i % args.eval_episodes == 0)
    n_actions = env.action_space.n
    if data["actions"].max() >= n_actions:
        raise SystemExit(f"error: the dataset has action {data['actions'].max()} but {args.env_id} has {n_actions} actions")
    offline_buffer, online_buffer = FrameStore(**label(data, args.gamma)), FrameStore.empty()

    qf = QNetwork(n_actions).to(device)
    qf_target = QNetwork(n_actions).to(device)
    qf_target.load_state_dict(qf.state_dict())
    optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, eps=0.01 / 32, capturable=args.cudagraphs)
    progress, resumed = Progress(), os.path.exists(f"{run_dir}/checkpoint.pt")
    if resumed:  # continue where the run stopped, as if it never had
        checkpoint = torch.load(f"{run_dir}/checkpoint.pt", map_location=device, weights_only=False)
        for module, name in ((qf, "qf"), (qf_target, "qf_target"), (optimizer, "optimizer")):
            module.load_state_dict(checkpoint[name])
        progress, online_buffer = Progress(**checkpoint["progress"]), FrameStore(**checkpoint["online_buffer"])
        restore_random_states(checkpoint["random_states"], env, rng)
        print(f"resuming {run_name} from gradient step {progress.global_step} ({progress.phase}, {progress.env_steps} env steps)")
    provenance = write_provenance(run_dir, args, device)
    if args.track:  # one W&B run per run: its id is made of the run name and its first start, so a resume continues it
        import wandb

        run_id = hashlib.sha256(f"{run_name} {provenance[0]['start_time']}".encode()).hexdigest()[:32]
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args), name=run_name,
                   id=run_id, resume="allow", save_code=True)
    # a resumed run rewrites what followed its checkpoint: TensorBoard hides those older points (no duplicates)
    writer = SummaryWriter(run_dir, purge_step=progress.global_step + 1 if resumed else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    train_step = make_train_step(qf, qf_target, optimizer, args)
    start_time, start_step = time.time(), progress.global_step

    def gradient_step(batch: dict):
        metrics, progress.global_step = train_step(to_torch(batch, device)), progress.global_step + 1
        if progress.global_step % args.target_update_period == 0:
            qf_target.load_state_dict(qf.state_dict())
        if progress.global_step % args.log_every == 0:
            log_metrics(writer, metrics, progress.global_step, (progress.global_step - start_step) / (time.time() - start_time))

    def run_evaluation() -> float:
        """Mean raw (unclipped) return of the eval_epsilon-greedy policy, logged at the current gradient step."""
        policy = epsilon_greedy(qf.act, n_actions, args.eval_epsilon, rng)
        eval_return = evaluate(eval_env, policy, args.eval_episodes, args.seed + 1)["return"]
        writer.add_scalar("eval/return", eval_return, progress.global_step)
        writer.add_scalar("eval/env_steps", progress.env_steps, progress.global_step)
        return eval_return

    def save_progress():
        """The whole run state, written after everything up to this gradient step is logged."""
        writer.flush()
        atomic_save({"qf": qf.state_dict(), "qf_target": qf_target.state_dict(), "optimizer": optimizer.state_dict(), "args": asdict(args),
                     "progress": asdict(progress), "online_buffer": online_buffer.state_dict(), "random_states": random_states(env, rng)}, f"{run_dir}/checkpoint.pt")

    def exit_if_stopped():
        if stopped_by:
            save_progress()
            print(f"stopped by {stopped_by[0]} at gradient step {progress.global_step}: state saved to {run_dir}/checkpoint.pt; run the same command again to resume", file=sys.stderr)
            raise SystemExit(75)  # EX_TEMPFAIL: try again

    def save_agent(name: str):
        if args.save_model:
            atomic_save({"qf": qf.state_dict(), "global_step": progress.global_step, "args": asdict(args)}, f"{run_dir}/{name}")

    # ---------------- offline pre-training ----------------
    if progress.phase == "offline":
        with tqdm(initial=progress.global_step, total=args.offline_steps, desc="offline", unit="step", mininterval=2) as bar:
            if not resumed:
                bar.set_postfix(eval=run_evaluation())
            while progress.global_step < args.offline_steps and not stopped_by:
                gradient_step(offline_buffer.sample(args.batch_size, rng))
                if progress.global_step % args.offline_eval_every == 0 or progress.global_step == args.offline_steps:
                    bar.set_postfix(eval=run_evaluation())
                if crossed(progress.global_step - 1, progress.global_step, args.checkpoint_every):
                    save_progress()
                bar.update()
        exit_if_stopped()
        save_agent("pretrained.pt")
        progress.phase = "online"

    # ---------------- online fine-tuning: collect, label, update, evaluate ----------------
    n_offline = int(args.batch_size * args.mixing_ratio)
    with tqdm(initial=progress.env_steps, total=args.online_env_steps, desc="online", unit="env step", mininterval=2) as bar:
        while progress.env_steps < args.online_env_steps and not stopped_by:
            episode = run_episode(env, qf.act, args.online_epsilon, rng)
            online_buffer.add(**label(episode, args.gamma))  # labelled with its own MC returns once it has ended
            steps_before, env_steps_before = progress.global_step, progress.env_steps
            progress.env_steps += len(episode["actions"])
            # the updates this episode's steps add to round(env_steps * utd): a fractional UTD's remainder is carried over
            for _ in range(round(progress.env_steps * args.utd_ratio) - round(env_steps_before * args.utd_ratio)):
                offline_batch, online_batch = offline_buffer.sample(n_offline, rng), online_buffer.sample(args.batch_size - n_offline, rng)
                gradient_step({k: np.concatenate([offline_batch[k], online_batch[k]]) for k in offline_batch})
            writer.add_scalar("charts/episodic_return", episode["rewards"].sum(), progress.global_step)
            writer.add_scalar("charts/env_steps", progress.env_steps, progress.global_step)
            if crossed(env_steps_before, progress.env_steps, args.online_eval_every) or progress.env_steps >= args.online_env_steps:
                bar.set_postfix(eval=run_evaluation())
            if crossed(steps_before, progress.global_step, args.checkpoint_every):
                save_progress()
            bar.update(len(episode["actions"]))
    exit_if_stopped()

    save_agent("final.pt")
    with open(f"{run_dir}/finished.json", "w") as f:  # marks the run done for a re-launch (and benchmarks/grid.py)
        json.dump({"global_step": progress.global_step, "env_steps": progress.env_steps, "wall_time_s": round(time.time() - start_time, 1)}, f)
    if os.path.exists(f"{run_dir}/checkpoint.pt"):
        os.remove(f"{run_dir}/checkpoint.pt")  # it holds the online buffer's frames
    env.close()
    eval_env.close()
    writer.close()
