"""Building one simulation: the servers' models from the config, the event loop with its LB layer, and the
run's timeline of timed events. Shared by `marllb simulate` (`sim.run`), the training environment and the
static-weights search (`sim.static_search`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from marllb_cli.config import Config
from marllb_cli.events import Event, TimedEvent, timeline
from marllb_cli.sim.compiled import CompiledSim, use_compiled
from marllb_cli.sim.engine import Engine, ServerModel, ServerState
from marllb_cli.sim.events import refuse_network_events
from marllb_cli.sim.lbs import LbLayer
from marllb_cli.sim.traffic import Traffic

__all__ = ["build_simulation", "run_events", "server_models"]


def server_models(config: Config) -> tuple[list[ServerModel], list[str], list[str], list[float]]:
    """Per server: its model, name, group and cpus, in the testbed's order (srv0, srv1, ...)."""
    models, names, groups, cpus = [], [], [], []
    unit = config.sim.cores_per_unit  # set: the testbed's CFS quotas (cpus × unit cores), work in core-seconds
    for group in config.testbed.servers:
        speed = group.speed * (unit or 1.0)
        for _ in range(group.count):
            names.append(f"srv{len(names)}")
            groups.append(group.name)
            cpus.append(group.cpus)
            models.append(
                ServerModel(
                    cpus=group.cpus,
                    speed=speed,
                    job_rate=min(group.speed, group.cpus * speed) if unit else None,
                    max_workers=group.apache.max_request_workers,
                    backlog=group.apache.listen_backlog,
                    io_speed=config.sim.io_speed if config.sim.io_speed is not None else math.inf,
                )
            )
    return models, names, groups, cpus


def build_simulation(
    config: Config,
    method: str,
    load: Traffic,
    models: list[ServerModel],
    cpus: list[float],
    *,
    seed: int,
    agents: list | None = None,
    joint: Any = None,
    agent_period: float | None = None,
    neurips_observation: bool = False,
) -> tuple[Engine | CompiledSim, LbLayer]:
    """The event loop (compiled or Python, by `sim.engine`) and the LB layer on it, ready to `run`; with
    `agent_period`, the LB layer's agents step every that many simulated seconds (`LbLayer.tick`), else the
    caller steps them; `neurips_observation`: the agents observe `features.observe_neurips`'s 16 columns.
    Shared by `marllb simulate` and the training environment."""
    ticks: dict[str, Any] = (
        {} if agent_period is None else {"tick_period": agent_period, "on_tick": lambda now: lbs.tick(now)}
    )
    common = dict(
        n_lbs=config.testbed.lbs,
        cpus=cpus,
        work=load.work,
        io=load.io,
        seed=seed,
        agents=agents,
        joint=joint,
        neurips_observation=neurips_observation,
        reservoir_keep=config.experiment.reservoir_keep,
    )
    idle = config.sim.idle_timeout_s
    if use_compiled(config.sim.engine, method, models, config.source):
        core = CompiledSim(
            load.arrival,
            load.work,
            models,
            n_lbs=config.testbed.lbs,
            idle_timeout=idle,
            seed=seed,
            io=load.io,
            oracle_gsq=method == "oracle-gsq",
            neurips_observation=neurips_observation,
            reservoir_keep=config.experiment.reservoir_keep,
            **ticks,
        )
        lbs = LbLayer(method=method, states=core.servers, idle_timeout=idle, table_factory=core.table, **common)
        return core, lbs
    states = [ServerState(m) for m in models]
    lbs = LbLayer(method=method, states=states, idle_timeout=idle, **common)
    engine = Engine(
        load.arrival, load.work, models, lbs.dispatch, on_finish=lbs.finish, states=states, io=load.io, **ticks
    )
    return engine, lbs


def run_events(config: Config, *, seed: int, duration_s: float, extra: Sequence[Event] = ()) -> list[TimedEvent]:
    """The run's timeline (the config's events and drifts with `seed`, and `extra`), refused when the
    simulator cannot model one."""
    names = server_models(config)[1]
    events = timeline(config.experiment.events, servers=names, duration_s=duration_s, seed=seed, extra=extra)
    refuse_network_events(events, config.source)
    return events
