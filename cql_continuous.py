"""CQL for continuous actions: offline pre-training, then online fine-tuning, in one file (Cal-QL without calibration).

Nakamoto et al., "Cal-QL: Calibrated Offline RL Pre-Training for Efficient Online Fine-Tuning", NeurIPS 2023.
Cal-QL is CQL whose regularizer pushes down max(Q(s, a_pi), mc_return(s)) instead of Q(s, a_pi) for policy actions,
where mc_return(s) is the Monte-Carlo return-to-go of the trajectory the transition came from: one line, marked
"Cal-QL:" in cal_ql_continuous.py. `diff cql_continuous.py cal_ql_continuous.py` shows it is the only change.
"""

import argparse
import copy
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
from dataclasses import asdict, dataclass, field, replace

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.datasets import load_dataset
from utils.evaluation import deterministic, evaluate
from utils.tasks import TASKS, check_dataset_fits_env, get_task, make_env
from utils.validation import DatasetError


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    cuda: bool = True  # if toggled, cuda will be enabled by default
    track: bool = False  # if toggled, this experiment will be tracked with Weights and Biases
    wandb_project_name: str = "cal-ql"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project
    capture_video: bool = False  # record the first episode of every evaluation to `videos/{run_name}` (needs moviepy; MuJoCo tasks also a GL backend)
    save_model: bool = True  # save the agent to `runs/{run_name}/pretrained.pt` after pre-training and `final.pt` at the end
    run_name: str | None = None  # the run's folder in runs/ (default `{env_id}__{exp_name}__{seed}__{time}`); a folder holding a checkpoint is resumed
    checkpoint_every: int = 50_000  # save the whole run state to `runs/{run_name}/checkpoint.pt` every this many gradient steps (0: only on SIGTERM/SIGUSR1/2)

    # data
    env_id: str = "pointmaze-umaze"  # the task; `--env-id ID --help` shows its preset. Any gymnasium id (or module.path:EnvId-v0, importing module.path first) works with --dataset-path or --dataset-id
    env_kwargs: str = "{}"  # a custom --env-id's keyword arguments for gymnasium.make, as JSON, e.g. '{"max_episode_steps": 200}' (a built-in task's are fixed)
    dataset_path: str | None = None  # a D4RL-format HDF5 file to use as the offline data
    dataset_id: str | None = None  # a Minari dataset id to use as the offline data
    dataset_dir: str = "datasets"  # where the embedded task's data is cached and the AWAC Adroit files are looked for (in offpolicy_hand_data/)
    reward_scale: float = 1.0  # rewards become reward * scale + bias, offline and online, before Monte-Carlo labelling
    reward_bias: float = 0.0  # see --reward-scale
    failure_reward: float | None = None  # sparse tasks: raw reward of a step off the goal; a trajectory of only such steps gets MC return (scaled failure) / (1 - gamma)
    mc_bootstrap_tail: bool = False  # a trajectory cut by the time limit keeps its last reward forever: last MC return r_T / (1 - gamma) (official, Kitchen)

    # networks
    policy_hidden: list[int] = field(default_factory=lambda: [256, 256])  # hidden layer widths of the actor
    q_hidden: list[int] = field(default_factory=lambda: [256, 256])  # hidden layer widths of each critic

    # CQL / Cal-QL
    gamma: float = 0.99  # the discount factor
    tau: float = 5e-3  # target network update rate (Polyak averaging every gradient step)
    policy_lr: float = 1e-4  # learning rate of the actor and of the SAC temperature
    q_lr: float = 3e-4  # learning rate of the critics and of the CQL Lagrange multiplier
    batch_size: int = 256  # transitions per gradient step
    cql_n_actions: int = 10  # actions sampled per state for each of the random, pi(s) and pi(s') sets, and for the max-target backup
    cql_weight: float = 5.0  # weight of the conservative regularizer (CQL alpha)
    cql_importance_sample: bool = True  # subtract the sampling log-densities inside the logsumexp (and leave the data action out of it)
    cql_lagrange: bool = False  # tune a multiplier alpha' (init e) that scales --cql-weight so the regularizer gap reaches --cql-target-action-gap
    cql_target_action_gap: float = 1.0  # the gap targeted with --cql-lagrange

    # offline
    offline_steps: int = 1_000_000  # gradient steps of offline pre-training
    offline_eval_every: int = 50_000  # evaluate every this many offline gradient steps
    pretrained_checkpoint: str | None = None  # skip pre-training and fine-tune the agent saved in this file (a run's pretrained.pt, final.pt or checkpoint.pt)

    # online
    online_env_steps: int = 1_000_000  # environment steps of online fine-tuning
    mixing_ratio: float = 0.5  # fraction of every online-phase batch drawn from the offline data (the rest from the online buffer)
    utd_ratio: float = 1.0  # gradient steps per environment step, done in one go after each finished episode
    buffer_size: int = 1_000_000  # capacity of the online replay buffer
    online_eval_every: int = 2_000  # evaluate when the environment-step count crosses a multiple of this (checked at episode ends)

    # evaluation and logging
    eval_episodes: int = 20  # episodes per evaluation, deterministic policy tanh(mean)
    log_every: int = 100  # write the training metrics (one device-to-host copy, non-finite check) every this many gradient steps

    # speed
    compile: bool = False  # run the update through torch.compile (same function, fused kernels; the first steps compile for a minute)
    cudagraphs: bool = False  # GPU only: capture the whole gradient step (batch sampling, noise, update, Adam, Polyak) as one CUDA graph and replay it
    tf32: bool = True  # GPU only: TF32 matmuls (Ampere and newer), the precision JAX and so the official code use there by default


