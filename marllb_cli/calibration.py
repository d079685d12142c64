"""What a request costs on a testbed's servers, measured: the cost model `marllb calibrate` fits and stores, and
the load arithmetic `replay-trace --load` and the simulator build on it.

The PHP for-loop costs 6–8 ns per iteration depending on the CPU, so a fixed `work_scale` is a different load
on another machine. A calibration replaces the guess with a measurement on the testbed itself:

    cost of a CPU request    cpu_overhead_s + n × work_scale × iteration_s     core-seconds
    cost of a static file    static_s
    cost of a wiki page      wiki_s (servers with app: mediawiki; else none)

    offered load of a trace window at speed s  =  (Σ cost in the window) / (window length / s) / Σ cores

`fit_cpu_cost` fits the first line from phases of identical requests (CPU seconds each server's cgroup used,
over the requests answered). A request costs more on a loaded server than alone, so the model is the pooled
fit of saturated phases; the calibration keeps each server's fits, alone and loaded, and it is valid only
for the config and the machine it was measured on (`Calibration.check`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from marllb_cli.config import Config
from marllb_cli.errors import ConfigError, RunDirError

__all__ = [
    "CALIBRATION_FILE",
    "Calibration",
    "CostModel",
    "CpuFit",
    "LoadPlan",
    "PilotRun",
    "ServerCalibration",
    "config_digest",
    "cost_ratio",
    "fit_cpu_cost",
    "machine_id",
    "offered_load",
    "plan_load",
    "simulator_config",
    "request_costs",
    "speed_for_load",
]

CALIBRATION_FILE = "calibration.json"
#: The highest load `--load` may ask for: beyond it a run only measures a queue growing without bound.
MAX_LOAD = 2.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CostModel(_Strict):
    """Core-seconds per request, by class (see the module docstring)."""

    iteration_s: float = Field(gt=0, lt=1e-3, description="Core-seconds per executed for-loop iteration.")
    cpu_overhead_s: float = Field(ge=0, lt=10, description="Core-seconds of a CPU request besides its loop.")
    static_s: float = Field(ge=0, lt=10, description="Core-seconds of a static-file request.")
    wiki_s: float | None = Field(None, ge=0, lt=100, description="Core-seconds of a wiki page (mediawiki servers).")
    work_scale: float = Field(gt=0, description="The testbed's work_scale when measured (n is multiplied by it).")


class CpuFit(_Strict):
    """cost(n) = overhead_s + n × iteration_s, fitted by least squares; r2 says how straight the line was."""

    iteration_s: float
    overhead_s: float
    r2: float


class ServerCalibration(_Strict):
    """One server, measured: its fits (one request at a time, and saturated), its response time alone, and what
    it achieves when saturated."""

    name: str
    group: str
    cores: float = Field(description="Its CPU quota, cores.")
    fit: CpuFit = Field(description="Core-seconds per request, one request at a time.")
    loaded_fit: CpuFit = Field(description="Core-seconds per request with more in flight than the quota serves.")
    static_s: float
    wiki_s: float | None = None
    alone_ms: list[tuple[float, float]] = Field(
        description="(executed iterations, median response time in ms) with one request at a time."
    )
    saturated_cpu_share: float = Field(description="CPU used / quota with more requests than it can serve.")
    saturated_rps: float = Field(description="Requests/s it completed while saturated.")


class PilotRun(_Strict):
    """A short replay through the LBs at a known offered load: what the servers really carried. Requests cost
    a little more or less in a real replay than in the probe's phases (the replayer, the LBs and the sampler
    share the machine), so the model is the phases' model × `scale`: the CPU seconds the servers used over
    the work the phases' model counted for the pilot's requests (`cost_ratio`); `carried` = offered × scale."""

    offered: float
    carried: float
    scale: float
    requests: int
    jct_mean_s: float | None
    run: str


class Calibration(_Strict):
    """`calibration.json` in the testbed's state directory."""

    version: int = 1
    testbed: str
    config_digest: str
    machine: str
    created: str
    model: CostModel = Field(description="The cost model loads are computed with (the phases' × the pilot's scale).")
    phase_model: CostModel | None = Field(None, description="The model the phases alone gave.")
    pilot: PilotRun | None = None
    servers: list[ServerCalibration]

    @property
    def capacity_cores(self) -> float:
        return float(sum(server.cores for server in self.servers))

    def check(self, config: Config, path: Path) -> None:
        """Refuse a calibration measured for another config or on another machine: its costs would be wrong."""
        hint = f"run `marllb calibrate {config.source or 'CONFIG'}` on the deployed testbed"
        if self.config_digest != config_digest(config):
            raise ConfigError(f"{path}: measured for a different testbed config", hint=hint)
        if self.machine != machine_id():
            raise ConfigError(f"{path}: measured on {self.machine}, this is {machine_id()}", hint=hint)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """A stored calibration, or one line saying what is wrong with the file."""
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no calibration", hint="run `marllb calibrate CONFIG` on the deployed testbed first"
            ) from None
        except (OSError, ValueError, ValidationError) as exc:
            raise RunDirError(
                f"{path}: damaged calibration ({exc.__class__.__name__})", hint="calibrate again"
            ) from None


