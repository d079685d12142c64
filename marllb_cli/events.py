"""Timed events: the parts of a system that move during a run, with one meaning on the testbed and in the
simulator.

A config lists them under `experiment.events` (and `--event KEY=VALUE,...` adds more on the command line)::

    experiment:
      events:
        - {at: 30, server: srv2, capacity: 0.5}     # the server's CPU share halves (cgroup quota / speed)
        - {at: 30, server: srv2, hog: 0.5}          # a process burns half its quota beside Apache
        - {at: 40, server: srv1, state: down}       # Apache stops accepting (connections refused) ...
        - {at: 50, server: srv1, state: up}         # ... and starts again; the LBs are not told
        - {at: 20, lb: lb1, state: down}            # the LB leaves the router's multipath route
        - {at: 20, agent: lb0, state: down}         # the agent is killed; its dataplane keeps its weights
        - {at: 10, link: srv3, rate_mbit: 20}       # the server's link is shaped (testbed only)
        - {drift: capacity, servers: all, low: 0.3, high: 1.0, hold_s: 20}   # a random process

What each change means, on both sides:

    capacity c   the server's CPU becomes c × its config's (absolute, not cumulative): cpus × c cores, and a
                 lone request gets at most one core or the new quota, whichever is less
    hog h        a process in the server's CPU share that wants h of it; it competes with the requests as one
                 more runnable task (it gets min(h, 1/(k+1)) of the share beside k requests), which the LB
                 cannot see; hog 0 stops it
    state        a server down refuses new connections and resets those waiting in its backlog; the requests
                 it is computing finish (Apache's graceful stop). An LB down leaves the router's route: new flows
                 hash over the LBs that are up. An agent down stops acting (no step records) and its LB keeps
                 the last weights; it is not restarted within the run.
    link         the server's link rate (tbf) in Mbit/s; 0 removes the shaping. The simulator has no network
                 and refuses link events.

A drift is a Markov chain per server: it holds a capacity for an exponential time of mean `hold_s`, then
draws the next uniformly in [low, high]. `timeline(...)` expands drifts into capacity events with the run's
seed, so every method of a comparison sees the same realisation.

This module is plain data and arithmetic (no testbed or simulator code): the config validates with it, the
simulator (`sim/events.py`) and the testbed (`testbed_events.py`) apply what it expands.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from marllb_cli.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CapacityDrift",
    "EVENT_COLUMNS",
    "EVENT_KINDS",
    "Event",
    "TimedEvent",
    "check_targets",
    "down_windows",
    "events_frame",
    "event_specs",
    "parse_event_option",
    "phase_bounds",
    "timeline",
]

#: What a timed event changes, as recorded in `events.parquet`.
EVENT_KINDS = ("capacity", "hog", "server_state", "lb_state", "agent_state", "link_rate")
#: events.parquet, on both sides.
EVENT_COLUMNS = {
    "at_s": "float64",
    "applied_s": "float64",
    "kind": "string",
    "target": "string",
    "value": "float64",
    "source": "string",
    "ok": "bool",
    "error": "string",
}
#: A run longer than this is not a run of this tool (and a drift would expand without end).
MAX_EVENT_TIME_S = 1e6
#: A drift that would draw more events than this is refused: each is applied one by one.
MAX_DRIFT_EVENTS = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Strict):
    """One change at time `at` (seconds from the run's start): exactly one target and one change."""

    at: float = Field(ge=0, le=MAX_EVENT_TIME_S, description="Seconds from the run's start.")
    server: str | None = Field(None, description="The server it happens to (srv0, srv1, ...).")
    lb: str | None = Field(None, description="The LB it happens to (lb0, ...).")
    agent: str | None = Field(None, description="The LB whose agent it happens to.")
    link: str | None = Field(None, description="The server whose link it shapes (testbed only).")
    capacity: float | None = Field(None, gt=0, le=4, description="server: CPU share, × the config's.")
    hog: float | None = Field(None, ge=0, le=1, description="server: share of its CPU a neighbour process wants.")
    state: Literal["down", "up"] | None = Field(None, description="server, lb or agent: down or up.")
    rate_mbit: float | None = Field(None, ge=0, le=100_000, description="link: Mbit/s (0: no shaping).")

    @model_validator(mode="after")
    def _one_target_one_change(self) -> Event:
        targets = [name for name in ("server", "lb", "agent", "link") if getattr(self, name) is not None]
        changes = [name for name in ("capacity", "hog", "state", "rate_mbit") if getattr(self, name) is not None]
        if len(targets) != 1:
            raise ValueError(f"an event names exactly one of server, lb, agent, link (got {targets or 'none'})")
        if len(changes) != 1:
            raise ValueError(
                f"an event makes exactly one change: capacity, hog, state or rate_mbit (got {changes or 'none'})"
            )
        allowed = {
            "server": {"capacity", "hog", "state"},
            "lb": {"state"},
            "agent": {"state"},
            "link": {"rate_mbit"},
        }[targets[0]]
        if changes[0] not in allowed:
            raise ValueError(f"a {targets[0]} event changes {' or '.join(sorted(allowed))}, not {changes[0]}")
        if targets[0] == "agent" and self.state == "up":
            raise ValueError("an agent killed in a run is not restarted: agent events take state: down only")
        return self

    @property
    def kind(self) -> str:
        if self.capacity is not None:
            return "capacity"
        if self.hog is not None:
            return "hog"
        if self.rate_mbit is not None:
            return "link_rate"
        return {"server": "server_state", "lb": "lb_state", "agent": "agent_state"}[self.target_role]

    @property
    def target_role(self) -> str:
        return next(name for name in ("server", "lb", "agent", "link") if getattr(self, name) is not None)

    @property
    def target(self) -> str:
        return str(getattr(self, self.target_role))

    @property
    def value(self) -> float:
        """The change as a number: capacity, hog, 1/0 for up/down, or Mbit/s."""
        if self.state is not None:
            return 1.0 if self.state == "up" else 0.0
        return float(next(v for v in (self.capacity, self.hog, self.rate_mbit) if v is not None))


class CapacityDrift(_Strict):
    """Every named server's capacity as a Markov chain: hold for Exp(hold_s), then a uniform new level."""

    drift: Literal["capacity"] = Field(description="What drifts (capacity).")
    servers: Literal["all"] | list[str] = Field("all", description="all, or a list of servers.")
    low: float = Field(0.3, gt=0, le=4, description="Lowest capacity, × the config's.")
    high: float = Field(1.0, gt=0, le=4, description="Highest capacity, × the config's.")
    hold_s: float = Field(20.0, gt=0, le=MAX_EVENT_TIME_S, description="Mean time at one level, seconds.")
    start: float = Field(1.0, ge=0, le=4, description="Every server's capacity at the start, × the config's.")

    @model_validator(mode="after")
    def _ordered(self) -> CapacityDrift:
        if self.low > self.high:
            raise ValueError(f"drift: low {self.low} is above high {self.high}")
        return self


@dataclass(frozen=True)
class TimedEvent:
    """One event of a run's timeline: when, what kind, to whom, the new value, and where it came from."""

    at: float
    kind: str
    target: str
    value: float
    source: str  # "config", "drift" or "option"

    def record(self, applied_s: float | None, error: str = "") -> dict[str, Any]:
        """Its row of events.parquet: applied at `applied_s` (None: not applied), `error` if it did not take."""
        return {
            "at_s": self.at,
            "applied_s": applied_s if applied_s is not None else float("nan"),
            "kind": self.kind,
            "target": self.target,
            "value": self.value,
            "source": self.source,
            "ok": applied_s is not None and not error,
            "error": error,
        }

    @property
    def node(self) -> str:
        """The node its change is made on: the router (its route over the LBs up) for an LB's state, the
        target otherwise. Two events on one node are applied in their order (`timed_events`)."""
        return "router" if self.kind == "lb_state" else self.target

    @classmethod
    def from_row(cls, row: Any) -> TimedEvent:
        """The event a row of events.parquet (an `itertuples` row) records."""
        return cls(row.at_s, row.kind, row.target, row.value, row.source)

    def describe(self) -> str:
        """`srv2 capacity 0.5`, `srv1 down`, `lb1 up`, `lb0's agent down`, `srv3 link 20 Mbit/s`."""
        if self.kind.endswith("_state"):
            who = f"{self.target}'s agent" if self.kind == "agent_state" else self.target
            return f"{who} {'up' if self.value else 'down'}"
        if self.kind == "link_rate":
            return f"{self.target} link {self.value:g} Mbit/s" if self.value else f"{self.target} link unshaped"
        return f"{self.target} {self.kind} {self.value:g}"


def check_targets(events: Sequence[Event | CapacityDrift], servers: Sequence[str], lbs: Sequence[str]) -> None:
    """Refuse (ValueError, for pydantic) an event whose server or LB the testbed does not have, and a
    sequence of LB events that leaves no LB up."""
    for index, event in enumerate(events):
        if isinstance(event, CapacityDrift):
            unknown = [] if event.servers == "all" else [s for s in event.servers if s not in servers]
        else:
            names = lbs if event.target_role in ("lb", "agent") else servers
            unknown = [] if event.target in names else [event.target]
        if unknown:
            known = servers if isinstance(event, CapacityDrift) or event.target_role in ("server", "link") else lbs
            raise ValueError(
                f"events[{index}] names {unknown[0]!r}, which this testbed does not have ({', '.join(known)})"
            )
    up = set(lbs)
    for event in sorted((e for e in events if isinstance(e, Event) and e.lb is not None), key=lambda e: e.at):
        (up.discard if event.state == "down" else up.add)(event.target)
        if not up:
            raise ValueError(f"events take every LB down at {event.at:g} s; keep one up (the router needs a route)")


def timeline(
    events: Sequence[Event | CapacityDrift],
    *,
    servers: Sequence[str],
    duration_s: float,
    seed: int,
    extra: Sequence[Event] = (),
) -> list[TimedEvent]:
    """Every event of a run in time order (stable: at equal times, in the order given), drifts expanded with
    `seed` up to `duration_s`. `extra` are the command line's `--event`s."""
    timed: list[TimedEvent] = []
    for number, event in enumerate(events):
        if isinstance(event, CapacityDrift):
            timed.extend(_expand_drift(event, servers, duration_s, random.Random(f"{seed}:drift:{number}")))
        else:
            timed.append(TimedEvent(event.at, event.kind, event.target, event.value, "config"))
    timed.extend(TimedEvent(e.at, e.kind, e.target, e.value, "option") for e in extra)
    return sorted(timed, key=lambda e: e.at)  # sorted() is stable


def _expand_drift(
    drift: CapacityDrift, servers: Sequence[str], duration_s: float, rng: random.Random
) -> list[TimedEvent]:
    names = list(servers) if drift.servers == "all" else list(drift.servers)
    expected = len(names) * duration_s / drift.hold_s
    if expected > MAX_DRIFT_EVENTS:
        raise ConfigError(
            f"experiment.events: a capacity drift with hold_s {drift.hold_s:g} over {duration_s:g} s would draw "
            f"≈ {expected:,.0f} events",
            hint=f"raise hold_s to at least {len(names) * duration_s / MAX_DRIFT_EVENTS:.3g}",
        )
    out = []
    for name in names:  # one chain per server, drawn in server order from the one stream
        if drift.start != 1.0:
            out.append(TimedEvent(0.0, "capacity", name, drift.start, "drift"))
        t = rng.expovariate(1.0 / drift.hold_s)
        while t < duration_s:
            out.append(TimedEvent(round(t, 3), "capacity", name, round(rng.uniform(drift.low, drift.high), 4), "drift"))
            t += rng.expovariate(1.0 / drift.hold_s)
    return out


def event_specs(config: Any, extra: Sequence[Event] = ()) -> list[dict[str, Any]]:
    """The events of a run as written in its meta.json: the config's (drifts as given, not expanded), then
    the command line's."""
    items = [*config.experiment.events, *extra]
    return [item.model_dump(mode="json", exclude_none=True) for item in items]


def parse_event_option(text: str) -> Event:
    """`--event at=30,server=srv2,capacity=0.5` → an `Event`; a `ConfigError` naming the option otherwise."""
    fields: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--event {text!r}: expected KEY=VALUE items separated by commas",
                hint="e.g. --event at=30,server=srv2,capacity=0.5",
            )
        try:
            fields[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--event {text!r}: {key.strip()} is not a value") from None
    try:
        return Event.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"--event {text!r}: {where + ': ' if where else ''}{message}",
            hint="e.g. --event at=30,server=srv2,capacity=0.5 (see docs for the event kinds)",
        ) from None


