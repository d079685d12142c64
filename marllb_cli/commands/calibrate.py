"""`marllb calibrate`: measure the deployed testbed's request costs, store them, and say what a trace offers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.cli_support import ConfigArg, JsonOption, SetOption, console, detail_progress, load, reports_errors
from marllb_cli.errors import ConfigError

__all__ = ["calibrate_command"]


@reports_errors
def calibrate_command(
    config: ConfigArg,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", "-t", help="A trace: print the load it offers and the speed for --target-load."),
    ] = None,
    target_load: Annotated[
        float, typer.Option("--target-load", help="With --trace: the load to find the speed for.")
    ] = 0.85,
    start: Annotated[
        float, typer.Option(help="With --trace: skip its first S seconds (as replay-trace --start).")
    ] = 0.0,
    duration: Annotated[
        float | None, typer.Option(help="With --trace: replay seconds (as replay-trace --duration).")
    ] = None,
    pilot: Annotated[
        float,
        typer.Option(
            "--pilot-s", help="Seconds of the pilot replay through SED LBs that corrects the model (0: none).", min=0
        ),
    ] = 20.0,
    sim_out: Annotated[
        Path | None,
        typer.Option("--sim-out", help="Write the config with a simulator that models this testbed (YAML)."),
    ] = None,
    json_: JsonOption = False,
    set_: SetOption = None,
) -> None:
    """Measure what requests cost on the deployed testbed's servers and store it (`calibration.json` in the
    testbed's state; `replay-trace --load` reads it).

    Sends phases of identical requests from the client node straight to each server (the CPU page at four
    loop sizes one at a time, then two sizes saturated, static files, wiki pages where there is a wiki) while reading
    each server's CPU counter; fits cost = overhead + iterations × seconds per iteration; then replays 20 s
    through SED LBs at load 0.85 and scales the model by the load the servers really carried. Takes ≈ 45 s.
    """
    from marllb_cli.calibrating import calibrate
    from marllb_cli.calibration import plan_load
    from marllb_cli.deploy import testbed_for
    from marllb_cli.deploy.base import exclusive_use
    from marllb_cli.traces import read_trace, trace_window

    cfg = load(config, set_)
    # The trace is read (and its window cut) before a minute of measuring, so a bad one fails at once.
    window = trace_window(read_trace(trace)[0], start, None) if trace is not None else None
    # Another command measuring on the testbed: refused in one line, before the display.
    with exclusive_use(testbed_for(cfg)), detail_progress("calibrating") as bar:
        task = bar.add_task("calibrate", total=None, detail="starting the load probe")
        calibration, path = calibrate(cfg, lambda phase: bar.update(task, detail=phase), pilot_s=pilot)
    plan = None
    if window is not None:
        plan = plan_load(window, calibration, load=target_load, duration_s=duration)
    if sim_out is not None:
        from marllb_cli.calibration import simulator_config

        text = simulator_config(cfg, calibration, trace=trace, speed=plan.speed if plan else 1.0, start_s=start)
        try:
            sim_out.write_text(text)
        except OSError as exc:
            raise ConfigError(f"--sim-out {sim_out}: cannot write ({exc.strerror})") from None
    if json_:
        console.print_json(
            json.dumps({"path": str(path), **calibration.model_dump(mode="json"), "trace": plan and plan.model_dump()})
        )
        return
    model = calibration.model
    table = Table(title=f"calibration of {calibration.testbed} ({calibration.machine})")
    # Short headings: a log or a pipe gets 80 columns, and rich clips what does not fit.
    columns = ("server", "group", "cores", "ns/it", "+ms", "ns/it\nloaded", "+ms\nloaded", "file\nms", "2M\nms")
    for column in (*columns, "used"):
        table.add_column(column, justify="left" if column in ("server", "group") else "right")
    for server in calibration.servers:
        alone = dict(server.alone_ms)
        table.add_row(
            server.name,
            server.group,
            f"{server.cores:g}",
            f"{server.fit.iteration_s * 1e9:.2f}",
            f"{server.fit.overhead_s * 1e3:.2f}",
            f"{server.loaded_fit.iteration_s * 1e9:.2f}",
            f"{server.loaded_fit.overhead_s * 1e3:.2f}",
            f"{server.static_s * 1e3:.2f}",
            f"{alone.get(2_000_000.0, float('nan')):.0f}",
            f"{server.saturated_cpu_share:.0%}",
        )
    console.print(table)
    console.print(
        "ns/it, +ms: core time per for-loop iteration and per request, one request at a time and loaded; "
        "file: the static file's core time; 2M: a request of 2 M iterations alone; used: CPU used / quota when "
        "saturated"
    )
    wiki = f", wiki page {model.wiki_s * 1e3:.1f} ms" if model.wiki_s is not None else ""
    console.print(
        f"cost model (loaded): {model.iteration_s * 1e9:.2f} ns per iteration + "
        f"{model.cpu_overhead_s * 1e3:.2f} ms per CPU "
        f"request, static file {model.static_s * 1e3:.2f} ms{wiki} (core time; capacity "
        f"{calibration.capacity_cores:g} cores)"
    )
    if calibration.pilot is not None:
        p = calibration.pilot
        console.print(
            f"pilot replay (sed, {p.requests:,} requests): carried {p.carried:.2f} where the phases predicted "
            f"{p.offered:.2f}; the model is the phases' × {p.scale:.3f}"
        )
    console.print(f"saved: {path}" + (f"; simulator model: {sim_out}" if sim_out else ""))
    if plan is not None:
        at_one = plan_load(window, calibration, speed=1.0, duration_s=duration)
        console.print(
            f"{trace}: load {at_one.load:.2f} at speed 1; load {plan.load:.2f} at speed {plan.speed:.4g} "
            f"({plan.requests:,} requests, {plan.rate_rps:.1f}/s)"
        )
