"""Rewards over per-server load signals l_j (by default each server's decayed mean flow duration, seconds).

Both papers score a set of servers by how evenly and how lightly they are loaded; these are the
candidates an agent step logs and a learner may optimise. Larger is better for every one of them.

    jain      (Σ l)² / (n Σ l²)          Jain's fairness index, in [1/n, 1]; 1 when all l_j are equal
    jain-log  log jain
    pbf       ∏ l_j / max l              product-based fairness (NeurIPS'22 Def. 5); 0 if any l_j = 0
    pbf-log   Σ log l_j − log max l      log PBF, computed as a sum (∏ of 7 durations of 0.1 s underflows
                                         nothing but is 1e-7: the log keeps it in a usable range); l_j
                                         floored at `EPS`
    vbf       −Var(l)                    variance-based fairness (NeurIPS'22 Def. 2; population variance)
    vbf-log   −Var(l) − log(Var(l) + EPS)
                                         VBF + log: the paper adds "a log term to the VBF-based reward … to
                                         become more sensitive to close-to-0 VBF (∇ log f > ∇ f when f < 1)".
                                         VBF itself is ≤ 0, so the log is taken of the variance: −log(Var + ε)
                                         grows without bound as the variance goes to 0, and its gradient
                                         1/(Var + ε) dominates −Var's exactly where Var < 1. EPS keeps it finite
                                         for identical loads.
    vbf-exp   exp(−Var(l))               bounded to (0, 1]
    ms        −max(l)                    makespan
    ms-exp    exp(−max(l))

Per-LB rewards use the LB's own l; the team form is the mean of the per-LB rewards over LBs (`team`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["EPS", "REWARDS", "all_rewards", "jain", "ms", "pbf", "team", "vbf", "vbf_log"]

#: Floor for logarithms (seconds or seconds², far below any measured flow duration).
EPS = 1e-9


def jain(load: np.ndarray) -> float:
    total_sq = float(np.square(load).sum())
    if total_sq == 0.0:
        return 1.0  # nothing measured anywhere: perfectly even
    return float(load.sum()) ** 2 / (len(load) * total_sq)


def pbf(load: np.ndarray) -> float:
    top = float(np.max(load)) if len(load) else 0.0
    return float(np.prod(load)) / top if top > 0 else 0.0


def pbf_log(load: np.ndarray) -> float:
    floored = np.maximum(load, EPS)
    return float(np.log(floored).sum() - np.log(floored.max())) if len(load) else 0.0


def vbf(load: np.ndarray) -> float:
    return -float(np.var(load))


def vbf_log(load: np.ndarray) -> float:
    variance = float(np.var(load))
    return -variance - float(np.log(variance + EPS))


def ms(load: np.ndarray) -> float:
    return -float(np.max(load)) if len(load) else 0.0


REWARDS: dict[str, Callable[[np.ndarray], float]] = {
    "jain": jain,
    "jain-log": lambda load: float(np.log(jain(load))),
    "pbf": pbf,
    "pbf-log": pbf_log,
    "vbf": vbf,
    "vbf-log": vbf_log,
    "vbf-exp": lambda load: float(np.exp(vbf(load))),
    "ms": ms,
    "ms-exp": lambda load: float(np.exp(ms(load))),
}


def all_rewards(load: np.ndarray) -> dict[str, float]:
    """Every reward of `load`, by name (what an agent step logs)."""
    return {name: fn(np.asarray(load, dtype=np.float64)) for name, fn in REWARDS.items()}


def team(name: str, loads: Sequence[np.ndarray]) -> float:
    """The team form of reward `name`: the mean over LBs of each LB's reward of its own loads."""
    fn = REWARDS[name]
    return float(np.mean([fn(np.asarray(load, dtype=np.float64)) for load in loads]))
