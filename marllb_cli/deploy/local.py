"""The local testbed: network namespaces on this machine (`kind: local`), and its LBs.

    deploy    preflight → refuse foreign namespaces and cgroups → [unchanged? done] → remove leftovers →
              network → cgroups → Apache per server → mark complete (`base.deploy_recorded`)
    teardown  reverse order over the manifest: stop Apache, empty and remove cgroups, kill what still runs
              inside our namespaces, delete the namespaces, then the state directory
    lbs       `LocalLbs`: per LB namespace, its dataplane and agent (`node.lbs`)
    client    the client namespace (`client_node.LocalClient`)

A testbed only ever acts on names its manifest lists, so two testbeds with different names live side by side.
pyroute2 is imported only by the steps that build, so `marllb status` of an absent testbed starts fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from marllb_cli.agents.runner import LearningSpec
from marllb_cli.config import Config
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.coordination.protocol import SECRET_FILE, new_secret
from marllb_cli.deploy.base import (
    MANIFEST,
    DeployOutcome,
    LbStart,
    NodeStatus,
    TestbedStatus,
    coordinator_node,
    deploy_recorded,
    lb_plan,
    refuse_foreign_namespaces,
    require_root,
    require_tools,
)
from marllb_cli.deploy.node import mediawiki
from marllb_cli.deploy.node.apache import ApacheInstance, apache_binary, install_docroot, php_module
from marllb_cli.deploy.node.cgroups import CpuCgroup, CpuUsage, cgroup_root
from marllb_cli.deploy.node.lbs import (
    LbSnapshot,
    channel_path,
    lb_resources,
    read_snapshot,
    start_coordinator,
    start_lb,
    steps_log,
    stop_lbs,
)
from marllb_cli.deploy.node.manifest import Manifest, require_complete, state_root
from marllb_cli.deploy.node.server import services_running, start_server
from marllb_cli.deploy.node.undo import teardown_recorded
from marllb_cli.errors import ConfigError, MissingTool, NamespaceExists, TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.probes import busy_workers, http_get
from marllb_cli.progress import Progress, no_progress
from marllb_cli.services import start_service
from marllb_cli.topology import Node, Topology, plan

__all__ = ["LocalLbs", "LocalTestbed"]


class LocalTestbed:
    """A testbed of network namespaces on this machine, described by `config`."""

    __test__ = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topology: Topology = plan(config.testbed)
        self.state_dir: Path = state_root() / config.testbed.name
        self.manifest_path = self.state_dir / MANIFEST

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
        self._refuse_foreign(Manifest.load(self.manifest_path))
        return deploy_recorded(self, progress, lambda manifest: self._build(manifest, progress))

    def teardown(self, progress: Progress = no_progress, *, purge: bool = False) -> int:
        """Remove everything the manifest lists, in reverse; return how many resources were removed."""
        if purge:
            raise ConfigError("--purge removes a kvm testbed's image cache; this testbed is kind local")
        return teardown_recorded(self.manifest_path, self.state_dir, progress)

    def status(self, *, probe: bool = True) -> TestbedStatus:
        """Which nodes exist and, with `probe`, whether each server answers HTTP (and how busy it is)."""
        manifest = Manifest.load(self.manifest_path)
        nodes = [self._node_status(node, manifest, probe) for node in self.topology.nodes]
        return TestbedStatus.of(self.topology, manifest, nodes)

    def require_deployed(self) -> None:
        self._manifest()

    def lbs(self) -> LocalLbs:
        return LocalLbs(self)

    def client(self):  # -> ClientNode
        from marllb_cli.client_node import LocalClient

        return LocalClient(LocalNamespace(self.topology.client.namespace))

    def server_usage(self) -> dict[str, CpuUsage]:
        return {server.name: self.apache(server).cgroup.usage() for server in self.topology.servers}

    def faults(self):  # -> LocalFaults
        from marllb_cli.deploy.local_faults import LocalFaults

        return LocalFaults(self)

    def apache(self, server: Node) -> ApacheInstance:
        """The Apache instance of one server node."""
        group = self.config.testbed.group(server.group)
        assert group is not None, f"{server.name} is not a server"
        return ApacheInstance(
            node=server,
            group=group,
            root=self.state_dir / server.name,
            www=self.state_dir / "www",
            cgroup=CpuCgroup.at(f"marllb-{self.topology.testbed}/{server.name}"),
            vip=str(self.topology.vip),
        )

    # -- steps -----------------------------------------------------------------------------------------
    def _build(self, manifest: Manifest, progress: Progress) -> None:
        from marllb_cli.deploy.netns import build_network

        (self.state_dir / "config.yaml").write_text(self.config.resolved_yaml())
        new_secret(self.state_dir / SECRET_FILE)  # what a training episode's agents prove to its coordinator
        build_network(self.topology, manifest, progress)
        self._start_servers(manifest, progress)

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
        from marllb_cli.dataplane.gre_terminator import TUN_NAME

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
    def _manifest(self) -> Manifest:
        return require_complete(
            self.manifest_path,
            f"testbed {self.topology.testbed}",
            hint=f"run `marllb deploy` with this config first (state: {self.state_dir})",
        )

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
        refuse_foreign_namespaces(self.topology, self.topology.namespaces, ours)
        ours_cg = {resource.data["path"] for resource in manifest.of_kind("cgroup")} if manifest else set()
        root, _ = cgroup_root()
        parent = root / f"marllb-{self.topology.testbed}"
        if parent.exists() and str(parent) not in ours_cg:
            raise NamespaceExists(
                f"cgroup {parent} exists but testbed {self.topology.testbed} did not create it",
                hint="choose another testbed.name, or remove that cgroup yourself",
            )


class LocalLbs:
    """The LB processes of one local testbed: per LB namespace, a dataplane and an agent (`node.lbs`).
    Specs, logs and step logs live under `<state dir>/<testbed>/lb/`."""

    def __init__(self, testbed: LocalTestbed) -> None:
        self.testbed = testbed
        self.topology = testbed.topology
        self.dir = testbed.state_dir / "lb"

    def start(
        self,
        method: str,
        *,
        period: float = 0.25,
        idle_timeout: float = 40.0,
        seed: int = 0,
        learning: LearningSpec | None = None,
        coordinator: CoordinatorSpec | None = None,
    ) -> int:
        """Start a dataplane and an agent on every LB (and first, for a coordinated training episode, the
        coordinator in the namespace of the LB whose address it listens on); return how many LBs were
        already running (replaced)."""
        manifest = self.testbed._manifest()
        replaced = len({r.data.get("lb") for r in lb_resources(manifest)})
        self.stop()
        manifest = self.testbed._manifest()
        start = LbStart(method, period, idle_timeout, seed, learning)
        try:
            if coordinator is not None:
                host = coordinator_node(self.topology, coordinator)
                start_coordinator(LocalNamespace(host.namespace), manifest, coordinator, host.name, self.dir)
            for lb in self.topology.lbs:
                dataplane, agent = lb_plan(self.testbed.config, self.topology, lb, start, self.dir)
                start_lb(LocalNamespace(lb.namespace), manifest, dataplane, agent, self.dir)
        except BaseException:
            self.stop()
            raise
        return replaced

    def stop(self) -> int:
        """Stop every LB process and remove the channels; return how many processes were running."""
        manifest = Manifest.load(self.testbed.manifest_path)
        return 0 if manifest is None else stop_lbs(manifest)

    def snapshots(self) -> list[LbSnapshot]:
        manifest = self.testbed._manifest()
        return [read_snapshot(self.topology.testbed, lb.name, manifest) for lb in self.topology.lbs]

    def stats_json(self) -> list[dict[str, Any]]:
        """`lb stats`: every LB's snapshot as JSON-ready dicts (`LbSnapshot.as_json`)."""
        names = [server.name for server in self.topology.servers]
        return [snapshot.as_json(names) for snapshot in self.snapshots()]

    def channel_path(self, lb: Node) -> Path:
        """The shared-memory channel between LB `lb`'s dataplane and its agent."""
        return channel_path(self.topology.testbed, lb.name)

    def steps_log(self, lb: Node) -> Path:
        """The agent's per-step JSON lines of the current (or last) `start`."""
        return steps_log(self.dir, lb.name)


def _has_link(name: str) -> bool:
    """Whether this thread's network namespace has a link called `name` (run through `LocalNamespace.call`)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def _preflight() -> None:
    """Fail before creating anything when this machine cannot host a local testbed."""
    require_root("a local testbed")
    require_tools((("ip", "iproute2"), ("ethtool", "ethtool"), ("nft", "nftables")))
    apache_binary()
    php_module()
    cgroup_root()
