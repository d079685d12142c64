"""Remove what a manifest lists, newest first: the one teardown of the local and KVM testbeds and of a real
host's node state (`marllb node down`). Already-absent resources are fine, so a teardown that was interrupted can
simply run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from marllb_cli.deploy.node.apache import stop_apache
from marllb_cli.deploy.node.cgroups import CpuCgroup
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.deploy.node.owned import remove_owned
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost, LocalNamespace
from marllb_cli.processes import kill_pids
from marllb_cli.progress import Progress, no_progress
from marllb_cli.services import Service

__all__ = ["remove_resources", "teardown_recorded"]

_NETWORK_CHANGES = ("route", "address", "sysctl", "nft", "offloads", "link")


def teardown_recorded(
    manifest_path: Path, state_dir: Path, progress: Progress = no_progress, *, keep_directory: bool = False
) -> int:
    """The one teardown of a manifest (local and kvm testbeds, `marllb node down`): remove what it lists,
    newest first, then the state directory if marllb made it (`owned`); return how many resources it
    listed. An error leaves the manifest in place, so the teardown can run again. `keep_directory`: a
    redeploy over a broken set-up keeps the directory (its marker, the uploaded config) and drops the record."""
    manifest = Manifest.load(manifest_path)
    if manifest is None:
        if not keep_directory:
            remove_owned(state_dir)
        return 0
    errors = remove_resources(manifest, progress)
    if errors:
        raise TestbedError(f"teardown of {manifest.testbed} incomplete: {'; '.join(errors)}")
    if keep_directory or not remove_owned(state_dir):
        manifest_path.unlink(missing_ok=True)  # only the record goes (kept, or a directory marllb did not make)
    return len(manifest.resources)


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
                from marllb_cli.deploy.node.roles import undo_network  # pyroute2: only when there is one

                undo_network(host, resource.kind, resource.data)
        except (TestbedError, OSError) as exc:
            errors.append(exc.message if isinstance(exc, TestbedError) else f"{resource.kind} {resource.name}: {exc}")
        progress("teardown", done, len(resources))
    return errors
