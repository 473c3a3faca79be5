"""Cal-QL on Atari from pixels: discrete CQL(H) plus the Cal-QL calibration; offline pre-training, online fine-tuning.

Paper: Nakamoto et al., "Cal-QL: Calibrated Offline RL Pre-Training for Efficient Online Fine-Tuning" (NeurIPS 2023).
The official code has no Atari version; the discrete form used here is this project's own (calql-spec.md §9):

    loss = TD(Q(s, a), r + gamma * max_a' Q_target(s', a')) + cql_alpha * (logsumexp_a Q~(s, a) - Q(s, a_data))

with Q~(s, a) = max(Q(s, a), mc_return(s)) for every action (the Cal-QL line, search "Cal-QL") and Q~ = Q for plain
CQL (`--no-calibrate`). mc_return(s) is the Monte-Carlo discounted return-to-go of the logged trajectory (clipped
rewards), a value estimate of the behaviour policy that Q must not fall below. Data: the DQN Replay Dataset layout, or
a small built-in dataset of a noisy heuristic on Freeway that the script collects and caches itself.
"""

import os
import random
import sys
import time
from dataclasses import dataclass
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cal-ql"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """record the first episode of every evaluation to `videos/{run_name}`"""
    save_model: bool = True
    """save the Q-network state_dict after pre-training and at the end, into runs/{run_name}/"""

    # data
    env_id: str = "ALE/Freeway-v5"
    """the ALE game; played with sticky actions (p=0.25), frame skip 4, 84x84 grey frames, as the DQN Replay Dataset"""
    replay_dir: str | None = None
    """a DQN Replay `replay_logs` folder; if None, the built-in Freeway dataset (datasets/atari/<game>/replay_logs)"""
    checkpoints: tuple[int, ...] = (0,)
    """which checkpoint files N (`..._ckpt.N.gz`) of the replay folder to load"""
    transitions_per_checkpoint: int | None = None
    """load only the first this-many transitions of each checkpoint (None: all)"""
    dataset_size: int = 50_000
    """transitions of the built-in dataset (used only when it is collected)"""
    dataset_epsilon: float = 0.5
    """built-in dataset: probability of a uniformly random action instead of the heuristic's UP"""

    # network
    learning_rate: float = 5e-5
    """Adam learning rate (eps 0.01/32, Dopamine's offline-Atari setting)"""
    target_update_period: int = 2000
    """gradient steps between copies of the Q-network into the target network"""

    # CQL / Cal-QL
    cql_alpha: float = 1.0
    """weight of the CQL(H) regulariser"""
    calibrate: bool = True
    """Cal-QL: bound the Q-values inside the logsumexp from below by the MC return; --no-calibrate gives plain CQL"""
    td_loss: Literal["huber", "mse"] = "huber"
    """TD loss against the DQN target r + gamma * max_a' Q_target(s', a')"""
    gamma: float = 0.99
    """the discount factor gamma"""
    batch_size: int = 32
    """the batch size of each gradient step"""

    # offline
    offline_updates: int = 10_000
    """gradient steps of offline pre-training"""
    offline_eval_every: int = 2_500
    """gradient steps between evaluations during pre-training"""

    # online
    online_steps: int = 4_096
    """environment steps of online fine-tuning (Freeway episodes are 2048 steps)"""
    utd: float = 1.0
    """gradient steps per environment step, done after each episode once it is labelled"""
    mixing_ratio: float = 0.5
    """fraction of each online-phase batch drawn from the offline data (the rest from the online buffer)"""
    online_epsilon: float = 0.01
    """epsilon of the epsilon-greedy policy that collects online episodes"""
    max_episode_steps: int | None = None
    """cap on agent steps of online and evaluation episodes (None: ALE's 27,000)"""

    # evaluation
    eval_every: int = 2048
    """environment steps between online evaluations (checked at episode ends)"""
    eval_episodes: int = 3
    """episodes per evaluation"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy"""
    log_every: int = 100
    """gradient steps between reads of the training metrics (TensorBoard, non-finite check)"""
    compile: bool = False
    """run the update through torch.compile (same function, fused kernels; the first steps compile)"""
    cudagraphs: bool = False
    """GPU only: capture the update (forward, backward, Adam) as one CUDA graph; each step copies its batch in and replays"""
    tf32: bool = True
    """GPU only: TF32 matmuls and convolutions (Ampere and newer)"""


