"""`marllb bench policies`: heuristics, oracles and trained policies on the same unseen requests.

Every method runs on `seeds` (by default 10 000 … 10 004; training draws every episode's requests from
a multiple of 100 003 — `LoadBalancingEnv.reset` — so these requests never appear in training) for
`duration_s` simulated seconds at the config's load. The table gives the mean over seeds of each run's
mean and p99 JCT, and, for trained policies, the training wall time summed from their learning curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from marllb_cli.config import Config
from marllb_cli.sim.run import run_simulation

__all__ = ["PolicyResult", "DEFAULT_METHODS", "EVAL_SEEDS", "evaluate", "as_dicts"]

DEFAULT_METHODS = ("oracle-srt", "oracle-gsq", "sed", "lsq", "wcmp", "ecmp")
EVAL_SEEDS = tuple(range(10_000, 10_005))


@dataclass(frozen=True)
class PolicyResult:
    name: str
    method: str
    jct_mean_ms: float
    jct_p99_ms: float
    mean_vs_sed: float | None
    train_wall_s: float | None
    train_episodes: int | None


def evaluate(
    config: Config,
    policies: dict[str, Path],
    *,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    seeds: tuple[int, ...] = EVAL_SEEDS,
    duration_s: float = 60.0,
) -> list[PolicyResult]:
    """Mean and p99 JCT per method (averaged over seeds); `policies` maps a row name to a training dir."""
    rows: list[tuple[str, str, float, float, float | None, int | None]] = []
    for name, method in [*((m, m) for m in methods), *((n, f"rl:{d}") for n, d in policies.items())]:
        means, p99s = [], []
        for seed in seeds:
            requests = run_simulation(config, method, seed=seed, duration_s=duration_s).requests
            jct = requests.loc[requests["error"] == "", "jct_s"]
            means.append(jct.mean())
            p99s.append(jct.quantile(0.99))
        wall, episodes = None, None
        if method.startswith("rl:"):
            curve = pd.read_parquet(Path(method[3:]) / "curve.parquet")
            wall, episodes = float(curve["wall_s"].sum()), int(len(curve))
        rows.append((name, method, float(np.mean(means)) * 1e3, float(np.mean(p99s)) * 1e3, wall, episodes))
    sed = next((r[2] for r in rows if r[1] == "sed"), None)
    return [
        PolicyResult(name, method, mean, p99, mean / sed if sed else None, wall, episodes)
        for name, method, mean, p99, wall, episodes in rows
    ]


def as_dicts(results: list[PolicyResult]) -> list[dict]:
    return [asdict(r) for r in results]
