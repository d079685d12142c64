"""Remove what a manifest lists, newest first: the one teardown of the local testbed and of a real host's
node state (`marllb node down`). Already-absent resources are fine, so a teardown that was interrupted can
simply run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from marllb_cli.deploy.apache import stop_apache
from marllb_cli.deploy.cgroups import CpuCgroup
from marllb_cli.deploy.manifest import Manifest
from marllb_cli.deploy.network import Progress
from marllb_cli.deploy.roles import undo_network
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost, LocalNamespace
from marllb_cli.processes import kill_pids
from marllb_cli.services import Service

__all__ = ["remove_resources"]

_NETWORK_CHANGES = ("route", "address", "sysctl", "nft", "offloads", "link")


def remove_resources(manifest: Manifest, progress: Progress, *, host: LocalHost | None = None) -> list[str]:
    """Undo every resource of `manifest` in reverse order; return the errors (one line each), if any.

    `host` is where recorded network changes are undone (a real host's own namespace by default)."""
    host = host or LocalHost()
    resources = list(reversed(manifest.resources))
    errors: list[str] = []
    for done, resource in enumerate(resources, 1):
        try:
            if resource.kind == "process":
                Service.from_record(resource.name, resource.data).stop()
            elif resource.kind == "file":
                Path(resource.data["path"]).unlink(missing_ok=True)
            elif resource.kind == "apache":
                cgroup = CpuCgroup(Path(resource.data["cgroup"]), resource.data["version"])
                stop_apache(cgroup, Path(resource.data["pidfile"]))
            elif resource.kind == "cgroup":
                CpuCgroup(Path(resource.data["path"]), resource.data["version"]).remove()
            elif resource.kind == "namespace":
                ns = LocalNamespace(resource.name)
                if ns.exists():
                    kill_pids(ns.pids)
                    ns.remove()
            elif resource.kind == "directory":
                shutil.rmtree(resource.data["path"], ignore_errors=True)
            elif resource.kind in _NETWORK_CHANGES:
                undo_network(host, resource.kind, resource.data)
        except (TestbedError, OSError) as exc:
            errors.append(exc.message if isinstance(exc, TestbedError) else f"{resource.kind} {resource.name}: {exc}")
        progress("teardown", done, len(resources))
    return errors
