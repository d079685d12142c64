"""Synthetic traces. Poisson: exponential inter-arrival times and exponential CPU work (the papers' for-loop
traces have exponential work with mean ≈ 3.67 M iterations), with an optional mix of request classes.

Reproducible: the same seed gives the same trace, and one generator stream is used per quantity
(arrivals, classes, work, files), so changing the mix does not change the arrival times.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from marllb_cli.errors import ConfigError
from marllb_cli.traces.formats import TRACE_CLASSES

__all__ = ["poisson", "parse_mix", "PAPER_WORK_MEAN"]

#: Mean for-loop iterations of the papers' Poisson traces.
PAPER_WORK_MEAN = 3_670_000
_STATIC_FILES = ("/static/1k.bin", "/static/10k.bin", "/static/100k.bin")


def parse_mix(text: str) -> dict[str, float]:
    """`cpu=0.75,static=0.25` → shares that sum to 1 over known classes."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, share = item.partition("=")
        if not sep or name not in TRACE_CLASSES:
            raise ConfigError(f"--mix {text!r}: expected CLASS=SHARE with CLASS in {', '.join(TRACE_CLASSES)}")
        try:
            mix[name] = float(share)
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
    if rate <= 0 or duration <= 0 or work_mean <= 0:
        raise ConfigError("rate, duration and work mean must be positive")
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
        f"/dummy.php/?n={int(w)}"
        if c == "cpu"
        else (_STATIC_FILES[f] if c == "static" else f"/wiki/index.php/Page_{f}")
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
