"""`python -m marllb_cli.deploy.node.cli` (`marllb node`): what runs *on* a `kind: ssh` host or KVM guest,
called by `marllb deploy`, `lb start`, `status` and `teardown` over SSH. Each command acts on this host only
and keeps its record in the node's state directory (`<workdir>/<testbed>`, `--state`), so `down` removes
exactly what `up` and `lb-start` made.

    claim     make the state directory (with marllb's marker), or accept ours; refuse anything else
    up        make this host the config's node NAME (`deploy.roles`: routes, VIP, sysctls, nftables), and on
              a server Apache inside its CPU cgroup; idempotent (same config and healthy: nothing to do).
              Prints the node's facts as JSON (the MAC of its data interface, which the LBs need).
    lb-start  start this LB's dataplane and agent from the specs the controller uploaded
    lb-stop   stop them
    lb-stats  JSON: this LB's processes, method, weights and per-server counters (`marllb lb stats`)
    status    JSON: whether the node is set up, and for a server whether Apache answers
    usage     JSON: a server's CPU counters (CPU seconds used, CFS throttling)
    events    a run's timed events on this host, one JSON line each on stdin (`node.faults`): a quota, a
              hog, Apache down or up, the router's route, an agent killed, a link shaped; the controller
              sends absolute values
    stop-clients  stop the replayers and samplers a previous controller left running on this (client) host
    down      stop those, undo everything in the record, newest first, and remove the state directory

The logic is the local testbed's own (`roles.apply_role`, `server.start_server`, `lbs.start_lb`,
`undo.teardown_recorded`), run on `LocalHost` instead of a namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from marllb_cli.cli_support import reports_errors
from marllb_cli.config import Config, ServerGroup, load_config
from marllb_cli.deploy.node import faults, mediawiki
from marllb_cli.deploy.node.apache import ApacheInstance, install_docroot
from marllb_cli.deploy.node.cgroups import CpuCgroup
from marllb_cli.deploy.node.manifest import MANIFEST, Manifest, require_complete
from marllb_cli.deploy.node.owned import claim
from marllb_cli.deploy.node.roles import apply_role, missing_changes, route_replace
from marllb_cli.deploy.node.server import services_running, start_server
from marllb_cli.deploy.node.undo import teardown_recorded
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.probes import http_get
from marllb_cli.services import stop_recorded_clients
from marllb_cli.topology import Node, plan

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Node-level operations (run by marllb over SSH).")
StateOption = Annotated[Path, typer.Option("--state", help="This node's state directory for the testbed.")]
ConfigOption = Annotated[Path, typer.Option("--config", help="The testbed's resolved config, as uploaded.")]
NodeOption = Annotated[str, typer.Option("--node", help="Which node of the config this host is (lb0, srv1, ...).")]


@app.command()
@reports_errors
def up(config: ConfigOption, node: NodeOption, state: StateOption) -> None:
    """Set this host up as NODE; print its facts as JSON."""
    cfg = load_config(config)
    me = _node(cfg, node)
    digest = hashlib.sha256(f"{node}\n{cfg.testbed.model_dump_json()}".encode()).hexdigest()[:16]
    cfg = _with_uploaded_dumps(cfg, state)
    manifest = Manifest.load(state / MANIFEST)
    if manifest is not None:
        if manifest.complete and manifest.config_digest == digest and _healthy(cfg, me, state, manifest):
            typer.echo(json.dumps({**_facts(me), "changed": False}))
            return
        # Undo the old set-up but keep the directory: its marker and the config the controller just uploaded.
        teardown_recorded(state / MANIFEST, state, keep_directory=True)
    manifest = Manifest(state / MANIFEST, cfg.testbed.name, config_digest=digest)
    manifest.save()
    try:
        apply_role(LocalHost(), plan(cfg.testbed), me, manifest, kernel_gre=cfg.testbed.forwarding == "gre")
        if me.role == "server":
            if _group(cfg, me).app == "mediawiki":
                mediawiki.ensure_packages(LocalHost())
            manifest.record("directory", "www", path=str(state / "www"))
            install_docroot(state / "www")
            start_server(_apache(cfg, me, state), cfg.testbed, manifest)
    except BaseException:
        _down(state)
        raise
    manifest.complete = True
    manifest.save()
    typer.echo(json.dumps({**_facts(me), "changed": True}))


@app.command("claim")
@reports_errors
def claim_command(
    state: StateOption,
    owner: Annotated[str, typer.Option(help="Who the directory is for (testbed NAME).")],
) -> None:
    """Make this node's state directory for OWNER (with marllb's marker), or accept it when it is already
    theirs; refuse a directory marllb did not make, so `down` never deletes what was there before."""
    claim(state, owner)


@app.command("lb-start")
@reports_errors
def lb_start(
    state: StateOption,
    dataplane: Annotated[Path, typer.Option(help="The dataplane spec (JSON).")],
    agent: Annotated[Path, typer.Option(help="The agent spec (JSON).")],
    coordinator: Annotated[
        Path | None, typer.Option(help="A training episode's coordinator spec (JSON), started first, here.")
    ] = None,
) -> None:
    """Start this LB's dataplane and agent (and a training episode's coordinator), replacing running ones."""
    from marllb_cli.agents.runner import AgentSpec
    from marllb_cli.coordination.coordinator import CoordinatorSpec
    from marllb_cli.dataplane.fastpath import DataplaneSpec
    from marllb_cli.deploy.node.lbs import start_coordinator, start_lb, stop_lbs

    manifest = _deployed(state)
    stop_lbs(manifest)
    dataplane_spec = DataplaneSpec.model_validate_json(dataplane.read_text())
    agent_spec = AgentSpec.model_validate_json(agent.read_text())
    try:
        if coordinator is not None:
            spec = CoordinatorSpec.model_validate_json(coordinator.read_text())
            start_coordinator(LocalHost(), manifest, spec, agent_spec.lb, state / "lb")
        start_lb(LocalHost(), manifest, dataplane_spec, agent_spec, state / "lb")
    except BaseException:
        stop_lbs(manifest)
        raise


@app.command("lb-stop")
@reports_errors
def lb_stop(state: StateOption) -> None:
    """Stop this LB's dataplane and agent; print how many processes were running."""
    from marllb_cli.deploy.node.lbs import stop_lbs

    manifest = Manifest.load(state / MANIFEST)
    typer.echo(json.dumps({"stopped": stop_lbs(manifest) if manifest else 0}))


