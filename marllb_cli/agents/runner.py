"""The agent process of one LB: every period, read the dataplane's stats, act, write weights, log the step.

Runs inside the LB's namespace (`python -m marllb_cli.agents.runner SPEC.json`), next to its dataplane,
and talks to it only through the shared-memory channel. Steps are paced on CLOCK_MONOTONIC: a step that
overruns skips the missed ticks instead of bunching up. Each step appends one JSON line to the steps log
(time, observation summary, weights, reward candidates), flushed at once, so a crash loses nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from marllb_cli.agents.base import Agent
from marllb_cli.agents.factory import make_agent
from marllb_cli.dataplane.channel import Channel, TornRead
from marllb_cli.features import observe
from marllb_cli.probes import busy_workers
from marllb_cli.services import until_signalled
from marllb_cli.steps import step_record

__all__ = ["AgentSpec", "run_agent", "main"]

log = logging.getLogger("marllb.agent")


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


def _probe(servers: list[str], port: int, timeout: float):
    def probe() -> list[int | None]:
        busy: list[int | None] = []
        for ip in servers:
            try:
                busy.append(busy_workers(None, ip, port, timeout=timeout))
            except OSError:
                busy.append(None)
        return busy

    return probe


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


def run_agent(spec: AgentSpec, agent: Agent, channel: Channel, should_run) -> int:
    """Step `agent` every `spec.period` until `should_run()` is false; return the number of steps."""
    step = 0
    weights: list[float] | None = None
    next_tick = time.monotonic()
    with open(spec.steps_log, "a", buffering=1) as steps:
        while should_run():
            try:
                stats = channel.read_stats(patience_s=spec.period / 2)
            except TornRead:  # the dataplane died mid-publish, or stalls: this step is skipped, not the agent
                log.warning("%s: no consistent statistics within %.0f ms; step skipped", spec.lb, spec.period * 500)
                stats = None
            if stats is not None:
                now = time.monotonic()
                obs = observe(stats.flows, stats.durations, now)
                weights = usable_weights(agent.act(obs), weights)
                channel.write_control(agent.method, weights)
                channel.heartbeat()
                row = step_record(now, step, spec.lb, agent, obs, weights, stats.new_flows)
                steps.write(json.dumps(row) + "\n")
                step += 1
            next_tick += spec.period
            now = time.monotonic()
            if next_tick < now:  # overran: skip the missed ticks
                next_tick += spec.period * ((now - next_tick) // spec.period + 1)
            time.sleep(max(0.0, next_tick - now))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-agent", description="one LB's agent")
    parser.add_argument("spec", type=Path, help="AgentSpec JSON written by `marllb lb start`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    spec = AgentSpec.model_validate_json(args.spec.read_text())
    probe = _probe(spec.servers, spec.status_port, timeout=spec.period * 0.8)
    agent = make_agent(spec.method, spec.cpus, probe, spec.lb_index, spec.n_lbs)
    channel = _attach(spec.channel)
    should_run = until_signalled()
    log.info("%s: %s every %.0f ms, pid %d", spec.lb, spec.method, spec.period * 1000, os.getpid())
    steps = run_agent(spec, agent, channel, should_run)
    log.info("%s: stopped after %d steps", spec.lb, steps)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
