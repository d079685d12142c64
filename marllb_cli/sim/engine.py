"""Discrete-event core of the simulator: jobs arrive, a dispatcher picks a server, servers serve them.

One server model covers everything we need, by its three limits:

    cpus         cores; every active job runs at min(job_rate, speed × cpus / active) — processor sharing in
                 which one job can use at most `job_rate` (default `speed`: one core, as an Apache worker is
                 one process; on a testbed whose server is a CFS quota below a core, a lone job gets the whole
                 quota, so `job_rate` is min(1 core, the quota): `sim.cores_per_unit`)
    max_workers  jobs served at once (Apache prefork: 32); the rest wait in a FIFO backlog (a job in an IO
                 phase holds its worker but uses no CPU: it joins processor sharing when its IO is done)
    backlog      waiting room (Apache: 128); a job arriving to a full backlog is rejected (a failed request)
    io_speed     IO-seconds the server's IO device completes per second, one IO phase at a time in arrival
                 order (a FIFO disk); infinite (the default): IO phases never wait for each other, a pure delay
    hog          a neighbour process that wants this share of the server's CPU (a timed event, `events.py`):
                 one more task in processor sharing, so beside k jobs it takes min(hog, 1/(k+1)) of it

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

__all__ = ["Engine", "ServerModel", "ServerState", "Result", "simulate", "APACHE_WORKERS", "APACHE_BACKLOG"]

APACHE_WORKERS = 32
APACHE_BACKLOG = 128
INF = math.inf


@dataclass(frozen=True)
class ServerModel:
    """A server's capacity: cores, speed factor (work units per core-second), workers, backlog, IO device."""

    cpus: float = 1.0
    speed: float = 1.0
    max_workers: float = APACHE_WORKERS
    backlog: float = APACHE_BACKLOG
    io_speed: float = INF
    job_rate: float | None = None  # the most one job gets; None: speed (one core)
    hog: float = 0.0  # share of the CPU a neighbour process wants (timed events)

    @property
    def job_cap(self) -> float:
        return self.speed if self.job_rate is None else self.job_rate

    def rate(self, k: int) -> float:
        """Service rate of each of `k` computing jobs: an equal share of speed × cpus, less what the hog
        takes as one more task, and at most `job_cap`."""
        if k <= 0:
            return 0.0
        share = self.speed * self.cpus
        return min(self.job_cap, (share - min(self.hog * share, share / (k + 1))) / k)


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


class ServerState:
    """Mutable state of one server during a run; the LB layer reads it for probes and oracles."""

    __slots__ = ("model", "virtual", "clock", "active", "waiting", "waiting_work", "in_io", "io_free", "version", "r")

    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self.virtual = 0.0  # V: service each active job has received since the start
        self.clock = 0.0  # when V was last brought up to date
        self.active: list[tuple[float, int]] = []  # heap of (finish value of V, job)
        self.waiting: deque[int] = deque()
        self.waiting_work: deque[float] = deque()
        self.in_io = 0  # jobs holding a worker in their IO phase (waiting for the IO device or using it)
        self.io_free = 0.0  # when the IO device finishes the last IO phase handed to it
        self.version = 0
        self.r = 0.0  # service rate of each active job; `rerate()` after every change of `active`

    def workers(self) -> int:
        """Workers in use: jobs computing plus jobs in IO."""
        return len(self.active) + self.in_io

    def jobs(self) -> int:
        """Jobs the server holds: computing, in IO, or waiting for a worker."""
        return len(self.active) + self.in_io + len(self.waiting)

    def rerate(self) -> None:
        self.r = self.model.rate(len(self.active))

    def advance(self, now: float) -> None:
        if self.active:
            self.virtual += (now - self.clock) * self.r
        self.clock = now

    def remaining(self, now: float) -> tuple[list[float], list[float]]:
        """(remaining work of each active job, work of each waiting job, in FIFO order) at `now`."""
        virtual = self.virtual + (now - self.clock) * self.r if self.active else self.virtual
        return [max(0.0, v - virtual) for v, _ in self.active], list(self.waiting_work)

    def next_completion(self) -> float:
        if not self.active:
            return INF
        return self.clock + max(0.0, self.active[0][0] - self.virtual) / self.r


#: `dispatch(job, now)` → the server index of a new job; `on_finish(job, server, now, completed)` is told
#: when a job leaves its server, completed or rejected (`completed` False; its finish time stays NaN);
#: `on_tick(now)` runs every `tick_period` simulated seconds, before any arrival or completion at the same
#: time (agent steps).
Dispatch = Callable[[int, float], int]
OnFinish = Callable[[int, int, float, bool], None]
OnTick = Callable[[float], None]


