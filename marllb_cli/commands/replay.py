"""`marllb replay-trace`: one experiment run on the deployed testbed, written as a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from marllb_cli.agents.methods import HEURISTICS
from marllb_cli.cli_support import (
    ConfigArg,
    EventOption,
    SetOption,
    console,
    detail_progress,
    err_console,
    load_events,
    reports_errors,
)
from marllb_cli.cli_support import load as load_config
from marllb_cli.errors import ConfigError


@reports_errors
def replay_trace_command(
    config: ConfigArg,
    trace: Annotated[Path, typer.Option("--trace", "-t", help="Trace file: the papers' TSV, WikiBench or Parquet.")],
    method: Annotated[
        str, typer.Option("--method", "-m", help=f"LB policy: {', '.join(HEURISTICS)}, or rl:DIR (a trained policy).")
    ] = "sed",
    speed: Annotated[
        float | None, typer.Option(help="Replay speed: 0.25 sends the trace 4× slower [default: 1].")
    ] = None,
    load: Annotated[
        float | None,
        typer.Option(help="Offered load (0.85: 85 % of the servers' CPU): the speed comes from `marllb calibrate`."),
    ] = None,
    start: Annotated[
        float, typer.Option(help="Skip the trace's first S seconds (trace time: its start-up ramp).")
    ] = 0.0,
    duration: Annotated[
        float | None, typer.Option(help="Replay only requests due in the first S seconds (after --speed).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the run directory is created.")] = Path("runs"),
    seed: Annotated[int | None, typer.Option(help="Seed of the run (default: experiment.seed).")] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.", min=0.1)] = 60.0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed trace lines.")] = False,
    set_: SetOption = None,
    event: EventOption = None,
) -> None:
    """Replay a trace open-loop through the LBs running METHOD and record every request in a run directory.

    Starts the dataplanes and agents, samples the servers' busy workers every agent period, replays the
    trace from the client namespace, stops the LBs and writes runs/<id>/ (with the servers' measured CPU
    utilisation). --load picks the speed that offers that share of the servers' CPU, from the testbed's
    calibration (`marllb calibrate`). Ctrl-C stops early and keeps every request sent so far (the run is
    marked incomplete). Timed events (experiment.events, --event) are applied at their times on the replay's
    clock, recorded in events.parquet, and undone after the run (kind local).
    """
    from marllb_cli.deploy.base import exclusive_use
    from marllb_cli.experiment import ReplayOptions, plan_replay, replay_trace

    if speed is not None and load is not None:
        raise ConfigError("--speed and --load both given", hint="--load derives the speed; give one of them")
    cfg = load_config(config, set_)
    options = ReplayOptions(
        trace=trace,
        method=method,
        speed=1.0 if speed is None else speed,
        load=load,
        start_s=start,
        duration_s=duration,
        runs_dir=runs_dir,
        seed=seed,
        timeout_s=timeout,
        skip_bad=skip_bad,
        events=tuple(load_events(cfg, event)),
    )
    plan = plan_replay(cfg, options)  # every input checked before the progress display starts
    # A testbed that another command measures on is refused before the display too.
    with exclusive_use(plan.testbed), detail_progress(f"replaying {method}") as bar:
        task = bar.add_task("replay", total=None, detail="starting LBs")

        def progress(data: dict[str, Any]) -> None:
            detail = f"sent {data['sent']:,}  errors {data['errors']:,}  send lag p99 {data['lag_p99_s'] * 1e3:.1f} ms"
            bar.update(task, total=data["total"], completed=data["done"], detail=detail)

        outcome = replay_trace(cfg, options, progress, plan=plan)
    s = outcome.summary
    for warning in outcome.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    jct = (
        f"JCT mean {s['jct_mean_s'] * 1e3:.0f} ms, p99 {s['jct_p99_s'] * 1e3:.0f} ms"
        if s["jct_mean_s"] is not None
        else "no request completed"
    )
    console.print(
        f"{method}: {s['requests']:,} requests, {s['errors']:,} errors, {jct}, "
        f"send lag p99 {(s['send_lag_p99_s'] or 0) * 1e3:.1f} ms"
    )
    if outcome.utilisation is not None:
        load = outcome.load or {}
        offered = f"offered {load['offered']:.2f}, carried {load['carried']:.2f}; " if "carried" in load else ""
        busy = outcome.utilisation["mean"]
        console.print(f"load: {offered}servers busy {busy:.0%} of their CPU quota over the run")
    console.print(f"run directory: {outcome.path}" + ("" if outcome.complete else " [yellow](incomplete)[/]"))
    if outcome.interrupted:
        err_console.print(f"[yellow]{outcome.failure}[/]: every request sent so far is in the run directory")
        raise typer.Exit(128 + outcome.stopped_by if outcome.stopped_by else 130)
