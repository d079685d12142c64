"""One server node, where it is: its CPU cgroup and Apache inside it (and MediaWiki's database and cache),
recorded before they exist, and whether what was recorded for it still runs. The local testbed calls these
for each server namespace; `marllb node up` and `status` on a server host.
"""

from __future__ import annotations

from marllb_cli.config import Testbed
from marllb_cli.deploy.node.apache import ApacheInstance
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.errors import TestbedError
from marllb_cli.services import Service

__all__ = ["services_running", "start_server"]


def start_server(instance: ApacheInstance, testbed: Testbed, manifest: Manifest) -> None:
    """One server's CPU cgroup (cores = cpus × cpu_unit) and Apache inside it, recorded before they exist."""
    cgroup, name = instance.cgroup, instance.node.name
    if cgroup.path.exists():  # checked before it is recorded: a teardown must never remove someone else's
        raise TestbedError(
            f"{name}: cgroup {cgroup.path} exists but this deploy did not create it",
            hint="another controller may run a testbed of this name on this host: choose another testbed.name, "
            "or remove the cgroup if nothing uses it",
        )
    manifest.record("cgroup", name, path=str(cgroup.path), version=cgroup.version)
    cgroup.create()
    cgroup.set_cores(instance.node.cores or 0.0, testbed.cpu_period_us)
    manifest.record("apache", name, cgroup=str(cgroup.path), version=cgroup.version, pidfile=str(instance.pidfile))
    instance.start(testbed)
    if instance.group.app == "mediawiki":
        # After Apache, so teardown (newest first) stops the database and cache before Apache's cgroup sweep.
        instance.mediawiki.start(instance.namespace, manifest)


def services_running(manifest: Manifest, node: str) -> bool:
    """Whether every process recorded for server `node` (GRE terminator, MariaDB, memcached) still runs."""
    services = [Service.from_record(r.name, r.data) for r in manifest.of_kind("process") if r.data.get("node") == node]
    return all(service.running() for service in services)