def phase_bounds(applied: Sequence[float], end_s: float, *, limit: int = 8) -> list[tuple[float, float]] | None:
    """The phases a run's events cut it into: [0, t₁), [t₁, t₂), ..., [t_k, end]; None when more than
    `limit` phases (a drift: the report then draws the events instead of tabulating phases)."""
    times = sorted({round(t, 6) for t in applied if 0 < t < end_s})
    if len(times) + 1 > limit:
        return None
    edges = [0.0, *times, max(end_s, times[-1] if times else 0.0)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a] or [(0.0, end_s)]


def events_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """events.parquet's table from event records (an empty table with its columns when there are none)."""
    import pandas as pd

    frame = pd.DataFrame(list(records), columns=list(EVENT_COLUMNS))
    return frame.astype(EVENT_COLUMNS)


def down_windows(events: pd.DataFrame, end_s: float) -> dict[str, list[tuple[float, float]]]:
    """Per server, the [down, up) intervals of its applied state events (the last one open until `end_s`)."""
    windows: dict[str, list[tuple[float, float]]] = {}
    since: dict[str, float] = {}
    for row in events[events["kind"] == "server_state"].sort_values("applied_s").itertuples():
        if row.value == 0.0 and row.target not in since:
            since[row.target] = row.applied_s
        elif row.value == 1.0 and row.target in since:
            windows.setdefault(row.target, []).append((since.pop(row.target), row.applied_s))
    for target, start in since.items():
        windows.setdefault(target, []).append((start, end_s))
    return windows
