"""The LB layer of the simulator: an edge router hashing flows over m LBs, each LB with the dataplane's own
`FlowTable` (q_j as that LB sees it, the flow-duration reservoirs) and `Selector`, and one agent per LB
stepping every period through the same `Agent` interface, `features.observe` and step record as on the
testbed.

A request is one flow. An LB sees only the client's segments, and in simulation they are, with zero RTT:

    arrival   SYN (opens the flow: the selector picks the server, q_j += 1), then the handshake ACK
    finish    the ACK of the response (samples the flow duration), then FIN (q_j −= 1, completion sample)

so the reservoirs fill with the same mixture of near-zero and full-length durations as on the wire, and a
request running longer than the idle timeout ends by timeout exactly as it would there (the table is
expired every second, as the dataplane does). A rejected request (full backlog) is a reset: RST.

Oracle policies see what no LB can (the servers' true state) and skip the flow tables:
    oracle-srt   the server that would finish the new job first if nothing else arrived (exact PS
                 drain of its remaining work, backlog and worker limit included). With IO phases it is
                 approximate: the new job computes once the server's FIFO IO device has done its IO (exact),
                 on the server's work projected to that moment, and jobs in IO are not in the drain.
    oracle-gsq   global shortest expected delay: argmin (n_j + 1) / (cpus_j × speed_j) over the jobs n_j
                 each server really holds (computing, in IO, or waiting), summed over all LBs
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from marllb_cli.agents.base import Agent
from marllb_cli.agents.heuristics import heuristic
from marllb_cli.agents.methods import LOOKAHEAD, ORACLES, SIM_METHODS
from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.packets import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from marllb_cli.dataplane.selection import Selector
from marllb_cli.features import observe, observe_many, observe_neurips
from marllb_cli.sim.engine import ServerState
from marllb_cli.steps import step_record

__all__ = ["LbLayer", "finish_if_added", "job_hash", "job_hashes"]

#: Steps of agents that do not read their observation are recorded in batches of this many (see `tick`).
RECORD_BATCH = 64
_ACK, _FIN, _RST = TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST


def job_key(job: int) -> bytes:
    """The flow key of request `job`: 12 bytes, as long as a TCP 4-tuple key."""
    return job.to_bytes(12, "little")


def job_hash(job: int) -> int:
    """The 32-bit hash of request `job`'s flow: the edge router's ECMP hash and the LB's Maglev hash."""
    return zlib.crc32(job_key(job))


def _crc32_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table


_CRC32 = _crc32_table()


def job_hashes(n: int) -> np.ndarray:
    """`job_hash` of jobs 0 … n−1 at once: CRC-32 (zlib's) of each job's 12-byte key, byte by byte over
    all jobs in NumPy, for the compiled simulator, which needs every hash before it starts."""
    jobs = np.arange(n, dtype=np.uint64)
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    for byte in range(12):  # little-endian; bytes 8–11 are zero
        value = ((jobs >> np.uint64(8 * byte)) & np.uint64(0xFF)).astype(np.uint32) if byte < 8 else np.uint32(0)
        crc = _CRC32[(crc ^ value) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
    return (crc ^ np.uint32(0xFFFFFFFF)).astype(np.int64)


@dataclass
class _PendingStep:
    """What a blind step's records need, copied at the step: every LB's weights and new flows, and all LBs'
    q_j and reservoirs together (stacked arrays when every reservoir holds as many samples, else a copy of
    each one's (times, values))."""

    now: float
    step: int
    weights: list
    new_flows: list[list[int]]
    flows: np.ndarray
    durations: tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]


