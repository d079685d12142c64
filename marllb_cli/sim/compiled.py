"""The simulator's hot loop compiled with numba: the event engine (`engine.py`) and the LB layer's per-request
work (`lbs.py`: edge hash, flow table, selection, flow-duration reservoirs) in one loop over arrays.

Why a second implementation: in Python every request costs ≈ 35 µs (four segments through the dataplane's
`FlowTable`, the dispatch and finish callbacks, the engine's heaps), so `marllb simulate` ran at ≈ 28 k
requests per wall second. Compiled, the per-request work costs well under a microsecond, and what is left in
Python is what happens once per agent step: the same `LbLayer.tick` (features.observe, the agents,
step records) as in the pure-Python path, on views of these arrays.

The Python classes stay the reference: the dataplane runs them on real packets, the oracles and the
queueing-theory validation run on them, and `tests/unit/test_sim_compiled.py` checks that this loop makes
the same decision for every request and shows the agents the same observations at every step. It follows
them line by line, in particular:

    engine      per-server virtual time V with dV/dt = `ServerModel.rate(k)`; a job admitted at V₀ with
                work w finishes when V = V₀ + w; ties between jobs by job number, between servers by
                server number, an IO end before a completion at the same instant; events before an
                arrival at the same instant; the next agent step before both
    flow table  SYN (new flow: choose, q_j += 1) and the handshake ACK (a zero duration sample) at the
                arrival; the response's ACK (duration sample) and FIN (q_j −= 1) at the finish; RST
                (q_j −= 1) on rejection; a flow idle for `idle_timeout` ends by timeout at the next expiry
    selection   sed, lsq, wcmp (Vose's alias table, built by `selection.AliasTable`), ecmp (Maglev table
                from `selection.maglev_table`), with IPVS tie-breaking; or, for oracle-gsq, global shortest
                expected delay over the servers' true job counts (no flow tables)

Two differences by design: the random numbers (wcmp draws, reservoir slots once full) come from a
splitmix64 stream per LB, not Python's Mersenne Twister, so runs that use them are equal in distribution,
not bit for bit; and only what the agents see is kept (q_j, new flows, the flow-duration reservoirs), not
the dataplane's packet, completion and inter-arrival counters.

Servers need a finite worker limit and backlog (every config-driven server has them: Apache's
MaxRequestWorkers and listen backlog); `supported()` says when this core applies. Without numba (the `fast`
extra) it never does, and `sim.engine: auto` runs the Python engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from marllb_cli.agents.methods import PYTHON_ONLY
from marllb_cli.dataplane.flows import MAX_FLOWS
from marllb_cli.dataplane.selection import METHODS, Selector, maglev_table
from marllb_cli.errors import ConfigError
from marllb_cli.features import RESERVOIR_SLOTS
from marllb_cli.sim.engine import INF, Result, ServerModel
from marllb_cli.sim.lbs import job_hashes

try:
    import numba
except ImportError:  # the `fast` extra; without it the simulator runs the Python engine
    numba = None

__all__ = ["CompiledSim", "available", "supported", "use_compiled"]

_WCMP, _LSQ, _SED = (METHODS.index(m) for m in ("wcmp", "lsq", "sed"))  # anything else: ecmp (Maglev)
#: Beyond this, fixed per-server arrays of workers and backlog would waste memory; the Python engine runs.
MAX_SLOTS = 1 << 16


def available() -> bool:
    """Whether numba is installed (the `fast` extra)."""
    return numba is not None


def supported(models: Sequence[ServerModel]) -> bool:
    """Whether the compiled core can run these servers: numba present, finite workers and backlog."""
    return available() and all(
        math.isfinite(m.max_workers)
        and math.isfinite(m.backlog)
        and 0 < m.max_workers <= MAX_SLOTS
        and m.backlog <= MAX_SLOTS
        for m in models
    )


def use_compiled(setting: str, method: str, models: Sequence[ServerModel], source: object = None) -> bool:
    """Whether `sim.engine: setting` runs `method` on `models` with this core. `method` is the simulated
    selection (a heuristic, an oracle, or the sed an `rl:` policy starts from); oracle-srt needs every
    server's remaining work and oracle-weights copies the engine, which only the Python engine allows."""
    possible = supported(models) and method not in PYTHON_ONLY
    if setting == "compiled" and not possible:
        why = (
            "numba is not installed"
            if not available()
            else (
                f"{method} needs the Python engine"
                if method in PYTHON_ONLY
                else "a server has no worker or backlog limit"
            )
        )
        raise ConfigError(
            f"{source or 'config'}: sim.engine: compiled cannot run here ({why})",
            hint="pip install 'marllb[fast]', or set sim.engine to auto or python",
        )
    return possible and setting != "python"