class Engine:
    """A simulation that can be advanced in steps (`run(until)`), for the PettingZoo environment; `simulate`
    runs one to the end. The arguments are those of `simulate`."""

    def __init__(
        self,
        arrival: np.ndarray,
        work: np.ndarray,
        servers: Sequence[ServerModel],
        dispatch: Dispatch,
        *,
        on_finish: OnFinish | None = None,
        on_tick: OnTick | None = None,
        tick_period: float = INF,
        states: list[ServerState] | None = None,
        io: np.ndarray | None = None,
    ) -> None:
        n = len(arrival)
        self.arrival = arrival
        self.states = states if states is not None else [ServerState(model) for model in servers]
        self.server = np.full(n, -1, dtype=np.int64)
        self.start = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.dispatch, self.on_finish, self.on_tick, self.tick_period = dispatch, on_finish, on_tick, tick_period
        self._arrivals = arrival.tolist()
        self._works = work.tolist()
        self._ios = io.tolist() if io is not None else None
        self._events: list[tuple[float, int, int]] = []  # (time, server, version ≥ 0 | −1 − job for an IO end)
        self.next_job = 0
        self.next_tick = 0.0 if on_tick is not None else INF

    def result(self) -> Result:
        return Result(arrival=self.arrival, server=self.server, start=self.start, finish=self.finish)

    def pending(self) -> bool:
        """Whether a completion or an IO end is still to come."""
        return bool(self._events)

    def retune(self, index: int, model: ServerModel, now: float) -> None:
        """Server `index` runs as `model` from `now` on (a timed event): its jobs so far were served at the
        old rate, the rest at the new one. A model with no workers and no backlog refuses every arrival."""
        s = self.states[index]
        s.advance(now)
        s.model = model
        s.rerate()
        self._reschedule(index, s)

    def drop_waiting(self, index: int, now: float) -> list[int]:
        """Reset the jobs waiting in server `index`'s backlog (its listener closed); they end as rejected
        (`on_finish(..., False)`). The jobs it is serving go on. Returns the jobs dropped."""
        s = self.states[index]
        dropped = list(s.waiting)
        s.waiting.clear()
        s.waiting_work.clear()
        if self.on_finish is not None:
            for job in dropped:
                self.on_finish(job, index, now, False)
        return dropped

    def _reschedule(self, index: int, s: ServerState) -> None:
        s.version += 1
        t = s.next_completion()
        if t < INF:
            heapq.heappush(self._events, (t, index, s.version))

    def run(self, until: float = INF) -> None:
        """Process every tick, completion and arrival at or before `until`, in time order (ticks first)."""
        state, events, works, ios = self.states, self._events, self._works, self._ios
        arrivals, n = self._arrivals, len(self._arrivals)
        start, finish, server_of = self.start, self.finish, self.server
        dispatch, on_finish, on_tick, tick_period = self.dispatch, self.on_finish, self.on_tick, self.tick_period
        push, pop = heapq.heappush, heapq.heappop
        next_job, next_tick = self.next_job, self.next_tick

        def admit(index: int, s: ServerState, job: int, now: float) -> bool:
            """Give `job` a worker; False when it starts with IO (no CPU yet, nothing to reschedule)."""
            start[job] = now
            if ios is not None and ios[job] > 0:
                s.in_io += 1
                io_speed = s.model.io_speed
                if io_speed == INF:
                    done = now + ios[job]
                else:  # FIFO device: this phase starts when the ones handed over before it are done
                    done = s.io_free = max(now, s.io_free) + ios[job] / io_speed
                push(events, (done, index, -1 - job))
                return False
            heapq.heappush(s.active, (s.virtual + works[job], job))
            s.rerate()
            return True

        reschedule = self._reschedule

        while True:
            t_arrival = arrivals[next_job] if next_job < n else INF
            t_event = events[0][0] if events else INF
            if next_tick <= t_arrival and next_tick <= t_event:
                if next_tick > until or (next_job >= n and not events):
                    break
                on_tick(next_tick)  # type: ignore[misc]
                next_tick += tick_period
                continue
            if events and t_event <= t_arrival:
                if t_event > until:
                    break
                now, index, version = pop(events)
                s = state[index]
                if version < 0:  # a job's IO phase ended: it starts computing
                    job = -1 - version
                    s.advance(now)
                    s.in_io -= 1
                    heapq.heappush(s.active, (s.virtual + works[job], job))
                    s.rerate()
                    reschedule(index, s)
                    continue
                if version != s.version:
                    continue  # superseded by a later change at this server
                s.advance(now)
                _, job = heapq.heappop(s.active)
                s.rerate()
                finish[job] = now
                if on_finish is not None:
                    on_finish(job, index, now, True)
                if s.waiting:
                    s.waiting_work.popleft()
                    admit(index, s, s.waiting.popleft(), now)
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
            if s.workers() < s.model.max_workers:
                if admit(index, s, job, now):
                    reschedule(index, s)
            elif len(s.waiting) < s.model.backlog:
                s.waiting.append(job)
                s.waiting_work.append(works[job])
            elif on_finish is not None:  # rejected (a reset connection): start and finish stay NaN, the flow ends
                on_finish(job, index, now, False)
        self.next_job, self.next_tick = next_job, next_tick


def simulate(
    arrival: np.ndarray,
    work: np.ndarray,
    servers: Sequence[ServerModel],
    dispatch: Dispatch,
    *,
    on_finish: OnFinish | None = None,
    on_tick: OnTick | None = None,
    tick_period: float = INF,
    until: float = INF,
    states: list[ServerState] | None = None,
    io: np.ndarray | None = None,
) -> Result:
    """Run the jobs (sorted `arrival` times, `work` in core-seconds at speed 1) through `servers`.

    `io` (seconds per job, optional): an IO phase at the start of service that holds a worker but no CPU.

    `states` lets the caller hold the servers' live state (for probes and oracles); it must be fresh
    `ServerState(model)` objects for `servers`, in order."""
    engine = Engine(
        arrival,
        work,
        servers,
        dispatch,
        on_finish=on_finish,
        on_tick=on_tick,
        tick_period=tick_period,
        states=states,
        io=io,
    )
    engine.run(until)
    return engine.result()
