"""One testbed experiment run: `marllb replay-trace`.

    check the testbed is up → read the trace, build the schedule (speed, duration) → create the run
    directory (config.yaml, meta.json with complete=false) → start the LBs with the method → sample every
    server's busy workers every agent period → replay the schedule from the client namespace (progress
    from the replayer's stdout) → stop the replayer, the sampler and the LBs → write requests.parquet,
    servers.parquet, agents/lb<i>.parquet, summary.json and the final meta.json.

The last step runs whatever happened before it (error, Ctrl-C): a run that did not finish is written with
`complete: false` and every request that was sent. `requests.parquet` always has exactly one row per
request the replayer sent, and the replayer sends the schedule in order, so it is a prefix of the schedule.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.agents.factory import resolve_method
from marllb_cli.config import Config
from marllb_cli.deploy import lb_services_for
from marllb_cli.deploy.apache import busy_workers
from marllb_cli.deploy.lb_services import LbServices
from marllb_cli.deploy.ssh import SshLbServices
from marllb_cli.errors import ConfigError, TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.replay import ReplaySpec
from marllb_cli.runs import (
    create_run_dir,
    empty_requests,
    environment,
    now_iso,
    save_results,
    steps_frame,
    write_json,
)
from marllb_cli.topology import Node
from marllb_cli.traces import read_trace

__all__ = ["ReplayOptions", "RunOutcome", "build_schedule", "replay_trace"]

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


@dataclass
class RunOutcome:
    """What the command prints after a run."""

    path: Path
    summary: dict[str, Any]
    complete: bool
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)


def build_schedule(trace: pd.DataFrame, *, speed: float, duration_s: float | None) -> pd.DataFrame:
    """Intended send times: trace time / speed (speed 0.25 = four times slower), cut at `duration_s` of
    replay time. Columns intended_s, path, class."""
    if speed <= 0:
        raise ConfigError(f"--speed {speed:g}: must be positive", hint="e.g. --speed 0.25 replays 4× slower")
    intended = trace["t"].to_numpy(np.float64) / speed
    keep = intended < duration_s if duration_s is not None else np.ones(len(intended), dtype=bool)
    return pd.DataFrame(
        {"intended_s": intended[keep], "path": trace["path"][keep].to_numpy(), "class": trace["class"][keep].to_numpy()}
    ).astype({"class": "string", "path": "string"})


def replay_trace(config: Config, options: ReplayOptions, progress: ReplayProgress = lambda _: None) -> RunOutcome:
    """Run one experiment on the deployed local testbed; always writes the run directory.

    Ctrl-C (KeyboardInterrupt) stops the run early and returns it with `interrupted` set; any other error
    is raised after the run directory has been written."""
    if config.testbed.kind == "ssh":
        raise ConfigError(
            f"{config.source or 'config'}: testbed.kind: ssh — replay-trace runs its client in a namespace on this "
            "machine: kind local and kvm testbeds only for now",
            hint="use a local or kvm config",
        )
    services = lb_services_for(config)
    resolve_method(options.method)
    services.require_deployed()
    if options.duration_s is not None and options.duration_s <= 0:
        raise ConfigError(f"--duration {options.duration_s:g}: must be positive")
    trace, skipped = read_trace(options.trace, fmt=options.trace_format, skip_bad=options.skip_bad)
    schedule = build_schedule(trace, speed=options.speed, duration_s=options.duration_s)
    if schedule.empty:
        raise ConfigError(f"{options.trace}: no request falls within --duration {options.duration_s:g} s")
    seed = config.experiment.seed if options.seed is None else options.seed
    topology = services.topology
    run = create_run_dir(options.runs_dir, method=options.method, testbed=topology.testbed, seed=seed)
    (run / "config.yaml").write_text(config.resolved_yaml())
    schedule_path = run / "schedule.parquet"
    schedule.to_parquet(schedule_path, index=False)
    meta: dict[str, Any] = {
        "kind": "testbed",
        "method": options.method,
        "testbed": topology.testbed,
        "seed": seed,
        "trace": {"file": str(options.trace), "skipped_lines": skipped, "lines": len(trace)},
        "speed": options.speed,
        "duration_s": options.duration_s,
        "scheduled_requests": len(schedule),
        "started": now_iso(),
        "complete": False,
        **environment(),
    }
    write_json(run / "meta.json", meta)

    period = config.experiment.agent_period_ms / 1000
    client = LocalNamespace(topology.client.namespace)
    status_port = config.testbed.servers[0].apache.status_port
    sampler = ServerSampler(client, topology.servers, status_port, period)
    replayer: ReplayerProcess | None = None
    finished = False
    failure: str | None = None
    try:
        services.start(options.method, period=period, seed=seed)
        sampler.start()
        spec = ReplaySpec(
            host=str(topology.vip), schedule=schedule_path, out=run / "requests.csv", timeout_s=options.timeout_s
        )
        (run / "replay.json").write_text(spec.model_dump_json(indent=1))
        replayer = ReplayerProcess(client, run / "replay.json", run / "replay.log")
        finished = replayer.wait(progress)
    except KeyboardInterrupt:
        failure = "interrupted"  # not re-raised: the caller gets the partial run and decides the exit code
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # A second Ctrl-C must not cut the clean-up short: the processes stop and the results are written.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            if replayer is not None:
                replayer.stop()
            sampler.stop()
            services.stop()
            outcome = _finish(run, meta, schedule, sampler, replayer, services, finished, failure)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
    return outcome


def _finish(
    run: Path,
    meta: dict[str, Any],
    schedule: pd.DataFrame,
    sampler: ServerSampler,
    replayer: ReplayerProcess | None,
    services: LbServices | SshLbServices,
    finished: bool,
    failure: str | None,
) -> RunOutcome:
    """Turn what the processes streamed into the run directory's Parquet and JSON files."""
    t0 = replayer.t0 if replayer is not None and replayer.t0 is not None else time.monotonic()
    requests = _requests(run / "requests.csv", schedule)
    agents = {
        lb.name: agent_steps(services.steps_log(lb), t0)
        for lb in services.topology.lbs
        if services.steps_log(lb).exists()
    }
    duration = float(requests["intended_s"].max()) if finished and len(requests) else _elapsed(requests)
    summary = save_results(
        run, method=meta["method"], requests=requests, servers=sampler.frame(t0), agents=agents, duration_s=duration
    )
    warnings = []
    lag = summary["send_lag_p99_s"]
    if lag is not None and lag > LAG_WARNING_S:
        warnings.append(
            f"the replayer fell behind: p99 send lag {lag * 1000:.1f} ms (> {LAG_WARNING_S * 1000:.0f} ms); "
            "latencies include client delay — replay slower (--speed) or on a less busy machine"
        )
    complete = finished and failure is None and len(requests) == len(schedule)
    meta.update(
        complete=complete,
        failure=failure,
        ended=now_iso(),
        replayed_requests=len(requests),
        replay_loop=replayer.loop if replayer is not None else None,
        warnings=warnings,
    )
    write_json(run / "meta.json", meta)
    (run / "requests.csv").unlink(missing_ok=True)
    return RunOutcome(run, summary, complete, failure == "interrupted", warnings)


