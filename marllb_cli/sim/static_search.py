"""`static-opt`: the best fixed SED weights for a scenario, found in the simulator on validation seeds.

Why: an agent that rewrites SED weights every period has to beat what the best weights that never change
already reach, or its dynamics add nothing. `oracle-weights` (`sim.lookahead`) is not that reference: it
looks ahead with the simulator's future, and most of its gain over sed is static.

The search, top to bottom:

    levels = 1 per server (SED's own weights, cpus × speed)
    first by group, then per server, for step in 1.5, 1.2, 1.07:
        repeat until a round improves nothing (at most `max_rounds`):
            for each group (server): try its levels × step and ÷ step, keep the better if it lowers the
            objective by more than `tolerance` (a relative 0.2 %: less is the seeds' noise)
    weights = cpus × speed × levels, scaled so that their geometric mean is that of SED's

Every candidate runs on the same requests (the validation seeds' traffic, drawn once: common random numbers),
so two candidates differ only by their weights. The objective is the mean, p90 or p99 JCT over all
validation requests, a request the servers refused counted at the run's horizon, so refusing work never
pays. The seeds are the first three validation seeds (`marllb_cli.seeds`), apart from `bench policies`' test
seeds and from training's, so the weights are chosen on requests no report uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from marllb_cli.agents.heuristics import StaticWeights
from marllb_cli.config import Config
from marllb_cli.errors import ConfigError
from marllb_cli.seeds import VALIDATION_SEEDS
from marllb_cli.sim.build import build_simulation, run_events, server_models
from marllb_cli.sim.events import attach_events
from marllb_cli.sim.traffic import Traffic, traffic

__all__ = [
    "METRICS",
    "SEARCH_DURATION_S",
    "SEARCH_SEEDS",
    "StaticSearch",
    "search_static_weights",
    "static_opt_weights",
]

SEARCH_SEEDS = VALIDATION_SEEDS[:3]
#: Simulated seconds per validation seed: three minutes of requests per candidate, ≈ 0.3 s on this machine.
SEARCH_DURATION_S = 60.0
METRICS = {"mean": None, "p90": 0.9, "p99": 0.99}
STEPS = (1.5, 1.2, 1.07)


@dataclass
class StaticSearch:
    """What the search found: `weights` per server, their `levels` (× cpus × speed), the objective they
    reach and SED's, and how many candidates were simulated."""

    weights: list[float]
    levels: list[float]
    objective_s: float
    sed_s: float
    metric: str
    seeds: list[int]
    duration_s: float
    evaluations: int
    history: list[dict] = field(default_factory=list)  # one row per accepted move

    def record(self) -> dict:
        """The file's `search` field (`agents.weights_file`)."""
        return {
            "metric": self.metric,
            "seeds": self.seeds,
            "duration_s": self.duration_s,
            "objective_s": self.objective_s,
            "sed_s": self.sed_s,
            "levels": self.levels,
            "evaluations": self.evaluations,
        }


class _Objective:
    """The objective of a level vector on the validation requests (drawn once)."""

    def __init__(self, config: Config, metric: str, seeds: Sequence[int], duration_s: float) -> None:
        self.config, self.quantile, self.duration_s = config, METRICS[metric], duration_s
        self.models, _, self.groups, self.cpus = server_models(config)
        unit = config.sim.cores_per_unit or 1.0
        self.base = np.array([c * m.speed / unit for c, m in zip(self.cpus, self.models, strict=True)])
        self.draws: list[tuple[int, Traffic, list]] = [
            (
                seed,
                traffic(config, seed=seed, duration_s=duration_s),
                run_events(config, seed=seed, duration_s=duration_s),
            )
            for seed in seeds
        ]
        self.period = config.experiment.agent_period_ms / 1000
        self.evaluations = 0

    def __call__(self, levels: np.ndarray) -> float:
        self.evaluations += 1
        weights = (self.base * levels).tolist()
        jcts = []
        for seed, requests, events in self.draws:
            agents = [StaticWeights("sed", weights) for _ in range(self.config.testbed.lbs)]
            core, lbs = build_simulation(
                self.config, "sed", requests, self.models, self.cpus, seed=seed, agents=agents, agent_period=self.period
            )
            attach_events(events, core, lbs, self.models)
            core.run()
            result = core.result()
            jct = result.finish - result.arrival
            jcts.append(np.where(np.isnan(jct), self.duration_s, jct))
        every = np.concatenate(jcts) if jcts else np.zeros(0)
        if not len(every):
            return float("nan")
        return float(every.mean() if self.quantile is None else np.quantile(every, self.quantile))


def search_static_weights(
    config: Config,
    *,
    metric: str = "mean",
    seeds: Sequence[int] = SEARCH_SEEDS,
    duration_s: float = SEARCH_DURATION_S,
    tolerance: float = 0.002,
    max_rounds: int = 4,
    progress: Callable[[str], None] = lambda _: None,
) -> StaticSearch:
    """Coordinate descent on log weights (see the module docstring); `progress` gets a line per move."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: unknown", hint=f"choose one of {', '.join(METRICS)}")
    duration = duration_s
    objective = _Objective(config, metric, seeds, duration)
    groups = objective.groups
    by_group = [[j for j, g in enumerate(groups) if g == name] for name in dict.fromkeys(groups)]
    by_server = [[j] for j in range(len(groups))]
    levels = np.ones(len(groups))
    sed = best = objective(levels)
    if not np.isfinite(sed):
        raise ConfigError(
            f"{config.source}: no request in {duration:g} s of sim.traffic", hint="use a longer --duration"
        )
    history: list[dict] = []
    for blocks, scope in ((by_group, "group"), (by_server, "server")):
        if scope == "server" and len(by_server) == len(by_group):
            continue  # one server per group: the group search was the server search
        for step in STEPS:
            for _ in range(max_rounds):
                moved = False
                for block in blocks:
                    tried = []
                    for factor in (step, 1 / step):
                        candidate = levels.copy()
                        candidate[block] *= factor
                        tried.append((objective(candidate), factor, candidate))
                    value, factor, candidate = min(tried, key=lambda t: t[0])
                    if value < best * (1 - tolerance):
                        best, levels, moved = value, candidate, True
                        names = ", ".join(f"srv{j}" for j in block) if scope == "server" else groups[block[0]]
                        history.append({"scope": scope, "servers": names, "factor": factor, "objective_s": best})
                        progress(f"{scope} {names} × {factor:.3g}: {metric} {best * 1e3:.1f} ms (sed {sed * 1e3:.1f})")
                if not moved:
                    break
    levels = levels / np.exp(np.log(levels).mean())  # SED depends on ratios: centre the levels on 1
    weights = objective.base * levels
    return StaticSearch(
        weights=[round(float(w), 6) for w in weights],
        levels=[round(float(v), 6) for v in levels],
        objective_s=best,
        sed_s=sed,
        metric=metric,
        seeds=list(seeds),
        duration_s=duration,
        evaluations=objective.evaluations,
        history=history,
    )


_FOUND: dict[str, StaticSearch] = {}


def static_opt_weights(config: Config) -> StaticSearch:
    """`--method static-opt`: the search with its defaults (the validation seeds, `SEARCH_DURATION_S` each,
    whatever the run's own duration), once per scenario in a process (`bench policies` evaluates it on
    several seeds)."""
    key = config.resolved_yaml()
    if key not in _FOUND:
        _FOUND[key] = search_static_weights(config)
    return _FOUND[key]
