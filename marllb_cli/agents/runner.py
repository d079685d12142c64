"""The agent process of one LB: every period, read the dataplane's stats, act, write weights, log the step.

Runs inside the LB's namespace (`python -m marllb_cli.agents.runner SPEC.json`), next to its dataplane,
and talks to it only through the shared-memory channel. Steps are paced on CLOCK_MONOTONIC: a step that
overruns skips the missed ticks instead of bunching up. Each step appends one JSON line to the steps log
(time, observation summary, weights, reward candidates), flushed at once, so a crash loses nothing.

In a training episode on the testbed (`spec.learning`) the agent explores instead (`ExploringPolicy`, or
`CoordinatedAgent`, which takes its steps from the coordinator's ticks), and each row also holds the full
observation and the levels chosen, from which the controller rebuilds the transitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from marllb_cli.agents.base import Agent
from marllb_cli.agents.factory import make_agent
from marllb_cli.coordination.link import CoordinatedAgent, CoordinatorAddress
from marllb_cli.dataplane.channel import Channel, TornRead
from marllb_cli.features import observe, observe_neurips
from marllb_cli.probes import BusyWorkersProbe
from marllb_cli.services import next_tick, until_signalled
from marllb_cli.steps import step_record

__all__ = ["AgentSpec", "LearningSpec", "learning_agent", "periods", "run_agent", "main"]

log = logging.getLogger("marllb.agent")


class LearningSpec(BaseModel):
    """An agent in a training episode on the live testbed (`marllb train --env testbed`): it explores, and its
    step log records the full observation and the levels chosen, from which the controller rebuilds every
    transition. Without a coordinator it samples from its own SAC actor (`policy`); with one, the coordinator
    acts for every LB (QMIX, Centr-LB)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: Path | None = None
    levels: list[float]
    residual: bool = False
    uniform: bool = False  # warm-up: levels drawn uniformly at random
    seed: int = 0
    coordinator: CoordinatorAddress | None = None
    neurips_obs: bool = False  # observe NeurIPS'22's 16 features per server (a coordinated agent sends them)


class AgentSpec(BaseModel):
    """What one LB's agent process needs; written by `marllb lb start`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lb: str
    lb_index: int
    n_lbs: int  # a QMIX policy's LB id is one-hot over all LBs
    channel: Path
    method: str
    cpus: list[float]
    servers: list[str]
    status_port: int = 8080
    period: float = 0.25
    steps_log: Path
    learning: LearningSpec | None = None


def _attach(path: Path, timeout_s: float = 10.0) -> Channel:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Channel.attach(path)
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def usable_weights(weights: Sequence[float], previous: list[float] | None) -> list[float]:
    """A policy's weights as floats, or `previous` (at first: all 1) when any is non-finite or negative or
    none is positive: the dataplane would refuse the whole vector, and the LB keeps what is in force."""
    values = [float(w) for w in weights]
    if all(math.isfinite(w) and w >= 0 for w in values) and any(w > 0 for w in values):
        return values
    log.warning("unusable weights %s; keeping the previous ones", values)
    return previous if previous is not None else [1.0] * len(values)


def periods(period: float, should_run) -> Iterator[None]:
    """Yield every `period` on CLOCK_MONOTONIC until `should_run()` is false; a step that overruns skips the
    missed ticks instead of bunching up."""
    tick = time.monotonic()
    while should_run():
        yield
        now = time.monotonic()
        tick = next_tick(tick, period, now)
        time.sleep(max(0.0, tick - now))


def run_agent(spec: AgentSpec, agent: Agent, channel: Channel, should_run) -> int:
    """Step `agent` every `spec.period` (a coordinated agent: at every TICK of its coordinator) until
    `should_run()` is false; return the number of steps."""
    step = 0
    weights: list[float] | None = None
    clock = agent.ticks(should_run) if isinstance(agent, CoordinatedAgent) else periods(spec.period, should_run)
    record = getattr(agent, "record", None)
    neurips = getattr(agent, "neurips_observation", False)
    with open(spec.steps_log, "a", buffering=1) as steps:
        for _ in clock:
            try:
                stats = channel.read_stats(patience_s=spec.period / 2)
            except TornRead:  # the dataplane died mid-publish, or stalls: this step is skipped, not the agent
                log.warning("%s: no consistent statistics within %.0f ms; step skipped", spec.lb, spec.period * 500)
                stats = None
            if stats is not None:
                now = time.monotonic()
                if neurips:  # a policy trained on NeurIPS'22's observation
                    obs = observe_neurips(stats.flows, stats.durations, stats.completions, [stats.interarrivals], now)
                else:
                    obs = observe(stats.flows, stats.durations, now)
                weights = usable_weights(agent.act(obs), weights)
                channel.write_control(agent.method, weights)
                channel.heartbeat()
                row = step_record(now, step, spec.lb, agent, obs, weights, stats.new_flows)
                if record is not None:
                    row.update(record(obs))
                steps.write(json.dumps(row) + "\n")
                step += 1
    return step


def learning_agent(spec: AgentSpec) -> Agent:
    """The exploring agent of a training episode (`spec.learning`)."""
    learning = spec.learning
    assert learning is not None
    if learning.coordinator is not None:
        scale = np.asarray(spec.cpus) if learning.residual else np.ones(len(spec.cpus))
        return CoordinatedAgent(
            learning.coordinator, spec.lb, spec.lb_index, learning.levels, scale, spec.period,
            neurips_observation=learning.neurips_obs,
        )  # fmt: skip
    if learning.policy is None:
        raise ValueError("a learning agent without a coordinator needs its policy")
    from marllb_cli.agents.rl.exploring import ExploringPolicy

    return ExploringPolicy(learning.policy, spec.lb_index, spec.cpus, uniform=learning.uniform, seed=learning.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-agent", description="one LB's agent")
    parser.add_argument("spec", type=Path, help="AgentSpec JSON written by `marllb lb start`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    spec = AgentSpec.model_validate_json(args.spec.read_text())
    log.info("%s: starting, pid %d", spec.lb, os.getpid())  # a start-up failure then shows after this line
    probe = BusyWorkersProbe(spec.servers, spec.status_port, deadline_s=spec.period * 0.8)
    if spec.learning is not None:
        agent = learning_agent(spec)
    else:
        agent = make_agent(spec.method, spec.cpus, probe, spec.lb_index, spec.n_lbs)
    channel = _attach(spec.channel)
    should_run = until_signalled()
    log.info("%s: %s every %.0f ms, pid %d", spec.lb, spec.method, spec.period * 1000, os.getpid())
    steps = run_agent(spec, agent, channel, should_run)
    log.info("%s: stopped after %d steps", spec.lb, steps)
    if isinstance(agent, CoordinatedAgent):
        agent.close()
    probe.close()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
