"""Discrete-event core of the simulator: jobs arrive, a dispatcher picks a server, servers serve them.

One server model covers everything we need, by its three limits:

    cpus         cores; every active job runs at speed × min(1, cpus / active) — processor sharing in which
                 one job can use at most one core (an Apache worker is one process)
    max_workers  jobs served at once (Apache prefork: 32); the rest wait in a FIFO backlog
    backlog      waiting room (Apache: 128); a job arriving to a full backlog is rejected (a failed request)

so M/M/1 FCFS is (cpus 1, workers 1, backlog ∞), M/M/c is (c, c, ∞), an egalitarian PS server is
(1, ∞, ∞), and an Apache server is (cpus, 32, 128).

Processor sharing is simulated in O(log k) per event with a per-server *virtual time* V: dV/dt is the
service rate each active job receives, so a job admitted at virtual time V₀ with work w finishes when
V = V₀ + w. Active jobs sit in a heap keyed by that finish value; only the server's next completion is an
event, and it is re-scheduled (the old one invalidated by a version number) whenever the server changes.
Arrivals come from a sorted array and are merged with the event heap instead of being pushed into it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ServerModel", "Result", "simulate", "APACHE_WORKERS", "APACHE_BACKLOG"]

APACHE_WORKERS = 32
APACHE_BACKLOG = 128
INF = math.inf


@dataclass(frozen=True)
class ServerModel:
    """A server's capacity: cores, speed factor (work units per core-second), workers and backlog."""

    cpus: float = 1.0
    speed: float = 1.0
    max_workers: float = APACHE_WORKERS
    backlog: float = APACHE_BACKLOG


@dataclass
class Result:
    """Per job: server, start of service, finish (NaN when rejected); all in simulated seconds."""

    arrival: np.ndarray
    server: np.ndarray
    start: np.ndarray
    finish: np.ndarray

    @property
    def rejected(self) -> np.ndarray:
        return np.isnan(self.finish)

    @property
    def response(self) -> np.ndarray:
        """Response (sojourn) time of every completed job."""
        done = ~self.rejected
        return self.finish[done] - self.arrival[done]


class _Server:
    """Mutable state of one server during a run."""

    __slots__ = ("model", "virtual", "clock", "active", "waiting", "version")

    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self.virtual = 0.0  # V: service each active job has received since the start
        self.clock = 0.0  # when V was last brought up to date
        self.active: list[tuple[float, int]] = []  # heap of (finish value of V, job)
        self.waiting: deque[int] = deque()
        self.version = 0

    def rate(self) -> float:
        k = len(self.active)
        return self.model.speed * min(1.0, self.model.cpus / k) if k else 0.0

    def advance(self, now: float) -> None:
        if self.active:
            self.virtual += (now - self.clock) * self.rate()
        self.clock = now

    def next_completion(self) -> float:
        if not self.active:
            return INF
        return self.clock + max(0.0, self.active[0][0] - self.virtual) / self.rate()


#: `dispatch(job, now)` → the server index of a new job; `on_finish(job, server, now)` is told when a job
#: leaves its server, completed or rejected (its finish time is then NaN).
Dispatch = Callable[[int, float], int]
OnFinish = Callable[[int, int, float], None]


def simulate(
    arrival: np.ndarray,
    work: np.ndarray,
    servers: Sequence[ServerModel],
    dispatch: Dispatch,
    *,
    on_finish: OnFinish | None = None,
    until: float = INF,
) -> Result:
    """Run the jobs (sorted `arrival` times, `work` in core-seconds at speed 1) through `servers`."""
    n = len(arrival)
    state = [_Server(model) for model in servers]
    server_of = np.full(n, -1, dtype=np.int64)
    start = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    arrivals = arrival.tolist()
    works = work.tolist()
    events: list[tuple[float, int, int]] = []  # (time, server, version)
    push, pop = heapq.heappush, heapq.heappop

    def admit(s: _Server, job: int, now: float) -> None:
        heapq.heappush(s.active, (s.virtual + works[job], job))
        start[job] = now

    def reschedule(index: int, s: _Server) -> None:
        s.version += 1
        t = s.next_completion()
        if t < INF:
            push(events, (t, index, s.version))

    next_job = 0
    while True:
        t_arrival = arrivals[next_job] if next_job < n else INF
        if events and events[0][0] <= t_arrival:
            now, index, version = pop(events)
            s = state[index]
            if version != s.version:
                continue  # superseded by a later change at this server
            if now > until:
                break
            s.advance(now)
            _, job = heapq.heappop(s.active)
            finish[job] = now
            if on_finish is not None:
                on_finish(job, index, now)
            if s.waiting:
                admit(s, s.waiting.popleft(), now)
            reschedule(index, s)
            continue
        if t_arrival == INF or t_arrival > until:
            break
        job, now = next_job, t_arrival
        next_job += 1
        index = dispatch(job, now)
        server_of[job] = index
        s = state[index]
        s.advance(now)
        if len(s.active) < s.model.max_workers:
            admit(s, job, now)
            reschedule(index, s)
        elif len(s.waiting) < s.model.backlog:
            s.waiting.append(job)
        elif on_finish is not None:  # rejected (a reset connection): start and finish stay NaN, the flow ends
            on_finish(job, index, now)
    return Result(arrival=arrival, server=server_of, start=start, finish=finish)
