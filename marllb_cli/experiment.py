"""One testbed experiment run: `marllb replay-trace`.

    check the testbed is up → read the trace, cut it (--start), find the speed (--speed, or --load from the
    testbed's calibration), build the schedule (duration) → create the run
    directory (`runs.RunDir`: config.yaml, meta.json with complete=false) → send the schedule and specs to
    the client node (`Testbed.client()`: the client namespace, or the client host of `kind: ssh`) → start
    the LBs (`Testbed.lbs()`) with the method → start the sampler (every server's busy workers every agent
    period) and the replayer there (progress from the replayer's stdout) → stop the replayer, the sampler
    and the LBs → fetch their files → write requests.parquet, servers.parquet, agents/lb<i>.parquet,
    summary.json and the final meta.json.

The last step runs whatever happened before it (error, Ctrl-C): a run that did not finish is written with
`complete: false` and every request that was sent. `requests.parquet` always has exactly one row per
request the replayer sent, and the replayer sends the schedule in order, so it is a prefix of the schedule.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.agents.methods import resolve_method
from marllb_cli.agents.runner import LearningSpec
from marllb_cli.agents.weights_file import read_weights, static_file
from marllb_cli.calibration import CALIBRATION_FILE, Calibration, LoadPlan, cost_ratio, plan_load
from marllb_cli.client_node import ClientNode, ClientProcess, stop_process
from marllb_cli.config import Config
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.deploy import testbed_for
from marllb_cli.deploy.base import LbControl, Testbed, exclusive_use
from marllb_cli.deploy.node.cgroups import CpuUsage
from marllb_cli.errors import ConfigError, MarllbError, Terminated, TestbedError
from marllb_cli.events import Event, TimedEvent, event_specs, events_frame, timeline
from marllb_cli.replay import ReplaySpec, write_schedule
from marllb_cli.runs import RunDir, elapsed, requests_from_replay, save_results
from marllb_cli.sampler import SampledServer, SamplerSpec
from marllb_cli.steps import read_steps_log
from marllb_cli.timed_events import EventRunner
from marllb_cli.topology import Topology
from marllb_cli.traces import read_trace, trace_window

__all__ = ["ReplayOptions", "ReplayPlan", "RunOutcome", "build_schedule", "plan_replay", "replay_trace", "utilisation"]

#: p99 send lag above which the replayer itself is the bottleneck and latencies are suspect.
LAG_WARNING_S = 0.010
ReplayProgress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ReplayOptions:
    """What `marllb replay-trace` asks for besides the config."""

    trace: Path
    method: str
    speed: float = 1.0
    duration_s: float | None = None
    runs_dir: Path = Path("runs")
    seed: int | None = None
    timeout_s: float = 60.0
    trace_format: str = "auto"
    skip_bad: bool = False
    load: float | None = None  # the speed that offers this load on the calibrated testbed (instead of `speed`)
    start_s: float = 0.0  # skip the trace's first seconds (its start-up ramp)
    events: tuple[Event, ...] = ()  # `--event`s, besides the config's experiment.events


@dataclass
class RunOutcome:
    """What the command prints after a run."""

    path: Path
    summary: dict[str, Any]
    complete: bool
    interrupted: bool = False  # Ctrl-C, SIGTERM or SIGHUP: the run stopped early, its requests are kept
    warnings: list[str] = field(default_factory=list)
    failure: str | None = None
    stopped_by: int | None = None  # the signal (SIGTERM, SIGHUP) that stopped it, None for Ctrl-C
    utilisation: dict[str, Any] | None = None  # meta.json's: how busy the servers were
    load: dict[str, Any] | None = None  # meta.json's: the load the calibration says the run offered


def build_schedule(trace: pd.DataFrame, *, speed: float, duration_s: float | None) -> pd.DataFrame:
    """Intended send times: trace time / speed (speed 0.25 = four times slower), cut at `duration_s` of
    replay time. Columns intended_s, path, class."""
    if not (math.isfinite(speed) and speed > 0):
        raise ConfigError(
            f"--speed {speed:g}: must be a finite positive number", hint="e.g. --speed 0.25 replays 4× slower"
        )
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"--duration {duration_s:g}: must be a finite positive number of seconds")
    intended = trace["t"].to_numpy(np.float64) / speed
    keep = intended < duration_s if duration_s is not None else np.ones(len(intended), dtype=bool)
    return pd.DataFrame(
        {"intended_s": intended[keep], "path": trace["path"][keep].to_numpy(), "class": trace["class"][keep].to_numpy()}
    ).astype({"class": "string", "path": "string"})


def _load_plan(
    config: Config, testbed: Testbed, trace: pd.DataFrame, options: ReplayOptions
) -> tuple[LoadPlan, Calibration] | None:
    """With `--load`: the speed that offers it, from the testbed's calibration (which must exist and fit this
    config and machine). Without: the load `--speed` offers, when there is a valid calibration (else None)."""
    path = testbed.state_dir / CALIBRATION_FILE
    try:
        calibration = Calibration.load(path)
        calibration.check(config, path)
        speed = None if options.load is not None else options.speed
        return plan_load(trace, calibration, load=options.load, speed=speed, duration_s=options.duration_s), calibration
    except MarllbError:
        if options.load is not None:
            raise
        return None  # no calibration (or a stale one): the run just does not say what load it offered


def _load_meta(planned: tuple[LoadPlan, Calibration] | None, target: float | None) -> dict[str, Any] | None:
    if planned is None:
        return None
    plan, calibration = planned
    return {
        "target": target,
        "offered": plan.load,
        "speed": plan.speed,
        "rate_rps": plan.rate_rps,
        "work_core_s": plan.work_core_s,
        "capacity_cores": calibration.capacity_cores,
        "calibration": {
            "created": calibration.created,
            "machine": calibration.machine,
            **calibration.model.model_dump(),
        },
    }


@dataclass
class ReplayPlan:
    """A replay checked and ready to run: everything `plan_replay` validates before anything starts."""

    testbed: Testbed
    method: str
    seed: int
    schedule: pd.DataFrame
    meta: dict[str, Any]
    learning: LearningSpec | None = None  # a training episode's exploring agents (`live_training`)
    coordinator: CoordinatorSpec | None = None  # and its coordinator, for QMIX and Centr-LB
    events: list[TimedEvent] = field(default_factory=list)  # the timed events, drifts drawn with the seed


def plan_replay(config: Config, options: ReplayOptions) -> ReplayPlan:
    """Check the testbed is up and every input (method, trace, --start, --load and its calibration, --speed,
    --duration) before anything starts or any run directory exists."""
    method = resolve_method(options.method)
    testbed = testbed_for(config)
    testbed.require_deployed()
    if options.duration_s is not None and options.duration_s <= 0:
        raise ConfigError(f"--duration {options.duration_s:g}: must be positive")
    trace, skipped = read_trace(options.trace, fmt=options.trace_format, skip_bad=options.skip_bad)
    lines = len(trace)
    trace = trace_window(trace, options.start_s, None)
    planned = _load_plan(config, testbed, trace, options)
    speed = planned[0].speed if planned is not None and options.load is not None else options.speed
    schedule = build_schedule(trace, speed=speed, duration_s=options.duration_s)
    if schedule.empty:
        raise ConfigError(f"{options.trace}: no request falls within --duration {options.duration_s:g} s")
    meta: dict[str, Any] = {
        "kind": "testbed",
        "testbed": testbed.topology.testbed,
        "trace": {"file": str(options.trace), "skipped_lines": skipped, "lines": lines, "start_s": options.start_s},
        "speed": speed,
        "duration_s": options.duration_s,
        "scheduled_requests": len(schedule),
        "load": _load_meta(planned, options.load),
    }
    if (weights := static_file(method)) is not None:  # checked against these servers before the run exists
        meta["static_weights"] = read_weights(weights, len(testbed.topology.servers))
    seed = config.experiment.seed if options.seed is None else options.seed
    servers = [server.name for server in testbed.topology.servers]
    end = float(schedule["intended_s"].max())
    events = timeline(config.experiment.events, servers=servers, duration_s=end, seed=seed, extra=options.events)
    if events:
        testbed.faults()  # refused where this kind cannot apply them
        meta["events"] = event_specs(config, options.events)
    return ReplayPlan(testbed, method, seed, schedule, meta, events=events)


def replay_trace(
    config: Config, options: ReplayOptions, progress: ReplayProgress = lambda _: None, *, plan: ReplayPlan | None = None
) -> RunOutcome:
    """Run one experiment on the deployed testbed `config` describes (as `plan`, when already planned);
    always writes the run directory.

    Ctrl-C (KeyboardInterrupt) stops the run early and returns it with `interrupted` set; any other error
    is raised after the run directory has been written."""
    plan = plan or plan_replay(config, options)
    with exclusive_use(plan.testbed):  # another command measuring here: refused before a run directory exists
        run_dir = RunDir(
            options.runs_dir,
            config=config,
            method=options.method,
            testbed=plan.testbed.topology.testbed,
            seed=plan.seed,
            meta=plan.meta,
        )
        with run_dir as run:
            plan.schedule.to_parquet(run.path / "schedule.parquet", index=False)
            return _replay(config, plan, run, options, progress)


def _replay(
    config: Config, plan: ReplayPlan, run: RunDir, options: ReplayOptions, progress: ReplayProgress
) -> RunOutcome:
    """Start the LBs, the sampler and the replayer; whatever happens, stop them and write the results."""
    testbed, schedule = plan.testbed, plan.schedule
    period = config.experiment.agent_period_ms / 1000
    lbs = testbed.lbs()
    client = testbed.client()
    files = ClientFiles(run.path, client.staging(run.path))
    replayer: ReplayerProcess | None = None
    sampler: ClientProcess | None = None
    finished = False
    failure: str | None = None
    stopped_by: int | None = None  # the signal (SIGTERM, SIGHUP) that stopped it, None for Ctrl-C
    lbs_started = False
    events: EventRunner | None = None
    usage: list[Counters] = []  # the servers' and this machine's CPU counters as the replay starts and ends
    try:
        # A run whose controller was killed could not undo its events: this one does it before it starts.
        undone = testbed.faults().undo_leftovers()
        if undone:
            run.meta["undone_at_start"] = undone
        _stage_inputs(config, testbed.topology, schedule, options, files, client, period)
        lbs.start(plan.method, period=period, seed=plan.seed, learning=plan.learning, coordinator=plan.coordinator)
        lbs_started = True
        sampler = client.start("marllb_cli.sampler", [files.remote("sampler.json")], files.remote("sampler.log"))
        usage.extend(_counters(testbed, run))
        replayer = ReplayerProcess(client, files)
        if plan.events:
            end = float(schedule["intended_s"].max())
            events = EventRunner(testbed.faults(), plan.events, _replay_t0(replayer, client), end_s=end).start()
        finished = replayer.wait(progress)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (`cli_support.Terminated`)
        # Not re-raised: the caller gets the partial run and decides the exit code.
        failure = f"terminated ({exc.args[0]})" if isinstance(exc, Terminated) else "interrupted"
        stopped_by = exc.signum if isinstance(exc, Terminated) else None
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # A second signal must not cut the clean-up short: the processes stop and the results are written.
        with _signals_held():
            liveness: list[dict[str, Any]] = []
            steps: list[tuple[str, Callable[[], object]]] = [
                ("stop the replayer", lambda: replayer and replayer.stop()),
                ("stop the timed events", lambda: events and events.stop()),
                ("undo the timed events", lambda: events and _restore(events)),
                ("read the servers' CPU counters", lambda: usage and usage.extend(_counters(testbed, run))),
                ("stop the sampler", lambda: sampler and stop_process(sampler, grace_s=5.0)),
                ("check the LBs", lambda: lbs_started and liveness.extend(lb_liveness(lbs.stats_json(), period))),
                ("stop the LBs", lbs.stop),
                *[(f"fetch {name}", lambda n=name: files.fetch(client, n)) for name in CLIENT_OUTPUTS],
                ("close the client node", client.close),
            ]
            problems = _each(steps)
            if plan.events:
                events_frame(events.records if events else []).to_parquet(run.path / "events.parquet", index=False)
                liveness = _expected_deaths(liveness, plan.events)
                problems += _failed_events(events)
            run.meta["utilisation"] = utilisation(usage, testbed.topology) if len(usage) == 2 else None
            if run.meta.get("load") and run.meta["utilisation"]:
                ratio = cost_ratio(run.meta["utilisation"], run.meta["load"]["work_core_s"])
                run.meta["load"] |= {"cost_ratio": ratio, "carried": run.meta["load"]["offered"] * ratio}
            outcome = _finish(run, schedule, client, replayer, lbs, finished, failure, problems, liveness)
            outcome.warnings[:0] = run.meta.get("undone_at_start", [])
            outcome.stopped_by = stopped_by
            outcome.utilisation, outcome.load = run.meta["utilisation"], run.meta.get("load")
    return outcome


#: (monotonic time, each server's CPU counters, this machine's (busy, steal) CPU seconds)
Counters = tuple[float, dict[str, CpuUsage], tuple[float, float]]
#: Above this share of this machine's CPUs busy, a local testbed's servers may not have got their quotas.
HOST_BUSY_WARNING = 0.95


def host_cpu_seconds() -> tuple[float, float]:
    """This machine's CPU seconds (all CPUs) spent busy, and stolen by its hypervisor, since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _counters(testbed: Testbed, run: RunDir) -> list[Counters]:
    """The servers' CPU counters now, or nothing (and a note in meta.json) when they cannot be read: the
    utilisation is a figure about the run, not a reason to lose it."""
    try:
        return [(time.monotonic(), testbed.server_usage(), host_cpu_seconds())]
    except (MarllbError, OSError, ValueError, KeyError) as exc:
        run.meta.setdefault("notes", []).append(f"no utilisation: the servers' CPU counters: {exc}")
        return []