@app.command("lb-stats")
@reports_errors
def lb_stats(config: ConfigOption, node: NodeOption, state: StateOption) -> None:
    """Print this LB's snapshot (processes, method, weights, per-server counters) as JSON."""
    from marllb_cli.deploy.node.lbs import read_snapshot

    cfg = load_config(config)
    servers = [server.name for server in plan(cfg.testbed).servers]
    snapshot = read_snapshot(cfg.testbed.name, _node(cfg, node).name, _deployed(state))
    typer.echo(json.dumps(snapshot.as_json(servers)))


@app.command()
@reports_errors
def usage(config: ConfigOption, node: NodeOption, state: StateOption) -> None:
    """JSON: this server's CPU counters (`CpuCgroup.usage`: CPU seconds, CFS periods and throttling)."""
    cfg = load_config(config)
    me = _node(cfg, node)
    if me.role != "server":
        raise TestbedError(f"{node} is a {me.role}; only servers have a CPU quota")
    typer.echo(json.dumps(_apache(cfg, me, state).cgroup.usage().as_json()))


@app.command("events")
@reports_errors
def events_command(config: ConfigOption, node: NodeOption, state: StateOption) -> None:
    """Apply timed events to this node as they come: one JSON object a line on stdin ({"kind": "quota", "hog",
    "apache", "route", "kill-agent" or "shape"; "value": quota/hog cores, apache 1 up or 0 down, shape Mbit/s;
    "gateways": route's LB addresses; "lifetime": a hog's seconds at most}), each answered by one line,
    {"ok": true} or {"ok": false, "error": "..."}, until stdin closes. One process serves a whole run, so an
    event costs its change and not a Python start (about a second on a loaded host). A hog started here
    outlives it: it ends after its lifetime, at a hog event of value 0, or at `node down`."""
    cfg = _with_uploaded_dumps(load_config(config), state)
    me = _node(cfg, node)
    # The answers get their own copy of stdout (not inherited); whatever an action or a process it starts
    # prints goes to stderr, the log, and cannot come between the controller and its answers.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            _apply_event(cfg, me, state, request["kind"], **{k: v for k, v in request.items() if k != "kind"})
            answer: dict[str, object] = {"ok": True}
        except Exception as exc:  # the controller records the event as failed; the next one may work
            answer = {"ok": False, "error": str(exc) or type(exc).__name__}
        answers.write(json.dumps(answer) + "\n")


def _apply_event(
    cfg: Config, me: Node, state: Path, kind: str, value: float = 0.0, gateways: str = "", lifetime: float = 3600.0
) -> None:
    manifest = _deployed(state)
    host = LocalHost()
    if kind == "quota":
        faults.set_capacity(_apache(cfg, me, state).cgroup, value, cfg.testbed.cpu_period_us)
    elif kind == "hog" and value > 0:
        cgroup = _apache(cfg, me, state).cgroup
        faults.start_hog(host, manifest, me.name, cgroup, value, state / "faults", lifetime_s=lifetime, tied=False)
    elif kind == "hog":
        faults.stop_hog(manifest, me.name)
    elif kind == "apache":
        instance = _apache(cfg, me, state)
        faults.server_up(instance, cfg.testbed) if value else faults.server_down(instance)
    elif kind == "route":
        host.call(route_replace, f"{plan(cfg.testbed).vip}/32", gateways.split(","))
    elif kind == "kill-agent":
        faults.kill_agent(manifest, me.name)
    elif kind == "shape":
        faults.shape_link(host, me.interfaces[0].name, value)
    else:
        raise TestbedError(f"node events: unknown kind {kind!r}")