def calc_mc_returns(rewards, terminals, episode_ends, gamma, failure_reward=None) -> np.ndarray:
    """Monte-Carlo return-to-go of flat, concatenated trajectories: G_t = r_t + gamma * G_{t+1} * (1 - terminal_t).

    episode_ends[i] marks the last step of a trajectory; nothing is bootstrapped past it. Sparse-reward failure rule
    (spec §4): a trajectory whose rewards all equal failure_reward gets failure_reward / (1 - gamma) at every step.
    """
    rewards = np.asarray(rewards, np.float64)
    episode_ends = np.asarray(episode_ends, bool).copy()
    episode_ends[-1] = True
    # Solve G_t = a_t + b_t * G_{t+span} with a doubling span: log2(longest trajectory) vectorised passes, no Python
    # loop over steps. b becomes exactly 0 across a cut, and gamma ** span underflows to 0 after ~17 passes.
    a = rewards.copy()
    b = np.where(np.asarray(terminals, bool) | episode_ends, 0.0, gamma)
    span = 1
    while span < len(a) and b.any():
        a[:-span] += b[:-span] * a[span:]
        b[:-span] = b[:-span] * b[span:]
        span *= 2
    if failure_reward is not None:
        trajectory = np.concatenate([[0], np.cumsum(episode_ends[:-1])])
        failed = np.bincount(trajectory, weights=rewards != failure_reward) == 0
        a = np.where(failed[trajectory], failure_reward / (1 - gamma), a)
    return a.astype(np.float32)


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
    """One gradient step of TD + cql_alpha * CQL on a batch; returns detached metric tensors (no host sync)."""
    q = qf(batch["obs"])
    q_data = q.gather(1, batch["actions"][:, None]).squeeze(1)
    with torch.no_grad():
        next_q = qf_target(batch["next_obs"]).max(dim=1).values
        td_target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * next_q
    td_loss = (F.smooth_l1_loss if args.td_loss == "huber" else F.mse_loss)(q_data, td_target)
    cql = cql_loss(q, q_data, batch["mc_returns"], args.calibrate)
    optimizer.zero_grad()
    (td_loss + args.cql_alpha * cql).backward()
    optimizer.step()
    q, mc = q.detach(), batch["mc_returns"]
    return {"losses/td_loss": td_loss.detach(), "losses/cql_loss": cql.detach(),
            "losses/q_values": q_data.detach().mean(), "calibration/bound_rate": (q < mc[:, None]).float().mean(),
            "calibration/q_minus_mc": (q.max(dim=1).values - mc).mean()}


class CudaGraphStep:
    """Replays `step(batch)` as one captured CUDA graph: each call copies the batch into the captured input tensors
    and replays, so the update's kernel launches cost one. The first `warmup` calls run eagerly on a side stream,
    as capture requires (they create Adam's state and pick kernels); they are real steps. Every call is one step."""

    def __init__(self, step, warmup: int = 3):
        self.step, self.warmup, self.graph, self.side_stream = step, warmup, None, torch.cuda.Stream()

    def __call__(self, batch: dict) -> dict:
        if self.warmup > 0:
            self.warmup -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                metrics = self.step(batch)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return metrics
        if self.graph is None:  # capture records the kernels without running them; the replay below runs them
            self.batch, self.graph = {k: v.clone() for k, v in batch.items()}, torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.metrics = self.step(self.batch)  # static outputs, overwritten by every replay
        else:
            for k, v in batch.items():
                self.batch[k].copy_(v)
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


