"""Timed events on `kind: ssh` hosts (and KVM guests): each node an event concerns runs one `marllb node
events` for the run, started over SSH before the run's time 0, and each action is a line to it and its
answer back. Why not a command per event: a Python start costs about a second on a loaded host, and the
events were that late."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from marllb_cli.deploy.faults import TrackedFaults
from marllb_cli.deploy.node.roles import route_replace
from marllb_cli.errors import TestbedError
from marllb_cli.events import TimedEvent
from marllb_cli.hosts.local import LocalHost
from marllb_cli.topology import Node

__all__ = ["SshFaults"]

#: How long one event's change may take on its host (Apache's start is the slowest).
EVENT_TIMEOUT_S = 60.0


class _NodeEvents:
    """One host's `marllb node events`, over its own SSH connection: `apply` sends an action and waits for
    the answer; `close` ends its stdin, and with it the process."""

    def __init__(self, testbed: Any, host: Any) -> None:
        from marllb_cli.hosts.ssh import SshProcess

        self.name = host.node
        self.ssh = testbed.connect(host)
        self.process = SshProcess(self.ssh, host.args("events", config=True), f"{host.state}/events.log")
        self.process.channel.settimeout(EVENT_TIMEOUT_S)

    def apply(self, kind: str, **options: object) -> None:
        try:
            self.process.stdin.write(json.dumps({"kind": kind, **options}) + "\n")
            self.process.stdin.flush()
            line = next(self.process.stdout, "")
        except (TimeoutError, OSError) as exc:
            raise TestbedError(f"{self.name}: node events did not answer: {exc or 'timed out'}") from None
        if not line:
            raise TestbedError(f"{self.name}: node events ended", hint="see events.log in the host's state directory")
        answer = json.loads(line)
        if not answer["ok"]:
            raise TestbedError(f"{self.name}: {answer['error']}")

    def close(self) -> None:
        try:
            self.process.stdin.channel.shutdown_write()
            self.process.wait(timeout=10.0)
        except Exception:  # noqa: BLE001 - the connection goes either way
            pass
        self.ssh.close()


class SshFaults(TrackedFaults):
    """`deploy.base.Faults` over SSH. `testbed` is an `SshTestbed` (given as `Any`: `deploy.ssh` imports this
    module); `router`: where the router is when it is not one of the hosts (a KVM testbed's namespace)."""

    def __init__(self, testbed: Any, router: LocalHost | None = None) -> None:
        super().__init__(testbed.topology, testbed.state_dir / "faults.json")
        self.testbed, self.router = testbed, router
        self.hosts = {host.node: host for host in testbed.hosts}
        self._nodes: dict[str, _NodeEvents] = {}

    def prepare(self, events: Sequence[TimedEvent]) -> None:
        """Start each node's `node events` now, so that the first event there waits for neither a connection
        nor a Python start."""
        for name in dict.fromkeys(event.node for event in events):
            if not (name == self.topology.router.name and self.router):
                self._node_events(name)

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
            for node in self._nodes.values():
                node.close()
            self._nodes = {}

    def _node_events(self, name: str) -> _NodeEvents:
        if name not in self._nodes:
            self._nodes[name] = _NodeEvents(self.testbed, self.hosts[name])
        return self._nodes[name]

    def _event(self, node: Node, kind: str, **options: object) -> None:
        self._node_events(node.name).apply(kind, **options)