class _State(NamedTuple):
    """Everything the loop reads and writes. Jobs are indexed by arrival order, servers by number."""

    # jobs
    arrival: np.ndarray  # f8[N]
    work: np.ndarray  # f8[N]
    io: np.ndarray  # f8[N], 0 without an IO phase
    hash: np.ndarray  # i8[N], the flow hash
    lb_of: np.ndarray  # i8[N], the edge router's choice
    server: np.ndarray  # i8[N], −1 until dispatched
    start: np.ndarray  # f8[N]
    finish: np.ndarray  # f8[N], NaN while running and when rejected
    open_flow: np.ndarray  # i1[N], 1 while the job's flow is open in its LB's table
    # servers
    cpus: np.ndarray  # f8[n]
    speed: np.ndarray  # f8[n]
    job_cap: np.ndarray  # f8[n]: the most one job gets
    hog: np.ndarray  # f8[n]: share of the CPU a neighbour process wants (timed events)
    max_workers: np.ndarray  # i8[n]
    backlog: np.ndarray  # i8[n]
    io_speed: np.ndarray  # f8[n]
    virtual: np.ndarray  # f8[n], V
    clock: np.ndarray  # f8[n], when V was last brought up to date
    rate: np.ndarray  # f8[n], dV/dt
    io_free: np.ndarray  # f8[n], when the FIFO IO device is done with the phases handed to it
    next_time: np.ndarray  # f8[n], the next completion (INF when idle)
    next_slot: np.ndarray  # i8[n], its slot in active_*
    n_active: np.ndarray  # i8[n]
    in_io: np.ndarray  # i8[n]
    active_v: np.ndarray  # f8[n, W], finish value of V of each computing job (unordered)
    active_job: np.ndarray  # i8[n, W]
    wait_job: np.ndarray  # i8[n, B], FIFO ring
    wait_head: np.ndarray  # i8[n]
    wait_len: np.ndarray  # i8[n]
    io_heap_t: np.ndarray  # f8[cap], IO ends ordered by (time, server, −job) as the engine's heap
    io_heap_job: np.ndarray  # i8[cap]
    # LBs
    method: np.ndarray  # i8[m], index into selection.METHODS
    weights: np.ndarray  # f8[m, n]
    alias_prob: np.ndarray  # f8[m, n]
    alias_idx: np.ndarray  # i8[m, n]
    maglev: np.ndarray  # i8[M]
    flows: np.ndarray  # i8[m, n], q_j as each LB sees it
    new_flows: np.ndarray  # i8[m, n]
    open_count: np.ndarray  # i8[m]
    res_t: np.ndarray  # f8[m, n, S], flow-duration reservoirs
    res_v: np.ndarray  # f8[m, n, S]
    res_filled: np.ndarray  # i8[m, n]
    cmp_t: np.ndarray  # f8[m, n, S], completion-time reservoirs (NeurIPS'22's observation; limits[2] = 1)
    cmp_v: np.ndarray  # f8[m, n, S]
    cmp_filled: np.ndarray  # i8[m, n]
    ia_t: np.ndarray  # f8[m, 1, S], each LB's inter-arrival reservoir (limits[2] = 1)
    ia_v: np.ndarray  # f8[m, 1, S]
    ia_filled: np.ndarray  # i8[m, 1]
    last_new: np.ndarray  # f8[m], the LB's last new flow (−1: none yet)
    rng: np.ndarray  # u8[m], splitmix64 state per LB
    expire_from: np.ndarray  # i8[m], first job not yet known to be past the idle timeout
    # scalars as small arrays: [next job, IO heap size, dispatch: 0 by the LBs' tables, 1 oracle-gsq],
    # [idle timeout, max flows, 1 to keep completion and inter-arrival samples, reservoir keep probability]
    cursor: np.ndarray  # i8[3]
    limits: np.ndarray  # f8[2]


