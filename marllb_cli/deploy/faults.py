"""What a testbed's timed events changed, and how to put it back: the bookkeeping every kind shares.

`TrackedFaults.apply(event)` keeps the state each event leaves (capacities, hogs, servers down, the LBs in the
router's route, shaped links) and calls the kind's action for it; `restore()` undoes them all, each attempt
whatever the others did. A kind says only how an action is done where the node is:

    set_quota(server, cores)        the server's CFS quota
    hog(server, cores, lifetime_s)  hog processes wanting `cores` in all (0: stop them)
    apache(server, up)              Apache's graceful stop, or start
    route(gateways)                 the router's VIP route over these LB addresses
    kill_agent(lb)                  SIGKILL to the LB's agent
    shape(server, rate_mbit)        tbf on the server's link (0: none)

`deploy.local_faults.LocalFaults` does them in namespaces, `deploy.ssh_faults.SshFaults` with `marllb node
event` on the hosts.

What the events changed is also written to `<state dir>/faults.json` after each one (`undo_leftovers` reads
it): a controller killed mid-run cannot restore, so the next run on the testbed undoes what it left before
it starts.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from marllb_cli.events import TimedEvent
from marllb_cli.topology import Node, Topology

__all__ = ["TrackedFaults"]


class TrackedFaults:
    """`deploy.base.Faults` less the actions, which a kind implements."""

    def __init__(self, topology: Topology, record: Path) -> None:
        """`record`: where the changes in force are kept between events (`faults.json` in the state dir)."""
        self.topology, self.record = topology, record
        self.capacity: dict[str, float] = {}  # servers whose capacity an event changed
        self.hogs: dict[str, float] = {}  # servers with a hog: its share of their CPU
        self.down: set[str] = set()  # servers whose Apache an event stopped
        self.lbs_up = [lb.name for lb in topology.lbs]
        self.route_changed = False
        self.shaped: set[str] = set()
        self._lock = threading.Lock()

    # -- the kind's actions ------------------------------------------------------------------------------
    def set_quota(self, server: Node, cores: float) -> None:
        raise NotImplementedError

    def hog(self, server: Node, cores: float, lifetime_s: float) -> None:
        raise NotImplementedError

    def apache(self, server: Node, up: bool) -> None:
        raise NotImplementedError

    def route(self, gateways: list[str]) -> None:
        raise NotImplementedError

    def kill_agent(self, lb: Node) -> None:
        raise NotImplementedError

    def shape(self, server: Node, rate_mbit: float) -> None:
        raise NotImplementedError

    # -- Faults ------------------------------------------------------------------------------------------
    def prepare(self, events: Sequence[TimedEvent]) -> None:
        """Nothing to prepare unless the kind says so."""

    def apply(self, event: TimedEvent, *, lifetime_s: float = 3600.0) -> None:
        """Note the change, record it, then make it. Recorded first: a controller killed while the action runs
        (a graceful stop waits for its workers) must still leave the change on record for the next run to undo;
        undoing a change that was never made is harmless. Events on different nodes may be applied at once
        (the event runner's lanes), so the bookkeeping is under a lock and the action, which may take a
        second over SSH, is not."""
        with self._lock:
            action = self._note(event, lifetime_s)
            self._save()
        action()

    def _note(self, event: TimedEvent, lifetime_s: float) -> Callable[[], object]:
        """Record what `event` changes; the action that makes the change."""
        node = self.topology.node(event.target)
        if event.kind == "capacity":
            self.capacity[node.name] = event.value
            cores, hog = self._cores(node), self.hogs.get(node.name, 0.0) * self._cores(node)

            def set_capacity() -> None:
                self.set_quota(node, cores)
                if hog:  # the hog wants its share of the new quota
                    self.hog(node, hog, lifetime_s)

            return set_capacity
        if event.kind == "hog":
            self.hogs[node.name] = event.value
            hog = event.value * self._cores(node)
            return lambda: self.hog(node, hog, lifetime_s)
        if event.kind == "server_state":
            (self.down.discard if event.value else self.down.add)(node.name)
            return lambda: self.apache(node, bool(event.value))
        if event.kind == "lb_state":
            up = set(self.lbs_up)
            (up.add if event.value else up.discard)(node.name)
            self.lbs_up = [lb.name for lb in self.topology.lbs if lb.name in up]
            self.route_changed = True
            gateways = [str(lb.ip) for lb in self.topology.lbs if lb.name in up]
            return lambda: self.route(gateways)
        if event.kind == "agent_state":
            return lambda: self.kill_agent(node)
        if event.kind == "link_rate":
            (self.shaped.add if event.value else self.shaped.discard)(node.name)
            return lambda: self.shape(node, event.value)
        raise ValueError(f"unknown event kind {event.kind!r}")

    def undo_leftovers(self) -> list[str]:
        """Undo what a previous run's events left in force (its controller was killed before restoring);
        what was undone, one line each (none without a record)."""
        try:
            left = json.loads(self.record.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        self.capacity, self.hogs = dict(left.get("capacity", {})), dict(left.get("hogs", {}))
        self.down, self.shaped = set(left.get("down", [])), set(left.get("shaped", []))
        self.route_changed = bool(left.get("route_changed"))
        changes = [*self.capacity, *self.hogs, *self.down, *self.shaped, *(["route"] if self.route_changed else [])]
        problems = self.restore()
        return [f"undid what an earlier run's events left ({', '.join(sorted(set(changes))) or 'nothing'})", *problems]

    def _save(self) -> None:
        state = {
            "capacity": self.capacity,
            "hogs": self.hogs,
            "down": sorted(self.down),
            "route_changed": self.route_changed,
            "shaped": sorted(self.shaped),
        }
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.record)

    def restore(self) -> list[str]:
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:  # each undo is tried whatever the others did; the run reports them
                problems.append(f"{what}: {exc}")

        node = self.topology.node
        for name in [name for name, share in self.hogs.items() if share]:
            attempt(f"stop {name}'s hog", lambda n=name: self.hog(node(n), 0.0, 0.0))
        for name in list(self.capacity):
            attempt(f"restore {name}'s quota", lambda n=name: self.set_quota(node(n), node(n).cores or 0.0))
        for name in sorted(self.down):
            attempt(f"start {name}'s Apache", lambda n=name: self.apache(node(n), True))
        if self.route_changed:
            attempt("restore the router's route", lambda: self.route([str(lb.ip) for lb in self.topology.lbs]))
        for name in sorted(self.shaped):
            attempt(f"unshape {name}'s link", lambda n=name: self.shape(node(n), 0.0))
        self.capacity, self.hogs, self.down, self.shaped = {}, {}, set(), set()
        self.lbs_up, self.route_changed = [lb.name for lb in self.topology.lbs], False
        if not problems:
            self.record.unlink(missing_ok=True)
        return problems

    def _cores(self, server: Node) -> float:
        return (server.cores or 0.0) * self.capacity.get(server.name, 1.0)
