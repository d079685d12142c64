"""`marllb bench`: dataplane, replayer, simulator, policies, fidelity and sweep benchmarks (figures for
docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.agents.methods import SIM_METHODS, resolve_method
from marllb_cli.cli_support import (
    ConfigArg,
    JsonOption,
    SetOption,
    console,
    err_console,
    load,
    print_table,
    reports_errors,
    work_status,
)
from marllb_cli.errors import ConfigError, MissingTool

bench_app = typer.Typer(help="Benchmarks; their figures are recorded in docs/benchmarks.md.", no_args_is_help=True)


@bench_app.command()
@reports_errors
def dataplane(
    duration: Annotated[
        float, typer.Option("--duration", help="Seconds of traffic per measured point.", min=0.5)
    ] = 3.0,
    no_search: Annotated[bool, typer.Option("--no-search", help="Skip the search for the loss-free rate.")] = False,
    decisions_only: Annotated[bool, typer.Option("--decisions-only", help="Only time the selection.")] = False,
    json_: JsonOption = False,
) -> None:
    """Packets/s through marllb's fast path vs scapy vs the kernel; ns per new-flow decision (needs root)."""
    from marllb_cli.bench.dataplane import decision_benchmark, forwarding_benchmark, report_json

    forwarding = []
    if not decisions_only:
        if os.geteuid() != 0:
            raise MissingTool(
                "the forwarding benchmark builds namespaces and needs root", hint="sudo, or --decisions-only"
            )
        with work_status("forwarding benchmark") as status:
            forwarding = forwarding_benchmark(duration, lossless_search=not no_search, progress=status)
    with work_status("decision benchmark"):
        decisions = decision_benchmark()
    if json_:
        print(report_json(forwarding, decisions))
        return
    if forwarding:
        table = Table(title="forwarding (one-armed, 64-byte TCP payload, 1 000 tracked flows)")
        for column in ("forwarder", "offered pkt/s", "delivered pkt/s", "loss", "CPU ns/pkt"):
            table.add_column(column, justify="left" if column == "forwarder" else "right")
        for r in forwarding:
            table.add_row(
                r.forwarder,
                f"{r.offered_pps:,.0f}",
                f"{r.delivered_pps:,.0f}" + (" (all)" if r.sink_saw_everything else ""),
                f"{r.loss:.1%}",
                "" if r.cpu_ns_per_packet is None else f"{r.cpu_ns_per_packet:,.0f}",
            )
        console.print(table)
    table = Table(title="new-flow decision cost (ns)")
    for column in ("method", "servers", "choose", "SYN through flow table"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for d in decisions:
        table.add_row(d.method, str(d.servers), f"{d.choose_ns:,.0f}", f"{d.syn_ns:,.0f}")
    console.print(table)
    err_console.print("record these figures with the command line in docs/benchmarks.md")


@bench_app.command()
@reports_errors
def replay(
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds of traffic per offered rate.", min=0.5)] = 3.0,
    json_: JsonOption = False,
) -> None:
    """Highest open-loop rate of the replayer on one core with p99 send lag < 2 ms, next to wrk (needs root)."""
    from marllb_cli.bench.replay import replay_benchmark

    if os.geteuid() != 0:
        raise MissingTool("the replay benchmark deploys a bench testbed and needs root", hint="run it with sudo")
    with work_status("replay benchmark") as status:
        result = replay_benchmark(seconds, progress=status)
    if json_:
        print(json.dumps(result, indent=2))
        return
    table = Table(title="open-loop replayer, 1 KiB static page, new connection per request, CPU 0")
    for column in ("generator", "offered/s", "completed/s", "send lag p99 (ms)", "failed", "p99 < 2 ms"):
        table.add_column(column, justify="left" if column == "generator" else "right")
    for p in result["replayer"]:
        table.add_row(
            p["generator"],
            f"{p['offered_per_s']:,.0f}",
            f"{p['completed_per_s']:,.0f}",
            f"{p['lag_p99_ms']:.2f}",
            f"{p['errors']:.1%}",
            "yes" if p["passed"] else "[red]no[/]",
        )
    wrk = result["wrk"]
    rate = wrk["requests_per_s"]
    table.add_row(wrk["generator"], "", "" if rate is None else f"{rate:,.0f}", "", wrk["errors"] or "", "")
    console.print(table)
    for generator, rate in result["max_rate"].items():
        console.print(f"{generator}: max open-loop rate with p99 send lag < 2 ms {rate:,.0f} requests/s")
    err_console.print("record these figures with the command line in docs/benchmarks.md")


@bench_app.command()
@reports_errors
def sim(
    config: ConfigArg = Path("configs/sim-moderate.yaml"),
    duration: Annotated[float, typer.Option(help="Simulated seconds of arrivals.", min=1)] = 300.0,
    json_: JsonOption = False,
) -> None:
    """Simulated requests per wall second: marllb (full and event core, compiled and Python) next to SimPy."""
    from marllb_cli.bench.sim import as_dicts, sim_benchmark

    # No spinner: its refresh thread would take the interpreter lock from the simulators being timed.
    err_console.print(f"simulating {duration:g} s of {config} with each simulator, best of 3 runs …")
    results = sim_benchmark(load(config, None), duration)
    if json_:
        print(json.dumps(as_dicts(results), indent=2))
        return
    table = Table(title=f"{config}: {results[-1].requests:,} requests over {duration:g} simulated s")
    for column in ("simulator", "wall s", "requests / wall s", "× SimPy", "mean JCT (ms)"):
        table.add_column(column, justify="left" if column == "simulator" else "right")
    simpy_rate = results[-1].requests_per_wall_s
    for r in results:
        if not r.requests:  # the compiled loop's loading time
            err_console.print(f"{r.simulator}: {r.wall_s:.2f} s, not counted below")
            continue
        table.add_row(
            r.simulator,
            f"{r.wall_s:.3f}",
            f"{r.requests_per_wall_s:,.0f}",
            f"{r.requests_per_wall_s / simpy_rate:.1f}",
            f"{r.jct_mean_s * 1e3:.2f}",
        )
    console.print(table)
    err_console.print("record these figures with the command line in docs/benchmarks.md")


@bench_app.command()
@reports_errors
def policies(
    config: ConfigArg,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", metavar="NAME=DIR", help="A trained policy (marllb train --out DIR)."),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            help="A further method to evaluate beside the defaults, e.g. oracle-weights (the best SED weights "
            "found by looking ahead; minutes per run).",
        ),
    ] = None,
    duration: Annotated[float, typer.Option(help="Simulated seconds per evaluation run.", min=1)] = 60.0,
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds",
            help="test (10 000 … 10 004: what results are reported on) or validation (20 000 … 20 004: what "
            "settings are chosen on; never report a choice on the seeds that made it).",
        ),
    ] = "test",
    set_: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Oracles, heuristics and trained policies on the same 5 unseen request seeds: mean and p99 JCT."""
    from marllb_cli.bench.policies import DEFAULT_METHODS, evaluate
    from marllb_cli.bench.policies import as_dicts as policy_dicts
    from marllb_cli.seeds import SEED_SETS

    if seeds not in SEED_SETS:
        raise ConfigError(f"--seeds {seeds!r}: unknown", hint=f"choose one of {', '.join(SEED_SETS)}")
    chosen = SEED_SETS[seeds]

    extras = [resolve_method(m, SIM_METHODS) for m in dict.fromkeys(method or [])]
    methods = (*DEFAULT_METHODS, *(m for m in extras if m not in DEFAULT_METHODS))
    trained = {}
    for item in policy or []:
        name, sep, directory = item.partition("=")
        if not sep:
            raise ConfigError(f"--policy {item!r}: expected NAME=DIR")
        trained[name] = Path(directory)
    with work_status("evaluating"):
        results = evaluate(load(config, set_), trained, methods=methods, seeds=chosen, duration_s=duration)
    if json_:
        print(json.dumps(policy_dicts(results), indent=2))
        return
    title = f"{config}: {seeds} seeds {chosen[0]}–{chosen[-1]} × {duration:g} s; ratios paired by seed, 95 % CI"
    table = Table(title=title)
    columns = ("policy", "mean JCT (ms)", "p99 JCT (ms)", "mean / sed", "p99 / sed", "refused", "training")
    for column in columns:
        table.add_column(column, justify="left" if column == "policy" else "right")

    def ratio(value: float | None, ci: tuple[float, float] | None) -> str:
        if value is None:
            return ""
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None and value != 1.0 else "")

    for r in results:
        training = f"{r.train_episodes} ep, {r.train_wall_s / 60:.1f} min" if r.train_wall_s is not None else ""
        refused = f"{r.rejected:,} of {r.requests:,}"
        table.add_row(
            r.name, f"{r.jct_mean_ms:.1f}", f"{r.jct_p99_ms:.0f}", ratio(r.mean_vs_sed, r.mean_vs_sed_ci),
            ratio(r.p99_vs_sed, r.p99_vs_sed_ci), refused, training,
        )  # fmt: skip
    print_table(table)
    err_console.print("record these figures with the command line in docs/benchmarks.md")


@bench_app.command()
@reports_errors
def sweep(
    config: ConfigArg = Path("configs/sim-moderate.yaml"),
    cells: Annotated[int, typer.Option(help="Cells per sweep (the 4 heuristics × enough seeds).", min=4)] = 12,
    cell_s: Annotated[float, typer.Option("--cell-s", help="Simulated seconds of a long cell.", min=1)] = 1200.0,
    json_: JsonOption = False,
) -> None:
    """Cells per minute of `marllb sweep` with 1 and 2 local workers and on a Ray started for it, and each
    backend's cost per cell (one-second cells). Every cell runs again (--force), workers' start included."""
    import importlib.util

    from marllb_cli.bench.sweep import sweep_benchmark

    backends = ("local", "ray") if importlib.util.find_spec("ray") else ("local",)
    if backends == ("local",):
        err_console.print("ray is not installed: the local pool only (pip install 'marllb[ray]')")
    err_console.print(f"sweeping {cells} cells of {cell_s:g} s and of 1 s on {config} with {', '.join(backends)} …")
    rows = sweep_benchmark(config, cells, cell_s, backends)
    if json_:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    table = Table(title=f"marllb sweep on {config}: {rows[0].cells} cells")
    for column in ("backend", "workers", "cell (sim s)", "wall s", "cells / min", "wall s / cell", "× 1 worker"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    single = {row.cell_s: row.wall_s for row in rows if row.backend == "local" and row.workers == 1}
    for row in rows:
        table.add_row(
            row.backend,
            str(row.workers),
            f"{row.cell_s:g}",
            f"{row.wall_s:.1f}",
            f"{row.cells_per_minute:.0f}",
            f"{row.wall_per_cell_s:.2f}",
            f"{single[row.cell_s] / row.wall_s:.2f}",
        )
    console.print(table)
    err_console.print("record these figures with the command line in docs/benchmarks.md")


@bench_app.command()
@reports_errors
def fidelity(
    config: ConfigArg,
    trace: Annotated[Path, typer.Option("--trace", "-t", help="The trace both sides replay.")],
    load_: Annotated[
        list[float] | None, typer.Option("--load", help="Offered load (repeatable; default 0.7 and 0.9).")
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", "-m", help="Methods (repeatable; default ecmp wcmp lsq sed awcmp; rl:DIR too)."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Runs of every method at every load on each side.", min=1)] = 3,
    duration: Annotated[float, typer.Option(help="Seconds of each replay (and of each simulation).", min=1)] = 30.0,
    start: Annotated[float, typer.Option(help="Skip the trace's first S seconds.", min=0)] = 0.0,
    out: Annotated[Path, typer.Option("--out", help="Where runs, models and fidelity.json go.")] = Path("fidelity"),
    set_: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Testbed against simulator, method by method: calibrate the deployed testbed, then replay and simulate
    the same requests at each load (at the calibrated cost, and at the cost the testbed paid); mean / p90 /
    p99 JCT, errors, request shares, stability, the ratios testbed / sim and each side's ranking (root;
    minutes: loads × methods × repeats × duration)."""
    from marllb_cli.bench.fidelity import FIDELITY_METHODS
    from marllb_cli.bench.fidelity import fidelity as run_fidelity
    from marllb_cli.deploy import testbed_for
    from marllb_cli.deploy.base import exclusive_use

    loads = load_ or [0.7, 0.9]
    methods = [resolve_method(m) for m in dict.fromkeys(method or FIDELITY_METHODS)]
    cfg = load(config, set_)
    # Another command measuring on the testbed: refused in one line, before the display.
    with exclusive_use(testbed_for(cfg)), work_status("fidelity") as status:
        report = run_fidelity(
            cfg,
            trace,
            loads=loads,
            methods=methods,
            repeats=repeats,
            duration_s=duration,
            start_s=start,
            out=out,
            progress=status,
        )
    if json_:
        print(json.dumps(report, indent=1))
        return
    print_fidelity(report)
    console.print(f"written: {out / 'fidelity.json'}")
    err_console.print("record these figures with the command line in docs/benchmarks.md")


