"""Timed events in the simulator: what `events.timeline` lists, applied to the engine and the LB layer.

Events are applied at agent steps: an event at `at` takes effect at the first step at or after it (at most
one agent period late, `applied_s` in the record says when). The testbed applies them from the controller at
their time, with its own lag; both record intended and applied times, so a comparison can see the gap.

    capacity, hog   the server's model is rebuilt from its config model, its capacity and its hog
                    (`Engine.retune`): jobs served so far at the old rate, the rest at the new one
    server down     no workers and no backlog (every arrival is refused: a reset, as the LB sees it) and the
                    backlog's jobs are reset; the jobs being served finish. Up: the config's limits again.
    lb down / up    the router hashes new flows over the LBs up (`LbLayer.live`; the compiled core's lb_of)
    agent down      `LbLayer.kill_agent`
    link            refused before the run: the simulator has no network (`refuse_network_events`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from marllb_cli.errors import ConfigError
from marllb_cli.events import TimedEvent
from marllb_cli.sim.engine import ServerModel
from marllb_cli.sim.lbs import LbLayer

__all__ = ["SimEvents", "attach_events", "refuse_network_events"]


def refuse_network_events(events: Sequence[TimedEvent], source: object) -> None:
    """A `ConfigError` for an event the simulator cannot model (link shaping: it has no network)."""
    for event in events:
        if event.kind == "link_rate":
            raise ConfigError(
                f"{source or 'config'}: experiment.events: {event.describe()} at {event.at:g} s shapes a link, and "
                "the simulator has no network",
                hint="run it on the testbed (replay-trace), or remove the link event for simulate",
            )


class SimEvents:
    """Applies a timeline to a running simulation; `LbLayer.on_step` calls it before each step."""

    def __init__(self, events: Sequence[TimedEvent], core: Any, lbs: LbLayer, models: Sequence[ServerModel]) -> None:
        self.events = list(events)
        self.next = 0  # the first event not yet applied (a drift can list many: no pop(0))
        self.core, self.lbs, self.base = core, lbs, list(models)
        self.capacity = [1.0] * len(models)
        self.hog = [0.0] * len(models)
        self.up = [True] * len(models)
        self.records: list[dict[str, Any]] = []

    def __call__(self, now: float) -> None:
        while self.next < len(self.events) and self.events[self.next].at <= now + 1e-9:
            event = self.events[self.next]
            self.next += 1
            self._apply(event, now)
            self.records.append(event.record(now))

    def _apply(self, event: TimedEvent, now: float) -> None:
        index = int(event.target.removeprefix("srv").removeprefix("lb"))
        if event.kind == "capacity":
            self.capacity[index] = event.value
        elif event.kind == "hog":
            self.hog[index] = event.value
        elif event.kind == "server_state":
            self.up[index] = bool(event.value)
        elif event.kind == "lb_state":
            live = set(self.lbs.live)
            (live.add if event.value else live.discard)(index)
            self.lbs.live = sorted(live)
            if hasattr(self.core, "route"):
                self.core.route(self.lbs.live)
            return
        elif event.kind == "agent_state":
            self.lbs.kill_agent(index)
            return
        else:  # refused before the run
            raise ValueError(f"the simulator cannot apply {event.kind}")
        self.core.retune(index, self.model(index), now)
        if not self.up[index]:
            self.core.drop_waiting(index, now)

    def model(self, index: int) -> ServerModel:
        """Server `index`'s model now: its config model at its capacity, with its hog, open or closed."""
        base, capacity = self.base[index], self.capacity[index]
        cpus = base.cpus * capacity
        return dataclasses.replace(
            base,
            cpus=cpus,
            job_rate=min(base.job_cap, base.speed * cpus),
            hog=self.hog[index],
            max_workers=base.max_workers if self.up[index] else 0,
            backlog=base.backlog if self.up[index] else 0,
        )


def attach_events(events: Sequence[TimedEvent], core: Any, lbs: LbLayer, models: Sequence[ServerModel]) -> SimEvents:
    """Apply `events` to this simulation (`core`: `Engine` or `CompiledSim`) at its LB layer's steps."""
    applier = SimEvents(events, core, lbs, models)
    lbs.on_step = applier if events else None
    return applier
