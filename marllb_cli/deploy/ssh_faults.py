"""Timed events on `kind: ssh` hosts (and KVM guests): each action is a `marllb node event` on the host of the
node it concerns, over one SSH connection per host kept for the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from marllb_cli.deploy.faults import TrackedFaults
from marllb_cli.deploy.node.roles import route_replace
from marllb_cli.events import TimedEvent
from marllb_cli.hosts.local import LocalHost
from marllb_cli.topology import Node

__all__ = ["SshFaults"]


class SshFaults(TrackedFaults):
    """`deploy.base.Faults` over SSH. `testbed` is an `SshTestbed` (given as `Any`: `deploy.ssh` imports this
    module); `router`: where the router is when it is not one of the hosts (a KVM testbed's namespace)."""

    def __init__(self, testbed: Any, router: LocalHost | None = None) -> None:
        super().__init__(testbed.topology, testbed.state_dir / "faults.json")
        self.testbed, self.router = testbed, router
        self.hosts = {host.node: host for host in testbed.hosts}
        self._connections: dict[str, Any] = {}

    def prepare(self, events: Sequence[TimedEvent]) -> None:
        """Connect to the events' nodes now: a connection costs a good part of a second, which the first
        event on each node would otherwise be late by."""
        for name in dict.fromkeys(event.node for event in events):
            if name not in self._connections and not (name == self.topology.router.name and self.router):
                self._connections[name] = self.testbed.connect(self.hosts[name])

    def set_quota(self, server: Node, cores: float) -> None:
        self._event(server, "quota", value=cores)

    def hog(self, server: Node, cores: float, lifetime_s: float) -> None:
        self._event(server, "hog", value=cores, lifetime=lifetime_s)

    def apache(self, server: Node, up: bool) -> None:
        self._event(server, "apache", value=1.0 if up else 0.0)

    def route(self, gateways: list[str]) -> None:
        if self.router is not None:
            self.router.call(route_replace, f"{self.topology.vip}/32", gateways)
        else:
            self._event(self.topology.router, "route", gateways=",".join(gateways))

    def kill_agent(self, lb: Node) -> None:
        self._event(lb, "kill-agent")

    def shape(self, server: Node, rate_mbit: float) -> None:
        self._event(server, "shape", value=rate_mbit)

    def restore(self) -> list[str]:
        try:
            return super().restore()
        finally:
            for ssh in self._connections.values():
                ssh.close()
            self._connections = {}

    def _event(self, node: Node, kind: str, **options: object) -> None:
        host = self.hosts[node.name]
        if node.name not in self._connections:
            self._connections[node.name] = self.testbed.connect(host)
        extra = [arg for name, value in options.items() for arg in (f"--{name}", str(value))]
        self._connections[node.name].run([*host.args("event", config=True), "--kind", kind, *extra], timeout=60)