def utilisation(usage: list[Counters], topology: Topology) -> dict[str, Any]:
    """How busy the servers were from the replay's start to its end, from their CPU counters: each server's
    CPU seconds over its quota × the window, the share of CFS periods in which it was throttled, and the
    testbed's mean (all CPU seconds over all quotas: the load it actually carried). And how busy this
    machine was (on a local testbed, a busy machine starves the servers below their quotas)."""
    (t0, before, host0), (t1, after, host1) = usage
    window = t1 - t0
    servers = {}
    for server in topology.servers:
        rise = after[server.name].since(before[server.name])
        servers[server.name] = {
            "cpu_s": rise.cpu_s,
            "utilisation": rise.cpu_s / (window * (server.cores or 1.0)),
            "throttled_share": rise.throttled_periods / rise.periods if rise.periods > 0 else None,
        }
    capacity = sum(server.cores or 1.0 for server in topology.servers)
    mean = sum(server["cpu_s"] for server in servers.values()) / (window * capacity)
    cpus = os.cpu_count() or 1
    host = {
        "cpus": cpus,
        "busy_share": (host1[0] - host0[0]) / (window * cpus),
        "steal_share": (host1[1] - host0[1]) / (window * cpus),
    }
    return {"window_s": window, "mean": mean, "servers": servers, "host": host}