class LbLayer:
    """Dispatch, finish and tick callbacks for `engine.simulate`, and what the run records."""

    def __init__(
        self,
        *,
        method: str,
        n_lbs: int,
        states: list[ServerState],
        cpus: Sequence[float],
        idle_timeout: float = 40.0,
        work: Sequence[float],
        io: Sequence[float] | None = None,
        seed: int = 0,
        agents: list[Agent] | None = None,
        joint: Any = None,
        table_factory: Callable[[int, str, list[float]], Any] | None = None,
        neurips_observation: bool = False,
        reservoir_keep: float = 1.0,
    ) -> None:
        """`states` are the servers' live states (anything with `workers()`). `table_factory(lb, method,
        weights)` makes LB `lb`'s flow table; by default the dataplane's `FlowTable`, and the compiled
        simulator passes its own (`CompiledSim.table`)."""
        if method not in SIM_METHODS:
            raise ValueError(f"unknown method {method!r}")
        self.method = method
        self.neurips_observation = neurips_observation  # agents get `features.observe_neurips`'s 16 columns
        self.joint = joint  # Centr-LB: act_all(observations of every LB) → weights of every LB
        self.work, self.io = work, io
        self.states = states
        self.n = len(states)
        self.n_lbs = n_lbs
        self.capacity = np.array([c * s.model.speed for c, s in zip(cpus, states, strict=True)])
        self.oracle = method in ORACLES
        probe = self._busy_probe
        # Static weights ∝ capacity (cpus × speed): the testbed's cpus, and faster servers count for more.
        self.agents: list[Agent] = agents or [
            heuristic("sed" if self.oracle or method == LOOKAHEAD else method, self.capacity.tolist(), probe)
            for _ in range(n_lbs)
        ]

        def flow_table(lb: int, method: str, weights: list[float]) -> FlowTable:
            rng = random.Random(seed * 1_000 + lb)
            selector = Selector(self.n, method=method, weights=weights, rng=rng)
            return FlowTable(selector, idle_timeout=idle_timeout, keep_probability=reservoir_keep, rng=rng)

        make_table = table_factory or flow_table
        self.tables = [make_table(lb, agent.method, list(agent.weights)) for lb, agent in enumerate(self.agents)]
        self.lb_of: list[int] = []
        self.steps: list[list[dict]] = [[] for _ in range(n_lbs)]  # complete after `step_records()`
        # Agents that act without reading their observation (the static heuristics) need it only for their
        # step records; those observations are reduced RECORD_BATCH steps at a time, which costs a fraction
        # of one reduction per step (the simulator's largest cost per simulated second otherwise).
        self._blind = joint is None and not any(getattr(agent, "reads_observation", True) for agent in self.agents)
        self._pending: list[_PendingStep] = []
        self.busy: list[tuple[float, int, int]] = []  # (t, server, jobs holding a worker)
        self._step = 0
        self._next_expire = 1.0
        self.live = list(range(n_lbs))  # the LBs in the router's route (timed events take them out)
        self.agents_down: set[int] = set()  # killed agents: their tables keep the last weights
        self.on_step: Callable[[float], None] | None = None  # timed events, before each step's housekeeping

    # -- engine callbacks -------------------------------------------------------------------------------
    def dispatch(self, job: int, now: float) -> int:
        key = job_key(job)
        live = self.live
        lb = live[zlib.crc32(key) % len(live)]  # the edge router's per-flow ECMP hash over the LBs up
        self.lb_of.append(lb)
        if self.oracle:
            return self._oracle(job, now)
        table = self.tables[lb]
        server = table.server_for(key, TCP_SYN, now)
        table.server_for(key, _ACK, now)
        return server

    def finish(self, job: int, server: int, now: float, completed: bool) -> None:
        if self.oracle:
            return
        key = job_key(job)
        table = self.tables[self.lb_of[job]]
        if completed:
            table.server_for(key, _ACK, now)
            table.server_for(key, _FIN, now)
        else:
            table.server_for(key, _RST, now)

    def tick(self, now: float) -> None:
        """An agent step on every LB, the busy-workers sample, and the 1 s flow-table expiry. Oracles have
        no agents: their step is the housekeeping alone."""
        self.housekeeping(now)
        if self.oracle:
            return
        if self._blind:
            self._blind_step(now)
            return
        observations = self.observe_all(now)
        joint = self.joint.act_all(observations) if self.joint is not None else None
        for lb, (agent, table) in enumerate(zip(self.agents, self.tables, strict=True)):
            if lb in self.agents_down:
                continue
            obs = observations[lb]
            weights = joint[lb] if joint is not None else agent.act(obs)
            self._apply(table, weights)
            self.steps[lb].append(step_record(now, self._step, f"lb{lb}", agent, obs, weights, table.new_flows))
        self._step += 1

    def kill_agent(self, lb: int) -> None:
        """LB `lb`'s agent stops: no more steps or records; its table keeps the weights it has. Steps of
        blind agents still pending are recorded first, and later steps go the per-step way."""
        self._record_pending()
        self._blind = False
        self.agents_down.add(lb)

    def step_records(self) -> list[list[dict]]:
        """Every LB's step records (`steps.step_record`), in order."""
        self._record_pending()
        return self.steps

    def _apply(self, table: Any, weights: Sequence[float]) -> None:
        as_floats = [float(w) for w in weights]
        if as_floats != table.selector.weights:  # a heuristic's stay the same: no new alias table
            table.selector.set_weights(as_floats)

    def _blind_step(self, now: float) -> None:
        """A step of agents that do not read their observation: they act now; what their records show
        (q_j, new flows, the reservoirs) is copied and reduced later with other steps'."""
        weights = []
        for agent, table in zip(self.agents, self.tables, strict=True):
            weights.append(agent.act(None))  # type: ignore[arg-type]  # reads_observation = False
            self._apply(table, weights[-1])
        flows = np.concatenate([table.flows for table in self.tables])
        samples = [r.samples() for table in self.tables for r in table.durations]
        if len({len(values) for _, values in samples}) == 1 and len(samples[0][1]):
            durations: Any = (np.stack([t for t, _ in samples]), np.stack([v for _, v in samples]))
        else:  # reservoirs still filling: each one's own copy
            durations = [(t.copy(), v.copy()) for t, v in samples]
        new_flows = [list(table.new_flows) for table in self.tables]
        self._pending.append(_PendingStep(now, self._step, weights, new_flows, flows, durations))
        self._step += 1
        if len(self._pending) >= RECORD_BATCH:
            self._record_pending()

    def _record_pending(self) -> None:
        """The records of the pending blind steps: the steps whose reservoirs were equally full are
        reduced in one `observe_many` call, the others one by one with `observe`."""
        pending, self._pending = self._pending, []
        observations: dict[int, np.ndarray] = {}
        full = {i: p.durations for i, p in enumerate(pending) if isinstance(p.durations, tuple)}
        for size in {values.shape[1] for _, values in full.values()}:
            same = [i for i, (_, values) in full.items() if values.shape[1] == size]
            joint = observe_many(
                np.stack([pending[i].flows for i in same]),
                np.stack([full[i][0] for i in same]),
                np.stack([full[i][1] for i in same]),
                np.array([pending[i].now for i in same]),
            )
            observations.update(zip(same, joint, strict=True))
        for i, p in enumerate(pending):
            if i not in observations:
                observations[i] = observe(p.flows, p.durations, p.now)
        for i, p in enumerate(pending):
            for lb, agent in enumerate(self.agents):
                obs = observations[i][lb * self.n : (lb + 1) * self.n]
                self.steps[lb].append(step_record(p.now, p.step, f"lb{lb}", agent, obs, p.weights[lb], p.new_flows[lb]))

    def housekeeping(self, now: float) -> None:
        """What happens every step whoever acts: the timed events due, the 1 s flow-table expiry and the
        busy-workers sample."""
        if self.on_step is not None:
            self.on_step(now)
        if now >= self._next_expire:
            for table in self.tables:
                table.expire(now)
            self._next_expire = now + 1.0
        for j, state in enumerate(self.states):
            self.busy.append((now, j, state.workers()))

    def observe(self, lb: int, now: float) -> np.ndarray:
        """LB `lb`'s observation, exactly as its agent on the testbed computes it: [servers, 6], or 16 columns
        with `neurips_observation`."""
        return self._observe([self.tables[lb]], now)

    def observe_all(self, now: float) -> list[np.ndarray]:
        """Every LB's observation (as `observe`), reduced in one call: the agent step is what the compiled
        simulator spends most of its time on, and one reduction over all LBs' rows costs little more than
        one over a single LB's."""
        joint = self._observe(self.tables, now)
        return [joint[lb * self.n : (lb + 1) * self.n] for lb in range(self.n_lbs)]

    def _observe(self, tables: Sequence[Any], now: float) -> np.ndarray:
        flows = np.concatenate([table.flows for table in tables])
        durations = [r.samples() for table in tables for r in table.durations]
        if not self.neurips_observation:
            return observe(flows, durations, now)
        completions = [r.samples() for table in tables for r in table.completions]
        return observe_neurips(flows, durations, completions, [t.interarrivals.samples() for t in tables], now)

    # -- helpers ----------------------------------------------------------------------------------------
    def _busy_probe(self) -> list[int | None]:
        """What mod_status would report: the workers in use plus the probe's own."""
        return [s.workers() + 1 for s in self.states]

    def _oracle(self, job: int, now: float) -> int:
        if self.method == "oracle-gsq":
            jobs = np.array([s.jobs() for s in self.states], dtype=np.float64)
            return int(np.argmin((jobs + 1) / self.capacity))
        work, io = self.work[job], (self.io[job] if self.io is not None else 0.0)
        return min(range(self.n), key=lambda j: finish_if_added(self.states[j], work, now, io))


