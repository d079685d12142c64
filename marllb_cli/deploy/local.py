"""The local testbed's lifecycle: deploy (idempotent), status (probed), teardown (manifest-driven).

    deploy    preflight → refuse foreign namespaces → [unchanged? done] → remove leftovers → network →
              cgroups → Apache per server → mark complete
    teardown  reverse order over the manifest: stop Apache, empty and remove cgroups, kill what still runs
              inside our namespaces, delete the namespaces, then the state directory

A testbed only ever acts on names its manifest lists, so two testbeds with different names live side by side.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel
from pyroute2 import IPRoute

from marllb_cli.config import Config, ServerGroup, Testbed
from marllb_cli.dataplane.gre_terminator import TUN_NAME
from marllb_cli.deploy import mediawiki
from marllb_cli.deploy.apache import (
    ApacheInstance,
    apache_binary,
    busy_workers,
    http_get,
    install_docroot,
    php_module,
)
from marllb_cli.deploy.cgroups import CpuCgroup, cgroup_root
from marllb_cli.deploy.manifest import Manifest, state_root, testbed_digest
from marllb_cli.deploy.network import Progress, build_network, no_progress
from marllb_cli.deploy.undo import remove_resources
from marllb_cli.errors import ConfigError, MissingTool, NamespaceExists, TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.services import Service, start_service
from marllb_cli.topology import Node, Topology, plan

if TYPE_CHECKING:
    from marllb_cli.deploy.kvm import KvmTestbed

__all__ = ["LocalTestbed", "NodeStatus", "TestbedStatus", "DeployOutcome", "redeploy", "start_server"]

DeployOutcome = Literal["created", "unchanged", "rebuilt"]


class NodeStatus(BaseModel):
    """One node as `marllb status` reports it."""

    name: str
    role: Literal["client", "router", "lb", "server"]
    namespace: str
    ip: str
    cpus: float | None = None
    cores: float | None = None
    group: str | None = None
    up: bool = False
    http_status: int | None = None
    busy_workers: int | None = None
    error: str | None = None  # why the node could not be probed (kind ssh/kvm: SSH failed)

    @classmethod
    def of(cls, node: Node, *, up: bool = False) -> NodeStatus:
        """A node's entry before any probe."""
        return cls(
            name=node.name,
            role=node.role,
            namespace=node.namespace,
            ip=str(node.ip),
            cpus=node.cpus,
            cores=node.cores,
            group=node.group,
            up=up,
        )


class TestbedStatus(BaseModel):
    """The testbed as `marllb status --json` prints it."""

    __test__ = False

    testbed: str
    vip: str
    state: Literal["absent", "partial", "up", "degraded"]
    nodes: list[NodeStatus]