PRESETS = {  # per task family, then per task id on top of it: what differs from the Args defaults; any flag overrides it
    # The embedded task is small enough for 2 CPU cores: narrower networks and short phases (see README).
    "pointmaze": dict(reward_scale=10.0, reward_bias=-5.0, failure_reward=0.0, policy_hidden=[128, 128], q_hidden=[128, 128],
                      offline_steps=5_000, offline_eval_every=2_500, online_env_steps=10_000, online_eval_every=2_500,
                      eval_episodes=50, checkpoint_every=5_000),
    # Built for CQL's fine-tuning dip (docs/effect.md): small networks, targets 4x faster so Q settles within pre-training
    "pointmaze-tight": dict(policy_hidden=[64, 64], q_hidden=[64, 64], tau=0.02, offline_steps=20_000, online_env_steps=3_000,
                            online_eval_every=500, eval_episodes=20),
    # Built for CQL's fine-tuning dip (docs/effect.md): AntMaze's rewards and regularizer, small networks, fast targets
    "bridge": dict(reward_scale=10.0, reward_bias=-5.0, failure_reward=0.0, cql_lagrange=True, cql_target_action_gap=0.8,
                   policy_hidden=[64, 64], q_hidden=[64, 64], tau=0.02, offline_steps=10_000, offline_eval_every=1_000,
                   online_env_steps=3_000, online_eval_every=250, eval_episodes=20),
    # The paper's tasks: the official settings (nakamotoo/Cal-QL scripts/run_antmaze.sh, run_adroit.sh, run_kitchen.sh)
    "antmaze": dict(reward_scale=10.0, reward_bias=-5.0, failure_reward=0.0, q_hidden=[256] * 4, cql_lagrange=True, cql_target_action_gap=0.8),
    "adroit": dict(reward_scale=10.0, reward_bias=5.0, failure_reward=-1.0, policy_hidden=[512] * 2, q_hidden=[512] * 3, cql_weight=1.0,
                   offline_steps=20_000, offline_eval_every=2_000),
    "pen-binary-v0": dict(online_env_steps=200_000),
    "kitchen": dict(mc_bootstrap_tail=True, policy_hidden=[512] * 3, q_hidden=[512] * 3, cql_importance_sample=False,
                    offline_steps=500_000, online_env_steps=1_500_000, online_eval_every=5_000, mixing_ratio=0.25),
}