def _replay_t0(replayer: ReplayerProcess, client: ClientNode) -> Callable[[], float | None]:
    """The replay's time 0 on this machine's monotonic clock, once the replayer has reported it."""
    return lambda: None if replayer.t0 is None else replayer.t0 + client.offset


def _failed_events(events: EventRunner | None) -> list[str]:
    """One line per timed event that was due but did not take (its error is in events.parquet too)."""
    records = events.records if events else []
    return [
        f"event {r['target']} {r['kind']} at {r['at_s']:g} s: {r['error']}"
        for r in records
        if r["error"] and not math.isnan(r["applied_s"])
    ]


def _restore(events: EventRunner) -> None:
    problems = events.faults.restore()
    if problems:
        raise TestbedError("; ".join(problems))


def _expected_deaths(liveness: list[dict[str, Any]], events: list[TimedEvent]) -> list[dict[str, Any]]:
    """The LBs' liveness without the agents that timed events killed: those deaths were the experiment."""
    killed = {event.target for event in events if event.kind == "agent_state"}
    return [
        {**lb, "dead": [d for d in lb["dead"] if not (lb["lb"] in killed and d.startswith("agent"))]} for lb in liveness
    ]


def lb_liveness(stats: list[dict[str, Any]], period: float) -> list[dict[str, Any]]:
    """Each LB at the end of a run, from `lb stats`: which of its processes had died (the dataplane, the
    agent, or an agent whose last step is more than ten periods old)."""
    out = []
    for lb in stats:
        age = lb.get("agent_heartbeat_age_s")
        dead = [
            *(["dataplane died"] if not lb.get("dataplane_running") else []),
            *(["agent died"] if not lb.get("agent_running") else []),
            *(["agent stalled"] if lb.get("agent_running") and (age is None or age > 10 * period) else []),
        ]
        out.append({"lb": lb["lb"], "dead": dead, "agent_heartbeat_age_s": age})
    return out


