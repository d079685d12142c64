"""Synthetic traces.

- Poisson: exponential inter-arrival times and exponential CPU work (the papers' for-loop traces have
  exponential work with mean ≈ 3.67 M iterations), with an optional mix of request classes.
- Wiki: a *synthetic* Wikipedia-shaped trace for the testbed's wiki pages: a diurnal rate curve
  (sinusoidal, peak-to-trough ratio (1 + a)/(1 − a), a day compressed to `day_s` seconds), Zipf page
  popularity (exponent ≈ 1, as measured for Wikipedia page views), and a share of static files with
  small files far more common than large ones. Not a real trace: for real Wikipedia traffic read a
  WikiBench file.

Reproducible: the same seed gives the same trace, and one generator stream is used per quantity
(arrivals, classes, work, files), so changing the mix does not change the arrival times.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from marllb_cli.errors import ConfigError
from marllb_cli.traces.formats import TRACE_CLASSES
from marllb_cli.wikipages import page_path

__all__ = ["poisson", "wiki", "parse_mix", "PAPER_WORK_MEAN"]

#: Mean for-loop iterations of the papers' Poisson traces.
PAPER_WORK_MEAN = 3_670_000
_STATIC_FILES = ("/static/1k.bin", "/static/10k.bin", "/static/100k.bin")
#: Static file sizes of the wiki trace and how often each is asked for (small objects dominate).
_WIKI_STATIC = {"/static/1k.bin": 0.60, "/static/10k.bin": 0.30, "/static/100k.bin": 0.09, "/static/1m.bin": 0.01}


#: The most requests one generated trace may hold (≈ 2 GB of Parquet and paths in memory).
MAX_REQUESTS = 50_000_000


def _bounded(option: str, value: float, low: float, high: float, *, low_open: bool = True) -> None:
    """A finite `value` in (low, high] (or [low, high]), else a one-line error naming the option."""
    inside = (value > low if low_open else value >= low) and value <= high
    if not (math.isfinite(value) and inside):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{option} {value!r}: must be a finite number in {bracket}{low:g}, {high:g}]")


def _check_size(rate: float, duration: float) -> None:
    _bounded("--rate", rate, 0, 1e6)
    _bounded("--duration", duration, 0, 1e8)
    if rate * duration > MAX_REQUESTS:
        raise ConfigError(
            f"--rate {rate:g} × --duration {duration:g} s ≈ {rate * duration:.3g} requests: at most {MAX_REQUESTS:,}",
            hint="generate a shorter trace",
        )


def parse_mix(text: str) -> dict[str, float]:
    """`cpu=0.75,static=0.25` → shares that sum to 1 over known classes."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, share = item.partition("=")
        if not sep or name not in TRACE_CLASSES:
            raise ConfigError(f"--mix {text!r}: expected CLASS=SHARE with CLASS in {', '.join(TRACE_CLASSES)}")
        try:
            mix[name] = float(share)
            if not math.isfinite(mix[name]):
                raise ValueError(share)
        except ValueError:
            raise ConfigError(f"--mix {text!r}: {share!r} is not a number") from None
    total = sum(mix.values())
    if not mix or total <= 0 or any(v < 0 for v in mix.values()):
        raise ConfigError(f"--mix {text!r}: shares must be non-negative with a positive sum")
    return {name: share / total for name, share in mix.items()}


def poisson(
    *,
    rate: float,
    duration: float,
    work_mean: float = PAPER_WORK_MEAN,
    mix: dict[str, float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A Poisson trace of `rate` requests/s over `duration` s; CPU requests carry exponential work."""
    _check_size(rate, duration)
    _bounded("--work-mean", work_mean, 0, 1e12)
    mix = mix or {"cpu": 1.0}
    arrivals, classes_rng, work_rng, files_rng = (np.random.default_rng([seed, k]) for k in range(4))
    expected = rate * duration
    gaps = arrivals.exponential(1.0 / rate, size=int(expected + 10 * np.sqrt(expected) + 10))
    t = np.cumsum(gaps)
    t = t[t < duration]
    names = list(mix)
    classes = np.asarray(names)[classes_rng.choice(len(names), size=len(t), p=[mix[n] for n in names])]
    work = np.maximum(np.rint(work_rng.exponential(work_mean, size=len(t))), 1.0)
    files = files_rng.integers(len(_STATIC_FILES), size=len(t))
    paths = [
        f"/dummy.php/?n={int(w)}" if c == "cpu" else (_STATIC_FILES[f] if c == "static" else page_path(f + 1))
        for c, w, f in zip(classes, work, files, strict=True)
    ]
    return pd.DataFrame(
        {
            "t": t,
            "path": paths,
            "class": pd.Categorical(classes, categories=TRACE_CLASSES),
            "work": np.where(classes == "cpu", work, np.nan),
        }
    )


def wiki(
    *,
    rate: float,
    duration: float,
    day_s: float = 86_400.0,
    amplitude: float = 0.4,
    pages: int = 1000,
    zipf: float = 1.0,
    static_share: float = 0.35,
    seed: int = 0,
) -> pd.DataFrame:
    """A synthetic Wikipedia-shaped trace: mean `rate` requests/s over `duration` s.

    The rate follows rate·(1 + amplitude·sin(2π t/day_s − π/2)) (the trough at t = 0, the peak half a day
    later), drawn by thinning a Poisson process at the peak rate. Page k (1-based) is asked for with
    probability ∝ k^−zipf; `static_share` of requests are static files.
    """
    _check_size(rate, duration * (1 + amplitude) if math.isfinite(amplitude) else math.inf)
    _bounded("--day", day_s, 0, 1e9)
    _bounded("--pages", pages, 1, 10_000_000, low_open=False)
    _bounded("--zipf", zipf, 0, 10, low_open=False)
    _bounded("--static-share", static_share, 0, 1, low_open=False)
    if not 0 <= amplitude < 1:
        raise ConfigError(f"--amplitude {amplitude!r}: must be in [0, 1)")
    arrivals, thinning, kinds, page_rng, file_rng = (np.random.default_rng([seed, 10 + k]) for k in range(5))
    peak = rate * (1 + amplitude)
    expected = peak * duration
    t = np.cumsum(arrivals.exponential(1.0 / peak, size=int(expected + 10 * np.sqrt(expected) + 10)))
    t = t[t < duration]
    relative = (1 + amplitude * np.sin(2 * np.pi * t / day_s - np.pi / 2)) / (1 + amplitude)
    t = t[thinning.random(len(t)) < relative]
    static = kinds.random(len(t)) < static_share
    popularity = np.arange(1, pages + 1, dtype=np.float64) ** -zipf
    page = page_rng.choice(pages, size=len(t), p=popularity / popularity.sum()) + 1
    files = list(_WIKI_STATIC)
    chosen = file_rng.choice(len(files), size=len(t), p=list(_WIKI_STATIC.values()))
    paths = [files[f] if s else page_path(p) for s, p, f in zip(static, page, chosen, strict=True)]
    return pd.DataFrame(
        {
            "t": t,
            "path": paths,
            "class": pd.Categorical(np.where(static, "static", "wiki"), categories=TRACE_CLASSES),
            "work": np.full(len(t), np.nan),
        }
    )
