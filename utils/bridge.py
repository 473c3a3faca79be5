"""The embedded `point-bridge` task, built for CQL's fine-tuning dip (docs/effect.md): a point crosses a narrow bridge
within a tight time limit. Its environment, its expert, and the expert's data."""

import gymnasium as gym
import numpy as np

from utils.pointmaze import as_d4rl, episode_rows
from utils.tasks import TASKS

LENGTH, HALF_WIDTH, STEP = 1.0, 0.1, 0.05  # the bridge runs from x = 0 to LENGTH, |y| <= HALF_WIDTH; a move is STEP * action
START_SPREAD = 0.02  # the start: x = 0, y uniform in [-START_SPREAD, START_SPREAD]
TIME_LIMIT = TASKS["point-bridge"].max_episode_steps  # 48: 1.2x the expert's slowest crossing (39-42 steps)
EXPERT_SPEED, EXPERT_NOISE = 0.5, 0.03  # actions inside (-1, 1), and a third of a learned policy's spread or less


class PointBridge(gym.Env):
    """A point at (x, y), observed as such, moved by STEP * action per step (actions in [-1, 1]^2; a wall at x = -0.1).
    Reaching x >= LENGTH on the bridge is success: reward 1, and the episode ends. A step that leaves the bridge
    (|y| > HALF_WIDTH) is a fall: the point stays where it fell, reward 0 until the time limit, so the episode fails."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.fallen = np.array([0.0, self.np_random.uniform(-START_SPREAD, START_SPREAD)]), False
        return self.pos.astype(np.float32), {}

    def step(self, action):
        if not self.fallen:
            self.pos = self.pos + STEP * np.clip(np.asarray(action, np.float64), -1.0, 1.0)
            self.pos[0] = max(self.pos[0], -0.1)
            self.fallen = abs(self.pos[1]) > HALF_WIDTH
        success = bool(not self.fallen and self.pos[0] >= LENGTH)
        return self.pos.astype(np.float32), float(success), success, False, {"success": success, "fallen": self.fallen}

    def render(self) -> np.ndarray:
        """Top view, 100 pixels per unit: water blue, the bridge grey, the far end green, the point red."""
        xs, ys = np.linspace(-0.2, LENGTH + 0.2, 140), np.linspace(0.3, -0.3, 60)[:, None]
        image = np.empty((len(ys), len(xs), 3), np.uint8)
        image[:] = (40, 90, 170)
        image[(np.abs(ys) <= HALF_WIDTH) & (xs >= -0.1)] = (150, 150, 150)
        image[(np.abs(ys) <= HALF_WIDTH) & (xs >= LENGTH)] = (80, 170, 80)
        image[(np.abs(ys - self.pos[1]) <= 0.02) & (np.abs(xs - self.pos[0]) <= 0.02)] = (220, 40, 40)
        return image


def expert_action(obs: np.ndarray, rng: np.random.Generator, scale: float = 1.0, noise_std: float = EXPERT_NOISE) -> np.ndarray:
    """Forward at EXPERT_SPEED, steering back to the centre line (a P controller, its force inside +-0.5), times
    `scale`, plus Gaussian noise."""
    action = np.array([EXPERT_SPEED, np.clip(-10.0 * obs[1], -0.5, 0.5)])
    return np.clip(scale * action + rng.normal(0.0, noise_std, 2), -1.0, 1.0).astype(np.float32)


def expert_episode(env: gym.Env, seed: int, rng: np.random.Generator, **expert) -> list[tuple]:
    """One episode of the expert (keyword arguments: `expert_action`'s); returns its rows (see `as_d4rl`)."""
    return episode_rows(env, seed, lambda obs: expert_action(obs, rng, **expert))


def collect_bridge_dataset(episodes: int = 200, seed: int = 0, time_limit: int = 100) -> dict:
    """point-bridge's data (under a second): `episodes` expert episodes under a loose time limit; every one crosses,
    in 39-42 steps (the task allows TIME_LIMIT)."""
    env = gym.wrappers.TimeLimit(PointBridge(), time_limit)
    rng = np.random.default_rng(seed)
    rows = [row for episode in range(episodes) for row in expert_episode(env, seed * 100_000 + episode, rng)]
    return as_d4rl(rows)
