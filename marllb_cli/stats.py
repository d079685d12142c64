"""Bootstrap confidence intervals (95 %) for `marllb report`: of a group's mean, p90 and p99 JCT, and of
their ratios to the baseline's.

What is resampled, and why:
- Several runs (seeds) of a group: the runs, with replacement, each drawn run with all its requests. The runs
  are the independent units (a seed draws the traffic and, for a learner, its training); resampling requests
  would pretend that 3 runs of 10 000 requests are 30 000 independent draws, and give intervals far too
  narrow when runs differ. With few runs a percentile interval is too narrow (it ignores that the spread
  itself is estimated from n runs), so it is expanded as Hesterberg recommends ("What teachers should know
  about the bootstrap", 2015): each replicate's distance from the estimate is stretched by
  √(n/(n−1)) · t(n−1) / z, which for the mean is the t interval of the run means.
- One run: its requests are not independent (a burst queues many at once), so they are resampled in blocks
  of consecutive requests (circular blocks of ⌈`BLOCK_FACTOR` · n^(1/3)⌉), which keeps the correlation
  within a block.
- A ratio to the baseline: taken per replicate of the drawn (unexpanded) figures, then expanded on a log
  scale (a ratio is multiplicative: stretched linearly, a wide interval reached below 0). When the group
  ran the same draws as the baseline (the same seeds, and on a testbed the same trace window: the
  simulator's common random numbers give every method the same requests and events for a seed), `marllb
  report` has both resample the same runs in each replicate (paired: the same bootstrap seed, runs in the
  same order), so the interval measures the difference between the methods, not between seeds; a scenario
  whose seeds differ widely (a capacity drift) otherwise gets intervals that span an order of magnitude.
  Else both are resampled independently.
A replicate is a weight per request (how often it was drawn), so the mean is a dot product and a quantile a
search in the sorted JCTs: 500 replicates of a 100 000-request run take 0.8 s, of 5 such runs 1 s. Seeded: a
report is reproducible.
`tests/unit/test_stats.py` measures the intervals' coverage on synthetic runs from known distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "BOOTSTRAP_REPLICATES",
    "STATISTICS",
    "Bootstrap",
    "bootstrap",
    "interquartile_mean",
]

#: Replicates per group: the interval's ends move by about 5 % of its width from one seed to another.
BOOTSTRAP_REPLICATES = 500
#: Blocks are this many times n^(1/3) requests long (n^(1/3) is the rate-optimal order for a variance).
BLOCK_FACTOR = 2.0
STATISTICS = ("jct_mean_s", "jct_p90_s", "jct_p99_s")
Z975 = 1.959964
#: Student's t, 97.5 % quantile, by degrees of freedom 1–30 (beyond: the normal's, within 4 %).
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


class Bootstrap:
    """One group's bootstrap: the point estimates and the (expanded) replicates of each statistic."""

    def __init__(self, estimates: dict[str, float], raw: dict[str, np.ndarray], stretch: float = 1.0) -> None:
        self.estimates = estimates
        self.raw = raw  # the replicates as drawn
        self.stretch = stretch  # Hesterberg's expansion for few runs (1: none)

    @property
    def replicates(self) -> dict[str, np.ndarray]:
        """The replicates, each one's distance from the estimate stretched by the expansion."""
        return {
            name: self.estimates[name] + self.stretch * (raw - self.estimates[name]) for name, raw in self.raw.items()
        }

    def interval(self, statistic: str) -> tuple[float, float] | None:
        """The 95 % percentile interval of `statistic` (None without replicates)."""
        return _percentiles(self.replicates[statistic])

    def ratio_interval(self, statistic: str, baseline: Bootstrap) -> tuple[float, float] | None:
        """The 95 % interval of this group's statistic over the baseline's. The ratio of the drawn replicates
        is expanded on a log scale (a ratio is multiplicative; stretched linearly, a wide one went below 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = self.raw[statistic] / baseline.raw[statistic]
            estimate = self.estimates[statistic] / baseline.estimates[statistic]
            stretch = max(self.stretch, baseline.stretch)
            return _percentiles(np.exp(np.log(estimate) + stretch * (np.log(ratios) - np.log(estimate))))


def bootstrap(
    runs: Sequence[np.ndarray],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
    strata: Sequence[object] | None = None,
) -> Bootstrap:
    """The bootstrap of a group: `runs` holds each run's completed requests' JCTs in time order. `strata`:
    each run's training seed, for a learner trained several times; a replicate then draws the trainings
    with replacement and, within each drawn one, its runs (a two-level bootstrap): the spread between
    trainings counts once per training, not once per run, and the interval is widened for few trainings.

    A replicate is a weight per request: how often its run was drawn (several runs), or how often a block
    covering it was (one run)."""
    kept = [i for i, run in enumerate(runs) if len(run)]
    if not kept or replicates <= 0:
        return Bootstrap({s: math.nan for s in STATISTICS}, {s: np.full(0, np.nan) for s in STATISTICS})
    samples = [np.asarray(runs[i], dtype=np.float64) for i in kept]
    values = np.concatenate(samples)
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    lengths = np.array([len(run) for run in samples])
    rng = np.random.default_rng(seed)
    labels = [strata[i] for i in kept] if strata is not None else []
    groups = [np.flatnonzero([label == g for label in labels]) for g in dict.fromkeys(labels)]
    draw_counts: Callable[[], np.ndarray] | None
    if len(groups) > 1:  # two levels: the groups, then each drawn group's runs

        def draw_counts() -> np.ndarray:
            counts = np.zeros(len(samples))
            for g in rng.integers(len(groups), size=len(groups)):
                inside = groups[g]
                np.add.at(counts, inside[rng.integers(len(inside), size=len(inside))], 1)
            return counts

        resampled = len(groups)
    elif len(samples) > 1:

        def draw_counts() -> np.ndarray:
            return np.bincount(rng.integers(len(samples), size=len(samples)), minlength=len(samples))

        resampled = len(samples)
    else:
        draw_counts, resampled = None, 1
    out = np.empty((replicates, len(STATISTICS)))
    drawn: dict[bytes, np.ndarray] = {}  # a few runs have few distinct draws (5 runs: 126)
    for replicate in range(replicates):
        if draw_counts is None:
            out[replicate] = _figures(values, ranked, _block_weights(len(values), rng)[order])
            continue
        counts = draw_counts()
        key = counts.tobytes()
        if key not in drawn:
            drawn[key] = _figures(values, ranked, np.repeat(counts, lengths)[order])
        out[replicate] = drawn[key]
    estimates = _figures(values, ranked, np.ones(len(values)))
    return Bootstrap(
        dict(zip(STATISTICS, map(float, estimates), strict=True)),
        {name: out[:, i] for i, name in enumerate(STATISTICS)},
        _expansion(resampled),
    )


def interquartile_mean(values: Sequence[float]) -> float:
    """The mean of the middle half of `values` (rliable's IQM: robust to a few runs far off, yet steadier
    than the median), each value weighted by how much of it falls in the 25–75 % band."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    low, high = 0.25 * n, 0.75 * n
    weights = np.clip(np.minimum(np.arange(1, n + 1), high) - np.maximum(np.arange(n), low), 0.0, 1.0)
    return float(np.dot(ordered, weights) / weights.sum())


