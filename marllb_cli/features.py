"""Per-server features an LB can see in its own packets, and their reduction to the agents' observation.

Used by BOTH the packet dataplane and the simulator, so an agent sees the same numbers in either world.

Reservoir (CIKM'22 Algorithm 2): a fixed number of (timestamp, value) slots. Each observed sample is kept
with probability `keep_probability` and, once the slots are full, overwrites a uniformly random slot, so
the buffer holds an exponentially thinning history that favours recent samples. While the reservoir is
filling, samples take the next free slot.

Reduction (`summarize`), over the *filled* slots only (the papers' artefact averaged its empty (0, 0)
slots in; we do not):

    mean, p90, std                 of the values τ_k
    decayed mean                   (1/k) Σ_k γ^(t − t_k) τ_k      CIKM'22 §3.3, γ = 0.9 per second
    decayed p90                    90th percentile of γ^(t − t_k) τ_k

The decayed forms follow the paper's definition: a stale sample fades towards zero instead of keeping its
full weight, so a server the LB has not heard from for a while looks less loaded, not frozen in time.

Observation (`observe`), per server j, in this order (`FEATURE_NAMES`): on-going flows q_j, then the five
statistics of the flow-duration reservoir. Shape `[n_servers, 6]`, float32.

NeurIPS'22's observation (`observe_neurips`, `NEURIPS_FEATURE_NAMES`) appends the five statistics of server
j's completion times (SYN → FIN or RST) and the five of the LB's inter-arrival times between new flows (the
same in every server's row: the load the LB sees as a whole). Shape `[n_servers, 16]`. Every column past the
first is a time in seconds, so one normalisation serves both.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Reservoir",
    "Summary",
    "summarize",
    "observe",
    "observe_many",
    "FEATURE_NAMES",
    "NEURIPS_FEATURE_NAMES",
    "N_NEURIPS_FEATURES",
    "observe_neurips",
    "RESERVOIR_SLOTS",
    "DECAY_PER_SECOND",
]

RESERVOIR_SLOTS = 128
DECAY_PER_SECOND = 0.9
FEATURE_NAMES = ("flows", "fd_mean", "fd_p90", "fd_std", "fd_decayed_mean", "fd_decayed_p90")
N_FEATURES = len(FEATURE_NAMES)
_STATS = ("mean", "p90", "std", "decayed_mean", "decayed_p90")
NEURIPS_FEATURE_NAMES = (*FEATURE_NAMES, *(f"tct_{s}" for s in _STATS), *(f"ia_{s}" for s in _STATS))
N_NEURIPS_FEATURES = len(NEURIPS_FEATURE_NAMES)


@dataclass
class Reservoir:
    """Random-replacement sample buffer of `slots` (timestamp s, value) pairs."""

    slots: int = RESERVOIR_SLOTS
    keep_probability: float = 1.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.slots < 1 or not 0.0 < self.keep_probability <= 1.0:
            raise ValueError("a reservoir needs at least one slot and 0 < keep_probability <= 1")
        self.times = np.zeros(self.slots, dtype=np.float64)
        self.values = np.zeros(self.slots, dtype=np.float64)
        self.filled = 0
        self.seen = 0

    def add(self, t: float, value: float) -> None:
        """Offer one sample observed at time `t` (seconds)."""
        self.seen += 1
        if self.keep_probability < 1.0 and self.rng.random() >= self.keep_probability:
            return
        if self.filled < self.slots:
            slot = self.filled
            self.filled += 1
        else:
            slot = int(self.rng.random() * self.slots)  # randrange costs 3× more on the per-packet path
        self.times[slot] = t
        self.values[slot] = value

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(timestamps, values) of the filled slots."""
        return self.times[: self.filled], self.values[: self.filled]

    def clear(self) -> None:
        self.filled = 0
        self.seen = 0


@dataclass(frozen=True)
class Summary:
    """The five statistics of one reservoir at one instant (all zero when it holds no sample)."""

    mean: float = 0.0
    p90: float = 0.0
    std: float = 0.0
    decayed_mean: float = 0.0
    decayed_p90: float = 0.0
    count: int = 0

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return (self.mean, self.p90, self.std, self.decayed_mean, self.decayed_p90)


def summarize(times: np.ndarray, values: np.ndarray, now: float, *, decay: float = DECAY_PER_SECOND) -> Summary:
    """Reduce filled reservoir slots to mean, p90, std and their time-decayed forms at time `now`."""
    if len(values) == 0:
        return Summary()
    mean, p90, std, decayed_mean, decayed_p90 = _summarize_rows(times[None, :], values[None, :], now, decay)[0]
    return Summary(
        mean=float(mean),
        p90=float(p90),
        std=float(std),
        decayed_mean=float(decayed_mean),
        decayed_p90=float(decayed_p90),
        count=len(values),
    )