def log_metrics(writer, metrics, global_step, start_time):
    for key, value in metrics.items():
        value = value.item()
        if not np.isfinite(value):
            sys.exit(f"error: {key} is {value} at gradient step {global_step} (checked every --log-every steps)")
        writer.add_scalar(key, value, global_step)
    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0 <= args.mixing_ratio <= 1:
        sys.exit(f"error: --mixing-ratio {args.mixing_ratio} is the offline share of a batch: give a value in [0, 1]")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        sys.exit("error: --cudagraphs replays CUDA graphs and needs a CUDA GPU (with --cuda on); drop the flag on CPU")
    # offline data: clipped rewards, MC labels per trajectory, frames stored once (loaded before the run folder is
    # created, so that a data error leaves no empty run behind)
    try:
        env = make_env(args.env_id, args.seed, args.max_episode_steps)
        eval_env = make_env(args.env_id, args.seed + 1, args.max_episode_steps, "rgb_array" if args.capture_video else None)
        replay_dir = args.replay_dir or builtin_replay_dir(args.env_id, args.dataset_size, args.dataset_epsilon, args.seed + 2)
        data = load_replay_logs(replay_dir, args.checkpoints, args.transitions_per_checkpoint)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    eval_env = gym.wrappers.FrameStackObservation(eval_env, FRAME_STACK, padding_type="zero")  # as the frame store
    n_actions = env.action_space.n
    if data["actions"].max() >= n_actions:
        sys.exit(f"error: the dataset has action {data['actions'].max()} but {args.env_id} has {n_actions} actions")
    offline_buffer, online_buffer = FrameStore(**label(data, args.gamma)), FrameStore.empty()

    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, f"videos/{run_name}", lambda i: i % args.eval_episodes == 0)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if args.tf32 else "ieee"

    qf = QNetwork(n_actions).to(device)
    qf_target = QNetwork(n_actions).to(device)
    qf_target.load_state_dict(qf.state_dict())
    optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, eps=0.01 / 32, capturable=args.cudagraphs)
    train_step = make_train_step(qf, qf_target, optimizer, args)
    global_step, env_steps, start_time = 0, 0, time.time()

    def report_eval(phase):
        policy = epsilon_greedy(qf.act, n_actions, args.eval_epsilon, rng)
        eval_return = evaluate(eval_env, policy, args.eval_episodes, args.seed + 1)["return"]  # raw, unclipped
        writer.add_scalar("eval/return", eval_return, global_step)
        tqdm.write(f"eval ({phase}) at gradient step {global_step}, env step {env_steps}: return {eval_return:.1f}")
        return eval_return

    # ---------------- offline pre-training ----------------
    pbar = tqdm(total=args.offline_updates, desc="offline")
    pbar.set_postfix(eval=report_eval("before training"))
    for _ in range(args.offline_updates):
        metrics = train_step(to_torch(offline_buffer.sample(args.batch_size, rng), device))
        global_step += 1
        if global_step % args.target_update_period == 0:
            qf_target.load_state_dict(qf.state_dict())
        if global_step % args.log_every == 0:
            log_metrics(writer, metrics, global_step, start_time)
        if global_step % args.offline_eval_every == 0 or global_step == args.offline_updates:
            pbar.set_postfix(eval=report_eval("offline"))
        pbar.update(1)
    pbar.close()
    offline_time = time.time() - start_time
    print(f"offline: {global_step} gradient steps in {offline_time:.0f} s ({global_step / offline_time:.1f} steps/s)")
    if args.save_model:
        torch.save(qf.state_dict(), f"runs/{run_name}/{args.exp_name}_offline.cleanrl_model")

    # ---------------- online fine-tuning ----------------
    n_offline = int(args.batch_size * args.mixing_ratio)
    pbar = tqdm(total=args.online_steps, desc="online")
    while env_steps < args.online_steps:
        # ALGO LOGIC: one whole episode, labelled with its MC returns once it is over, then len * utd updates
        episode = run_episode(env, qf.act, args.online_epsilon, rng)
        writer.add_scalar("charts/episodic_return", episode["rewards"].sum(), global_step)
        online_buffer.add(**label(episode, args.gamma))
        previous_env_steps, env_steps = env_steps, env_steps + len(episode["actions"])
        for _ in range(int(len(episode["actions"]) * args.utd)):
            offline_batch = offline_buffer.sample(n_offline, rng)
            online_batch = online_buffer.sample(args.batch_size - n_offline, rng)
            batch = {k: np.concatenate([offline_batch[k], online_batch[k]]) for k in offline_batch}
            metrics = train_step(to_torch(batch, device))
            global_step += 1
            if global_step % args.target_update_period == 0:
                qf_target.load_state_dict(qf.state_dict())
            if global_step % args.log_every == 0:
                log_metrics(writer, metrics, global_step, start_time)
        if env_steps // args.eval_every > previous_env_steps // args.eval_every or env_steps >= args.online_steps:
            pbar.set_postfix(eval=report_eval("online"))
        pbar.update(len(episode["actions"]))
    pbar.close()
    print(f"done: {global_step} gradient steps, {env_steps} env steps in {time.time() - start_time:.0f} s")

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save(qf.state_dict(), model_path)
        print(f"model saved to {model_path}")
    env.close()
    eval_env.close()
    writer.close()
