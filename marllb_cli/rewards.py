"""Rewards over per-server load signals l_j (each server's decayed mean flow duration, seconds; for `flows`, its
flows in progress q_j: `scored` picks the column of an LB's observation).

Both papers score a set of servers by how evenly and how lightly they are loaded; these are the
candidates an agent step logs and a learner may optimise. Larger is better for every one of them.

    jain      (Σ l)² / (n Σ l²)          Jain's fairness index, in [1/n, 1]; 1 when all l_j are equal
    jain-log  log jain
    pbf       ∏_j (l_j / max l)          product-based fairness (CIKM'22 Eq. 4, NeurIPS'22 Def. 5), in
                                         [0, 1]; 1 when all l_j are equal (all 0 included), 0 if one is 0.
                                         Scale-free like the paper's: the ratio is inside the product
    pbf-log   Σ log l_j − n log max l    log PBF, computed as a sum (a product of 7 ratios can be tiny: the
                                         log keeps it in a usable range); l_j floored at `EPS`
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
    flows     −Σ q_j                     the flows in progress at the LB's servers (the observation's `flows`
                                         column, not the durations): by Little's law the LB's mean JCT is its
                                         flows in progress over its arrival rate, which no weight changes, so
                                         this is the one reward here that is the JCT itself and not a proxy

Per-LB rewards use the LB's own l; the team form is the mean of the per-LB rewards over LBs (`team`).

Smoothing (CIKM'22 Eq. 18, `smooth`): the reward after step t+1 may score keep · l(t) + (1 − keep) · l(t+1)
instead of l(t+1) (the paper: keep = 1 − 0.9), so one noisy step moves the reward less; the first step of an
episode has no previous loads and scores l(1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from marllb_cli.features import FEATURE_NAMES

__all__ = [
    "EPS",
    "REWARDS",
    "all_rewards",
    "jain",
    "ms",
    "pbf",
    "scored",
    "smooth",
    "smooth_series",
    "team",
    "vbf",
    "vbf_log",
]

Loads = Sequence[float] | np.ndarray

#: Floor for logarithms (seconds or seconds², far below any measured flow duration).
EPS = 1e-9


def _floats(load: Loads) -> list[float]:
    """The loads as Python floats: for the handful of servers of an LB, plain arithmetic is several times
    faster than NumPy's per-call overhead, and every agent step logs every reward."""
    if isinstance(load, list):
        return load
    return np.asarray(load, dtype=np.float64).ravel().tolist()


def _variance(xs: list[float]) -> float:
    """Population variance, two-pass as `np.var`."""
    mean = sum(xs) / len(xs)
    return sum((x - mean) * (x - mean) for x in xs) / len(xs)


def jain(load: Loads) -> float:
    xs = _floats(load)
    total_sq = sum(x * x for x in xs)
    if total_sq == 0.0:
        return 1.0  # nothing measured anywhere: perfectly even
    return sum(xs) ** 2 / (len(xs) * total_sq)


def jain_log(load: Loads) -> float:
    value = jain(load)
    return math.log(value) if value > 0 else -math.inf


def pbf(load: Loads) -> float:
    xs = _floats(load)
    top = max(xs) if xs else 0.0
    return math.prod(x / top for x in xs) if top > 0 else 1.0


def pbf_log(load: Loads) -> float:
    floored = [max(x, EPS) for x in _floats(load)]
    return sum(math.log(x) for x in floored) - len(floored) * math.log(max(floored)) if floored else 0.0


def vbf(load: Loads) -> float:
    return -_variance(_floats(load))


def vbf_log(load: Loads) -> float:
    variance = _variance(_floats(load))
    return -variance - math.log(variance + EPS)


def ms(load: Loads) -> float:
    xs = _floats(load)
    return -max(xs) if xs else 0.0


REWARDS: dict[str, Callable[[Loads], float]] = {
    "jain": jain,
    "jain-log": jain_log,
    "pbf": pbf,
    "pbf-log": pbf_log,
    "vbf": vbf,
    "vbf-log": vbf_log,
    "vbf-exp": lambda load: math.exp(vbf(load)),
    "ms": ms,
    "ms-exp": lambda load: math.exp(ms(load)),
    "flows": lambda flows: -sum(_floats(flows)),
}

#: The observation column (`features.FEATURE_NAMES`) each reward scores: the on-going flows for `flows`, the
#: decayed mean flow duration for every other.
_COLUMN = {name: FEATURE_NAMES.index("flows" if name == "flows" else "fd_decayed_mean") for name in REWARDS}


def scored(name: str, obs: np.ndarray) -> np.ndarray:
    """What reward `name` scores in an observation [..., n servers, features]: one value per server."""
    return np.asarray(obs)[..., _COLUMN[name]].astype(np.float64)


def all_rewards(obs: np.ndarray) -> dict[str, float]:
    """Every reward of an LB's observation [n servers, features], by name (what an agent step logs). Each
    column is read once for all the rewards that score it."""
    obs = np.asarray(obs)
    columns = {column: obs[:, column].astype(np.float64).tolist() for column in set(_COLUMN.values())}
    return {name: fn(columns[_COLUMN[name]]) for name, fn in REWARDS.items()}


def team(name: str, loads: Sequence[np.ndarray]) -> float:
    """The team form of reward `name`: the mean over LBs of each LB's reward of its own loads."""
    fn = REWARDS[name]
    return float(np.mean([fn(np.asarray(load, dtype=np.float64)) for load in loads]))


def smooth(previous: np.ndarray | None, current: np.ndarray, keep: float) -> np.ndarray:
    """The loads a reward scores under CIKM'22 Eq. 18: keep · previous + (1 − keep) · current (`current` alone
    at an episode's first step, or with keep 0)."""
    if previous is None or keep == 0:
        return current
    return keep * previous + (1 - keep) * current


def smooth_series(loads: np.ndarray, keep: float) -> np.ndarray:
    """`smooth` along an episode's loads [T, n], step by step as the environment applies it."""
    return np.stack([smooth(loads[t - 1] if t else None, loads[t], keep) for t in range(len(loads))])