#: What the replayer and sampler leave on the client node, fetched into the run directory.
CLIENT_OUTPUTS = ("requests.csv", "servers.csv", "replay.log", "sampler.log")


def _each(steps: list[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run every clean-up step whatever the others did; return what failed, one line each."""
    problems = []
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
    return problems


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored for the block (main thread only): clean-up runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class ClientFiles:
    """A run's files on both sides: `run` here, `staging` on the client node (the same folder locally)."""

    run: Path
    staging: str

    def remote(self, name: str) -> str:
        return f"{self.staging}/{name}"

    def send(self, client: ClientNode, name: str) -> None:
        client.upload(self.run / name, self.remote(name))

    def fetch(self, client: ClientNode, name: str) -> None:
        try:
            client.download(self.remote(name), self.run / name)
        except TestbedError:
            pass  # the client node went away: the run is written with what is here


def _stage_inputs(
    config: Config,
    topology: Topology,
    schedule: pd.DataFrame,
    options: ReplayOptions,
    files: ClientFiles,
    client: ClientNode,
    period: float,
) -> None:
    """The replayer's schedule and spec and the sampler's spec, written into the run and sent to the client."""
    write_schedule(files.run / "schedule.tsv", schedule["intended_s"].to_numpy(), schedule["path"].tolist())
    replay = ReplaySpec(
        host=str(topology.vip),
        schedule=Path(files.remote("schedule.tsv")),
        out=Path(files.remote("requests.csv")),
        timeout_s=options.timeout_s,
    )
    (files.run / "replay.json").write_text(replay.model_dump_json(indent=1))
    servers = [SampledServer(name=s.name, group=s.group or "", ip=str(s.ip)) for s in topology.servers]
    status_port = config.testbed.servers[0].apache.status_port
    sampler = SamplerSpec(
        servers=servers, status_port=status_port, period_s=period, out=Path(files.remote("servers.csv"))
    )
    (files.run / "sampler.json").write_text(sampler.model_dump_json(indent=1))
    for name in ("schedule.tsv", "replay.json", "sampler.json"):
        files.send(client, name)


def _finish(
    run_dir: RunDir,
    schedule: pd.DataFrame,
    client: ClientNode,
    replayer: ReplayerProcess | None,
    lbs: LbControl,
    finished: bool,
    failure: str | None,
    problems: list[str],
    liveness: list[dict[str, Any]],
) -> RunOutcome:
    """Turn what the processes streamed into the run directory's Parquet and JSON files.

    Times: the replayer's and sampler's are the client node's CLOCK_MONOTONIC, relative to the replayer's
    t0; the agents' step logs are on this machine's clock, so their t0 is shifted by the client's offset."""
    if replayer is not None and replayer.t0 is not None:
        t0 = replayer.t0
    else:
        t0 = time.monotonic() - client.offset
    run = run_dir.path
    requests = requests_from_replay(run / "requests.csv", schedule)
    agents = {
        lb.name: read_steps_log(lbs.steps_log(lb), t0 + client.offset)
        for lb in lbs.topology.lbs
        if lbs.steps_log(lb).exists()
    }
    duration = float(requests["intended_s"].max()) if finished and len(requests) else elapsed(requests)
    summary = save_results(
        run,
        method=run_dir.meta["method"],
        requests=requests,
        servers=servers_frame(run / "servers.csv", t0),
        agents=agents,
        duration_s=duration,
    )
    warnings = []
    lag = summary["send_lag_p99_s"]
    if lag is not None and lag > LAG_WARNING_S:
        warnings.append(
            f"the replayer fell behind: p99 send lag {lag * 1000:.1f} ms (> {LAG_WARNING_S * 1000:.0f} ms); "
            "latencies include client delay — replay slower (--speed) or on a less busy machine"
        )
    host = (run_dir.meta.get("utilisation") or {}).get("host")
    if host and host["busy_share"] > HOST_BUSY_WARNING:
        warnings.append(
            f"this machine's CPUs were {host['busy_share']:.0%} busy during the run (steal {host['steal_share']:.0%}): "
            "a local testbed's servers may have got less than their quotas; run nothing else beside it"
        )
    warnings += [f"clean-up: {problem}" for problem in problems]
    dead = [f"{lb['lb']} {what}" for lb in liveness for what in lb["dead"]]
    if dead:
        warnings.append(f"degraded: {', '.join(dead)} during the run (the LB kept its last weights)")
    complete = finished and failure is None and not problems and not dead and len(requests) == len(schedule)
    run_dir.finish(
        complete=complete,
        failure=failure or ("clean-up failed" if problems else None) or (f"degraded: {dead[0]}" if dead else None),
        degraded=bool(dead),
        lbs=liveness,
        replayed_requests=len(requests),
        replay_loop=replayer.loop if replayer is not None else None,
        replay_sender=replayer.sender if replayer is not None else None,
        warnings=warnings,
    )
    for transient in ("requests.csv", "servers.csv", "schedule.tsv"):
        (run / transient).unlink(missing_ok=True)
    interrupted = failure is not None and failure.startswith(("interrupted", "terminated"))
    return RunOutcome(run, summary, complete, interrupted, warnings, failure)


def servers_frame(csv_path: Path, t0: float) -> pd.DataFrame:
    """The sampler's rows (`marllb_cli.sampler`) as servers.parquet wants them: t_s, server, group, busy."""
    try:
        rows = pd.read_csv(csv_path, dtype={"server": str, "group": str}, keep_default_na=False)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        rows = pd.DataFrame({"t": [], "server": [], "group": [], "busy": []})
    return pd.DataFrame(
        {
            "t_s": pd.to_numeric(rows["t"], errors="coerce").to_numpy(np.float64) - t0,
            "server": rows["server"].astype(str).to_numpy(),
            "group": rows["group"].astype(str).to_numpy(),
            "busy": pd.to_numeric(rows["busy"], errors="coerce").to_numpy(np.float64),
        }
    )


class ReplayerProcess:
    """The replayer (`marllb_cli.replay`) running on the client node, and its progress stream."""

    def __init__(self, client: ClientNode, files: ClientFiles) -> None:
        self.t0: float | None = None
        self.loop: str | None = None
        self.sender: str | None = None  # "realtime" where the sender got SCHED_FIFO, else "normal"
        self.last: dict[str, Any] = {}
        self.client, self.files = client, files
        self.process = client.start("marllb_cli.replay", [files.remote("replay.json")], files.remote("replay.log"))

    def wait(self, progress: ReplayProgress) -> bool:
        """Follow the progress lines until the replayer exits; True when it replayed the whole schedule."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._read(line, progress)
        code = self.process.wait()
        if code not in (0, 3):
            self.files.fetch(self.client, "replay.log")
            log = self.files.run / "replay.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            raise TestbedError(f"the replayer exited with {code}: {(lines or ['no output'])[-1]}", hint=f"see {log}")
        return code == 0 and bool(self.last.get("finished"))

    def _read(self, line: str, progress: ReplayProgress) -> None:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            return
        if "loop" in data:
            self.loop, self.sender = data["loop"], data.get("sender")
            return
        self.t0 = data.get("t0", self.t0)
        self.last = data
        progress(data)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (the replayer records in-flight requests as interrupted and flushes), then SIGKILL."""
        stop_process(self.process, grace_s)
        if self.process.stdout is not None:
            for line in self.process.stdout:  # the final progress line, with t0 if it never came before
                self._read(line, lambda _: None)
