"""Policy evaluation, for continuous (deterministic tanh(mean)) and discrete (epsilon-greedy) policies alike."""

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch


def normalized_score(episode_return: float, ref_min: float | None, ref_max: float | None) -> float:
    """D4RL's normalization: 0 for the reference failing policy, 1 for the reference successful one (NaN if unknown)."""
    if ref_min is None or ref_max is None:
        return float("nan")
    return (episode_return - ref_min) / (ref_max - ref_min)


def deterministic(act: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """A continuous policy: `act` (the actor's tanh(mean), no sampling) on one observation."""

    def policy(obs):
        with torch.no_grad():
            return act(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))[0].cpu().numpy()

    return policy


def epsilon_greedy(greedy: Callable[[np.ndarray], int], n_actions: int, epsilon: float, rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    """A discrete policy: a uniformly random action with probability epsilon, else greedy(obs)."""
    return lambda obs: rng.integers(n_actions) if rng.random() < epsilon else greedy(obs)


def evaluate(
    env: gym.Env,
    policy: Callable[[np.ndarray], np.ndarray],
    n_episodes: int,
    seed: int,
    ref_min: float | None = None,
    ref_max: float | None = None,
) -> dict[str, float]:
    """Mean return, episode length, success rate (success at any step, from `info["success"]`) and normalized
    score of `policy` over `n_episodes` episodes. The normalized score is the env's own per-episode score where it
    reports one (`info["normalized_score"]` at the last step: Adroit binary, Kitchen), else the return normalized by
    `ref_min`/`ref_max`. Episode i is reset with `seed + i`, so every evaluation of a run sees the same starts and
    goals and successive evaluations are comparable."""
    returns, lengths, successes, scores = [], [], [], []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        episode_return, length, success, done = 0.0, 0, False, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(obs))
            episode_return, length = episode_return + float(reward), length + 1
            success |= bool(info.get("success", False))
            done = terminated or truncated
        returns.append(episode_return)
        lengths.append(length)
        successes.append(success)
        scores.append(info.get("normalized_score"))
    mean_return = float(np.mean(returns))
    reported = None not in scores
    return {
        "return": mean_return,
        "length": float(np.mean(lengths)),
        "success_rate": float(np.mean(successes)),
        "normalized_score": float(np.mean(scores)) if reported else normalized_score(mean_return, ref_min, ref_max),
    }