def config_digest(config: Config) -> str:
    """What the servers' costs depend on: the whole testbed section but its name (a calibration lives in the
    testbed's own state directory, so the name is already fixed)."""
    data = config.testbed.model_dump(mode="json", exclude={"name"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def machine_id() -> str:
    """This machine, as far as a loop's speed goes: its host name and CPU model."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} ({model})"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fit_cpu_cost(iterations: Sequence[float], cost_s: Sequence[float]) -> CpuFit:
    """Least-squares line through (executed iterations, core-seconds per request) of several phases. The
    overhead is clamped at 0 (a negative intercept is noise on a tiny overhead)."""
    n = np.asarray(iterations, dtype=np.float64)
    y = np.asarray(cost_s, dtype=np.float64)
    if len(n) < 2 or np.ptp(n) == 0 or not np.isfinite(y).all():
        raise ValueError("a CPU cost fit needs finite costs at two or more iteration counts")
    slope, intercept = np.polyfit(n, y, 1)
    if intercept < 0:
        slope, intercept = float(np.dot(n, y) / np.dot(n, n)), 0.0
    predicted = intercept + slope * n
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 1.0
    if not slope > 0:
        raise ValueError("the measured cost does not grow with the iterations")
    return CpuFit(iteration_s=float(slope), overhead_s=float(intercept), r2=r2)


def request_costs(trace: pd.DataFrame, model: CostModel) -> np.ndarray:
    """Core-seconds of each request of a trace (columns `class`, `work`); a wiki request on a testbed
    without a wiki cost is refused."""
    classes = trace["class"].astype(str).to_numpy()
    work = trace["work"].to_numpy(np.float64) if "work" in trace else np.full(len(trace), np.nan)
    cost = np.full(len(trace), model.static_s)
    cpu = classes == "cpu"
    cost[cpu] = model.cpu_overhead_s + np.nan_to_num(work[cpu], nan=0.0) * model.work_scale * model.iteration_s
    wiki = classes == "wiki"
    if wiki.any():
        if model.wiki_s is None:
            raise ConfigError(
                "the trace has wiki requests and the calibration has no wiki cost",
                hint="calibrate a testbed with app: mediawiki servers, or replay a trace without wiki pages",
            )
        cost[wiki] = model.wiki_s
    return cost


def offered_load(costs: np.ndarray, times: np.ndarray, *, speed: float, capacity_cores: float) -> float:
    """The share of the servers' capacity a window of requests asks for when replayed at `speed`: its work over
    its replay time. The window's length is the span from its start (0) to its last request."""
    span = float(times.max()) if len(times) else 0.0
    if span <= 0:
        raise ConfigError("the trace window holds no time span to spread its work over", hint="replay a longer window")
    return float(costs.sum()) / (span / speed) / capacity_cores


def cost_ratio(utilisation: dict[str, Any], work_core_s: float) -> float:
    """What a replay's requests really cost against what the model said: the CPU seconds the servers used
    (a run's `utilisation`) over the work the load plan counted. Not carried / offered load: the counters'
    window runs from before the first request to after the last one is served, longer than the span the
    offered load is spread over, and by more when requests take longer, which made a pilot of slow requests
    read as cheap."""
    used = sum(server["cpu_s"] for server in utilisation["servers"].values())
    return used / work_core_s if work_core_s > 0 else float("nan")


def speed_for_load(
    trace: pd.DataFrame, model: CostModel, capacity_cores: float, load: float, *, duration_s: float | None = None
) -> float:
    """The speed at which `trace` (already cut at its start) offers `load` of `capacity_cores`; with
    `duration_s` (replay seconds) only the first duration_s × speed seconds of trace are replayed, so the
    speed is found by fixed-point iteration (a trace whose rate drifts needs a few rounds)."""
    if not (math.isfinite(load) and 0 < load <= MAX_LOAD):
        raise ConfigError(f"--load {load:g}: must be in (0, {MAX_LOAD:g}]", hint="e.g. --load 0.85")
    costs = request_costs(trace, model)
    times = trace["t"].to_numpy(np.float64)
    speed = load / offered_load(costs, times, speed=1.0, capacity_cores=capacity_cores)
    for _ in range(50):
        if duration_s is None:
            break
        keep = times < duration_s * speed
        if keep.sum() < 2:
            raise ConfigError(f"--duration {duration_s:g}: too short to hold two requests of the trace at this load")
        new = load / offered_load(costs[keep], times[keep], speed=1.0, capacity_cores=capacity_cores)
        if abs(new - speed) <= 1e-6 * speed:
            speed = new
            break
        speed = new
    return speed


class LoadPlan(_Strict):
    """What a trace window offers on a calibrated testbed: the speed, the load at that speed, and the rate."""

    speed: float
    load: float
    requests: int
    rate_rps: float
    work_core_s: float


def plan_load(
    window: pd.DataFrame,
    calibration: Calibration,
    *,
    load: float | None = None,
    speed: float | None = None,
    duration_s: float | None = None,
) -> LoadPlan:
    """The replay of `window` (a trace already cut at its start, `traces.trace_window`) at `speed`, or at the speed
    that offers `load`; `duration_s` (replay seconds) cuts it as `replay-trace --duration` does."""
    model, capacity = calibration.model, calibration.capacity_cores
    if speed is None:
        if load is None:
            raise ValueError("plan_load needs a load or a speed")
        speed = speed_for_load(window, model, capacity, load, duration_s=duration_s)
    times = window["t"].to_numpy(np.float64)
    keep = times < duration_s * speed if duration_s is not None else np.ones(len(times), dtype=bool)
    costs = request_costs(window.loc[keep], model)
    offered = offered_load(costs, times[keep], speed=speed, capacity_cores=capacity)
    span = float(times[keep].max()) / speed
    return LoadPlan(
        speed=speed,
        load=offered,
        requests=int(keep.sum()),
        rate_rps=int(keep.sum()) / span,
        work_core_s=float(costs.sum()),
    )


def simulator_config(
    config: Config,
    calibration: Calibration,
    *,
    trace: Path | None = None,
    speed: float = 1.0,
    start_s: float = 0.0,
) -> str:
    """`config` as YAML with a simulator that models the calibrated testbed: servers as CFS quotas of
    cpus × cpu_unit cores (`sim.cores_per_unit`), the measured per-iteration and per-request costs; with
    `trace`, traffic that replays it from `start_s` at `speed` (what `replay-trace --load` would send)."""
    import yaml

    data = config.model_dump(mode="json")
    model = calibration.model
    data["sim"]["cores_per_unit"] = config.testbed.cpu_unit
    traffic = data["sim"]["traffic"]
    traffic.update(
        iteration_s=model.iteration_s,
        cpu_overhead_s=model.cpu_overhead_s,
        static_work_s=max(model.static_s, 1e-6),  # below the counters' resolution: not free
    )
    if model.wiki_s is not None:
        traffic["wiki_work_s"] = max(model.wiki_s, 1e-6)
    if trace is not None:
        traffic.update(kind="trace", trace=str(trace.resolve()), trace_speed=speed, trace_start_s=start_s)
    header = (
        f"# Written by `marllb calibrate --sim-out` for testbed {calibration.testbed}, measured on "
        f"{calibration.machine} at {calibration.created}.\n# `marllb simulate` on this file models that testbed.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)
