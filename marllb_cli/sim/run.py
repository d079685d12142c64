"""`marllb simulate`: one simulated run of a method on the config's servers, written as a run directory in
exactly the format of `marllb replay-trace`, so `marllb report` reads both.

    traffic (common random numbers per seed) → servers (cpus × speed, Apache workers and backlog from the
    config) → LB layer (edge hash, flow tables, agents every agent period) → engine → requests, busy
    workers per server per step, agent steps → run directory

What differs from a testbed run, by construction: no network (zero RTT, no send lag), so `send_lag_s` is
0 and `connect_s` is the arrival; `first_byte_s` is the finish (CPU-bound pages answer at the end); the
`lb` column is known; a request the server's full backlog refuses has status 0 and error `rejected`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.agents.heuristics import StaticWeights
from marllb_cli.agents.methods import LOOKAHEAD, RL_PREFIX, SIM_METHODS, STATIC_OPT, STATIC_PREFIX, resolve_method
from marllb_cli.agents.weights_file import read_weights
from marllb_cli.config import Config
from marllb_cli.events import Event, TimedEvent, down_windows, event_specs, events_frame
from marllb_cli.runs import RunDir, empty_requests, save_results
from marllb_cli.sim.build import build_simulation, run_events, server_models
from marllb_cli.sim.compiled import CompiledSim, use_compiled
from marllb_cli.sim.engine import ServerModel
from marllb_cli.sim.events import attach_events
from marllb_cli.sim.lookahead import candidates, run_lookahead
from marllb_cli.sim.traffic import Traffic, capacity, traffic
from marllb_cli.steps import steps_frame

__all__ = [
    "SimOutcome",
    "SimRun",
    "check_sim_method",
    "run_simulation",
    "simulate_to_run_dir",
]


@dataclass
class SimRun:
    """Everything one simulation produced, as frames in the run directory's shapes."""

    method: str
    requests: pd.DataFrame
    servers: pd.DataFrame
    agents: dict[str, pd.DataFrame]
    duration_s: float
    rate: float
    wall_s: float
    events: pd.DataFrame  # events.parquet: each timed event, intended and applied


@dataclass
class SimOutcome:
    path: Path
    summary: dict[str, Any]
    wall_s: float
    jobs_per_wall_s: float


def run_simulation(
    config: Config,
    method: str,
    *,
    seed: int | None = None,
    duration_s: float | None = None,
    load: Traffic | None = None,
    events: Sequence[Event] = (),
) -> SimRun:
    """Simulate `method` on the config's servers and LBs, with the config's timed events and `events`;
    pure (no files)."""
    seed = config.experiment.seed if seed is None else seed
    prepared = _prepare(config, method, seed=seed, duration_s=duration_s, load=load, events=events)
    return _simulate(config, prepared, seed)


@dataclass
class _Prepared:
    """Everything a simulation needs that can refuse the input, made before anything is written."""

    method: str  # as the user named it, for the records
    resolved: str
    selection: str  # what the simulated dataplane applies (an rl: policy sets SED weights)
    requests: Traffic
    events: list[TimedEvent]
    joint: Any = None
    agents: Any = None
    static: dict | None = None  # static:FILE and static-opt: the weights and where they came from


def check_sim_method(config: Config, method: str) -> tuple[str, str, list[ServerModel]]:
    """Refuse a method this config's simulator cannot run (`ConfigError`); else (the method resolved, the
    selection the simulated dataplane applies, the server models). No file is read but an `rl:` path's."""
    resolved = resolve_method(method, SIM_METHODS)
    sets_sed_weights = resolved.startswith((RL_PREFIX, STATIC_PREFIX)) or resolved == STATIC_OPT
    selection = "sed" if sets_sed_weights else resolved
    models = server_models(config)[0]
    if resolved.startswith(STATIC_PREFIX):
        read_weights(Path(resolved.removeprefix(STATIC_PREFIX)), len(models))
    use_compiled(config.sim.engine, selection, models, config.source)
    return resolved, selection, models


def _prepare(
    config: Config,
    method: str,
    *,
    seed: int,
    duration_s: float | None,
    load: Traffic | None,
    events: Sequence[Event] = (),
) -> _Prepared:
    """The method checked, the engine checked against it, the events expanded, the requests drawn and a
    policy loaded."""
    resolved, selection, models = check_sim_method(config, method)
    horizon = duration_s if duration_s is not None else config.sim.traffic.duration_s
    timed = run_events(config, seed=seed, duration_s=horizon, extra=events)
    requests_in = load if load is not None else traffic(config, seed=seed, duration_s=duration_s)
    prepared = _Prepared(method, resolved, selection, requests_in, timed)
    if resolved.startswith(RL_PREFIX):
        from marllb_cli.agents.rl.policy import load_for_simulation

        capacity = [m.cpus * m.speed for m in models]
        prepared.joint, prepared.agents = load_for_simulation(resolved, config.testbed.lbs, capacity)
    elif resolved.startswith(STATIC_PREFIX) or resolved == STATIC_OPT:
        prepared.static = static_weights(config, resolved, len(models))
        prepared.agents = [StaticWeights("sed", prepared.static["weights"]) for _ in range(config.testbed.lbs)]
    return prepared


def static_weights(config: Config, resolved: str, n_servers: int) -> dict:
    """The weights of `static:FILE` with the file's record, or those `static-opt` finds for this config on its
    validation seeds with the search's record: {"weights": [...], "search": {...}}."""
    if resolved == STATIC_OPT:
        from marllb_cli.sim.static_search import static_opt_weights

        found = static_opt_weights(config)
        return {"weights": found.weights, "search": found.record()}
    return read_weights(Path(resolved.removeprefix(STATIC_PREFIX)), n_servers)