def parse_args() -> Args:
    """tyro CLI whose defaults are the chosen task's preset, so `--env-id X --help` shows what X will run with."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--env-id", default=Args.env_id)
    env_id = pre.parse_known_args()[0].env_id
    family = TASKS[env_id].family if env_id in TASKS else None  # a custom task runs with the Args defaults
    preset = {**PRESETS.get(family, {}), **PRESETS.get(env_id, {})}
    args = tyro.cli(Args, default=replace(Args(), env_id=env_id, **preset))
    if not 0.0 <= args.mixing_ratio <= 1.0:
        raise SystemExit(f"error: --mixing-ratio {args.mixing_ratio} is the offline share of a batch: give a value in [0, 1]")
    return args


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


def init_gain(layer: int, n_layers: int) -> float:
    """Official orthogonal init gains: sqrt(2) for hidden layers, 1e-2 for the output layer (biases start at 0)."""
    return 1e-2 if layer == n_layers - 1 else math.sqrt(2)


class Actor(nn.Module):
    """Tanh-Gaussian policy: log_std = multiplier * raw + offset (two learnable scalars), clipped to [-20, 2]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int]):
        super().__init__()
        sizes = [obs_dim, *hidden, 2 * action_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        for k, layer in enumerate(self.layers):
            nn.init.orthogonal_(layer.weight, gain=init_gain(k, len(self.layers)))
            nn.init.zeros_(layer.bias)
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def forward(self, obs):
        x = obs
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        mean, raw_log_std = self.layers[-1](x).chunk(2, dim=-1)
        return mean, (self.log_std_multiplier * raw_log_std + self.log_std_offset).clamp(-20.0, 2.0)

    def sample(self, obs, eps):
        """Reparameterised action tanh(mean + std * eps) and its log-probability. eps [B, A], or [B, N, A] for N
        actions per state."""
        mean, log_std = self(obs)
        if eps.dim() == 3:
            mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
        x = mean + log_std.exp() * eps
        # Gaussian log-density minus log(1 - tanh(x)^2), the latter written as 2 * (log 2 - x - softplus(-2x))
        log_prob = -0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - log_std - 2 * (math.log(2) - x - F.softplus(-2 * x))
        return torch.tanh(x), log_prob.sum(-1)

    def act(self, obs):
        """The deterministic action used for evaluation."""
        return torch.tanh(self(obs)[0])


class Critics(nn.Module):
    """Q1 and Q2 as one module: each layer's weights are stacked on a leading axis of 2, so a single batched
    matmul per layer evaluates both critics. Q_k(s, a) = MLP_k([s, a]) with ReLU and a scalar output."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int], n_critics: int = 2):
        super().__init__()
        sizes = [obs_dim + action_dim, *hidden, 1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n_critics, i, o)) for i, o in zip(sizes[:-1], sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(n_critics, 1, o)) for o in sizes[1:])
        with torch.no_grad():
            for k, w in enumerate(self.weights):
                for member in w:  # each critic initialised independently, as an [out, in] nn.Linear weight
                    member.copy_(nn.init.orthogonal_(torch.empty(member.shape[::-1]), gain=init_gain(k, len(self.weights))).T)

    def forward(self, obs, actions, detach_params=False):
        """Q-values [2, *batch] of actions [*batch, A] at obs [B, obs_dim] (broadcast over extra action axes).
        detach_params lets a loss read the critics without training them (the actor loss)."""
        if actions.dim() > obs.dim():
            obs = obs.unsqueeze(1).expand(*actions.shape[:-1], -1)
        x = torch.cat([obs, actions], -1).reshape(-1, obs.shape[-1] + actions.shape[-1])
        x = x.expand(len(self.weights[0]), *x.shape)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)  # the bias rides in the matmul, and ReLU works in place: fewer passes over x
            if k < len(self.weights) - 1:
                x = x.relu_()
        return x.view(len(self.weights[0]), *actions.shape[:-1])


class Agent(nn.Module):
    """Everything that learns: actor, critics and their targets, SAC temperature, CQL Lagrange multiplier."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args.policy_hidden)
        self.qf = Critics(obs_dim, action_dim, args.q_hidden)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(0.0))
        self.log_alpha_prime = nn.Parameter(torch.tensor(1.0))  # alpha' starts at e (official)

    def make_optimizer(self, args: Args):
        """One Adam over four groups (Adam is per-element, so this equals one optimizer per group).
        capturable keeps its step counters on the GPU, so a CUDA graph can replay optimizer.step()."""
        groups = [(self.actor.parameters(), args.policy_lr), ([self.log_alpha], args.policy_lr),
                  (self.qf.parameters(), args.q_lr), ([self.log_alpha_prime], args.q_lr)]
        return torch.optim.Adam([{"params": params, "lr": lr} for params, lr in groups], capturable=args.cudagraphs)


