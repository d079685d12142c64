"""`marllb calibrate`: measure what requests cost on a deployed testbed's servers and store the cost model.

    check the testbed is up → plan the phases (a ladder of for-loop sizes one request at a time, two
    saturated phases, static files, wiki pages where there is a wiki) → start the load probe on the client node
    (`loadprobe`, straight to the servers' addresses, not through the LBs) → sample every server's CPU
    counter while it runs (`Testbed.server_usage`) → per phase and server, CPU seconds used over requests
    answered → fit cost(n) = overhead + n × iteration_s per server, alone and saturated, and pooled over the
    saturated phases (`calibration.fit_cpu_cost`) → a pilot replay through SED LBs at load 0.85 by that
    model, and the model scaled by what its requests really cost (CPU seconds the servers used over the work
    the model counted, `calibration.cost_ratio`) → `calibration.json` in the testbed's state directory.

Why the pilot: in the probe's saturated phases four servers, 32 client threads and the probe share two
cores, and a request cost 5–8 % more (or, one request at a time, less) than in a replay. A replay measures
the replay.

The probe idles between phases, so each phase's CPU is the counter's rise from the last sample before it to
the first after it. The probe runs on the client node's clock, the sampling on this machine's; the client
node's offset (`ClientNode.offset`) puts them on one clock.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marllb_cli.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CostModel,
    PilotRun,
    ServerCalibration,
    config_digest,
    cost_ratio,
    fit_cpu_cost,
    machine_id,
    now_iso,
    plan_load,
)
from marllb_cli.client_node import stop_process
from marllb_cli.config import Config
from marllb_cli.deploy import testbed_for
from marllb_cli.deploy.base import Testbed, exclusive_use
from marllb_cli.deploy.node.cgroups import CpuUsage
from marllb_cli.errors import TestbedError
from marllb_cli.loadprobe import Phase, ProbeSpec, Stream
from marllb_cli.topology import Node
from marllb_cli.wikipages import page_path

__all__ = ["LADDER", "SATURATED_LADDER", "calibrate", "plan_phases"]

#: Executed for-loop iterations of the ladder's phases, one request at a time.
LADDER = (0, 500_000, 2_000_000, 6_000_000)
#: A first guess of the costs, only to size each phase (the measurement replaces it).
GUESS_ITERATION_S, GUESS_OVERHEAD_S = 7e-9, 0.002
#: Core-seconds each ladder phase asks of each server: enough that the CPU counters' resolution (10 ms
#: ticks on cgroup v1) is a few per cent of it.
PHASE_CORE_S = 0.5
#: Saturated phases (more requests in flight than the quota serves): what a loaded server pays per request.
#: Under load a request costs more than alone (CFS throttling every period, context switches, Apache forking
#: workers): on local-small ≈ 0.7 ms more each, 8 % of a typical request. Two sizes, so the loaded cost is a
#: line of its own, and the model a trace's load is computed with.
SATURATED_LADDER, SATURATED_WALL_S, SATURATED_CONCURRENCY = (500_000, 4_000_000), 2.0, 8
STATIC_PATH, STATIC_REQUESTS, WIKI_REQUESTS = "/static/1k.bin", 100, 20
#: A phase may lose this share of its requests (a reset under saturation) before the calibration is refused.
MAX_FAILED_SHARE = 0.05
Progress = Callable[[str], None]


def _path(iterations: float, work_scale: float) -> str:
    """The CPU page asking for `iterations` executed iterations (the server multiplies n by work_scale)."""
    return f"/dummy.php/?n={round(iterations / work_scale)}"


def _count(core_s: float, per_request_s: float, low: int = 5, high: int = 200) -> int:
    return int(min(high, max(low, math.ceil(core_s / per_request_s))))


def plan_phases(config: Config, servers: tuple[Node, ...]) -> list[Phase]:
    """The probe's phases: warm-up, the ladder (alone), saturated ones, static files, and wiki pages when there is a
    wiki. Every phase goes to every server (wiki: the mediawiki servers) at once."""
    scale = config.testbed.work_scale
    wiki = [s for s in servers if (g := config.testbed.group(s.group)) is not None and g.app == "mediawiki"]

    def phase(name: str, path: str, count: Callable[[Node], int], concurrency: int = 1, on=servers) -> Phase:
        streams = [Stream(server=s.name, ip=str(s.ip), path=path, count=count(s), concurrency=concurrency) for s in on]
        return Phase(name=name, streams=streams)

    phases = [phase("warm-up", _path(200_000, scale), lambda s: 5, concurrency=2)]
    if wiki:
        phases.append(phase("warm-up-wiki", page_path(1), lambda s: 3, on=wiki))
    for n in LADDER:
        per_request = GUESS_OVERHEAD_S + n * GUESS_ITERATION_S
        phases.append(phase(f"cpu-{n}", _path(n, scale), lambda s, r=per_request: _count(PHASE_CORE_S, r)))
    for n in SATURATED_LADDER:
        per_request = GUESS_OVERHEAD_S + n * GUESS_ITERATION_S
        phases.append(
            phase(
                f"saturated-{n}",
                _path(n, scale),
                lambda s, r=per_request: _count(SATURATED_WALL_S * (s.cores or 1.0), r, 10, 1000),
                concurrency=SATURATED_CONCURRENCY,
            )
        )
    phases.append(phase("static", STATIC_PATH, lambda s: STATIC_REQUESTS))
    if wiki:
        phases.append(phase("wiki", page_path(1), lambda s: WIKI_REQUESTS, on=wiki))
    return phases


@dataclass
class UsageSampler:
    """Samples every server's CPU counters on a thread, with this machine's monotonic time."""

    testbed: Testbed
    samples: list[tuple[float, dict[str, CpuUsage]]]
    period_s: float = 0.1

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                usage = self.testbed.server_usage()
            except Exception as exc:  # noqa: BLE001 - reported by the caller, the sampler just stops
                self.error = exc
                return
            self.samples.append((time.monotonic(), usage))
            self._stop.wait(self.period_s)

    def rise(self, start: float, end: float) -> dict[str, CpuUsage]:
        """Each server's counters' rise from the last sample at or before `start` to the first at or after `end`."""
        before = [usage for t, usage in self.samples if t <= start]
        after = [usage for t, usage in self.samples if t >= end]
        if not before or not after:
            raise TestbedError("the CPU counters were not sampled around a calibration phase", hint="calibrate again")
        first, last = before[-1], after[0]
        return {name: last[name].since(first[name]) for name in first}


#: The pilot replay: SED through the LBs at this load for this long, on a Poisson trace of the papers' work.
PILOT_LOAD, PILOT_S, PILOT_RATE = 0.85, 20.0, 100.0
#: A pilot whose cost ratio is beyond these is not trusted (a server failing, the machine busy).
PILOT_SCALE_RANGE = (0.7, 1.4)


def calibrate(
    config: Config, progress: Progress = lambda _: None, *, pilot_s: float = PILOT_S
) -> tuple[Calibration, Path]:
    """Measure the deployed testbed `config` describes; store and return its calibration (and the path).
    `pilot_s` > 0: then replay that long through the LBs at `PILOT_LOAD` and scale the model by what the
    servers really carried (`calibration.PilotRun`)."""
    testbed = testbed_for(config)
    with exclusive_use(testbed):  # its pilot replay takes the testbed again: nested holds are one
        return _calibrate(config, testbed, progress, pilot_s)


def _calibrate(config: Config, testbed: Testbed, progress: Progress, pilot_s: float) -> tuple[Calibration, Path]:
    testbed.require_deployed()
    servers = testbed.topology.servers
    started = time.monotonic()
    testbed.server_usage()  # fails early, and tells how long one round of the counters takes
    gap_s = max(1.0, 4 * (time.monotonic() - started))
    phases = plan_phases(config, servers)
    spec = ProbeSpec(port=80, timeout_s=60.0, gap_s=gap_s, phases=phases)
    work = testbed.state_dir / "calibrate"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "probe.json").write_text(spec.model_dump_json(indent=1))
    results = _run_probe(testbed, spec, work, progress)
    calibration = _calibration(config, testbed, servers, phases, results)
    if pilot_s > 0:
        progress(f"pilot replay: sed at load {PILOT_LOAD:g} for {pilot_s:g} s")
        calibration = _with_pilot(config, calibration, work, pilot_s)
    path = testbed.state_dir / CALIBRATION_FILE
    calibration.save(path)
    shutil.rmtree(work, ignore_errors=True)  # the pilot's run directory too: its figures are in the calibration
    return calibration, path


def _with_pilot(config: Config, calibration: Calibration, work: Path, pilot_s: float) -> Calibration:
    """Replay a Poisson trace of the papers' work through SED LBs at `PILOT_LOAD` by the phases' model; scale
    the model by what its requests really cost (`cost_ratio`). A pilot that did not finish, or whose scale is
    implausible, is an error: the machine or a server is not in a state to calibrate."""
    from marllb_cli.experiment import ReplayOptions, replay_trace
    from marllb_cli.traces import poisson, write_parquet

    trace = poisson(rate=PILOT_RATE, duration=3 * pilot_s, seed=0)
    path = work / "pilot.parquet"
    write_parquet(trace, path)
    plan = plan_load(trace, calibration, load=PILOT_LOAD, duration_s=pilot_s)
    options = ReplayOptions(trace=path, method="sed", speed=plan.speed, duration_s=pilot_s, runs_dir=work / "pilot")
    quiet = config.model_copy(update={"experiment": config.experiment.model_copy(update={"events": []})})
    outcome = replay_trace(quiet, options)  # the pilot measures the system as configured, without its events
    offered = plan.load  # what the phases' model says that speed offers
    if not outcome.complete or not outcome.utilisation:
        raise TestbedError(
            f"the calibration's pilot replay did not complete ({outcome.failure or 'no CPU counters'})",
            hint=f"see {outcome.path}; check the testbed with `marllb status`, then calibrate again",
        )
    scale = cost_ratio(outcome.utilisation, plan.work_core_s)
    carried = offered * scale
    if not PILOT_SCALE_RANGE[0] <= scale <= PILOT_SCALE_RANGE[1]:
        raise TestbedError(
            f"the pilot replay carried {carried:.2f} where the phases predicted {offered:.2f}",
            hint="is something else busy on this machine? calibrate again when it is quiet",
        )
    model = calibration.model
    scaled = model.model_copy(
        update={"iteration_s": model.iteration_s * scale, "cpu_overhead_s": model.cpu_overhead_s * scale}
    )
    pilot = PilotRun(
        offered=offered,
        carried=carried,
        scale=scale,
        requests=int(outcome.summary["requests"]),
        jct_mean_s=outcome.summary["jct_mean_s"],
        run=str(outcome.path),
    )
    return calibration.model_copy(update={"model": scaled, "phase_model": model, "pilot": pilot})


def _run_probe(
    testbed: Testbed, spec: ProbeSpec, work: Path, progress: Progress
) -> list[tuple[dict, dict[str, CpuUsage]]]:
    """Run the load probe on the client node while sampling the counters; each phase's line with its rise."""
    client = testbed.client()
    samples: list[tuple[float, dict[str, CpuUsage]]] = []
    lines: list[dict] = []
    try:
        staging = client.staging(work)
        client.upload(work / "probe.json", f"{staging}/probe.json")
        with UsageSampler(testbed, samples) as sampler:
            process = client.start("marllb_cli.loadprobe", [f"{staging}/probe.json"], f"{staging}/probe.log")
            try:
                assert process.stdout is not None
                for raw in process.stdout:
                    line = json.loads(raw)
                    lines.append(line)
                    progress(f"{line['phase']} ({len(lines)}/{len(spec.phases)})")
                code = process.wait()
            finally:
                stop_process(process, grace_s=5.0)
            time.sleep(2 * sampler.period_s)
        if sampler.error is not None:
            raise TestbedError(f"reading the servers' CPU counters failed: {sampler.error}")
        if code != 0 or len(lines) != len(spec.phases):
            client.download(f"{staging}/probe.log", work / "probe.log")
            raise TestbedError(f"the load probe exited with {code}", hint=f"see {work / 'probe.log'}")
    finally:
        client.close()
    offset = client.offset
    return [(line, sampler.rise(line["start"] + offset, line["end"] + offset)) for line in lines]