@app.command()
@reports_errors
def status(config: ConfigOption, node: NodeOption, state: StateOption) -> None:
    """Print {"deployed": bool, "up": bool, "http_status": int|null} for this node."""
    cfg = load_config(config)
    me = _node(cfg, node)
    manifest = Manifest.load(state / MANIFEST)
    deployed = manifest is not None and manifest.complete
    report: dict[str, object] = {"deployed": deployed, "up": deployed, "http_status": None, "missing": []}
    if deployed and manifest is not None:
        report["missing"] = missing = missing_changes(LocalHost(), me, manifest)
        report["up"] = not missing
        if me.role == "server":
            report["http_status"] = _http_status(me)
            report["up"] = not missing and report["http_status"] == 200 and services_running(manifest, me.name)
    typer.echo(json.dumps(report))


@app.command()
@reports_errors
def down(state: StateOption) -> None:
    """Undo everything this node's record lists and remove its state directory."""
    typer.echo(json.dumps({"removed": _down(state)}))


# -- helpers ---------------------------------------------------------------------------------------------------
def _node(cfg: Config, name: str) -> Node:
    """The config's node `name`, as this host: its own network, whatever namespace a local plan names."""
    try:
        return replace(plan(cfg.testbed).node(name), namespace="")
    except KeyError:
        raise TestbedError(f"node {name!r} is not in testbed {cfg.testbed.name}") from None


def _with_uploaded_dumps(cfg: Config, state: Path) -> Config:
    """The config with each MediaWiki dump path replaced by where the controller uploaded that dump."""
    groups = [
        group.model_copy(
            update={
                "mediawiki": group.mediawiki.model_copy(
                    update={"dump": Path(mediawiki.uploaded_dump(str(state), group.name))}
                )
            }
        )
        if group.app == "mediawiki" and group.mediawiki.dump is not None
        else group
        for group in cfg.testbed.servers
    ]
    return cfg.model_copy(update={"testbed": cfg.testbed.model_copy(update={"servers": groups})})


def _apache(cfg: Config, server: Node, state: Path) -> ApacheInstance:
    group = _group(cfg, server)
    # One flat cgroup per node: hosts that share a cgroup tree (containers, tests) never share a parent.
    cgroup = CpuCgroup.at(f"marllb-{cfg.testbed.name}-{server.name}")
    vip = str(plan(cfg.testbed).vip)
    return ApacheInstance(node=server, group=group, root=state / server.name, www=state / "www", cgroup=cgroup, vip=vip)


def _group(cfg: Config, server: Node) -> ServerGroup:
    group = cfg.testbed.group(server.group)
    if group is None:
        raise TestbedError(f"node {server.name} is not a server of testbed {cfg.testbed.name}")
    return group


def _deployed(state: Path) -> Manifest:
    return require_complete(
        state / MANIFEST, f"the testbed under {state} on this host", hint="run `marllb deploy` first"
    )


@app.command("stop-clients")
@reports_errors
def stop_clients(state: StateOption) -> None:
    """Stop the replayers and samplers of earlier runs still running here; print how many as JSON."""
    typer.echo(json.dumps({"stopped": stop_recorded_clients(state / "runs")}))


def _down(state: Path) -> int:
    stop_recorded_clients(state / "runs")
    return teardown_recorded(state / MANIFEST, state)


def _healthy(cfg: Config, me: Node, state: Path, manifest: Manifest) -> bool:
    """Whether a completed set-up is still in effect (after a host reboot the record says complete, but
    routes, addresses, nftables and sysctls are gone)."""
    if missing_changes(LocalHost(), me, manifest):
        return False
    if me.role != "server":
        return True
    running = bool(_apache(cfg, me, state).cgroup.pids()) and services_running(manifest, me.name)
    return running and _http_status(me) == 200


def _http_status(me: Node) -> int | None:
    """GET / from the server itself. 5 s: a server held to a fraction of a core (its cgroup) can be slow to
    answer while Apache forks its spare workers, and that is not "down"."""
    try:
        return http_get(LocalHost(), str(me.ip), 80, "/", timeout=5.0)[0]
    except OSError:
        return None


def _facts(me: Node) -> dict[str, str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=me.interfaces[0].name)
        if not found:
            raise TestbedError(f"{me.name}: interface {me.interfaces[0].name} does not exist on this host")
        mac = ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")
    return {"node": me.name, "mac": mac}


if __name__ == "__main__":
    app(prog_name="marllb-node")
