"""`marllb static-opt`: the best fixed SED weights for a config, searched for in its simulator, into a file
that `--method static:FILE` runs in the simulator and on the testbed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.cli_support import (
    ConfigArg,
    JsonOption,
    SetOption,
    console,
    load,
    print_table,
    reports_errors,
    work_status,
)

__all__ = ["static_opt_command"]


@reports_errors
def static_opt_command(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The weights file to write.")] = Path("static-weights.json"),
    metric: Annotated[str, typer.Option(help="What to minimise: mean, p90 or p99 JCT.")] = "mean",
    duration: Annotated[float, typer.Option(help="Simulated seconds of requests per validation seed.", min=1.0)] = 60.0,
    seed_count: Annotated[
        int,
        typer.Option(
            "--seed-count",
            help="How many validation seeds (20 000, 20 001, …) every candidate runs on; a count, where "
            "`bench policies --seeds` names a seed set.",
            min=1,
            max=100,
        ),
    ] = 3,
    json_: JsonOption = False,
    set_: SetOption = None,
) -> None:
    """Search the config's simulator for the fixed SED weights that minimise METRIC on validation seeds.

    Coordinate descent on each server group's weight, then on each server's, by factors 1.5, 1.2 and 1.07,
    every candidate on the same requests; a move is kept when it lowers the metric by more than 0.2 %.
    Validation seeds are not those `bench policies` reports on. The file holds one weight per server and
    how it was found; run it with `--method static:FILE` (simulate, replay-trace, lb, bench, sweeps), or let
    the simulator search when a run starts with `--method static-opt`.
    """
    from marllb_cli.agents.weights_file import write_weights
    from marllb_cli.seeds import VALIDATION_SEEDS
    from marllb_cli.sim.build import server_models
    from marllb_cli.sim.static_search import search_static_weights

    cfg = load(config, set_)
    chosen = tuple(VALIDATION_SEEDS[0] + k for k in range(seed_count))
    with work_status("simulating sed on the validation seeds") as status:
        found = search_static_weights(cfg, metric=metric, seeds=chosen, duration_s=duration, progress=status)
    _, names, groups, cpus = server_models(cfg)
    write_weights(out, found.weights, names, cpus, **found.record())
    if json_:
        print(json.dumps({"file": str(out), "weights": found.weights, **found.record()}, indent=2))
        return
    table = Table(title=f"static-opt for {cfg.source.name} ({metric} JCT on seeds {chosen[0]}–{chosen[-1]})")
    for column in ("server", "group", "cpus", "weight", "× sed's"):
        table.add_column(column, justify="left" if column in ("server", "group") else "right")
    for name, group, cpu, weight, level in zip(names, groups, cpus, found.weights, found.levels, strict=True):
        table.add_row(name, group, f"{cpu:g}", f"{weight:.3f}", f"{level:.3f}")
    print_table(table)
    ratio = found.objective_s / found.sed_s
    console.print(
        f"{metric} JCT {found.objective_s * 1e3:.1f} ms against sed's {found.sed_s * 1e3:.1f} ms ({ratio:.3f} × sed), "
        f"{found.evaluations} candidates simulated"
    )
    console.print(f"weights: {out}  (run them with --method static:{out})")
