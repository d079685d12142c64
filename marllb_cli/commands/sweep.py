"""`marllb sweep`: a grid of simulator runs on a local process pool, resumable, with an index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from marllb_cli.cli_support import JsonOption, SetOption, console, detail_progress, reports_errors

if TYPE_CHECKING:
    from marllb_cli.sweep import SweepPlan, SweepResult


@reports_errors
def sweep_command(
    sweep: Annotated[Path, typer.Argument(metavar="SWEEP", help="Sweep file, e.g. sweeps/sim-moderate-loads.yaml.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where the cells go (default: runs/sweeps/<sweep file name>).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-j", min=1, help="Cells run at once (default: this machine's cores).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run every cell again, done ones included.")] = False,
    backend: Annotated[
        str, typer.Option("--backend", help="local (a process pool here) or ray (tasks on a Ray cluster).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="--backend ray: the cluster (host:port or auto); default: start one here for the sweep."
        ),
    ] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Print each cell's state (done, failed, todo) and run nothing.")
    ] = False,
    set_: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Run a sweep file's grid: every combination of its `set` fields' values, methods and seeds, simulated on a
    local process pool or a Ray cluster (--backend ray, the `ray` extra), or replayed on a deployed testbed (one
    at a time, after the simulator's cells).

    Each cell is content-addressed (resolved config, method, seed, duration, marllb version, the files it reads)
    and done once its run directory is in OUT/runs/: running the sweep again runs only the cells not done
    (failed ones included); a sweep killed at any point loses only the cells that were running. One sweep at a
    time runs into OUT. OUT/index.parquet
    holds a row per done cell; `marllb report OUT/runs` compares the methods per scenario with confidence
    intervals. --set overrides apply to every cell. A sweep file's `trainings` are trained first (a cell per
    training seed, into OUT/trainings/), then their policies run on its seeds like methods.
    """
    from marllb_cli.sweep import check_backend, plan_sweep, sole_sweep

    check_backend(backend, address)  # before the progress bar, as a bad sweep file
    plan = plan_sweep(sweep, tuple(set_ or ()))  # a bad sweep file fails here, before the bar or any file
    target = out if out is not None else Path("runs") / "sweeps" / sweep.stem
    if status:
        _print_status(plan, target, json_)
        return
    with sole_sweep(target):  # another sweep into OUT: said before the bar
        result = _run(plan, sweep, target, workers, force, backend, address)
    console.print(
        f"sweep: {result.planned} cells, {result.skipped} already done, {result.ran} run, {len(result.failed)} failed"
    )
    console.print(f"index: {result.out / 'index.parquet'}; compare: marllb report {result.out / 'runs'}")
    if result.failed:
        for key, log in result.failed.items():
            console.print(f"failed cell {key}: see {log}")
        raise typer.Exit(1)


def _run(
    plan: SweepPlan, sweep: Path, target: Path, workers: int | None, force: bool, backend: str, address: str | None
) -> SweepResult:
    """The cells not done (all with `force`), behind a progress bar over the cells."""
    from marllb_cli.sweep import cell_states, check_testbeds, run_sweep

    todo = [cell for cell, state in cell_states(plan, target) if force or state != "done"]
    check_testbeds(todo)  # a testbed cell needs its testbed up: said before the bar, not after the other cells
    with detail_progress(f"sweep {sweep.name}") as progress:
        task = progress.add_task("cells", total=len(plan.cells), detail="")

        def on_cell(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, detail=escape(what))

        return run_sweep(
            plan,
            target,
            workers=workers or os.cpu_count() or 1,
            force=force,
            backend=backend,
            address=address,
            on_cell=on_cell,
        )


def _print_status(plan: SweepPlan, out: Path, json_: bool) -> None:
    """The cells of `plan` and their state in `out`, as a table (or JSON), with the counts."""
    import json
    from collections import Counter

    from rich.table import Table

    from marllb_cli.sweep import cell_states

    states = cell_states(plan, out)
    if json_:
        cells = [
            {"key": c.key, "method": c.method, "seed": c.seed, "axes": dict(c.axes), "state": s} for c, s in states
        ]
        print(json.dumps({"out": str(out), "cells": cells}, indent=2, default=str))
        return
    table = Table(title=f"{plan.path}: {len(states)} cells in {out}")
    fields = [field for field, _ in plan.cells[0].axes] if plan.cells else []
    for column in ("key", "method", "seed", *fields, "state"):
        table.add_column(column)
    for cell, state in states:
        values = [str(value) for _, value in cell.axes]
        table.add_row(cell.key, escape(cell.method), str(cell.seed), *values, state)
    console.print(table)
    counts = Counter(state for _, state in states)
    console.print(", ".join(f"{counts[state]} {state}" for state in ("done", "failed", "todo")))
