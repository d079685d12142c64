"""`marllb sweep`: a grid of simulator runs (config overrides × methods × seeds) run on a local process pool
or a Ray cluster, resumable, with one index of the results.

A sweep file names a base config and its axes:

    config: ../configs/sim-moderate.yaml      # relative to the sweep file
    methods: [sed, lsq, wcmp]
    seeds: [0, 1, 2, 3, 4]
    duration_s: 60                            # optional; default sim.traffic.duration_s
    set:                                      # optional; each field's alternatives (their product)
      sim.traffic.load: [0.7, 0.9]

Every cell is content-addressed: its key hashes the resolved config (every default filled in), method, seed,
duration, the marllb version and the bytes of the files it reads (a trace, an `rl:` policy, a `static:`
file), so a cell is the same cell however the sweep file spells it, and changes when anything it depends on changes.

A cell is done when its run directory is in `OUT/runs/` (named by its key): the worker simulates into
`OUT/.partial/` and renames the finished directory into place, so a sweep killed at any moment (SIGKILL
included) loses only the cells that were running, and the next `sweep` runs only the cells that are not
done, failed ones included (`--force`: all). Workers die with the sweep (PR_SET_PDEATHSIG). A failed cell
writes `OUT/failed/<key>.log` and the others go on. `OUT/index.parquet` (a row per done cell: its axes, its
summary's figures, its directory) is rewritten atomically after every cell; `marllb report OUT/runs` gives
a table per scenario with confidence intervals over the seeds.

Backends: `local` (spawned worker processes, `workers` of them) or `ray` (a task of one CPU per cell, on the
cluster at `address`, or on one started here for the sweep and stopped after it). Either way a cell is
`run_cell` and writes into OUT, so the two give the same cells; with Ray on several machines OUT must be
shared storage. Numba's cache is the installed package's, shared by the workers (numba writes it
atomically, so parallel compiles of the same function cannot corrupt it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from marllb_cli import __version__
from marllb_cli.config import Config, load_config
from marllb_cli.errors import ConfigError, MissingTool, TestbedError

__all__ = [
    "BACKENDS",
    "Cell",
    "cell_states",
    "check_backend",
    "SweepFile",
    "SweepPlan",
    "SweepResult",
    "load_sweep",
    "plan_cells",
    "plan_sweep",
    "run_sweep",
]

INDEX, RUNS, PARTIAL, FAILED = "index.parquet", "runs", ".partial", "failed"


class SweepFile(BaseModel):
    """The sweep file's fields."""

    model_config = ConfigDict(extra="forbid")

    config: Path = Field(description="The base config, relative to the sweep file.")
    methods: list[str] = Field(min_length=1, description="Methods of `marllb simulate --method`.")
    seeds: list[int] = Field(default=[0], min_length=1)
    duration_s: float | None = Field(default=None, gt=0)
    set: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted field → its alternatives.")


@dataclass(frozen=True)
class Cell:
    """One simulator run of the grid."""

    overrides: tuple[str, ...]
    method: str
    seed: int
    duration_s: float | None
    key: str
    axes: tuple[tuple[str, Any], ...]

    def name(self) -> str:
        """The run directory's name: the key first (what makes it findable), then what it is."""
        method = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.method)[-40:]
        return f"{self.key}-{method}-s{self.seed}"


@dataclass
class SweepResult:
    """What a sweep did: cells planned, already done, run now, failed (key → log)."""

    out: Path
    planned: int
    skipped: int
    ran: int
    failed: dict[str, Path]


def load_sweep(path: Path) -> tuple[SweepFile, Path]:
    """The sweep file and its base config's path, or a `ConfigError` naming the file and field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", hint="pass a sweep file, e.g. sweeps/sim-moderate-loads.yaml"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with config, methods and seeds")
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ConfigError(
            f"{path}: {field}: {error['msg']}", hint="fields: config, methods, seeds, duration_s, set"
        ) from None
    config = sweep.config if sweep.config.is_absolute() else path.parent / sweep.config
    return sweep, config


def plan_cells(sweep: SweepFile, config_path: Path, sweep_path: Path, extra: tuple[str, ...] = ()) -> list[Cell]:
    """Every cell of the grid, validated (config, overrides, methods) before anything runs."""
    from marllb_cli.sim.run import check_sim_method

    fields = list(sweep.set)
    cells = []
    for values in itertools.product(*(sweep.set[field] for field in fields)):
        axes = tuple(zip(fields, values, strict=True))
        overrides = (*extra, *(f"{field}={_yaml_value(value)}" for field, value in axes))
        try:
            config = load_config(config_path, overrides)
        except ConfigError as exc:
            where = ", ".join(f"{f}={v}" for f, v in axes) or "the base config"
            raise ConfigError(f"{sweep_path}: {where}: {exc.message}", hint=exc.hint) from None
        for method in sweep.methods:
            try:
                check_sim_method(config, method)
            except ConfigError as exc:
                raise ConfigError(f"{sweep_path}: methods: {exc.message}", hint=exc.hint) from None
            for seed in sweep.seeds:
                key = _key(config, method, seed, sweep.duration_s)
                cells.append(Cell(overrides, method, seed, sweep.duration_s, key, axes))
    return cells


@dataclass(frozen=True)
class SweepPlan:
    """A sweep file's cells, every one checked, before anything runs."""

    path: Path
    config: Path
    cells: list[Cell]