@dataclass
class LocalTestbed:
    """A testbed of network namespaces on this machine, described by `config`."""

    __test__ = False

    config: Config

    def __post_init__(self) -> None:
        if self.config.testbed.kind != "local":
            raise ConfigError(
                f"{self.config.source or 'config'}: testbed.kind: {self.config.testbed.kind} — this command "
                "works on kind local testbeds only for now",
                hint="use a local config (e.g. configs/local-small.yaml); kind ssh has deploy, status, lb start|stop "
                "and teardown",
            )
        self.topology: Topology = plan(self.config.testbed)
        self.state_dir: Path = state_root() / self.config.testbed.name
        self.manifest_path = self.state_dir / "manifest.json"

    # -- public operations -----------------------------------------------------------------------------
    def deploy(self, progress: Progress = no_progress) -> DeployOutcome:
        """Bring the testbed up; a no-op when it is already up with this config, a clean rebuild otherwise."""
        self._refuse_sim_only_settings()
        mediawiki.check_dumps(self.config)
        _preflight()
        if any(group.app == "mediawiki" for group in self.config.testbed.servers):
            if not mediawiki.installed():
                raise MissingTool(
                    "app: mediawiki needs MediaWiki, MariaDB and memcached on this machine",
                    hint=f"run `make system-deps` (apt-get install {' '.join(mediawiki.PACKAGES)})",
                )
        manifest = Manifest.load(self.manifest_path)
        self._refuse_foreign(manifest)
        outcome = redeploy(self, manifest, progress)
        if outcome == "unchanged":
            return outcome
        manifest = Manifest(
            self.manifest_path, self.config.testbed.name, config_digest=testbed_digest(self.config.testbed)
        )
        manifest.save()
        try:
            (self.state_dir / "config.yaml").write_text(self.config.resolved_yaml())
            build_network(self.topology, manifest, progress)
            self._start_servers(manifest, progress)
        except BaseException:
            # Nothing half-built stays behind: remove whatever the manifest lists, then re-raise.
            self.teardown()
            raise
        manifest.complete = True
        manifest.save()
        return outcome

    def teardown(self, progress: Progress = no_progress) -> int:
        """Remove everything the manifest lists, in reverse; return how many resources were removed."""
        manifest = Manifest.load(self.manifest_path)
        if manifest is None:
            return 0
        resources = len(manifest.resources)
        errors = remove_resources(manifest, progress)
        if errors:
            raise TestbedError(f"teardown of {manifest.testbed} incomplete: {'; '.join(errors)}")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return resources

    def status(self, *, probe: bool = True) -> TestbedStatus:
        """Which nodes exist and, with `probe`, whether each server answers HTTP (and how busy it is)."""
        manifest = Manifest.load(self.manifest_path)
        nodes = [self._node_status(node, manifest, probe) for node in self.topology.nodes]
        if manifest is None:
            state = "absent"
        elif not manifest.complete:
            state = "partial"
        else:
            state = "up" if all(node.up for node in nodes) else "degraded"
        return TestbedStatus(testbed=self.topology.testbed, vip=str(self.topology.vip), state=state, nodes=nodes)

    def apache(self, server: Node) -> ApacheInstance:
        """The Apache instance of one server node."""
        return ApacheInstance(
            node=server,
            group=self._group(server),
            root=self.state_dir / server.name,
            www=self.state_dir / "www",
            cgroup=CpuCgroup.at(f"marllb-{self.topology.testbed}/{server.name}"),
            vip=str(self.topology.vip),
        )

    # -- steps -----------------------------------------------------------------------------------------
    def _start_servers(self, manifest: Manifest, progress: Progress) -> None:
        testbed = self.config.testbed
        www = self.state_dir / "www"
        manifest.record("directory", "www", path=str(www))
        install_docroot(www)
        servers = self.topology.servers
        parent = CpuCgroup.at(f"marllb-{testbed.name}")
        manifest.record("cgroup", parent.path.name, path=str(parent.path), version=parent.version)
        parent.create()
        for done, server in enumerate(servers, 1):
            start_server(self.apache(server), testbed, manifest)
            progress("apache servers", done, len(servers))
        if testbed.forwarding == "gre":
            for done, server in enumerate(servers, 1):
                self._start_gre_terminator(server, manifest)
                progress("GRE terminators", done, len(servers))

    def _start_gre_terminator(self, server: Node, manifest: Manifest) -> None:
        """User-space GRE termination (this kernel has no ip_gre): see `dataplane.gre_terminator`."""
        ns = LocalNamespace(server.namespace)
        service = start_service(
            ns,
            f"gre-{server.name}",
            "marllb_cli.dataplane.gre_terminator",
            ["--vip", str(self.topology.vip)],
            self.state_dir / server.name / "logs" / "gre.log",
        )
        # Recorded once the pid exists; if we crash in between, teardown still kills it with the namespace.
        manifest.record("process", service.name, node=server.name, **service.as_record())
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and service.running():
            if ns.call(_has_link, TUN_NAME):
                return
            time.sleep(0.05)
        raise TestbedError(f"{server.name}: GRE terminator did not start: {service.log_tail(1) or 'no log output'}")

    def _node_status(self, node: Node, manifest: Manifest | None, probe: bool) -> NodeStatus:
        status = NodeStatus.of(node)
        if manifest is None or not LocalNamespace(node.namespace).exists():
            return status
        if node.role != "server":
            status.up = True
            return status
        instance = self.apache(node)
        status.up = bool(instance.cgroup.pids()) and services_running(manifest, node.name)
        if probe and status.up:
            client = LocalNamespace(self.topology.client.namespace)
            try:
                status.http_status, _, _ = http_get(client, str(node.ip), 80, "/", timeout=2.0)
                status.busy_workers = busy_workers(client, str(node.ip), instance.group.apache.status_port)
            except OSError:
                status.http_status = None
            status.up = status.http_status == 200
        return status

    # -- helpers ---------------------------------------------------------------------------------------
    def _group(self, server: Node) -> ServerGroup:
        return next(group for group in self.config.testbed.servers if group.name == server.group)

    def _refuse_sim_only_settings(self) -> None:
        """A core cannot be made slower here: `speed` exists in the simulator only."""
        for i, group in enumerate(self.config.testbed.servers):
            if group.speed != 1.0:
                raise ConfigError(
                    f"{self.config.source or 'config'}: testbed.servers[{i}].speed: {group.speed:g} is simulator-only",
                    hint="express capacity with cpus on a testbed (or use marllb simulate)",
                )

    def _refuse_foreign(self, manifest: Manifest | None) -> None:
        """Never adopt or remove a namespace or cgroup that this testbed's manifest does not list."""
        ours = manifest.names("namespace") if manifest else set()
        for name in self.topology.namespaces:
            if name not in ours and LocalNamespace(name).exists():
                raise NamespaceExists(
                    f"namespace {name} exists but testbed {self.topology.testbed} did not create it",
                    hint=f"choose another testbed.name, or remove it yourself (ip netns del {name})",
                )
        ours_cg = {resource.data["path"] for resource in manifest.of_kind("cgroup")} if manifest else set()
        root, _ = cgroup_root()
        parent = root / f"marllb-{self.topology.testbed}"
        if parent.exists() and str(parent) not in ours_cg:
            raise NamespaceExists(
                f"cgroup {parent} exists but testbed {self.topology.testbed} did not create it",
                hint="choose another testbed.name, or remove that cgroup yourself",
            )