def _jit(function):
    """Compiled with NumPy's error model: a float division needs no zero check (none divides by zero here:
    a rate is used only while jobs compute), and Python's check made the loop several times slower."""
    return numba.njit(cache=True, nogil=True, error_model="numpy")(function) if numba is not None else function


# --------------------------------------------------------------------------------------------------------
# random numbers, reservoirs, selection, flow table


@_jit
def _uniform(rng, lb):
    """splitmix64 (Steele, Lea & Flood 2014) → a double in [0, 1). (Helpers that numba may not inline take
    the arrays they need rather than the whole state, whose every array a call reference-counts.)"""
    z = rng[lb] + np.uint64(0x9E3779B97F4A7C15)
    rng[lb] = z
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@_jit
def _keep_sample(times, values, filled, lb, j, rng, t, value, keep):
    """`Reservoir.add` into reservoir [lb, j] of `times`/`values` ([m, n, S]): kept with probability `keep`
    (a draw only when below 1), then the next free slot, then a uniformly random one."""
    if keep < 1.0 and _uniform(rng, lb) >= keep:
        return
    slots = times.shape[2]
    count = filled[lb, j]
    if count < slots:
        slot = count
        filled[lb, j] = count + 1
    else:
        slot = int(_uniform(rng, lb) * slots)
    times[lb, j, slot] = t
    values[lb, j, slot] = value


@_jit
def _sample_duration(st, lb, j, t, value):
    """A flow-duration sample of server j at LB lb."""
    _keep_sample(st.res_t, st.res_v, st.res_filled, lb, j, st.rng, t, value, st.limits[3])


@_jit
def _sed(weights, flows, lb):
    """`selection.sed`: argmin_j (q_j + 1) / w_j over w_j > 0, compared as (q_i + 1)·w_j < (q_j + 1)·w_i."""
    best, best_q, best_w = -1, 0, 0.0
    for j in range(weights.shape[1]):
        w = weights[lb, j]
        if w <= 0:
            continue
        q1 = flows[lb, j] + 1
        if best < 0 or q1 * best_w < best_q * w:
            best, best_q, best_w = j, q1, w
    return best


@_jit
def _lsq(weights, flows, lb):
    """`selection.lsq`: argmin_j q_j over w_j > 0."""
    best = -1
    for j in range(weights.shape[1]):
        if weights[lb, j] > 0 and (best < 0 or flows[lb, j] < flows[lb, best]):
            best = j
    return best


@_jit
def _wcmp(alias_prob, alias_idx, rng, lb):
    """`AliasTable.sample` of a uniform number."""
    scaled = _uniform(rng, lb) * alias_prob.shape[1]
    j = int(scaled)
    return j if scaled - j < alias_prob[lb, j] else alias_idx[lb, j]


@_jit
def _maglev(maglev, flow_hash):
    """`Selector.by_hash`."""
    return maglev[flow_hash % maglev.shape[0]]


@_jit
def _choose(st, lb, flow_hash):
    """`Selector.choose`."""
    method = st.method[lb]
    if method == _SED:
        return _sed(st.weights, st.flows, lb)
    if method == _LSQ:
        return _lsq(st.weights, st.flows, lb)
    if method == _WCMP:
        return _wcmp(st.alias_prob, st.alias_idx, st.rng, lb)
    return _maglev(st.maglev, flow_hash)


