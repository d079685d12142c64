"""Timed events on a local testbed: each action in the namespace of the node it concerns (`node.faults`)."""

from __future__ import annotations

from typing import Any

from marllb_cli.deploy.faults import TrackedFaults
from marllb_cli.deploy.node import faults
from marllb_cli.deploy.node.roles import route_replace
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.topology import Node

__all__ = ["LocalFaults"]


class LocalFaults(TrackedFaults):
    """`deploy.base.Faults` for a `LocalTestbed` (given as `Any`: `deploy.local` imports this module)."""

    def __init__(self, testbed: Any) -> None:
        super().__init__(testbed.topology, testbed.state_dir / "faults.json")
        self.testbed = testbed

    def set_quota(self, server: Node, cores: float) -> None:
        faults.set_capacity(self.testbed.apache(server).cgroup, cores, self.testbed.config.testbed.cpu_period_us)

    def hog(self, server: Node, cores: float, lifetime_s: float) -> None:
        manifest = self.testbed._manifest()
        if cores <= 0:
            faults.stop_hog(manifest, server.name)
            return
        cgroup, logs = self.testbed.apache(server).cgroup, self.testbed.state_dir / "faults"
        ns = LocalNamespace(server.namespace)
        faults.start_hog(ns, manifest, server.name, cgroup, cores, logs, lifetime_s=lifetime_s)

    def apache(self, server: Node, up: bool) -> None:
        instance = self.testbed.apache(server)
        if up:
            faults.server_up(instance, self.testbed.config.testbed)
        else:
            faults.server_down(instance)

    def route(self, gateways: list[str]) -> None:
        router = LocalNamespace(self.topology.router.namespace)
        router.call(route_replace, f"{self.topology.vip}/32", gateways)

    def kill_agent(self, lb: Node) -> None:
        faults.kill_agent(self.testbed._manifest(), lb.name)

    def shape(self, server: Node, rate_mbit: float) -> None:
        faults.shape_link(LocalNamespace(server.namespace), server.interfaces[0].name, rate_mbit)
