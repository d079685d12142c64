"""The heuristic agents: static ecmp / wcmp / sed / lsq, and active WCMP (awcmp).

Static weights are proportional to each server's configured `cpus`, i.e. its capacity: what an operator
who knows the hardware would set. `lsq` ignores weights (all 1, none drained). `awcmp` (active WCMP) asks
every server how busy it is each period — Apache mod_status BusyWorkers over HTTP — and sets
w_j = cpus_j / (busy_j + 1): capacity discounted by current occupancy. A server that does not answer keeps
its previous weight, so one slow probe never drains a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from marllb_cli.agents.methods import HEURISTICS

__all__ = ["StaticWeights", "ActiveWcmp", "heuristic"]

#: `probe()` → BusyWorkers per server, None where a server did not answer.
Probe = Callable[[], Sequence[int | None]]


class StaticWeights:
    """The same weights every period."""

    #: `act` ignores its observation (the simulator then logs these steps' observations in batches).
    reads_observation = False

    def __init__(self, method: str, weights: Sequence[float]) -> None:
        self.method = method
        self.weights = np.asarray(weights, dtype=np.float64)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.weights


class ActiveWcmp:
    """Weighted random selection with w_j = cpus_j / (BusyWorkers_j + 1), probed every period."""

    method = "wcmp"

    def __init__(self, cpus: Sequence[float], probe: Probe) -> None:
        self.cpus = np.asarray(cpus, dtype=np.float64)
        self.probe = probe
        self.weights = self.cpus.copy()
        self.last_busy: list[int | None] = [None] * len(cpus)

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.last_busy = list(self.probe())
        for j, busy in enumerate(self.last_busy):
            if busy is not None:
                self.weights[j] = self.cpus[j] / (busy + 1)
        return self.weights.copy()


def heuristic(name: str, cpus: Sequence[float], probe: Probe | None = None) -> StaticWeights | ActiveWcmp:
    """The heuristic agent called `name` for servers of the given capacities."""
    if name == "awcmp":
        if probe is None:
            raise ValueError("awcmp needs a probe of the servers' busy workers")
        return ActiveWcmp(cpus, probe)
    if name == "lsq":
        return StaticWeights("lsq", [1.0] * len(cpus))
    if name in ("ecmp", "wcmp", "sed"):
        return StaticWeights(name, cpus)
    raise ValueError(f"unknown heuristic {name!r}; choose one of {', '.join(HEURISTICS)}")
