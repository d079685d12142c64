"""`marllb lb start|stop|stats`: the LBs of a deployed testbed (one dataplane + one agent per LB)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.agents.methods import HEURISTICS, resolve_method
from marllb_cli.cli_support import ConfigArg, JsonOption, SetOption, console, load, reports_errors
from marllb_cli.deploy import testbed_for

lb_app = typer.Typer(help="Start, stop and inspect the load balancers of a deployed testbed.", no_args_is_help=True)

MethodOption = Annotated[
    str,
    typer.Option(
        "--method", "-m", help=f"How each LB picks servers: {', '.join(HEURISTICS)}, or rl:DIR (a trained policy)."
    ),
]


@lb_app.command()
@reports_errors
def start(
    config: ConfigArg,
    method: MethodOption = "sed",
    period_ms: Annotated[float, typer.Option("--period-ms", help="Agent step period.", min=10)] = 250.0,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="Seconds before an idle flow ends.", min=1)
    ] = 40.0,
    set_: SetOption = None,
) -> None:
    """Start a packet dataplane and an agent on every LB (replacing any already running)."""
    cfg = load(config, set_)
    resolved = resolve_method(method)
    lbs = testbed_for(cfg).lbs()
    replaced = lbs.start(resolved, period=period_ms / 1000, idle_timeout=idle_timeout, seed=cfg.experiment.seed)
    note = f" (replaced {replaced} running)" if replaced else ""
    console.print(f"{len(lbs.topology.lbs)} LBs running {method} on testbed [bold]{lbs.topology.testbed}[/]{note}")


@lb_app.command()
@reports_errors
def stop(config: ConfigArg, set_: SetOption = None) -> None:
    """Stop every LB's agent and dataplane and remove their shared memory."""
    stopped = testbed_for(load(config, set_)).lbs().stop()
    console.print(f"stopped {stopped} LB processes" if stopped else "no LB process was running")


@lb_app.command()
@reports_errors
def stats(config: ConfigArg, json_: JsonOption = False, set_: SetOption = None) -> None:
    """Per-LB counters and, per server, on-going flows q_j, new flows and the current weights."""
    reports = testbed_for(load(config, set_)).lbs().stats_json()
    if json_:
        print(json.dumps(reports, indent=2))
        return
    for report in reports:
        state = (
            ("dataplane up" if report["dataplane_running"] else "[red]dataplane down[/]")
            + ", "
            + ("agent up" if report["agent_running"] else "[yellow]agent down (weights held)[/]")
        )
        table = Table(title=f"{report['lb']}: {report['method'] or '-'} — {state}")
        for column in ("server", "flows", "new flows", "packets", "weight"):
            table.add_column(column, justify="left" if column == "server" else "right")
        weights = report["weights"] or []
        for j, server in enumerate(report.get("servers", [])):
            weight = f"{weights[j]:.3g}" if j < len(weights) else ""
            table.add_row(
                server["name"], str(server["flows"]), str(server["new_flows"]), str(server["packets"]), weight
            )
        console.print(table)
        counters = report.get("counters")
        if counters is not None:
            dropped = {k: v for k, v in counters.items() if k not in ("ok", "forwarded", "open") and v}
            console.print(
                f"  forwarded {counters['forwarded']}, open flows {counters['open']}"
                + (", " + ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "")
            )
