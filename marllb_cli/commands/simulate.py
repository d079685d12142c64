"""`marllb simulate`: one simulated run, written as a run directory that `marllb report` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marllb_cli.agents.methods import SIM_METHODS
from marllb_cli.cli_support import (
    ConfigArg,
    EventOption,
    SetOption,
    console,
    load,
    load_events,
    reports_errors,
    work_status,
)


@reports_errors
def simulate_command(
    config: ConfigArg,
    method: Annotated[str, typer.Option("--method", "-m", help=f"LB policy: {', '.join(SIM_METHODS)}.")] = "sed",
    duration: Annotated[
        float | None, typer.Option(help="Simulated seconds of arrivals (default: sim.traffic.duration_s).", min=0.001)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: experiment.seed); same seed, same requests.")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the run directory is created.")] = Path("runs"),
    set_: SetOption = None,
    event: EventOption = None,
) -> None:
    """Simulate the config's LBs and servers under sim.traffic with METHOD; write a run directory.

    The LBs use the dataplane's own flow table, selection and features; agents step every
    experiment.agent_period_ms of simulated time. oracle-srt and oracle-gsq see the servers' true state.
    Timed events (experiment.events, --event) apply at the first agent step at or after their time and are
    recorded in events.parquet.
    """
    from marllb_cli.sim.run import simulate_to_run_dir

    cfg = load(config, set_)
    events = load_events(cfg, event)
    with work_status(f"simulating {method}") as status:
        outcome = simulate_to_run_dir(
            cfg, method, runs_dir=runs_dir, seed=seed, duration_s=duration, events=events, progress=status
        )
    s = outcome.summary
    jct = (
        f"JCT mean {s['jct_mean_s'] * 1e3:.1f} ms, p99 {s['jct_p99_s'] * 1e3:.0f} ms"
        if s["jct_mean_s"] is not None
        else "no request completed"
    )
    console.print(
        f"{method}: {s['requests']:,} requests, {s['errors']:,} failed, {jct} "
        f"({outcome.wall_s:.1f} s wall, {outcome.jobs_per_wall_s:,.0f} requests/s)"
    )
    console.print(f"run directory: {outcome.path}")
