"""Timed events on a local testbed: each applied in the namespace of the node it concerns (`node.faults`),
with what it changed remembered so that `restore` puts the testbed back as the run found it."""

from __future__ import annotations

from typing import Any

from marllb_cli.deploy.node import faults
from marllb_cli.deploy.node.roles import route_replace
from marllb_cli.events import TimedEvent
from marllb_cli.hosts.local import LocalNamespace

__all__ = ["LocalFaults"]


class LocalFaults:
    """`deploy.base.Faults` for a `LocalTestbed` (given as `Any`: `deploy.local` imports this module)."""

    def __init__(self, testbed: Any) -> None:
        self.testbed = testbed
        self.topology = testbed.topology
        self.capacity: dict[str, float] = {}  # servers whose capacity an event changed
        self.hog: dict[str, float] = {}  # servers with a hog running
        self.down: set[str] = set()  # servers whose Apache an event stopped
        self.lbs_up = [lb.name for lb in self.topology.lbs]
        self.route_changed = False
        self.shaped: set[str] = set()

    def apply(self, event: TimedEvent) -> None:
        name = event.target
        if event.kind == "capacity":
            self.capacity[name] = event.value
            self._set_quota(name)
            if self.hog.get(name):  # the hog wants its share of the new quota
                self._start_hog(name)
        elif event.kind == "hog":
            self.hog[name] = event.value
            if event.value > 0:
                self._start_hog(name)
            else:
                faults.stop_hog(self.testbed._manifest(), name)
        elif event.kind == "server_state":
            instance = self.testbed.apache(self._node(name))
            if event.value:
                faults.server_up(instance, self.testbed.config.testbed)
                self.down.discard(name)
            else:
                self.down.add(name)
                faults.server_down(instance)
        elif event.kind == "lb_state":
            up = set(self.lbs_up)
            (up.add if event.value else up.discard)(name)
            self.lbs_up = [lb.name for lb in self.topology.lbs if lb.name in up]
            self.route_changed = True
            self._route(self.lbs_up)
        elif event.kind == "agent_state":
            faults.kill_agent(self.testbed._manifest(), name)
        elif event.kind == "link_rate":
            node = self._node(name)
            faults.shape_link(LocalNamespace(node.namespace), node.interfaces[0].name, event.value)
            (self.shaped.add if event.value else self.shaped.discard)(name)
        else:
            raise ValueError(f"unknown event kind {event.kind!r}")

    def restore(self) -> list[str]:
        problems: list[str] = []

        def attempt(what: str, action) -> None:
            try:
                action()
            except Exception as exc:  # each undo is tried whatever the others did; the run reports them
                problems.append(f"{what}: {exc}")

        manifest = self.testbed._manifest()
        for name in list(self.hog):
            attempt(f"stop {name}'s hog", lambda n=name: faults.stop_hog(manifest, n))
        for name in list(self.capacity):
            self.capacity[name] = 1.0
            attempt(f"restore {name}'s quota", lambda n=name: self._set_quota(n))
        for name in sorted(self.down):
            instance = self.testbed.apache(self._node(name))
            attempt(f"start {name}'s Apache", lambda i=instance: faults.server_up(i, self.testbed.config.testbed))
        if self.route_changed:
            attempt("restore the router's route", lambda: self._route([lb.name for lb in self.topology.lbs]))
        for name in sorted(self.shaped):
            node = self._node(name)
            ns, iface = LocalNamespace(node.namespace), node.interfaces[0].name
            attempt(f"unshape {name}'s link", lambda ns=ns, iface=iface: faults.shape_link(ns, iface, 0))
        self.capacity, self.hog, self.down, self.shaped = {}, {}, set(), set()
        self.route_changed = False
        return problems

    # -- helpers -----------------------------------------------------------------------------------------
    def _node(self, name: str):
        return next(node for node in self.topology.nodes if node.name == name)

    def _cores(self, name: str) -> float:
        return (self._node(name).cores or 0.0) * self.capacity.get(name, 1.0)

    def _set_quota(self, name: str) -> None:
        instance = self.testbed.apache(self._node(name))
        faults.set_capacity(instance.cgroup, self._cores(name), self.testbed.config.testbed.cpu_period_us)

    def _start_hog(self, name: str) -> None:
        node = self._node(name)
        instance = self.testbed.apache(node)
        cores = self.hog[name] * self._cores(name)
        logs = self.testbed.state_dir / "faults"
        manifest = self.testbed._manifest()
        faults.start_hog(LocalNamespace(node.namespace), manifest, name, instance.cgroup, cores, logs)

    def _route(self, lbs: list[str]) -> None:
        gateways = [str(lb.ip) for lb in self.topology.lbs if lb.name in lbs]
        LocalNamespace(self.topology.router.namespace).call(route_replace, f"{self.topology.vip}/32", gateways)