def draw_noise(batch_size: int, n_actions: int, action_dim: int, device) -> dict[str, torch.Tensor]:
    """Every random number of one update, drawn in one place (the golden test feeds recorded draws instead)."""
    shape = (batch_size, n_actions, action_dim)
    return {
        "new_actions_eps": torch.randn(batch_size, action_dim, device=device),  # actor and temperature losses
        "backup_eps": torch.randn(shape, device=device),  # N actions at s' for the max-target backup
        "current_eps": torch.randn(shape, device=device),  # N actions from pi(.|s) for the CQL term
        "next_eps": torch.randn(shape, device=device),  # N actions from pi(.|s') for the CQL term
        "random_actions": torch.rand(shape, device=device) * 2 - 1,  # N uniform actions for the CQL term
    }


def cal_ql_losses(agent: Agent, batch: dict, noise: dict, args: Args) -> dict[str, torch.Tensor]:
    """All losses of one step from the current parameters; per-critic entries have shape [2]."""
    actor, qf = agent.actor, agent.qf
    obs, next_obs, action_dim, n = batch["obs"], batch["next_obs"], batch["actions"].shape[-1], args.cql_n_actions
    mc_returns = batch["mc_returns"].unsqueeze(-1)  # [B, 1]: the bound for every sampled action of a state

    with torch.no_grad():  # TD target: max over N next actions of min(Q1', Q2'), no entropy bonus
        next_actions, _ = actor.sample(next_obs, noise["backup_eps"])
        target_q = agent.qf_target(next_obs, next_actions).min(0).values.max(-1).values
        td_target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * target_q
        # policy actions for the CQL term, constants for the critic; pi(s') actions are scored at s (official)
        cur_actions, cur_log_pi = actor.sample(obs, noise["current_eps"])
        next_pi_actions, next_log_pi = actor.sample(next_obs, noise["next_eps"])

    # one batched forward: the data action, then N random, N pi(s) and N pi(s') actions, all at s -> [2, B, 1+3N]
    q = qf(obs, torch.cat([batch["actions"].unsqueeze(1), noise["random_actions"], cur_actions, next_pi_actions], 1))
    q_data, q_rand, q_cur, q_next = q[..., 0], q[..., 1 : 1 + n], q[..., 1 + n : 1 + 2 * n], q[..., 1 + 2 * n :]
    td_loss = ((q_data - td_target) ** 2).mean(-1)

    bound_rate = (torch.cat([q_cur, q_next], -1) < mc_returns).float().mean()
    if args.cql_importance_sample:
        random_log_density = action_dim * math.log(0.5)  # Uniform[-1, 1]^A
        ood = [q_rand - random_log_density, q_next - next_log_pi, q_cur - cur_log_pi]
    else:
        ood = [q_rand, q_data.unsqueeze(-1), q_next, q_cur]
    cql_diff = (torch.logsumexp(torch.cat(ood, -1), -1) - q_data).mean(-1)  # temperature 1, as every official run
    if args.cql_lagrange:  # alpha' rises while the gap exceeds its target; each side sees the other as a constant
        alpha_prime = agent.log_alpha_prime.exp().clamp(0.0, 1e6)
        cql_loss = alpha_prime.detach() * args.cql_weight * (cql_diff - args.cql_target_action_gap)
        alpha_prime_loss = -(alpha_prime * args.cql_weight * (cql_diff.detach() - args.cql_target_action_gap)).mean()
    else:
        cql_loss = args.cql_weight * cql_diff
        alpha_prime = alpha_prime_loss = torch.zeros_like(agent.log_alpha_prime)  # unused; logged as 0 (official)

    new_actions, log_pi = actor.sample(obs, noise["new_actions_eps"])
    q_new = qf(obs, new_actions, detach_params=True).min(0).values  # trains the actor only
    alpha = agent.log_alpha.exp()
    actor_loss = (alpha.detach() * log_pi - q_new).mean()
    alpha_loss = -(agent.log_alpha * (log_pi.detach() - action_dim)).mean()  # target entropy -|A|
    return {
        "qf_loss": td_loss + cql_loss, "td_loss": td_loss, "cql_loss": cql_loss, "cql_diff": cql_diff,
        "actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha_prime_loss": alpha_prime_loss,
        "alpha": alpha.detach(), "alpha_prime": alpha_prime.detach(), "q_data": q_data.detach().mean(),
        "bound_rate": bound_rate, "q_minus_mc": (q_new.detach() - batch["mc_returns"]).mean(),
    }