def _elapsed(requests: pd.DataFrame) -> float:
    ends = requests[["intended_s", "done_s"]].max(axis=1)
    return float(ends.max()) if len(requests) else 0.0


def _requests(csv_path: Path, schedule: pd.DataFrame) -> pd.DataFrame:
    """The replayer's rows, joined with the schedule's intended time, class and path; in schedule order."""
    try:
        rows = pd.read_csv(csv_path, keep_default_na=False, dtype={"server": str, "error": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return empty_requests(0)  # the replayer never started (the LBs failed first, say)
    rows = rows.sort_values("index").drop_duplicates("index")
    requests = empty_requests(len(rows))
    index = rows["index"].to_numpy(np.int64)
    requests["intended_s"] = schedule["intended_s"].to_numpy()[index]
    requests["class"] = pd.array(schedule["class"].to_numpy()[index], dtype="string")
    requests["path"] = pd.array(schedule["path"].to_numpy()[index], dtype="string")
    for column in ("send_lag_s", "connect_s", "first_byte_s", "done_s"):
        requests[column] = pd.to_numeric(rows[column], errors="coerce").to_numpy(np.float64)
    requests["status"] = rows["status"].to_numpy(np.int64)
    requests["bytes"] = rows["bytes"].to_numpy(np.int64)
    requests["server"] = pd.array(rows["server"].astype(str).to_numpy(), dtype="string")
    requests["error"] = pd.array(rows["error"].astype(str).to_numpy(), dtype="string")
    requests["jct_s"] = requests["done_s"] - requests["intended_s"]
    return requests


def agent_steps(steps_log: Path, t0: float) -> pd.DataFrame:
    """An agent's JSONL step log as a frame (`runs.steps_frame`); a line cut by a kill is skipped."""
    rows = []
    with steps_log.open() as lines:
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return steps_frame(rows, t0)


class ServerSampler:
    """Every `period` s, each server's busy workers (mod_status BusyWorkers less the probe's own worker),
    probed from the client namespace."""

    def __init__(self, ns: LocalNamespace, servers: tuple[Node, ...], status_port: int, period: float) -> None:
        self.ns, self.servers, self.port, self.period = ns, servers, status_port, period
        self.rows: list[tuple[float, str, str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.ns.call, args=(self._loop,), name="server-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            for server in self.servers:
                try:
                    busy = busy_workers(None, str(server.ip), self.port, timeout=self.period)
                except OSError:
                    busy = None
                # mod_status counts the worker answering the probe itself: leave it out.
                value = np.nan if busy is None else float(max(0, busy - 1))
                self.rows.append((now, server.name, server.group or "", value))
            next_tick += self.period
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def frame(self, t0: float) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=["t_s", "server", "group", "busy"])
        frame["t_s"] -= t0
        return frame


class ReplayerProcess:
    """The replayer (`marllb_cli.replay`) running in the client namespace, and its progress stream."""

    def __init__(self, ns: LocalNamespace, spec: Path, log: Path) -> None:
        self.t0: float | None = None
        self.loop: str | None = None
        self.last: dict[str, Any] = {}
        self._log = log.open("w")
        self.process = ns.popen(
            [sys.executable, "-m", "marllb_cli.replay", str(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def wait(self, progress: ReplayProgress) -> bool:
        """Follow the progress lines until the replayer exits; True when it replayed the whole schedule."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._read(line, progress)
        code = self.process.wait()
        if code not in (0, 3):
            self._log.flush()
            tail = Path(self._log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise TestbedError(f"the replayer exited with {code}: {tail[0]}", hint=f"see {self._log.name}")
        return code == 0 and bool(self.last.get("finished"))

    def _read(self, line: str, progress: ReplayProgress) -> None:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            return
        if "loop" in data:
            self.loop = data["loop"]
            return
        self.t0 = data.get("t0", self.t0)
        self.last = data
        progress(data)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (the replayer records in-flight requests as interrupted and flushes), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            for line in self.process.stdout:  # the final progress line, with t0 if it never came before
                self._read(line, lambda _: None)
            self.process.stdout.close()
        self._log.close()
