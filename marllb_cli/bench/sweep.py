"""`marllb bench sweep`: cells per minute of `marllb sweep` with 1 and 2 local workers and on Ray, and what a
cell costs besides its simulation.

Two sweeps of the same shape (the heuristics sed, lsq, wcmp and ecmp × seeds on the given config), every cell
run again each time (`force`): long cells (`cell_s` simulated seconds, about a wall second each on
sim-moderate) give the throughput and the speed-up of a second worker; one-second cells, whose simulation
costs next to nothing, give each backend's overhead per cell (spawning and importing workers, writing the
run directory, the index). Wall times include starting the workers (and Ray) as a user's sweep does.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from marllb_cli.sweep import plan_sweep, run_sweep

__all__ = ["SweepBenchRow", "sweep_benchmark"]

METHODS = ("sed", "lsq", "wcmp", "ecmp")
SHORT_CELL_S = 1.0


@dataclass(frozen=True)
class SweepBenchRow:
    backend: str
    workers: int
    cells: int
    cell_s: float
    wall_s: float

    @property
    def cells_per_minute(self) -> float:
        return 60 * self.cells / self.wall_s

    @property
    def wall_per_cell_s(self) -> float:
        return self.wall_s / self.cells

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cells_per_minute": self.cells_per_minute, "wall_per_cell_s": self.wall_per_cell_s}


def sweep_benchmark(config: Path, cells: int, cell_s: float, backends: tuple[str, ...]) -> list[SweepBenchRow]:
    """Time the long and the short sweep on each of `backends` ("local" runs with 1 and 2 workers)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="marllb-bench-sweep-") as scratch:
        work = Path(scratch)
        for seconds in (cell_s, SHORT_CELL_S):
            sweep = work / f"cells-{seconds:g}.yaml"
            seeds = list(range(math.ceil(cells / len(METHODS))))
            sweep.write_text(
                yaml.safe_dump(
                    {"config": str(config.resolve()), "methods": list(METHODS), "seeds": seeds, "duration_s": seconds}
                )
            )
            plan = plan_sweep(sweep)
            for backend in backends:
                for workers in (1, 2) if backend == "local" else (2,):
                    started = time.monotonic()
                    out = work / f"{backend}-{workers}"
                    result = run_sweep(plan, out, workers=workers, force=True, backend=backend)
                    wall = time.monotonic() - started
                    if result.failed:
                        log = next(iter(result.failed.values()))
                        raise RuntimeError(f"a benchmark cell failed: {log.read_text().splitlines()[0]}")
                    rows.append(SweepBenchRow(backend, workers, len(plan.cells), seconds, wall))
    return rows
