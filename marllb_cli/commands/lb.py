"""`marllb lb start|stop|stats`: the LBs of a deployed local testbed (one dataplane + one agent per LB)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.agents.heuristics import HEURISTICS
from marllb_cli.cli_support import ConfigArg, JsonOption, SetOption, console, load, reports_errors
from marllb_cli.deploy import LocalTestbed, lb_services_for
from marllb_cli.deploy.lb_services import LbServices, LbSnapshot
from marllb_cli.errors import TestbedError

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
    services = lb_services_for(cfg)
    replaced = services.start(method, period=period_ms / 1000, idle_timeout=idle_timeout, seed=cfg.experiment.seed)
    lbs = len(services.topology.lbs)
    note = f" (replaced {replaced} running)" if replaced else ""
    console.print(f"{lbs} LBs running {method} on testbed [bold]{services.topology.testbed}[/]{note}")


@lb_app.command()
@reports_errors
def stop(config: ConfigArg, set_: SetOption = None) -> None:
    """Stop every LB's agent and dataplane and remove their shared memory."""
    services = lb_services_for(load(config, set_))
    stopped = services.stop()
    console.print(f"stopped {stopped} LB processes" if stopped else "no LB process was running")


@lb_app.command()
@reports_errors
def stats(config: ConfigArg, json_: JsonOption = False, set_: SetOption = None) -> None:
    """Per-LB counters and, per server, on-going flows q_j, new flows and the current weights."""
    cfg = load(config, set_)
    if cfg.testbed.kind != "local":
        raise TestbedError("lb stats reads the LBs' shared memory: kind local only for now")
    services = LbServices(LocalTestbed(cfg))
    snapshots = services.snapshots()
    if json_:
        print(json.dumps([_as_json(s, services) for s in snapshots], indent=2))
        return
    servers = [server.name for server in services.topology.servers]
    for snap in snapshots:
        state = (
            ("dataplane up" if snap.dataplane_running else "[red]dataplane down[/]")
            + ", "
            + ("agent up" if snap.agent_running else "[yellow]agent down (weights held)[/]")
        )
        table = Table(title=f"{snap.lb}: {snap.method or '-'} — {state}")
        for column in ("server", "flows", "new flows", "packets", "weight"):
            table.add_column(column, justify="left" if column == "server" else "right")
        if snap.stats is not None:
            for j, name in enumerate(servers):
                table.add_row(
                    name,
                    str(snap.stats.flows[j]),
                    str(snap.stats.new_flows[j]),
                    str(snap.stats.packets[j]),
                    f"{snap.weights[j]:.3g}" if snap.weights else "",
                )
        console.print(table)
        if snap.stats is not None:
            counters = snap.stats.counters
            dropped = {k: v for k, v in counters.items() if k not in ("ok", "forwarded", "open") and v}
            console.print(
                f"  forwarded {counters['forwarded']}, open flows {counters['open']}"
                + (", " + ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "")
            )


def _as_json(snap: LbSnapshot, services: LbServices) -> dict:
    out = {
        "lb": snap.lb,
        "dataplane_running": snap.dataplane_running,
        "agent_running": snap.agent_running,
        "agent_heartbeat_age_s": snap.agent_heartbeat_age_s,
        "method": snap.method,
        "weights": snap.weights,
    }
    if snap.stats is not None:
        out["counters"] = snap.stats.counters
        out["servers"] = [
            {
                "name": server.name,
                "flows": int(snap.stats.flows[j]),
                "new_flows": int(snap.stats.new_flows[j]),
                "packets": int(snap.stats.packets[j]),
            }
            for j, server in enumerate(services.topology.servers)
        ]
    return out