def _figures(values: np.ndarray, ranked: np.ndarray, ranked_weights: np.ndarray) -> np.ndarray:
    """Mean, p90 and p99 of `values` where each request counts `weight` times (weights given in sorted order)."""
    cumulative = np.cumsum(ranked_weights)
    total = cumulative[-1]
    mean = float(np.dot(ranked, ranked_weights) / total)
    at = np.minimum(np.searchsorted(cumulative, [0.9 * total, 0.99 * total], side="left"), len(ranked) - 1)
    return np.array([mean, *ranked[at]])


def _block_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n requests is drawn by a circular block bootstrap: ⌈n / L⌉ blocks of L consecutive
    requests from random starts (a request is covered by every block starting in the L places before it)."""
    length = max(1, min(n, math.ceil(BLOCK_FACTOR * n ** (1 / 3))))
    starts = np.bincount(rng.integers(n, size=math.ceil(n / length)), minlength=n)
    circular = np.concatenate([starts[n - length + 1 :], starts]) if length > 1 else starts
    covered = np.cumsum(np.concatenate([[0], circular]))
    return (covered[length:] - covered[:-length]).astype(np.float64)


def _expansion(runs: int) -> float:
    """Hesterberg's stretch of a run-level bootstrap of `runs` runs (1 for a block bootstrap of one run)."""
    if runs < 2:
        return 1.0
    t = T975[runs - 2] if runs - 1 <= len(T975) else Z975
    return math.sqrt(runs / (runs - 1)) * t / Z975


def _percentiles(values: np.ndarray) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)
