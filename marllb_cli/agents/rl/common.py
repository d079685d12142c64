"""What the learning agents share: the recurrent network, observation normalisation, the greedy policy
that runs a trained network on an LB, and RNG state in a form a weights_only checkpoint can hold.

Observation normalisation: a fixed log scale, log1p(x / scale) with scale 1 for on-going flows and 10 ms for
the five flow-duration statistics (the papers' artefact fed raw seconds and counts).

Reward normalisation (hyperparameter `reward_norm`): rewards are standardised with the mean and standard
deviation of every reward the learner has stored so far (`RewardScale`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GreedyPolicy", "Recurrent", "RewardScale", "generator", "generator_state", "normalise", "plain"]

DURATION_SCALE_S = 0.01


def normalise(obs: np.ndarray) -> np.ndarray:
    """[servers, 6] features → the network's scale (see the module docstring)."""
    scaled = np.array(obs, dtype=np.float32)
    scaled[:, 1:] /= DURATION_SCALE_S
    return np.log1p(np.maximum(scaled, 0.0))


class Recurrent(nn.Module):
    """FC → FC → GRU → FC → FC (ReLU), `heads` × `levels` outputs. Used for the actor and each critic."""

    def __init__(self, n_in: int, hidden: int, heads: int, levels: int) -> None:
        super().__init__()
        self.heads, self.levels = heads, levels
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.fc3, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, heads * levels)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, time, n_in] → ([batch, time, heads, levels], final hidden state)."""
        z = F.relu(self.fc2(F.relu(self.fc1(x))))
        z, h = self.gru(z, h)
        y = self.out(F.relu(self.fc3(z)))
        return y.view(*y.shape[:-1], self.heads, self.levels), h


class GreedyPolicy:
    """A trained network acting for one LB: input = normalised observation, previous action (one-hot per
    head) and `extra` (QMIX's agent id, empty for SAC); output = the most useful level per server, times
    `scale` (each server's capacity for a policy trained with `residual`, else 1)."""

    def __init__(
        self,
        net: Recurrent,
        levels: tuple[float, ...],
        extra: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        self.net, self.levels = net, np.asarray(levels, dtype=np.float64)
        self.extra = extra if extra is not None else np.zeros(0, dtype=np.float32)
        self.scale = scale if scale is not None else np.ones(net.heads)
        self.reset()

    def weights(self) -> np.ndarray:
        """The weights of the current (previous) action."""
        return self.scale * self.levels[self.prev_action]

    def reset(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.prev_action = np.full(self.net.heads, self.net.levels // 2, dtype=np.int64)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        one_hot = np.eye(self.net.levels, dtype=np.float32)[self.prev_action].reshape(-1)
        x = np.concatenate([normalise(obs).reshape(-1), one_hot, self.extra]).astype(np.float32)
        out, self.hidden = self.net(torch.from_numpy(x).view(1, 1, -1), self.hidden)
        self.prev_action = out[0, 0].argmax(-1).numpy()
        return self.weights()


class RewardScale:
    """Standardises a learner's rewards: (r − mean) / std over all rewards stored so far (Welford's
    running moments). Disabled, or before two rewards, it returns them unchanged.

    Why: the rewards differ by orders of magnitude, and neither scale suits a critic. VBF is a variance of
    flow durations in s²: about −1.4e-4 per step on sim-moderate-io50, and a better or worse split moves it
    by 1e-5. A critic whose outputs start at O(0.1) never resolves that, and SAC's entropy term then
    decides the policy alone. VBF+log sits near +9 with steps varying by ±1. Its Q values are near
    9 / (1 − γ) = 900, and the differences between actions are a thousandth of that.

    Neither shift nor scale changes which policy is optimal. Episodes are truncated and bootstrapped,
    never terminated, so a constant added to every reward adds the same c / (1 − γ) to every action's
    value. A positive factor scales them all. The moments are checkpointed, so `--resume` continues with
    the same standardisation."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def observe(self, rewards: np.ndarray) -> None:
        """Merge one episode's rewards into the running moments (Chan et al.'s parallel update)."""
        values = np.asarray(rewards, dtype=np.float64).ravel()
        if values.size == 0:
            return
        n, mean = values.size, float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / self.count) ** 0.5 if self.count else 0.0
        if not self.enabled or self.count < 2 or std == 0:
            return rewards
        return (rewards - self.mean) / std

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load(self, saved: dict | None) -> None:
        """Restore the moments; a checkpoint from before reward normalisation has none."""
        if saved is not None:
            self.count, self.mean, self.m2 = int(saved["count"]), float(saved["mean"]), float(saved["m2"])


def generator_state(rng: np.random.Generator) -> dict:
    """A numpy Generator's state as plain ints (PCG64), for a weights_only checkpoint."""
    bit = rng.bit_generator.state
    return {
        "state": str(bit["state"]["state"]),
        "inc": str(bit["state"]["inc"]),
        "has_uint32": bit["has_uint32"],
        "uinteger": bit["uinteger"],
    }


def generator(saved: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": saved["has_uint32"],
        "uinteger": saved["uinteger"],
    }
    return rng


def plain(hyper: Any) -> dict:
    """A hyperparameter dataclass as plain values (tuples as lists), for a weights_only checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(hyper).items()}