@_jit
def _global_sed(st):
    """oracle-gsq (`LbLayer._oracle`): argmin (n_j + 1) / (cpus_j × speed_j) over the jobs each server
    really holds (computing, in IO, waiting); the lowest index wins ties."""
    best, best_delay = 0, INF
    for j in range(st.cpus.shape[0]):
        delay = (st.n_active[j] + st.in_io[j] + st.wait_len[j] + 1) / (st.cpus[j] * st.speed[j])
        if delay < best_delay:
            best, best_delay = j, delay
    return best


@_jit
def _open_flow(st, job, now):
    """The SYN and the handshake ACK of a new request at its LB; returns the chosen server."""
    lb = st.lb_of[job]
    flow_hash = st.hash[job]
    if st.open_count[lb] >= st.limits[1]:  # table full: forwarded by hash, untracked
        return _maglev(st.maglev, flow_hash)
    server = _choose(st, lb, flow_hash)
    st.open_flow[job] = 1
    st.open_count[lb] += 1
    st.flows[lb, server] += 1
    st.new_flows[lb, server] += 1
    _sample_duration(st, lb, server, now, 0.0)
    if st.limits[2] > 0:  # the LB's inter-arrival time between new flows
        if st.last_new[lb] >= 0:
            _keep_sample(st.ia_t, st.ia_v, st.ia_filled, lb, 0, st.rng, now, now - st.last_new[lb], st.limits[3])
        st.last_new[lb] = now
    return server


@_jit
def _close_flow(st, job, now, completed):
    """The response's ACK and the FIN (completed), or an RST (rejected), of an open flow."""
    if st.open_flow[job] == 0:
        return
    lb, server = st.lb_of[job], st.server[job]
    if completed:
        _sample_duration(st, lb, server, now, now - st.arrival[job])
    if st.limits[2] > 0:  # FIN or RST: the completion time, as the dataplane samples it
        _keep_sample(st.cmp_t, st.cmp_v, st.cmp_filled, lb, server, st.rng, now, now - st.arrival[job], st.limits[3])
    _end_flow(st, job)


@_jit
def _end_flow(st, job):
    """`FlowTable._end`: the flow is no longer open, q_j −= 1."""
    lb = st.lb_of[job]
    st.open_flow[job] = 0
    st.open_count[lb] -= 1
    st.flows[lb, st.server[job]] -= 1


@_jit
def _expire(st, lb, now):
    """`FlowTable.expire` for open flows: a flow's last segment is its arrival (SYN, ACK) until it finishes,
    so the flows past the idle timeout are a prefix of the jobs in arrival order."""
    job = st.expire_from[lb]
    timeout = st.limits[0]
    ended = 0
    while job < st.cursor[0] and now - st.arrival[job] >= timeout:
        if st.lb_of[job] == lb and st.open_flow[job] == 1:
            _end_flow(st, job)
            ended += 1
        job += 1
    st.expire_from[lb] = job
    return ended


# --------------------------------------------------------------------------------------------------------
# servers


@_jit
def _advance(st, s, now):
    if st.n_active[s] > 0:
        st.virtual[s] += (now - st.clock[s]) * st.rate[s]
    st.clock[s] = now


@_jit
def _rerate(st, s):
    k = st.n_active[s]
    if k == 0:
        st.rate[s] = 0.0
        return
    share = st.speed[s] * st.cpus[s]  # as ServerModel.rate: the hog is one more task in processor sharing
    st.rate[s] = min(st.job_cap[s], (share - min(st.hog[s] * share, share / (k + 1))) / k)


