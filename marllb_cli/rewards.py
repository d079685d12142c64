"""Rewards over per-server load signals (by default each server's decayed mean flow duration l_j).

Both papers score a set of servers by how evenly and how lightly they are loaded; these are the
candidates an agent step logs and a learner may optimise. Larger is better for every one of them.

    jain   (Σ l)² / (n Σ l²)          Jain's fairness index, in [1/n, 1]; 1 when all l_j are equal
    vbf    −Var(l)                    variance-based fairness (NeurIPS'22)
    ms     −max(l)                    makespan
"""

from __future__ import annotations

import numpy as np

__all__ = ["jain", "vbf", "ms", "REWARDS", "all_rewards"]


def jain(load: np.ndarray) -> float:
    total_sq = float(np.square(load).sum())
    if total_sq == 0.0:
        return 1.0  # nothing measured anywhere: perfectly even
    return float(load.sum()) ** 2 / (len(load) * total_sq)


def vbf(load: np.ndarray) -> float:
    return -float(np.var(load))


def ms(load: np.ndarray) -> float:
    return -float(np.max(load)) if len(load) else 0.0


REWARDS = {"jain": jain, "vbf": vbf, "ms": ms}


def all_rewards(load: np.ndarray) -> dict[str, float]:
    """Every reward of `load`, by name (what an agent step logs)."""
    return {name: fn(np.asarray(load, dtype=np.float64)) for name, fn in REWARDS.items()}