def update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict, noise: dict, args: Args) -> dict:
    """One gradient step on every loss (all from the pre-update parameters), then the Polyak target update.
    Returns detached scalar metrics, left on the device (no host sync)."""
    losses = cal_ql_losses(agent, batch, noise, args)
    optimizer.zero_grad(set_to_none=True)
    (losses["qf_loss"].sum() + losses["actor_loss"] + losses["alpha_loss"] + losses["alpha_prime_loss"]).backward()
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(agent.qf_target.parameters()), list(agent.qf.parameters()), args.tau)
    return {f"{'calibration' if k in ('bound_rate', 'q_minus_mc') else 'losses'}/{k}": v.detach().mean() for k, v in losses.items()}


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


class ReplayBuffer:
    """Transitions kept as tensors on the training device (FIFO once full), sampled uniformly with replacement."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.size, self.pos, self.device = capacity, 0, 0, device
        self.size_on_device = torch.zeros((), dtype=torch.long, device=device)  # read by sample(), so a graph sees growth
        shapes = {"obs": (obs_dim,), "actions": (action_dim,), "rewards": (), "next_obs": (obs_dim,), "terminals": (), "mc_returns": ()}
        self.data = {k: torch.zeros((capacity, *s), device=device) for k, s in shapes.items()}

    def add(self, transitions: dict[str, np.ndarray]):
        idx = (self.pos + torch.arange(len(transitions["rewards"]), device=self.device)) % self.capacity
        for k, v in self.data.items():
            v[idx] = torch.as_tensor(transitions[k], dtype=torch.float32, device=self.device)
        self.pos = (self.pos + len(idx)) % self.capacity
        self.size = min(self.size + len(idx), self.capacity)
        self.size_on_device.fill_(self.size)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(1 << 62, (n,), device=self.device) % self.size_on_device  # uniform (bias < 1e-12), no host sync
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"data": {k: v[: self.size].cpu() for k, v in self.data.items()}, "pos": self.pos}

    def load_state_dict(self, state: dict):
        self.add(state["data"])
        self.pos = state["pos"]


def make_train_step(agent: Agent, optimizer: torch.optim.Optimizer, args: Args, offline_buffer: ReplayBuffer, online_buffer: ReplayBuffer | None = None):
    """A function doing one gradient step on a fresh batch and fresh noise. Offline, every row comes from the offline
    data; online, a --mixing-ratio share of them, the rest from the online buffer. --compile and --cudagraphs wrap
    the same `update`; the eager path is the plain function."""
    update_fn = torch.compile(update) if args.compile else update
    n_offline = args.batch_size if online_buffer is None else int(args.batch_size * args.mixing_ratio)
    sources = [(buffer, rows) for buffer, rows in ((offline_buffer, n_offline), (online_buffer, args.batch_size - n_offline)) if rows > 0]

    def train_step() -> dict:
        parts = [buffer.sample(rows) for buffer, rows in sources]
        batch = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        noise = draw_noise(args.batch_size, args.cql_n_actions, batch["actions"].shape[-1], batch["actions"].device)
        return update_fn(agent, optimizer, batch, noise, args)

    return CudaGraphStep(train_step) if args.cudagraphs else train_step


def label_transitions(data: dict[str, np.ndarray], args: Args) -> dict[str, np.ndarray]:
    """Dataset-format arrays -> buffer transitions: scaled rewards, clipped actions and Monte-Carlo returns.
    The same path serves the offline data and every finished online episode."""
    rewards = data["rewards"] * args.reward_scale + args.reward_bias
    failure = None if args.failure_reward is None else args.failure_reward * args.reward_scale + args.reward_bias
    tail_rewards = rewards.copy()
    if args.mc_bootstrap_tail:  # a time-limited trajectory keeps its last reward forever: r_T / (1 - gamma)
        tail_rewards[data["episode_ends"] & ~data["terminals"].astype(bool)] /= 1 - args.gamma
    return {
        "obs": data["observations"], "next_obs": data["next_observations"], "terminals": data["terminals"], "rewards": rewards,
        "actions": np.clip(data["actions"], -0.99999, 0.99999),  # finite tanh log-probs of data actions
        "mc_returns": calc_mc_returns(tail_rewards, data["terminals"], data["episode_ends"], args.gamma, failure),
    }


def collect_episode(env: gym.Env, actor: Actor, device: torch.device) -> tuple[dict, dict]:
    """Roll out one whole episode with the stochastic policy; returns it in dataset format, and its statistics."""
    obs, _ = env.reset()
    steps, success, done = [], False, False
    while not done:
        with torch.no_grad():
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
            action = actor.sample(obs_t, torch.randn(1, env.action_space.shape[0], device=device))[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        steps.append((np.array(obs), action, reward, np.array(next_obs), terminated))  # copies: envs may reuse arrays
        success |= bool(info.get("success", False))
        obs, done = next_obs, terminated or truncated
    columns = [np.asarray(c, np.float32) for c in zip(*steps)]
    episode = dict(zip(("observations", "actions", "rewards", "next_observations", "terminals"), columns))
    episode["episode_ends"] = np.arange(len(steps)) == len(steps) - 1
    return episode, {"return": float(columns[2].sum()), "length": len(steps), "success": float(success)}


@dataclass
class Progress:
    """Where the run stands: what a resumed run needs besides the networks, the buffers and the random states."""

    phase: str = "offline"  # then "online"
    global_step: int = 0  # gradient steps
    env_steps: int = 0  # online environment steps
    eval_regrets: list[float] = field(default_factory=list)  # 1 - normalized score of each online evaluation
    train_regrets: list[float] = field(default_factory=list)  # 1 - success of each online training episode


def running_regret(regrets: list[float], score: float) -> float:
    """The paper's cumulative regret: append 1 - score (normalized score, or an episode's success), return the mean."""
    regrets.append(1 - score)
    return float(np.mean(regrets))


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


def random_states(env: gym.Env) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda,
            "env": env_generator_states(env)}


def restore_random_states(states: dict, env: gym.Env):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    restore_env_generators(states["env"], env)


def load_agent(path: str, agent: Agent, optimizer: torch.optim.Optimizer) -> dict:
    """A saved agent and its optimizer state (pretrained.pt, final.pt or checkpoint.pt); returns the whole file."""
    try:
        checkpoint = torch.load(path, map_location=next(agent.parameters()).device, weights_only=False)
        for saved, group in zip(checkpoint["optimizer"]["param_groups"], optimizer.param_groups):
            saved["capturable"] = group["capturable"]  # a run without --cudagraphs may be fine-tuned with it, or back
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except FileNotFoundError:
        raise SystemExit(f"error: --pretrained-checkpoint {path} does not exist")
    except (RuntimeError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {path} does not fit this run ({str(e).splitlines()[0]}); use the --env-id and network sizes it was trained with")
    return checkpoint


if __name__ == "__main__":
    args = parse_args()
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, stopped_by = f"runs/{run_name}", []
    # SIGTERM, SIGUSR1, SIGUSR2 (SLURM's notice before preemption or the time limit; submitit's is SIGUSR2) are only
    # noted: the loops finish the current gradient step (offline) or episode (online), save and exit
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signal.Signals(signum).name))
    if os.path.exists(f"{run_dir}/finished.json"):
        print(f"run {run_name} is already finished ({run_dir}/finished.json)")
        raise SystemExit(0)
    print(f"{args.exp_name} on {args.env_id}:", ", ".join(f"{k}={v}" for k, v in asdict(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        raise SystemExit("error: --cudagraphs replays CUDA graphs and needs a CUDA GPU (with --cuda on); drop the flag on CPU")
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"

    # environment and offline data, labelled with Monte-Carlo returns (before the run folder: bad data leaves none)
    try:
        task = get_task(args.env_id, args.dataset_path, args.dataset_id)
        env = make_env(args.env_id, args.seed, env_kwargs=args.env_kwargs)
        eval_env = make_env(args.env_id, args.seed, "rgb_array" if args.capture_video else None, args.env_kwargs)
        dataset = load_dataset(args.env_id, args.dataset_path, args.dataset_id, args.dataset_dir)
        check_dataset_fits_env(dataset, env, args.dataset_path or args.dataset_id or args.env_id)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    if args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, f"videos/{run_name}", lambda i: i % args.eval_episodes == 0)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    offline_buffer = ReplayBuffer(len(dataset["rewards"]), obs_dim, action_dim, device)
    offline_buffer.add(label_transitions(dataset, args))
    online_buffer = ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)

    agent = Agent(obs_dim, action_dim, args).to(device)
    optimizer = agent.make_optimizer(args)
    progress, resumed = Progress(), os.path.exists(f"{run_dir}/checkpoint.pt")
    if resumed:  # continue where the run stopped, as if it never had
        checkpoint = load_agent(f"{run_dir}/checkpoint.pt", agent, optimizer)
        progress = Progress(**checkpoint["progress"])
        online_buffer.load_state_dict(checkpoint["online_buffer"])
        restore_random_states(checkpoint["random_states"], env)
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
    start_time, start_step = time.time(), progress.global_step

    def run_evaluation() -> dict:
        """Evaluate and log at the current gradient step; online evaluations also update the regret."""
        result = evaluate(eval_env, deterministic(agent.actor.act, device), args.eval_episodes, args.seed + 1_000_000, task.ref_min_score, task.ref_max_score)
        result["env_steps"] = progress.env_steps
        if progress.phase == "online":
            result["regret"] = running_regret(progress.eval_regrets, result["normalized_score"])
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, progress.global_step)
        return result

    def save_progress():
        """The whole run state, written after everything up to this gradient step is logged."""
        writer.flush()
        atomic_save({"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "args": asdict(args), "progress": asdict(progress),
                     "online_buffer": online_buffer.state_dict(), "random_states": random_states(env)}, f"{run_dir}/checkpoint.pt")

    def exit_if_stopped():
        if stopped_by:
            save_progress()
            print(f"stopped by {stopped_by[0]} at gradient step {progress.global_step}: state saved to {run_dir}/checkpoint.pt; run the same command again to resume", file=sys.stderr)
            raise SystemExit(75)  # EX_TEMPFAIL: try again

    def save_agent(name: str):
        if args.save_model:
            atomic_save({"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "global_step": progress.global_step, "args": asdict(args)}, f"{run_dir}/{name}")

    # ---------------- offline pre-training ----------------
    if progress.phase == "offline":
        if args.pretrained_checkpoint:
            saved = load_agent(args.pretrained_checkpoint, agent, optimizer)
            progress.global_step = saved["progress"]["global_step"] if "progress" in saved else saved["global_step"]  # checkpoint.pt: in its progress
            print(f"fine-tuning {args.pretrained_checkpoint} (pre-trained for {progress.global_step} gradient steps)")
        else:
            train_step = make_train_step(agent, optimizer, args, offline_buffer)
            with tqdm(initial=progress.global_step, total=args.offline_steps, desc="offline", unit="step", mininterval=2) as bar:
                if not resumed:
                    bar.set_postfix(success=run_evaluation()["success_rate"])
                while progress.global_step < args.offline_steps and not stopped_by:
                    metrics, progress.global_step = train_step(), progress.global_step + 1
                    if progress.global_step % args.log_every == 0:
                        log_metrics(writer, metrics, progress.global_step, (progress.global_step - start_step) / (time.time() - start_time))
                    if progress.global_step % args.offline_eval_every == 0 or progress.global_step == args.offline_steps:
                        bar.set_postfix(success=run_evaluation()["success_rate"])
                    if crossed(progress.global_step - 1, progress.global_step, args.checkpoint_every):
                        save_progress()
                    bar.update()
            exit_if_stopped()
            save_agent("pretrained.pt")
        progress.phase = "online"

    # ---------------- online fine-tuning: collect, label, update, evaluate ----------------
    train_step = make_train_step(agent, optimizer, args, offline_buffer, online_buffer)
    with tqdm(initial=progress.env_steps, total=args.online_env_steps, desc="online", unit="env step", mininterval=2) as bar:
        while progress.env_steps < args.online_env_steps and not stopped_by:
            episode, stats = collect_episode(env, agent.actor, device)
            online_buffer.add(label_transitions(episode, args))  # labelled with its own MC returns once it has ended
            steps_before, env_steps_before = progress.global_step, progress.env_steps
            progress.env_steps += stats["length"]
            # the updates this episode's steps add to round(env_steps * utd): a fractional UTD's remainder is carried over
            for _ in range(round(progress.env_steps * args.utd_ratio) - round(env_steps_before * args.utd_ratio)):
                metrics, progress.global_step = train_step(), progress.global_step + 1
                if progress.global_step % args.log_every == 0:
                    log_metrics(writer, metrics, progress.global_step, (progress.global_step - start_step) / (time.time() - start_time))
            for name, value in stats.items():  # logged after the episode's updates, so a checkpoint covers them
                writer.add_scalar(f"charts/episodic_{name}", value, progress.global_step)
            writer.add_scalar("charts/train_regret", running_regret(progress.train_regrets, stats["success"]), progress.global_step)
            writer.add_scalar("charts/env_steps", progress.env_steps, progress.global_step)
            if crossed(env_steps_before, progress.env_steps, args.online_eval_every) or progress.env_steps >= args.online_env_steps:
                result = run_evaluation()
                bar.set_postfix(success=result["success_rate"], regret=round(result["regret"], 3))
            if crossed(steps_before, progress.global_step, args.checkpoint_every):
                save_progress()
            bar.update(stats["length"])
    exit_if_stopped()

    save_agent("final.pt")
    with open(f"{run_dir}/finished.json", "w") as f:  # marks the run done for a re-launch (and benchmarks/grid.py)
        json.dump({"global_step": progress.global_step, "env_steps": progress.env_steps, "wall_time_s": round(time.time() - start_time, 1)}, f)
    if os.path.exists(f"{run_dir}/checkpoint.pt"):
        os.remove(f"{run_dir}/checkpoint.pt")  # it holds the online buffer: up to hundreds of MB per run
    env.close()
    eval_env.close()
    writer.close()