def print_fidelity(report: dict) -> None:
    """`bench fidelity`'s tables, one per load, from its report (`fidelity.json`)."""
    from marllb_cli.bench.fidelity import stability

    for entry in report["loads"]:
        title = f"load {entry['load']:g} (speed {entry['speed']:.3g}), {report['repeats']} runs each: JCT in ms"
        table = Table(title=title)
        columns = ("method", "testbed mean ± sd", "sim mean ± sd", "tb / sim", "tb / sim cal", "tb p99", "sim p99")
        columns = (*columns, "errors tb/sim")
        for column in (*columns, "unstable tb/sim"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in entry["methods"]:
            tb, sim = row["testbed"], row["sim"]
            table.add_row(
                row["method"],
                _mean_sd(tb),
                _mean_sd(sim),
                "" if row["ratio"] is None else f"{row['ratio']:.2f}",
                "" if row["ratio_calibrated"] is None else f"{row['ratio_calibrated']:.2f}",
                _ms(tb["jct_p99_s"]),
                _ms(sim["jct_p99_s"]),
                f"{tb['error_rate']:.1%} / {sim['error_rate']:.1%}",
                f"{stability(tb)} / {stability(sim)}",
            )
        console.print(table)
        ranking = entry["ranking"]
        same = "same" if ranking["testbed"] == ranking["sim"] else "different"
        console.print(f"ranking ({same}): testbed {' < '.join(ranking['testbed'])}; sim {' < '.join(ranking['sim'])}")
        console.print(
            f"sim: at the cost the testbed paid ({entry['cost_scale']:.2f} × calibrated, so an offered load of "
            f"≈ {entry['load'] * entry['cost_scale']:.2f}); sim cal: at the calibrated cost"
        )
        if abs(entry["cost_scale"] - 1) > COST_DRIFT_WARNING:
            err_console.print(
                f"warning: at load {entry['load']:g} the requests cost {entry['cost_scale']:.2f} × the calibration "
                f"made minutes before: this machine's CPU speed moved, and the testbed ran at ≈ "
                f"{entry['load'] * entry['cost_scale']:.2f}, not {entry['load']:g}; 'tb / sim' compares at that load"
            )


#: A testbed whose requests cost more than this share away from the calibration did not run at the load asked for.
COST_DRIFT_WARNING = 0.1


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.0f}"


def _mean_sd(side: dict) -> str:
    spread = side["jct_mean_std_s"]
    return _ms(side["jct_mean_s"]) + ("" if spread is None else f" ± {spread * 1e3:.0f}")
