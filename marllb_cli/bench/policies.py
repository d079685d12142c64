"""`marllb bench policies`: heuristics, oracles and trained policies on the same unseen requests.

Every method runs on `seeds` (by default the test seeds 10 000 … 10 004, `marllb_cli.seeds`: no training
episode draws them, and nothing is chosen on them; `--seeds validation` is where settings are chosen) for
`duration_s` simulated seconds at the config's load. The table gives the mean over seeds of each run's
mean and p99 JCT; the ratios of mean and p99 to sed, with the 95 % t interval of the per-seed ratio (every
method runs the same requests per seed, so the ratio is paired by seed); the requests the servers refused
(they have no JCT); and, for trained policies, the training wall time summed from their learning curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from marllb_cli.config import Config
from marllb_cli.seeds import TEST_SEEDS
from marllb_cli.sim.run import run_simulation
from marllb_cli.stats import T975, Z975

__all__ = ["PolicyResult", "DEFAULT_METHODS", "evaluate", "as_dicts"]

DEFAULT_METHODS = ("oracle-srt", "oracle-gsq", "sed", "lsq", "wcmp", "ecmp")


@dataclass(frozen=True)
class PolicyResult:
    name: str
    method: str
    jct_mean_ms: float
    jct_p99_ms: float
    mean_vs_sed: float | None
    train_wall_s: float | None
    train_episodes: int | None
    mean_vs_sed_ci: tuple[float, float] | None = None
    p99_vs_sed: float | None = None
    p99_vs_sed_ci: tuple[float, float] | None = None
    requests: int = 0
    rejected: int = 0


def paired_ratio(values: list[float], sed: list[float]) -> tuple[float, tuple[float, float] | None]:
    """The ratio of the seed means, and the 95 % t interval of the per-seed ratios (None for one seed)."""
    ratios = np.asarray(values) / np.asarray(sed)
    ratio = float(np.mean(values) / np.mean(sed))
    if len(ratios) < 2:
        return ratio, None
    t = T975[len(ratios) - 2] if len(ratios) - 1 <= len(T975) else Z975
    half = t * float(ratios.std(ddof=1)) / np.sqrt(len(ratios))
    return ratio, (float(ratios.mean() - half), float(ratios.mean() + half))


def evaluate(
    config: Config,
    policies: dict[str, Path],
    *,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    seeds: tuple[int, ...] = TEST_SEEDS,
    duration_s: float = 60.0,
) -> list[PolicyResult]:
    """Mean and p99 JCT per method (averaged over seeds); `policies` maps a row name to a training dir."""
    measured: dict[str, tuple[str, list[float], list[float], int, int, float | None, int | None]] = {}
    for name, method in [*((m, m) for m in methods), *((n, f"rl:{d}") for n, d in policies.items())]:
        means, p99s, total, rejected = [], [], 0, 0
        for seed in seeds:
            requests = run_simulation(config, method, seed=seed, duration_s=duration_s).requests
            jct = requests.loc[requests["error"] == "", "jct_s"]
            means.append(float(jct.mean()))
            p99s.append(float(jct.quantile(0.99)))
            total, rejected = total + len(requests), rejected + int((requests["error"] != "").sum())
        wall, episodes = None, None
        if method.startswith("rl:"):
            curve = pd.read_parquet(Path(method[3:]) / "curve.parquet")
            wall, episodes = float(curve["wall_s"].sum()), int(len(curve))
        measured[name] = (method, means, p99s, total, rejected, wall, episodes)
    sed = next((m for m in measured.values() if m[0] == "sed"), None)
    results = []
    for name, (method, means, p99s, total, rejected, wall, episodes) in measured.items():
        mean_ratio, mean_ci = paired_ratio(means, sed[1]) if sed else (None, None)
        p99_ratio, p99_ci = paired_ratio(p99s, sed[2]) if sed else (None, None)
        results.append(
            PolicyResult(
                name,
                method,
                float(np.mean(means)) * 1e3,
                float(np.mean(p99s)) * 1e3,
                mean_ratio,
                wall,
                episodes,
                mean_ci,
                p99_ratio,
                p99_ci,
                total,
                rejected,
            )  # fmt: skip
        )
    return results


def as_dicts(results: list[PolicyResult]) -> list[dict]:
    return [asdict(r) for r in results]
