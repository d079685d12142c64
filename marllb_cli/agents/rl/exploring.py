"""Policies that explore, for episodes on the live testbed (`marllb train --env testbed`).

    ExploringPolicy   one LB's SAC actor (isac, ssac, distr): each server's level sampled from the actor's
                      softmax, or uniformly at random in the warm-up episodes, as `SacLearner.act` does
    JointActor        the coordinator's: QMIX's shared agent network, ε-greedy per LB and server (as
                      `QmixLearner.act`), or Centr-LB's one SAC actor over every LB's observation

Both read the policy.pt that the controller wrote before the episode (`training.save_training`), keep the GRU state
and the previous action between steps exactly as the learners do, and expose the level indices they chose,
which the step log records so that the controller can rebuild every transition after the episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from marllb_cli.agents.rl.common import GreedyPolicy, Recurrent, encode, input_size, load_file, observation_width

__all__ = ["ExploringPolicy", "JointActor"]


def _net(saved: dict, heads: int, extra: int, index: int) -> tuple[Recurrent, tuple[float, ...]]:
    hyper = saved["hyper"]
    levels = tuple(float(v) for v in hyper["levels"])
    net = Recurrent(
        input_size(heads, len(levels), extra, observation_width(hyper)),
        int(hyper["hidden"]),
        heads,
        len(levels),
        gru=hyper.get("gru", True),
    )
    actors = saved["actors"]
    net.load_state_dict(actors[index % len(actors)])
    return net, levels


def _sample(logits: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """One level per head from softmax(logits) [heads, L] (inverse-CDF draws, one uniform per head)."""
    probs = torch.softmax(logits, -1).numpy().astype(np.float64)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((draws > cdf).sum(-1), probs.shape[-1] - 1).astype(np.int64)


class ExploringPolicy(GreedyPolicy):
    """One LB's exploring SAC actor with the `Agent` interface: `GreedyPolicy`, with each level drawn instead
    of chosen; `prev_action` holds the last level indices."""

    method = "sed"

    def __init__(self, policy: Path, lb_index: int, cpus: Sequence[float], *, uniform: bool, seed: int) -> None:
        saved = load_file(policy, "policy")
        torch.set_num_threads(1)
        net, levels = _net(saved, len(cpus), 0, lb_index)
        scale = np.asarray(cpus, dtype=np.float64) if saved["hyper"].get("residual") else None
        super().__init__(net, levels, scale=scale)
        self.uniform, self.rng = uniform, np.random.default_rng(seed)
        # The runner observes what the actor reads: NeurIPS'22's 16 features per server, or CIKM'22's 6.
        self.neurips_observation = bool(saved["hyper"].get("neurips_obs", False))

    def choose(self, out: torch.Tensor) -> np.ndarray:
        if self.uniform:
            return self.rng.integers(len(self.levels), size=self.net.heads)
        return _sample(out, self.rng)

    def record(self, obs: np.ndarray) -> dict:
        """What the step log adds for a learning agent: the full observation and the levels chosen."""
        return {"obs": np.round(obs, 6).tolist(), "action": self.prev_action.tolist()}


class JointActor:
    """Every LB's action from every LB's observation: QMIX (kind `qmix`) or Centr-LB (kind `centr`)."""

    def __init__(self, policy: Path, n_lbs: int, n_servers: int, *, uniform: bool, epsilon: float, seed: int) -> None:
        saved = load_file(policy, "policy")
        torch.set_num_threads(1)
        self.kind, self.m, self.n = saved.get("kind"), n_lbs, n_servers
        if self.kind == "qmix":
            self.net, self.levels = _net(saved, n_servers, n_lbs, 0)
        elif self.kind == "centr":
            self.net, self.levels = _net(saved, n_lbs * n_servers, 0, 0)
        else:
            raise ValueError(f"{policy}: a {self.kind} policy has no joint actor (qmix or centr)")
        self.uniform, self.epsilon, self.rng = uniform, epsilon, np.random.default_rng(seed)
        self.hidden: torch.Tensor | None = None
        self.actions = np.full((n_lbs, n_servers), len(self.levels) // 2, dtype=np.int64)

    @torch.no_grad()
    def act(self, observations: list[np.ndarray]) -> np.ndarray:
        """[m] observations [n, features] → level indices [m, n] (also kept as the previous actions)."""
        n_levels = len(self.levels)
        if self.kind == "qmix":
            ids = np.eye(self.m, dtype=np.float32)
            x = np.stack([encode(obs, self.actions[i], n_levels, ids[i]) for i, obs in enumerate(observations)])
            utilities, self.hidden = self.net(torch.from_numpy(x).unsqueeze(1), self.hidden)
            actions = utilities[:, 0].argmax(-1).numpy()
            explore = self.rng.random(actions.shape) < (1.0 if self.uniform else self.epsilon)
            actions = np.where(explore, self.rng.integers(n_levels, size=actions.shape), actions)
        else:
            x = encode(np.concatenate(observations), self.actions.reshape(-1), n_levels)
            logits, self.hidden = self.net(torch.from_numpy(x).view(1, 1, -1), self.hidden)
            flat = (
                self.rng.integers(n_levels, size=self.m * self.n) if self.uniform else _sample(logits[0, 0], self.rng)
            )
            actions = flat.reshape(self.m, self.n)
        self.actions = actions.astype(np.int64)
        return self.actions