@_jit
def _drop_waiting(st, s, now):
    """Reset every job in server s's backlog (its listener closed): each ends as rejected."""
    ring = st.wait_job.shape[1]
    dropped = st.wait_len[s]
    for i in range(dropped):
        _close_flow(st, st.wait_job[s, (st.wait_head[s] + i) % ring], now, False)
    st.wait_len[s] = 0
    return dropped


@_jit
def _reschedule(st, s):
    """The server's next completion: its active job with the smallest (finish V, job)."""
    k = st.n_active[s]
    if k == 0:
        st.next_time[s] = INF
        return
    best = 0
    for i in range(1, k):
        v, best_v = st.active_v[s, i], st.active_v[s, best]
        if v < best_v or (v == best_v and st.active_job[s, i] < st.active_job[s, best]):
            best = i
    st.next_slot[s] = best
    st.next_time[s] = st.clock[s] + max(0.0, st.active_v[s, best] - st.virtual[s]) / st.rate[s]


@_jit
def _compute(st, s, job):
    """The job joins processor sharing at the server's current V."""
    k = st.n_active[s]
    st.active_v[s, k] = st.virtual[s] + st.work[job]
    st.active_job[s, k] = job
    st.n_active[s] = k + 1
    _rerate(st, s)


@_jit
def _io_before(st, a, b):
    """Heap order of IO ends a and b: (time, server, −job), as (time, server, −1 − job) in the engine."""
    ta, tb = st.io_heap_t[a], st.io_heap_t[b]
    if ta != tb:
        return ta < tb
    ja, jb = st.io_heap_job[a], st.io_heap_job[b]
    sa, sb = st.server[ja], st.server[jb]
    if sa != sb:
        return sa < sb
    return ja > jb


@_jit
def _io_swap(st, a, b):
    st.io_heap_t[a], st.io_heap_t[b] = st.io_heap_t[b], st.io_heap_t[a]
    st.io_heap_job[a], st.io_heap_job[b] = st.io_heap_job[b], st.io_heap_job[a]


@_jit
def _io_push(st, t, job):
    i = st.cursor[1]
    st.cursor[1] = i + 1
    st.io_heap_t[i] = t
    st.io_heap_job[i] = job
    while i > 0:
        parent = (i - 1) // 2
        if not _io_before(st, i, parent):
            break
        _io_swap(st, i, parent)
        i = parent


@_jit
def _io_pop(st):
    job = st.io_heap_job[0]
    size = st.cursor[1] - 1
    st.cursor[1] = size
    if size > 0:
        st.io_heap_t[0] = st.io_heap_t[size]
        st.io_heap_job[0] = st.io_heap_job[size]
        i = 0
        while True:
            left, smallest = 2 * i + 1, i
            if left < size and _io_before(st, left, smallest):
                smallest = left
            if left + 1 < size and _io_before(st, left + 1, smallest):
                smallest = left + 1
            if smallest == i:
                break
            _io_swap(st, i, smallest)
            i = smallest
    return job


@_jit
def _admit(st, s, job, now):
    """Give `job` a worker; False when it starts with IO (nothing to reschedule)."""
    st.start[job] = now
    io = st.io[job]
    if io > 0:
        st.in_io[s] += 1
        if st.io_speed[s] == INF:
            done = now + io
        else:
            st.io_free[s] = max(now, st.io_free[s]) + io / st.io_speed[s]
            done = st.io_free[s]
        _io_push(st, done, job)
        return False
    _compute(st, s, job)
    return True


# --------------------------------------------------------------------------------------------------------
# the loop