def _simulate(config: Config, prepared: _Prepared, seed: int) -> SimRun:
    """One simulation of what `_prepare` made."""
    method, resolved, selection = prepared.method, prepared.resolved, prepared.selection
    requests_in, joint, agents = prepared.requests, prepared.joint, prepared.agents
    models, names, groups, cpus = server_models(config)
    period = config.experiment.agent_period_ms / 1000
    lookahead = resolved == LOOKAHEAD  # steps the agents itself, between runs of the engine
    engine, lbs = build_simulation(
        config,
        selection,
        requests_in,
        models,
        cpus,
        seed=seed,
        agents=agents,
        joint=joint,
        agent_period=None if lookahead else period,
        neurips_observation=any(getattr(a, "neurips_observation", False) for a in [joint, *(agents or [])]),
    )
    applied = attach_events(prepared.events, engine, lbs, models)
    started = time.perf_counter()
    if lookahead:
        run_lookahead(engine, lbs, period, candidates(lbs.capacity, groups))  # type: ignore[arg-type]
    else:
        engine.run()
    result = engine.result()
    wall = time.perf_counter() - started
    n = len(requests_in)
    requests = empty_requests(n)
    done = ~np.isnan(result.finish)
    requests["intended_s"] = requests_in.arrival
    requests["send_lag_s"] = 0.0
    requests["connect_s"] = requests_in.arrival
    requests["first_byte_s"] = result.finish
    requests["done_s"] = result.finish
    requests["jct_s"] = result.finish - requests_in.arrival
    requests["status"] = np.where(done, 200, 0)
    requests["server"] = pd.array(np.asarray(names, dtype=object)[result.server], dtype="string")
    lb_of = engine.lb_of if isinstance(engine, CompiledSim) else np.asarray(lbs.lb_of, dtype=np.int64)
    requests["lb"] = pd.array(
        np.array([f"lb{i}" for i in range(config.testbed.lbs)], dtype=object)[lb_of], dtype="string"
    )
    requests["class"] = pd.array(requests_in.classes, dtype="string")
    requests["path"] = pd.array(requests_in.paths, dtype="string")
    events = events_frame(applied.records)
    error = np.where(done, "", "rejected").astype(object)
    for server, windows in down_windows(events, np.inf).items():  # refused by a server that was down
        mine = requests["server"].to_numpy() == server
        for start, end in windows:
            error[~done & mine & (requests_in.arrival >= start) & (requests_in.arrival < end)] = "refused"
    requests["error"] = pd.array(error, dtype="string")
    busy = np.asarray(lbs.busy, dtype=np.float64).reshape(-1, 3)
    index = busy[:, 1].astype(int)
    servers = pd.DataFrame(
        {
            "t_s": busy[:, 0],
            "server": np.asarray(names, dtype=object)[index],
            "group": np.asarray(groups, dtype=object)[index],
            "busy": busy[:, 2],
        }
    )
    agents = {} if lbs.oracle else {f"lb{i}": steps_frame(rows, 0.0) for i, rows in enumerate(lbs.step_records())}
    duration = float(requests_in.arrival[-1]) if n else 0.0
    return SimRun(method, requests, servers, agents, duration, requests_in.rate, wall, events)


def simulate_to_run_dir(
    config: Config,
    method: str,
    *,
    runs_dir: Path,
    seed: int | None = None,
    duration_s: float | None = None,
    events: Sequence[Event] = (),
    progress: Callable[[str], None] = lambda _: None,
    label: str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> SimOutcome:
    """Simulate and write a run directory (`runs.RunDir`: `meta.json` first with complete=false, as a
    testbed run). The method and the events are checked before the directory exists. `label`: the name the
    run reports its method by (a sweep's training, whose every seed is another `rl:` directory), the method
    itself then in meta's `policy`; `extra_meta`: more for meta.json."""
    seed = config.experiment.seed if seed is None else seed
    prepared = _prepare(config, method, seed=seed, duration_s=duration_s, load=None, events=events)  # refuses first
    spec = config.sim.traffic
    meta: dict[str, Any] = {
        "kind": "sim",
        "testbed": config.testbed.name,
        "traffic": spec.model_dump(mode="json"),
        "duration_s": duration_s if duration_s is not None else spec.duration_s,
        "capacity_core_s_per_s": capacity(config),
        "events": event_specs(config, events),
    }
    if prepared.static is not None:
        meta["static_weights"] = prepared.static
    if label is not None:
        meta["policy"] = prepared.resolved
    meta.update(extra_meta or {})
    name = label or method
    testbed = f"{config.testbed.name}-sim"
    with RunDir(runs_dir, config=config, method=name, testbed=testbed, seed=seed, meta=meta) as run:
        progress("simulating")
        sim = _simulate(config, prepared, seed)
        progress("writing the run directory")
        summary = save_results(
            run.path,
            method=name,
            requests=sim.requests,
            servers=sim.servers,
            agents=sim.agents,
            duration_s=sim.duration_s,
        )
        sim.events.to_parquet(run.path / "events.parquet", index=False)
        jobs_per_s = len(sim.requests) / sim.wall_s if sim.wall_s > 0 else float("inf")
        run.finish(
            complete=True,
            requests=len(sim.requests),
            rate_per_s=sim.rate,
            wall_s=sim.wall_s,
            simulated_requests_per_wall_s=jobs_per_s,
        )
    return SimOutcome(run.path, summary, sim.wall_s, jobs_per_s)
