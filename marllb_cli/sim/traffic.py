"""The simulator's requests: arrival times, CPU work and IO time per request, from the `sim.traffic` config.

Common random numbers: arrivals, work and classes each draw from their own generator seeded by
(seed, stream), so every method simulated with the same seed sees exactly the same requests, and
changing the work distribution does not move the arrivals.

Poisson: rate = load × Σ cpus × speed / mean CPU work (`load` is the offered CPU load, IO excluded),
unless `rate` is given. Work distributions all have
mean `mean_s`: exponential; lognormal with σ (μ = ln mean − σ²/2); Pareto with tail index α and scale
mean × (α − 1)/α; deterministic.

Trace: from trace_start_s on, times / trace_speed; a CPU request's work is cpu_overhead_s + its for-loop
iterations × work_scale × iteration_s core-seconds (what the testbed's PHP page costs: `marllb calibrate`
measures both), a static file `static_work_s`, a wiki page `wiki_work_s`.

`io_share` splits each request's service demand d into d × (1 − io_share) of CPU work and d × io_share
seconds of IO, the NeurIPS'22 application mixes (0, 0.25, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marllb_cli.config import Config, WorkDistribution
from marllb_cli.errors import ConfigError
from marllb_cli.traces import read_trace, trace_window

__all__ = ["Traffic", "capacity", "draw_work", "offered_load", "traffic"]


@dataclass(frozen=True)
class Traffic:
    """The requests of one simulation, sorted by arrival."""

    arrival: np.ndarray
    work: np.ndarray  # CPU core-seconds at speed 1
    io: np.ndarray | None  # IO seconds, or None without IO
    classes: np.ndarray  # cpu | static | wiki
    paths: np.ndarray
    rate: float  # mean requests per simulated second

    def __len__(self) -> int:
        return len(self.arrival)


def capacity(config: Config) -> float:
    """Σ cpus × speed over every server (× sim.cores_per_unit when set): core-seconds of work the cluster
    does per second."""
    unit = config.sim.cores_per_unit or 1.0
    return sum(g.count * g.cpus * g.speed * unit for g in config.testbed.servers)


def offered_load(config: Config) -> float:
    """The Poisson generator's offered CPU load: `load`, or what `rate` amounts to when that is set."""
    spec = config.sim.traffic
    if spec.rate is None:
        return spec.load
    return spec.rate * spec.work.mean_s * (1 - spec.io_share) / capacity(config)


#: The most requests one simulation holds in memory (≈ 1 KB each with its records).
MAX_REQUESTS = 20_000_000


def draw_work(dist: WorkDistribution, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` work sizes with mean `dist.mean_s`."""
    mean = dist.mean_s
    if dist.distribution == "exponential":
        return rng.exponential(mean, n)
    if dist.distribution == "lognormal":
        return rng.lognormal(np.log(mean) - dist.sigma**2 / 2, dist.sigma, n)
    if dist.distribution == "pareto":
        alpha = dist.shape
        return (rng.pareto(alpha, n) + 1) * mean * (alpha - 1) / alpha
    return np.full(n, mean)


def traffic(config: Config, *, seed: int, duration_s: float | None = None) -> Traffic:
    """The requests `config.sim.traffic` describes, for `duration_s` simulated seconds (default: its own)."""
    spec = config.sim.traffic
    duration = duration_s if duration_s is not None else spec.duration_s
    arrivals_rng, work_rng = (np.random.default_rng([seed, k]) for k in range(2))
    if spec.kind == "poisson":
        cpu_mean = spec.work.mean_s * (1 - spec.io_share)
        rate = spec.rate if spec.rate is not None else spec.load * capacity(config) / cpu_mean
        expected = rate * duration
        if expected > MAX_REQUESTS:
            raise ConfigError(
                f"{config.source or 'config'}: sim.traffic: {rate:.3g} requests/s for {duration:g} s is ≈ "
                f"{expected:.3g} requests, more than one simulation holds ({MAX_REQUESTS:,})",
                hint="lower sim.traffic.rate or duration_s (or --duration)",
            )
        gaps = arrivals_rng.exponential(1.0 / rate, int(expected + 10 * np.sqrt(expected) + 10))
        arrival = np.cumsum(gaps)
        arrival = arrival[arrival < duration]
        demand = draw_work(spec.work, len(arrival), work_rng)
        classes = np.full(len(arrival), "cpu", dtype=object)
        paths = np.full(len(arrival), "", dtype=object)
    else:
        if spec.trace is None:
            raise ConfigError(f"{config.source}: sim.traffic.trace: required when sim.traffic.kind is trace")
        trace, _ = read_trace(spec.trace)
        trace = trace_window(trace, spec.trace_start_s, None)
        arrival = trace["t"].to_numpy(np.float64) / spec.trace_speed
        keep = arrival < duration
        trace = trace[keep]
        arrival = arrival[keep]
        cls = trace["class"].astype(str).to_numpy()
        iterations = trace["work"].to_numpy(np.float64)
        demand = np.where(
            cls == "cpu",
            spec.cpu_overhead_s + np.nan_to_num(iterations, nan=0.0) * config.testbed.work_scale * spec.iteration_s,
            np.where(cls == "static", spec.static_work_s, spec.wiki_work_s),
        )
        demand = np.maximum(demand, 1e-9)
        classes = cls.astype(object)
        paths = trace["path"].to_numpy(dtype=object)
        rate = len(arrival) / duration
    io = demand * spec.io_share if spec.io_share > 0 else None
    work = demand * (1 - spec.io_share)
    return Traffic(arrival, work, io, classes, paths, rate)
