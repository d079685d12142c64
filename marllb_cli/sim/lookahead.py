"""`oracle-weights`: the SED weights an agent could best set every agent period, found by looking ahead.

Every learned policy acts in the same space: each agent period it sets every LB's SED weights. oracle-srt
decides per request, knowing each job's size and every server's queues, so it can beat anything in that
space. `oracle-weights` is the reference for the space itself: how far SED weights set every period can go.

At each agent step it does the following:
1. It copies the whole simulation (servers, flow tables, pending events) once per candidate weight vector.
2. It holds that candidate on every LB for `HORIZON_S` of the real future arrivals.
3. It scores the candidate by the job-seconds spent in the system during [now, now + horizon]. By Little's
   law, that is the window's share of the total JCT.
4. It applies the best candidate until the next step.

The candidates are each server group's capacity weights scaled by one ratio, the others' unscaled:
on sim-moderate-io50 that is small : large per cpu from 1 : 2.5 to 2.5 : 1.

It knows the future, but it is greedy over a short window and its candidates are finite. So it is a strong
reference, not a proof of optimality. It runs on the Python engine, which can be copied. One 60 s run of
sim-moderate-io50 takes about half a minute of wall time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from marllb_cli.sim.engine import Engine
from marllb_cli.sim.lbs import LbLayer

__all__ = ["HORIZON_S", "RATIOS", "candidates", "run_lookahead", "time_in_system"]

#: Per-group weight scales tried at every step (with 1, plain SED).
RATIOS = (1.25, 1.5625, 2.0, 2.5)
#: Seconds each candidate is simulated ahead: long enough for one period's dispatches to finish (the mean
#: JCT is ≈ 0.14 s), short enough that arrivals far ahead do not blur the choice.
HORIZON_S = 2.0


def candidates(capacity: Sequence[float], groups: Sequence[str], ratios: Sequence[float] = RATIOS) -> list[np.ndarray]:
    """Capacity weights, and each group's capacity weights scaled by each ratio. SED only compares
    weights with each other, so vectors equal up to a common factor are kept once."""
    base = np.asarray(capacity, dtype=np.float64)
    names = list(dict.fromkeys(groups))
    vectors = [base] + [base * np.where(np.asarray(groups) == name, ratio, 1.0) for name in names for ratio in ratios]
    unique: list[np.ndarray] = []
    for vector in vectors:
        if not any(np.allclose(vector / vector.sum(), seen / seen.sum()) for seen in unique):
            unique.append(vector)
    return unique


def time_in_system(engine: Engine, start: float, end: float) -> float:
    """Job-seconds in the system during [start, end], over the jobs that have arrived. A rejected job counts
    from its arrival to `end`: refusing work must not look cheap."""
    arrived = engine.next_job
    arrival = engine.arrival[:arrived]
    finish = engine.finish[:arrived]
    finish = np.where(np.isnan(finish), end, finish)
    return float(np.clip(np.minimum(finish, end) - np.maximum(arrival, start), 0.0, None).sum())


def _fork(engine: Engine, lbs: LbLayer) -> tuple[Engine, LbLayer]:
    """An independent copy of the running simulation to look ahead with. What the copy only reads (the
    requests, each selector's 65 537-entry Maglev table) is shared; the lists of ints it appends to are
    copied shallowly; what it never needs (the run's records) starts empty. A plain deepcopy spent 60 ms per
    copy on those; this one spends a few."""
    shared = [engine.arrival, engine._arrivals, engine._works, engine._ios, lbs.work, lbs.io]
    shared += [table.selector._maglev for table in lbs.tables]
    memo: dict[int, object] = {id(x): x for x in shared if x is not None}
    memo[id(lbs.lb_of)] = list(lbs.lb_of)
    for history in (lbs.steps, lbs.busy, lbs._pending):
        memo[id(history)] = type(history)()
    return copy.deepcopy((engine, lbs), memo)


def _set_weights(lbs: LbLayer, weights: np.ndarray) -> None:
    """Set every LB's weights now, and give its agent (a `StaticWeights`) the same, so the next `tick`
    records them. A new array, not an in-place change: step records keep a reference to the previous one."""
    for agent in lbs.agents:
        agent.weights = weights.copy()
    for table in lbs.tables:
        table.selector.set_weights(weights.tolist())


def run_lookahead(
    engine: Engine, lbs: LbLayer, period: float, choices: list[np.ndarray], horizon: float = HORIZON_S
) -> None:
    """Run the simulation to the end, choosing every LB's weights each `period` by looking ahead."""
    now = 0.0
    n = len(engine.arrival)
    while engine.next_job < n or engine.pending():
        if engine.next_job < n:  # once every request has arrived, weights no longer matter
            costs = []
            for weights in choices:
                fork, fork_lbs = _fork(engine, lbs)
                _set_weights(fork_lbs, weights)
                fork.run(until=now + horizon)
                costs.append(time_in_system(fork, now, now + horizon))
            _set_weights(lbs, choices[int(np.argmin(costs))])
        lbs.tick(now)
        now += period
        engine.run(until=now)