def _calibration(
    config: Config,
    testbed: Testbed,
    servers: tuple[Node, ...],
    phases: list[Phase],
    results: list[tuple[dict, dict[str, CpuUsage]]],
) -> Calibration:
    by_phase = {line["phase"]: (line, rise) for line, rise in results}

    def per_request(phase: str, server: str) -> float:
        line, rise = by_phase[phase]
        answered = line["servers"][server]
        sent = answered["ok"] + answered["failed"]
        if answered["failed"] > MAX_FAILED_SHARE * sent:
            raise TestbedError(
                f"{server}: {answered['failed']} of {sent} requests of calibration phase {phase} failed",
                hint="check the server with `marllb status`, then calibrate again",
            )
        return rise[server].cpu_s / max(1, answered["ok"])

    points: list[tuple[float, float]] = []
    calibrated = []
    for server in servers:
        alone = [per_request(f"cpu-{n}", server.name) for n in LADDER]
        loaded = [per_request(f"saturated-{n}", server.name) for n in SATURATED_LADDER]
        points += list(zip(SATURATED_LADDER, loaded, strict=True))
        line, rise = by_phase[f"saturated-{SATURATED_LADDER[-1]}"]
        wall = line["servers"][server.name]["elapsed_s"]
        wiki_line = by_phase.get("wiki", ({"servers": {}}, {}))[0]
        wiki = per_request("wiki", server.name) if server.name in wiki_line["servers"] else None
        calibrated.append(
            ServerCalibration(
                name=server.name,
                group=server.group or "",
                cores=float(server.cores or 0.0),
                fit=fit_cpu_cost(LADDER, alone),
                loaded_fit=fit_cpu_cost(SATURATED_LADDER, loaded),
                static_s=per_request("static", server.name),
                wiki_s=wiki,
                alone_ms=[
                    (float(n), by_phase[f"cpu-{n}"][0]["servers"][server.name]["median_s"] * 1e3) for n in LADDER
                ],
                saturated_cpu_share=rise[server.name].cpu_s / (wall * (server.cores or 1.0)),
                saturated_rps=line["servers"][server.name]["ok"] / wall,
            )
        )
    pooled = fit_cpu_cost([n for n, _ in points], [cost for _, cost in points])
    wikis = [s.wiki_s for s in calibrated if s.wiki_s is not None]
    model = CostModel(
        iteration_s=pooled.iteration_s,
        cpu_overhead_s=pooled.overhead_s,
        static_s=float(np.mean([s.static_s for s in calibrated])),
        wiki_s=float(np.mean(wikis)) if wikis else None,
        work_scale=config.testbed.work_scale,
    )
    return Calibration(
        testbed=testbed.topology.testbed,
        config_digest=config_digest(config),
        machine=machine_id(),
        created=now_iso(),
        model=model,
        servers=calibrated,
    )