@_jit
def _run(st, limit, inclusive):
    """Process arrivals and server events before `limit` (at or before it when `inclusive`), in the engine's
    order; returns whether anything (arrivals, computing jobs, IO phases) is left."""
    n_jobs, n_servers = st.arrival.shape[0], st.cpus.shape[0]
    while True:
        job = st.cursor[0]
        t_arrival = st.arrival[job] if job < n_jobs else INF
        t_done, done_at = INF, -1
        for s in range(n_servers):
            if st.next_time[s] < t_done:
                t_done, done_at = st.next_time[s], s
        t_io = st.io_heap_t[0] if st.cursor[1] > 0 else INF
        io_first = t_io < t_done or (t_io == t_done and t_io < INF and st.server[st.io_heap_job[0]] <= done_at)
        t_event = t_io if io_first else t_done
        if t_event <= t_arrival:
            if t_event == INF:
                return False
            if t_event > limit or (t_event == limit and not inclusive):
                return True
            if io_first:  # an IO phase ended: the job starts computing
                ended = _io_pop(st)
                s = st.server[ended]
                _advance(st, s, t_io)
                st.in_io[s] -= 1
                _compute(st, s, ended)
                _reschedule(st, s)
                continue
            s, now = done_at, t_done
            _advance(st, s, now)
            slot, last = st.next_slot[s], st.n_active[s] - 1
            finished = st.active_job[s, slot]
            st.active_v[s, slot], st.active_job[s, slot] = st.active_v[s, last], st.active_job[s, last]
            st.n_active[s] = last
            _rerate(st, s)
            st.finish[finished] = now
            _close_flow(st, finished, now, True)
            if st.wait_len[s] > 0:
                head = st.wait_head[s]
                waiting = st.wait_job[s, head]
                st.wait_head[s] = (head + 1) % st.wait_job.shape[1]
                st.wait_len[s] -= 1
                _admit(st, s, waiting, now)
            _reschedule(st, s)
            continue
        if t_arrival > limit or (t_arrival == limit and not inclusive):
            return True
        now = t_arrival
        st.cursor[0] = job + 1
        s = _global_sed(st) if st.cursor[2] == 1 else _open_flow(st, job, now)
        st.server[job] = s
        _advance(st, s, now)
        if st.n_active[s] + st.in_io[s] < st.max_workers[s]:
            if _admit(st, s, job, now):
                _reschedule(st, s)
        elif st.wait_len[s] < st.backlog[s]:
            ring = st.wait_job.shape[1]
            st.wait_job[s, (st.wait_head[s] + st.wait_len[s]) % ring] = job
            st.wait_len[s] += 1
        else:  # rejected: a reset connection
            _close_flow(st, job, now, False)


# --------------------------------------------------------------------------------------------------------
# Python side: the same objects `LbLayer` and the environment use with the Python engine


class _Reservoir:
    """A view of one reservoir (flow durations by default) with `Reservoir.samples()`."""

    def __init__(self, st: _State, lb: int, server: int, kind: str = "res") -> None:
        times, values, filled = (getattr(st, f"{kind}_{part}") for part in ("t", "v", "filled"))
        self._times, self._values = times[lb, server], values[lb, server]
        self._filled, self._server = filled[lb], server

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        filled = self._filled[self._server]
        return self._times[:filled], self._values[:filled]


class _MirroredSelector(Selector):
    """The dataplane's `Selector` (validation, alias table) whose method and weights are copied into the
    compiled state, where the loop selects."""

    def __init__(self, st: _State, lb: int, n: int, method: str, weights: Sequence[float]) -> None:
        self._st, self._lb = st, lb
        super().__init__(n, method=method, weights=weights)

    def set_weights(self, weights: Sequence[float]) -> None:
        super().set_weights(weights)
        self._st.weights[self._lb] = self.weights
        self._st.alias_prob[self._lb] = self._alias.prob
        self._st.alias_idx[self._lb] = self._alias.alias

    def set_method(self, method: str) -> None:
        super().set_method(method)
        self._st.method[self._lb] = METHODS.index(method)