def plan_sweep(sweep_path: Path, extra: tuple[str, ...] = ()) -> SweepPlan:
    """Read and check a sweep file (`ConfigError` naming the file and field) and plan its cells."""
    sweep, config_path = load_sweep(sweep_path)
    cells = plan_cells(sweep, config_path, sweep_path, extra)
    if len({cell.key for cell in cells}) != len(cells):
        raise ConfigError(f"{sweep_path}: two cells are the same run", hint="remove repeated values from the axes")
    return SweepPlan(sweep_path, config_path, cells)


def cell_states(plan: SweepPlan, out: Path) -> list[tuple[Cell, str]]:
    """Each planned cell and its state in OUT: done (its run directory is in runs/), failed (its last try
    left a log in failed/) or todo."""
    done = {path.parent.name.split("-", 1)[0] for path in (out / RUNS).glob("*/cell.json")}
    failed = {path.stem for path in (out / FAILED).glob("*.log")}
    return [(cell, "done" if cell.key in done else "failed" if cell.key in failed else "todo") for cell in plan.cells]


#: Where cells run: a pool of processes on this machine, or the tasks of a Ray cluster.
BACKENDS = ("local", "ray")
Outcomes = Iterator[tuple[Cell, BaseException | None]]


def check_backend(backend: str, address: str | None) -> None:
    """Refuse a backend that is not one, or an address without Ray (`ConfigError`)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: not a backend", hint=f"choose one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ConfigError("--address: only with --backend ray", hint="add --backend ray, or drop --address")


def run_sweep(
    plan: SweepPlan,
    out: Path,
    *,
    workers: int,
    force: bool = False,
    backend: str = "local",
    address: str | None = None,
    on_cell: Callable[[int, int, str], None] = lambda done, total, what: None,
) -> SweepResult:
    """Run the planned cells that are not done (all with `force`): on `workers` local processes, or as Ray tasks
    (`address`: a running cluster's, or None to start one of `workers` CPUs here for the sweep)."""
    check_backend(backend, address)
    cells = plan.cells
    runs = out / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # what killed cells left; their workers died with them
    done = {cell.key for cell, state in cell_states(plan, out) if state == "done"}
    if force:
        for cell in cells:
            for path in runs.glob(f"{cell.key}-*"):
                shutil.rmtree(path)
        done -= {cell.key for cell in cells}
    todo = [cell for cell in cells if cell.key not in done]
    index = Index(out)
    failed: dict[str, Path] = {}
    finished = len(cells) - len(todo)
    on_cell(finished, len(cells), "")
    if todo:
        if backend == "ray":
            outcomes = _on_ray(todo, plan.config, out, workers, address)
        else:
            outcomes = _on_local_pool(todo, plan.config, out, workers)
        for cell, error in outcomes:
            finished += 1
            if error is not None:
                failed[cell.key] = _record_failure(out, cell, error)
            index.add(runs / cell.name())
            index.write()
            on_cell(finished, len(cells), f"{cell.method} s{cell.seed} {_axes_text(cell)}")
    index.write()
    return SweepResult(out, len(cells), len(cells) - len(todo), len(todo) - len(failed), failed)


def _on_local_pool(todo: list[Cell], config: Path, out: Path, workers: int) -> Outcomes:
    """Each cell as it ends, from a pool of spawned workers (children of the sweep: they die with it)."""
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        running: dict[Future, Cell] = {pool.submit(run_cell, str(config), cell, str(out)): cell for cell in todo}
        try:
            while running:
                complete, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in complete:
                    yield running.pop(future), future.exception()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _on_ray(todo: list[Cell], config: Path, out: Path, workers: int, address: str | None) -> Outcomes:
    """Each cell as it ends, from Ray tasks of one CPU each. OUT must be storage every node sees (a cell
    writes its run directory there); a cell that landed elsewhere is an error, not a lost result."""
    try:
        import ray
    except ImportError:
        raise MissingTool("--backend ray needs Ray", hint="pip install 'marllb[ray]' (make install does)") from None
    started_here = address is None
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if started_here:  # "local": a new instance, even where a `ray start` cluster or RAY_ADDRESS exists
            ray.init(address="local", num_cpus=workers, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "start a local Ray" if started_here else f"join the Ray cluster at {address}"
        raise TestbedError(f"--backend ray: cannot {where} ({exc})") from None
    try:
        task = ray.remote(num_cpus=1)(run_cell)
        running = {task.remote(str(config), cell, str(out.resolve())): cell for cell in todo}
        while running:
            complete, _ = ray.wait(list(running), num_returns=1)
            for ref in complete:
                cell = running.pop(ref)
                try:
                    landed = Path(ray.get(ref))
                    error = None if landed.is_dir() else FileNotFoundError(f"{landed} is not on this machine")
                except Exception as exc:  # noqa: BLE001 - the task's failure, logged for its cell
                    error = exc
                yield cell, error
    finally:
        ray.shutdown()  # a cluster started here stops with it


def run_cell(config_path: str, cell: Cell, out: str) -> str:
    """One cell, in a worker: simulate into `.partial/`, add `cell.json`, rename into `runs/` (done)."""
    from marllb_cli.sim.run import simulate_to_run_dir

    config = load_config(config_path, cell.overrides)
    partial = Path(out) / PARTIAL / f"{cell.key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    outcome = simulate_to_run_dir(config, cell.method, runs_dir=partial, seed=cell.seed, duration_s=cell.duration_s)
    record = {**asdict(cell), "axes": dict(cell.axes), "summary": outcome.summary, "version": __version__}
    (outcome.path / "cell.json").write_text(json.dumps(record, indent=1, default=str))
    final = Path(out) / RUNS / cell.name()
    os.rename(outcome.path, final)
    shutil.rmtree(partial, ignore_errors=True)
    (Path(out) / FAILED / f"{cell.key}.log").unlink(missing_ok=True)
    return str(final)


class Index:
    """`index.parquet`: a row per done cell (axes, figures, directory). Read from the cells once, then a row
    added per finished cell, and written beside and renamed over after each: a large sweep does not read
    every cell again each time one ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows = {path.parent.name: _index_row(path) for path in sorted((out / RUNS).glob("*/cell.json"))}

    def add(self, run: Path) -> None:
        if (run / "cell.json").is_file():
            self.rows[run.name] = _index_row(run / "cell.json")

    def write(self) -> Path:
        import pandas as pd

        index = self.out / INDEX
        partial = self.out / f".{INDEX}.{os.getpid()}"
        pd.DataFrame([self.rows[name] for name in sorted(self.rows)]).to_parquet(partial, index=False)
        os.replace(partial, index)
        return index


def _index_row(path: Path) -> dict[str, Any]:
    cell = json.loads(path.read_text())
    summary = cell["summary"]
    return {
        "key": cell["key"],
        "method": cell["method"],
        "seed": cell["seed"],
        **{f"set.{field}": str(value) for field, value in cell["axes"].items()},
        "duration_s": summary.get("duration_s"),
        "requests": summary.get("requests"),
        "error_rate": summary.get("error_rate"),
        "jct_mean_s": summary.get("jct_mean_s"),
        "jct_p90_s": summary.get("jct_p90_s"),
        "jct_p99_s": summary.get("jct_p99_s"),
        "path": str(path.parent),
    }


def _worker_init() -> None:
    """A worker dies with the sweep (SIGKILL included) and leaves Ctrl-C to it."""
    from marllb_cli.processes import die_with_parent

    die_with_parent(signal.SIGKILL)()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _record_failure(out: Path, cell: Cell, error: BaseException) -> Path:
    log = out / FAILED / f"{cell.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(error))
    log.write_text(f"cell {cell.name()} ({_axes_text(cell)}): {error}\n{text}")
    return log


def _axes_text(cell: Cell) -> str:
    return " ".join(f"{field}={value}" for field, value in cell.axes)


def _yaml_value(value: Any) -> str:
    """A value as `--set` parses it (YAML), on one line."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _key(config: Config, method: str, seed: int, duration_s: float | None) -> str:
    """The cell's content address (see the module docstring)."""
    inputs = {}
    trace = config.sim.traffic.trace
    if trace:
        inputs["trace"] = _digest_files([Path(trace)])
    if method.startswith("rl:"):
        inputs["policy"] = _digest_files(sorted(p for p in Path(method[3:]).glob("policy.*") if p.is_file()))
    if method.startswith("static:"):
        inputs["weights"] = _digest_files([Path(method.removeprefix("static:"))])
    material = json.dumps(
        {
            "config": config.resolved_yaml(),
            "method": method,
            "seed": seed,
            "duration_s": duration_s,
            "version": __version__,
            "inputs": inputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _digest_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
