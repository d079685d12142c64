"""`marllb sweep`: a grid of simulator runs on a local process pool, resumable, with an index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from marllb_cli.cli_support import SetOption, console, detail_progress, reports_errors


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
    set_: SetOption = None,
) -> None:
    """Run a sweep file's grid of simulator runs: every combination of its `set` fields' values, methods and seeds,
    on a local process pool or a Ray cluster (--backend ray, the `ray` extra).

    Each cell is content-addressed (resolved config, method, seed, duration, marllb version, the files it reads)
    and done once its run directory is in OUT/runs/: running the sweep again runs only the cells not done
    (failed ones included); a sweep killed at any point loses only the cells that were running. OUT/index.parquet
    holds a row per done cell; `marllb report OUT/runs` compares the methods per scenario with confidence
    intervals. --set overrides apply to every cell.
    """
    from marllb_cli.errors import ConfigError
    from marllb_cli.sweep import BACKENDS, plan_sweep, run_sweep

    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: not a backend", hint=f"choose one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ConfigError("--address: only with --backend ray", hint="add --backend ray, or drop --address")
    plan = plan_sweep(sweep, tuple(set_ or ()))  # a bad sweep file fails here, before the bar or any file
    target = out if out is not None else Path("runs") / "sweeps" / sweep.stem
    with detail_progress(f"sweep {sweep.name}") as progress:
        task = progress.add_task("cells", total=len(plan.cells), detail="")

        def on_cell(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, detail=escape(what))

        result = run_sweep(
            plan,
            target,
            workers=workers or os.cpu_count() or 1,
            force=force,
            backend=backend,
            address=address,
            on_cell=on_cell,
        )
    console.print(
        f"sweep: {result.planned} cells, {result.skipped} already done, {result.ran} run, {len(result.failed)} failed"
    )
    console.print(f"index: {result.out / 'index.parquet'}; compare: marllb report {result.out / 'runs'}")
    if result.failed:
        for key, log in result.failed.items():
            console.print(f"failed cell {key}: see {log}")
        raise typer.Exit(1)