class _Table:
    """What `LbLayer` and the environment read of an LB's `FlowTable`: flows, new_flows, durations,
    completions, interarrivals, selector, expire (completions and inter-arrivals stay empty unless the
    simulator keeps them: `CompiledSim(neurips_observation=True)`)."""

    def __init__(self, st: _State, lb: int, method: str, weights: Sequence[float]) -> None:
        n = st.cpus.shape[0]
        self._st, self._lb = st, lb
        self.selector = _MirroredSelector(st, lb, n, method, weights)
        self.flows = st.flows[lb]
        self.new_flows = st.new_flows[lb]
        self.durations = [_Reservoir(st, lb, j) for j in range(n)]
        self.completions = [_Reservoir(st, lb, j, "cmp") for j in range(n)]
        self.interarrivals = _Reservoir(st, lb, 0, "ia")

    def expire(self, now: float) -> int:
        return int(_expire(self._st, self._lb, now))


class _Server:
    """What `LbLayer` reads of a server's state (`ServerState`): its model, the workers in use, the jobs."""

    def __init__(self, st: _State, index: int, model: ServerModel) -> None:
        self._st, self._index, self.model = st, index, model

    def workers(self) -> int:
        return int(self._st.n_active[self._index] + self._st.in_io[self._index])

    def jobs(self) -> int:
        return self.workers() + int(self._st.wait_len[self._index])


