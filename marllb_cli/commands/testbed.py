"""`marllb deploy|status|teardown`: a testbed's life, whatever its kind (`deploy.testbed_for`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from marllb_cli.cli_support import ConfigArg, JsonOption, SetOption, console, err_console, load, reports_errors
from marllb_cli.deploy import testbed_for

if TYPE_CHECKING:
    from marllb_cli.deploy.base import TestbedStatus

__all__ = ["deploy", "status", "teardown"]


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display driven by the library's `progress(stage, done, total)` callback."""
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


@reports_errors
def deploy(
    config: ConfigArg,
    accept_new_host_keys: Annotated[
        bool,
        typer.Option(
            "--accept-new-host-keys", help="kind ssh: trust and record host keys not yet in known_hosts (verify first)."
        ),
    ] = False,
    set_: SetOption = None,
) -> None:
    """Bring the testbed up: namespaces, links, routes, cgroups and one Apache per server (kind local), or
    the listed hosts over SSH (kind ssh: marllb installed into a venv there, roles, Apache). Idempotent."""
    cfg = load(config, set_)
    testbed = testbed_for(cfg, accept_new_host_keys=accept_new_host_keys)
    with _progress() as progress:
        outcome = testbed.deploy(progress)
    status = testbed.status()
    _render_status(status)
    console.print(f"testbed [bold]{status.testbed}[/] {outcome}: {status.state}")


@reports_errors
def status(config: ConfigArg, json_: JsonOption = False, set_: SetOption = None) -> None:
    """Show every node of the testbed and whether each server answers HTTP."""
    result = testbed_for(load(config, set_)).status()
    if json_:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        _render_status(result)


@reports_errors
def teardown(
    config: ConfigArg,
    purge: Annotated[
        bool, typer.Option("--purge", help="kind kvm: also remove the cached guest image (rebuilt next deploy).")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Remove every namespace, link, cgroup and process of the testbed, and nothing else (kind ssh: what
    marllb set up on each host; the venv it installed stays for the next deploy; kind kvm: the guests)."""
    testbed = testbed_for(load(config, set_))
    with _progress() as progress:
        removed = testbed.teardown(progress, purge=purge)
    name = testbed.topology.testbed
    console.print(
        f"testbed [bold]{name}[/] removed ({removed} resources)" if removed else f"testbed {name}: nothing to remove"
    )


def _render_status(status: TestbedStatus) -> None:
    """Human table; role and cores are in `--json` (the node name says the role, cpus the capacity)."""
    table = Table(title=f"testbed {status.testbed} — VIP {status.vip} — {status.state}")
    for column in ("node", "namespace", "ip", "cpus", "up", "http", "busy"):
        table.add_column(column, justify="right" if column in ("cpus", "http", "busy") else "left", no_wrap=True)
    for node in status.nodes:
        table.add_row(
            node.name,
            node.namespace,
            node.ip,
            "" if node.cpus is None else f"{node.cpus:g}",
            "[green]yes[/]" if node.up else "[red]no[/]",
            "" if node.http_status is None else str(node.http_status),
            "" if node.busy_workers is None else str(node.busy_workers),
        )
    console.print(table)