def redeploy(testbed: LocalTestbed | KvmTestbed, manifest: Manifest | None, progress: Progress) -> DeployOutcome:
    """What a deploy over an earlier one does: nothing (`unchanged`) when that one completed with the same
    settings and is up; otherwise its teardown first (`rebuilt`); `created` when there was none."""
    if manifest is None:
        return "created"
    if manifest.complete and manifest.config_digest == testbed_digest(testbed.config.testbed):
        if testbed.status().state == "up":
            return "unchanged"
    testbed.teardown(progress)
    return "rebuilt"


def services_running(manifest: Manifest, node: str) -> bool:
    """Whether every process recorded for server `node` (GRE terminator, MariaDB, memcached) still runs."""
    services = [Service.from_record(r.name, r.data) for r in manifest.of_kind("process") if r.data.get("node") == node]
    return all(service.running() for service in services)


def start_server(instance: ApacheInstance, testbed: Testbed, manifest: Manifest) -> None:
    """One server's CPU cgroup (cores = cpus × cpu_unit) and Apache inside it, recorded before they exist."""
    cgroup, name = instance.cgroup, instance.node.name
    manifest.record("cgroup", name, path=str(cgroup.path), version=cgroup.version)
    cgroup.create()
    cgroup.set_cores(instance.node.cores or 0.0, testbed.cpu_period_us)
    manifest.record("apache", name, cgroup=str(cgroup.path), version=cgroup.version, pidfile=str(instance.pidfile))
    instance.start(testbed)
    if instance.group.app == "mediawiki":
        # After Apache, so teardown (newest first) stops the database and cache before Apache's cgroup sweep.
        instance.mediawiki.start(instance.namespace, manifest)


def _has_link(name: str) -> bool:
    """Whether this thread's network namespace has a link called `name` (run through `LocalNamespace.call`)."""
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def _preflight() -> None:
    """Fail before creating anything when this machine cannot host a local testbed."""
    if os.geteuid() != 0:
        raise MissingTool("a local testbed needs root (network namespaces, cgroups)", hint="run marllb with sudo")
    for tool, package in (("ip", "iproute2"), ("ethtool", "ethtool"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} is not installed", hint=f"run `make system-deps` (apt-get install {package})")
    apache_binary()
    php_module()
    cgroup_root()