class CompiledSim:
    """Engine and LB layer in one: `run(until)` as `Engine.run`, `table(lb, method, weights)` as the
    `LbLayer` table factory, `servers` as its states, `result()` as `Engine.result()`."""

    def __init__(
        self,
        arrival: np.ndarray,
        work: np.ndarray,
        servers: Sequence[ServerModel],
        *,
        n_lbs: int,
        idle_timeout: float = 40.0,
        seed: int = 0,
        io: np.ndarray | None = None,
        on_tick=None,
        tick_period: float = INF,
        slots: int = RESERVOIR_SLOTS,
        max_flows: int = MAX_FLOWS,
        oracle_gsq: bool = False,
        neurips_observation: bool = False,
        reservoir_keep: float = 1.0,
    ) -> None:
        """The arguments of `Engine` and of `LbLayer`'s tables; `oracle_gsq` dispatches every request by
        global shortest expected delay over the servers' true job counts instead of by the LBs' tables;
        `neurips_observation` keeps the completion-time and inter-arrival samples NeurIPS'22's observation
        reads (they cost random numbers, so runs without it draw as before)."""
        if not supported(servers):
            raise ValueError("the compiled simulator needs numba and finite worker and backlog limits")
        n_jobs, n = len(arrival), len(servers)
        workers = int(max(m.max_workers for m in servers))
        backlog = max(1, int(max(m.backlog for m in servers)))
        hashes = job_hashes(n_jobs)
        self.arrival = np.ascontiguousarray(arrival, dtype=np.float64)
        f8 = lambda *shape: np.zeros(shape, dtype=np.float64)  # noqa: E731
        i8 = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        self._st = _State(
            arrival=self.arrival,
            work=np.ascontiguousarray(work, dtype=np.float64),
            io=np.ascontiguousarray(io, dtype=np.float64) if io is not None else f8(n_jobs),
            hash=hashes,
            lb_of=hashes % n_lbs,
            server=np.full(n_jobs, -1, dtype=np.int64),
            start=np.full(n_jobs, np.nan),
            finish=np.full(n_jobs, np.nan),
            open_flow=np.zeros(n_jobs, dtype=np.int8),
            cpus=np.array([m.cpus for m in servers], dtype=np.float64),
            speed=np.array([m.speed for m in servers], dtype=np.float64),
            job_cap=np.array([m.job_cap for m in servers], dtype=np.float64),
            hog=np.array([m.hog for m in servers], dtype=np.float64),
            max_workers=np.array([m.max_workers for m in servers], dtype=np.int64),
            backlog=np.array([m.backlog for m in servers], dtype=np.int64),
            io_speed=np.array([m.io_speed for m in servers], dtype=np.float64),
            virtual=f8(n),
            clock=f8(n),
            rate=f8(n),
            io_free=f8(n),
            next_time=np.full(n, INF),
            next_slot=i8(n),
            n_active=i8(n),
            in_io=i8(n),
            active_v=f8(n, workers),
            active_job=i8(n, workers),
            wait_job=i8(n, backlog),
            wait_head=i8(n),
            wait_len=i8(n),
            io_heap_t=f8(max(1, n * workers)),
            io_heap_job=i8(max(1, n * workers)),
            method=i8(n_lbs),
            weights=np.ones((n_lbs, n)),
            alias_prob=np.ones((n_lbs, n)),
            alias_idx=np.tile(np.arange(n, dtype=np.int64), (n_lbs, 1)),
            maglev=np.asarray(maglev_table(n), dtype=np.int64),
            flows=i8(n_lbs, n),
            new_flows=i8(n_lbs, n),
            open_count=i8(n_lbs),
            res_t=f8(n_lbs, n, slots),
            res_v=f8(n_lbs, n, slots),
            res_filled=i8(n_lbs, n),
            cmp_t=f8(n_lbs, n, slots),
            cmp_v=f8(n_lbs, n, slots),
            cmp_filled=i8(n_lbs, n),
            ia_t=f8(n_lbs, 1, slots),
            ia_v=f8(n_lbs, 1, slots),
            ia_filled=i8(n_lbs, 1),
            last_new=np.full(n_lbs, -1.0),
            rng=np.array([(seed * 1_000 + lb) & (2**64 - 1) for lb in range(n_lbs)], dtype=np.uint64),
            expire_from=i8(n_lbs),
            cursor=np.array([0, 0, int(oracle_gsq)], dtype=np.int64),
            limits=np.array([idle_timeout, max_flows, float(neurips_observation), reservoir_keep], dtype=np.float64),
        )
        self.lb_of = self._st.lb_of
        self.servers = [_Server(self._st, j, model) for j, model in enumerate(servers)]
        self.on_tick, self.tick_period = on_tick, tick_period
        self.next_tick = 0.0 if on_tick is not None else INF
        _run(self._st, -INF, False)  # load (or compile) the loop now, so that a timed run does not count it
        _expire(self._st, 0, -INF)

    def table(self, lb: int, method: str, weights: Sequence[float]) -> _Table:
        """LB `lb`'s table, selecting by `method` with `weights` until told otherwise."""
        return _Table(self._st, lb, method, weights)

    def run(self, until: float = INF) -> None:
        """Process every agent step, completion and arrival at or before `until`, in time order (steps
        first), as `Engine.run`."""
        while self.on_tick is not None and self.next_tick <= until:
            if not _run(self._st, self.next_tick, False):
                return
            self.on_tick(self.next_tick)
            self.next_tick += self.tick_period
        _run(self._st, until, True)

    def retune(self, index: int, model: ServerModel, now: float) -> None:
        """Server `index` runs as `model` from `now` on, as `Engine.retune`."""
        st = self._st
        _advance(st, index, now)
        st.cpus[index], st.speed[index], st.job_cap[index], st.hog[index] = (
            model.cpus,
            model.speed,
            model.job_cap,
            model.hog,
        )
        st.max_workers[index], st.backlog[index] = int(model.max_workers), int(model.backlog)
        self.servers[index].model = model
        _rerate(st, index)
        _reschedule(st, index)

    def drop_waiting(self, index: int, now: float) -> int:
        """Reset the jobs in server `index`'s backlog, as `Engine.drop_waiting`; returns how many."""
        return int(_drop_waiting(self._st, index, now))

    def route(self, live: Sequence[int]) -> None:
        """From the next arrival on, the edge router hashes flows over the LBs `live` only (an LB left or
        rejoined its route): job j goes to live[hash_j mod len(live)], as `LbLayer.dispatch`."""
        st = self._st
        first = int(st.cursor[0])
        st.lb_of[first:] = np.asarray(live, dtype=np.int64)[st.hash[first:] % len(live)]

    def result(self) -> Result:
        st = self._st
        return Result(arrival=st.arrival, server=st.server, start=st.start, finish=st.finish)