def finish_if_added(state: ServerState, work: float, now: float, io: float = 0.0) -> float:
    """When a new job of `work` (and an IO phase of `io` s) would finish at this server if nothing else
    arrived (∞ if rejected).

    Drains the server exactly: the k active jobs each get speed × min(1, cpus/k); a finished job's worker
    goes to the next waiting job (FIFO); the new job joins the active set, or the end of the backlog. With
    IO, the job computes from the moment the server's FIFO IO device is done with it (`io_free` and
    `io_speed`, as the engine does), on the server's work projected to that moment at its current rate."""
    model = state.model
    if io > 0:
        now = max(now, state.io_free) + io / model.io_speed if model.io_speed < np.inf else now + io
    active, waiting = state.remaining(now)
    if len(active) < model.max_workers:
        active.append(work)
        new = len(active) - 1
    elif len(waiting) < model.backlog:
        waiting.append(work)
        new = len(active) + len(waiting) - 1  # ids: active first, then the waiting line in order
    else:
        return np.inf
    remaining = dict(enumerate(active))
    line = list(enumerate(waiting, start=len(active)))
    line.reverse()  # pop() from the end = FIFO
    t = now
    while True:
        rate = model.rate(len(remaining))
        first = min(remaining, key=remaining.__getitem__)
        served = remaining.pop(first)
        t += served / rate
        for i in remaining:
            remaining[i] -= served
        if first == new:
            return t
        if line:
            i, w = line.pop()
            remaining[i] = w