def observe(flows: Sequence[float], durations: Sequence[tuple[np.ndarray, np.ndarray]], now: float) -> np.ndarray:
    """The observation of one LB: per server, on-going flows and the flow-duration statistics. [n, 6].

    `durations[j]` is the (timestamps, values) of server j's filled flow-duration slots, as
    `Reservoir.samples()` returns them or as the dataplane publishes them in shared memory.
    """
    if len(flows) != len(durations):
        raise ValueError(f"{len(flows)} flow counters but {len(durations)} reservoirs")
    out = np.zeros((len(flows), N_FEATURES), dtype=np.float32)
    out[:, 0] = flows
    by_size: dict[int, list[int]] = {}
    for j, (_, values) in enumerate(durations):
        by_size.setdefault(len(values), []).append(j)
    for size, rows in by_size.items():  # one vectorised reduction per fill level (usually one: all full)
        if size:
            times = np.stack([durations[j][0] for j in rows])
            out[rows, 1:] = _summarize_rows(times, np.stack([durations[j][1] for j in rows]), now)
    return out


Samples = tuple[np.ndarray, np.ndarray]


def observe_neurips(
    flows: Sequence[float],
    durations: Sequence[Samples],
    completions: Sequence[Samples],
    interarrivals: Sequence[Samples],
    now: float,
) -> np.ndarray:
    """NeurIPS'22's observation of one or more LBs: `observe`'s six columns, then the five statistics of each
    server's completion times and of its LB's inter-arrival times. `interarrivals` holds one reservoir per LB;
    the rows are the LBs' servers in order (len(flows) = LBs × servers). [rows, 16]."""
    rows, lbs = len(flows), len(interarrivals)
    if rows % max(lbs, 1) or len(completions) != rows:
        raise ValueError(f"{rows} flow counters, {len(completions)} completion and {lbs} inter-arrival reservoirs")
    out = np.zeros((rows, N_NEURIPS_FEATURES), dtype=np.float32)
    out[:, :N_FEATURES] = observe(flows, durations, now)
    out[:, N_FEATURES : N_FEATURES + 5] = observe(np.zeros(rows), completions, now)[:, 1:]
    per_lb = observe(np.zeros(lbs), interarrivals, now)[:, 1:]
    out[:, N_FEATURES + 5 :] = np.repeat(per_lb, rows // max(lbs, 1), axis=0)
    return out


def observe_many(flows: np.ndarray, times: np.ndarray, values: np.ndarray, now: np.ndarray) -> np.ndarray:
    """`observe` of B observations whose reservoirs all hold k samples, in one reduction: flows [B, n],
    times and values [B, n, k], now [B] → [B, n, 6]. The simulator logs its heuristics' steps this way."""
    b, n, k = values.shape
    out = np.zeros((b, n, N_FEATURES), dtype=np.float32)
    out[:, :, 0] = flows
    at = np.repeat(np.asarray(now, dtype=np.float64), n)[:, None]
    out[:, :, 1:] = _summarize_rows(times.reshape(b * n, k), values.reshape(b * n, k), at).reshape(b, n, 5)
    return out


def _summarize_rows(
    times: np.ndarray, values: np.ndarray, now: float | np.ndarray, decay: float = DECAY_PER_SECOND
) -> np.ndarray:
    """`summarize` of every row of equally filled reservoirs at once: [rows, 5] (`now`: one time, or a
    column of one per row).

    Runs at every agent step of every LB (4 per second on the testbed, and the simulator's hot spot
    between its compiled events), so the raw and decayed values share one mean and one partial sort,
    and it avoids `np.percentile`, `np.power` and `np.std`, each several times slower than what they
    compute here."""
    k, n = values.shape
    both = np.empty((2 * k, n))
    both[:k] = values
    np.multiply(values, np.exp(np.log(decay) * np.maximum(now - times, 0.0)), out=both[k:])
    means = both.mean(axis=1)
    p90 = _p90(both)
    centred = values - means[:k, None]
    out = np.empty((k, 5))
    out[:, 0] = means[:k]
    out[:, 1] = p90[:k]
    out[:, 2] = np.sqrt(np.einsum("ij,ij->i", centred, centred) / n)  # population std, as np.std
    out[:, 3] = means[k:]
    out[:, 4] = p90[k:]
    return out


def _p90(rows: np.ndarray) -> np.ndarray:
    """The 90th percentile of each row, interpolated linearly between order statistics as `np.percentile`
    does by default, from one partial sort: the upper statistic is put in place, and the lower one is the
    largest value before it (partitioning at both at once costs three times more)."""
    n = rows.shape[1]
    position = 0.9 * (n - 1)
    below = int(position)
    above = min(below + 1, n - 1)
    fraction = position - below
    ordered = np.partition(rows, above, axis=1)
    high = ordered[:, above]
    low = ordered[:, :above].max(axis=1) if above > below else high
    return low + (high - low) * fraction
