"""What the learning agents share: the recurrent network, the one encoding of a network's input, the replay
buffer of whole episodes, the greedy policy that runs a trained network on an LB, and RNG state in a form a
weights_only checkpoint can hold.

Input encoding (`encode`, `input_size`): the normalised observation, the previous action one-hot per head,
then `extra` (QMIX's LB id). Training (SAC, QMIX) and serving (`GreedyPolicy`) both call `encode`, so what
a policy is served is what it was trained on.

Observation normalisation: a fixed log scale, log1p(x / scale) with scale 1 for on-going flows and 10 ms for
the five flow-duration statistics (the papers' artefact fed raw seconds and counts).

Reward normalisation (hyperparameter `reward_norm`): rewards are standardised with the mean and standard
deviation of every reward the learner has stored so far (`RewardScale`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marllb_cli.agents.rl.levels import level_weights
from marllb_cli.features import N_FEATURES, N_NEURIPS_FEATURES

__all__ = [
    "EpisodeBuffer",
    "GreedyPolicy",
    "Recurrent",
    "RewardScale",
    "encode",
    "generator",
    "generator_state",
    "input_size",
    "observation_width",
    "load_file",
    "normalise",
    "plain",
]

DURATION_SCALE_S = 0.01


def normalise(obs: np.ndarray) -> np.ndarray:
    """[servers, N_FEATURES] features → the network's scale (see the module docstring)."""
    scaled = np.array(obs, dtype=np.float32)
    scaled[:, 1:] /= DURATION_SCALE_S
    return np.log1p(np.maximum(scaled, 0.0))


def load_file(path: Path, what: str) -> dict[str, Any]:
    """A policy or checkpoint `marllb train` wrote: tensors and plain values only (`weights_only`), a dict;
    anything else is a one-line `ConfigError` (a file holding Python objects is refused, never run)."""
    import pickle
    import warnings

    from marllb_cli.errors import ConfigError

    hint = "use a directory written by `marllb train`, or train again"
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol warning is not the user's business
            warnings.simplefilter("ignore")
            saved = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}", hint=hint) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        reason = "it holds Python objects" if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise ConfigError(f"{path}: not a marllb {what} (refused: {reason})", hint=hint) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a marllb {what} (a {type(saved).__name__}, not a dict)", hint=hint)
    return saved


def observation_width(hyper: Any) -> int:
    """Features per server a learner with these hyperparameters (a dataclass, or a saved policy's dict)
    observes: NeurIPS'22's 16 with `neurips_obs`, else CIKM'22's 6."""
    neurips = hyper.get("neurips_obs", False) if isinstance(hyper, dict) else getattr(hyper, "neurips_obs", False)
    return N_NEURIPS_FEATURES if neurips else N_FEATURES


def input_size(n_servers: int, n_levels: int, extra: int = 0, features: int = N_FEATURES) -> int:
    """The length of `encode`'s output: `features` and a one-hot previous action per server, then `extra`."""
    return n_servers * features + n_servers * n_levels + extra


def encode(obs: np.ndarray, prev_action: np.ndarray, n_levels: int, extra: np.ndarray | None = None) -> np.ndarray:
    """One network input: normalised observation [servers, N_FEATURES], the previous action (one level index
    per head) one-hot, and `extra`; float32 of length `input_size(heads, n_levels, len(extra))`."""
    one_hot = np.eye(n_levels, dtype=np.float32)[prev_action].reshape(-1)
    parts = [normalise(obs).reshape(-1), one_hot]
    if extra is not None:
        parts.append(np.asarray(extra, dtype=np.float32))
    return np.concatenate(parts).astype(np.float32, copy=False)


class EpisodeBuffer:
    """The replay buffer of whole episodes (the GRU trains on sequences from a zero state, as it acts): each
    episode a dict of arrays with time first; the oldest are dropped beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.episodes: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self.episodes)

    def append(self, episode: dict[str, np.ndarray]) -> None:
        self.episodes.append(episode)
        del self.episodes[: -self.capacity]

    def sample(self, rng: np.random.Generator, batch: int) -> dict[str, torch.Tensor]:
        """`batch` episodes drawn with replacement, each array stacked into a [batch, ...] tensor."""
        picks = rng.integers(len(self.episodes), size=batch)
        return {key: torch.from_numpy(np.stack([self.episodes[i][key] for i in picks])) for key in self.episodes[0]}

    def state(self) -> list[dict[str, torch.Tensor]]:
        return [{k: torch.from_numpy(v) for k, v in e.items()} for e in self.episodes]

    def load(self, saved: list[dict[str, torch.Tensor]]) -> None:
        self.episodes = [{k: v.numpy() for k, v in e.items()} for e in saved]


class Recurrent(nn.Module):
    """FC → FC → GRU → FC → FC (ReLU), `heads` × `levels` outputs. Used for the actor and each critic.

    `gru=False` drops the GRU (FC → FC → FC → FC): the network sees only the current observation and previous
    action, the ablation CIKM'22 leaves to future work ("with or without the GRU")."""

    def __init__(self, n_in: int, hidden: int, heads: int, levels: int, *, gru: bool = True) -> None:
        super().__init__()
        self.heads, self.levels = heads, levels
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True) if gru else None
        self.fc3, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, heads * levels)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [batch, time, n_in] → ([batch, time, heads, levels], final hidden state; None without a GRU)."""
        z = F.relu(self.fc2(F.relu(self.fc1(x))))
        if self.gru is not None:
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
        return level_weights(self.levels, self.prev_action, self.scale)

    def reset(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.prev_action = np.full(self.net.heads, self.net.levels // 2, dtype=np.int64)

    def input(self, obs: np.ndarray) -> np.ndarray:
        """The network input for `obs` after the previous action (`encode`)."""
        return encode(obs, self.prev_action, self.net.levels, self.extra)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        x = self.input(obs)
        out, self.hidden = self.net(torch.from_numpy(x).view(1, 1, -1), self.hidden)
        self.prev_action = self.choose(out[0, 0])
        return self.weights()

    def choose(self, out: torch.Tensor) -> np.ndarray:
        """The level per head from the network's output [heads, levels]: the most useful one (an exploring
        policy draws it instead, `exploring.ExploringPolicy`)."""
        return out.argmax(-1).numpy()


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
