"""`marllb sweep`: a grid of simulator runs (config overrides × methods × seeds) run on a local process pool
or a Ray cluster, resumable, with one index of the results.

A sweep file names a base config and its axes:

    config: ../configs/sim-moderate.yaml      # relative to the sweep file; a list: each is a scenario
    methods: [sed, lsq, wcmp]
    seeds: [0, 1, 2, 3, 4]
    duration_s: 60                            # optional; default sim.traffic.duration_s
    set:                                      # optional; each field's alternatives (their product)
      sim.traffic.load: [0.7, 0.9]
    trainings:                                # optional; each trained, then run like a method
      - name: qmix                            # the method name its runs report
        algo: qmix
        seeds: [0, 1, 2]                      # training seeds
        episodes: 72                          # optional: reward, preset, hyper, episodes, episode_s
        hyper: {residual: true, levels: [0.8, 1, 1.25]}

On a deployed testbed (`replay`), the cells are `replay-trace` runs instead of simulations:

    replay:
      trace: ../traces/rate_200_steady_30s.tsv    # relative to the sweep file
      loads: [0.7, 0.85, 0.95, 1.05]           # needs `marllb calibrate`; or speeds: [0.25, 0.5]
      duration_s: 30                           # optional: start_s

Testbed cells run one at a time, on this machine, after every simulator cell (a testbed shares its cores
with nothing else), whatever the backend; the testbed must be deployed.

A training is a cell of its own for each `set` combination and training seed: `marllb train` into
`OUT/trainings/` (done when renamed into place, as a run). Its policy then runs on every seed of `seeds`
like a method, and the runs report the training's name as their method, with `training_seed` in meta, so
`marllb report` pools a learner's training seeds and evaluation seeds into one row. Training cells run
first, with the methods' cells; evaluation cells once their training is done (a failed training fails
its evaluations without running them).

Every cell is content-addressed: its key hashes the resolved config (every default filled in), method, seed,
duration, the marllb version and the bytes of the files it reads (a trace, an `rl:` policy, a `static:`
file), so a cell is the same cell however the sweep file spells it, and changes when anything it depends on changes.

A cell is done when its run directory is in `OUT/runs/` (named by its key): the worker simulates into
`OUT/.partial/` and renames the finished directory into place, so a sweep killed at any moment (SIGKILL
included) loses only the cells that were running, and the next `sweep` runs only the cells that are not
done, failed ones included (`--force`: all). Workers die with the sweep (PR_SET_PDEATHSIG). One sweep at a
time holds OUT (`sole_sweep`). A failed cell
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

import contextlib
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
from marllb_cli.errors import ConfigError, MissingTool, Terminated, TestbedError
from marllb_cli.locks import exclusive

__all__ = [
    "BACKENDS",
    "Cell",
    "cell_states",
    "check_backend",
    "check_testbeds",
    "SweepFile",
    "SweepPlan",
    "SweepResult",
    "load_sweep",
    "plan_cells",
    "plan_sweep",
    "run_sweep",
    "sole_sweep",
]

INDEX, RUNS, TRAININGS, PARTIAL, FAILED = "index.parquet", "runs", "trainings", ".partial", "failed"
#: Held (flock) by the sweep that runs into OUT, for its whole life; the kernel drops it when that process dies.
LOCK = ".sweep.lock"


class TrainingSpec(BaseModel):
    """One learner of a sweep: `marllb train` with these options, once per training seed."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="What its runs call their method.")
    algo: str
    seeds: list[int] = Field(default=[0], min_length=1, description="Training seeds.")
    reward: str | None = None
    preset: str | None = None
    hyper: dict[str, Any] = Field(default_factory=dict)
    episodes: int | None = Field(default=None, ge=1)
    episode_s: float | None = Field(default=None, ge=1)

    def resolved(self) -> dict[str, Any]:
        """The options `train` gets (the preset's values under the sweep's own), checked (`ConfigError`)."""
        from dataclasses import asdict

        from marllb_cli.presets import training_options
        from marllb_cli.training import hyper_names, settings_for

        reward, episodes, episode_s, preset_hyper = training_options(
            self.preset, self.algo, hyper_names(self.algo), reward=self.reward, episodes=self.episodes,
            episode_s=self.episode_s,
        )  # fmt: skip
        settings = settings_for(self.algo, reward, self.hyper, preset_hyper)
        return {
            "name": self.name,
            "algo": self.algo,
            "reward": reward,
            "episodes": episodes,
            "episode_s": episode_s,
            "hyper": asdict(settings),
        }


class ReplaySpec(BaseModel):
    """A sweep on the deployed testbed: every method × seed replays this trace at each load (or speed)."""

    model_config = ConfigDict(extra="forbid")

    trace: Path = Field(description="The trace, relative to the sweep file.")
    loads: list[float] | None = Field(default=None, min_length=1, description="Offered loads (calibrated).")
    speeds: list[float] | None = Field(default=None, min_length=1, description="Replay speeds.")
    duration_s: float = Field(gt=0, description="Seconds of the trace each cell replays.")
    start_s: float = Field(default=0.0, ge=0, description="Skip the trace's first seconds.")

    def levels(self) -> tuple[str, list[float]]:
        """('load', loads) or ('speed', speeds): exactly one of them is given."""
        if (self.loads is None) == (self.speeds is None):
            raise ConfigError("replay: give loads or speeds (one of them)", hint="e.g. loads: [0.7, 0.85]")
        if self.loads is not None:
            if not all(0 < level <= 2 for level in self.loads):
                raise ConfigError("replay.loads: each load must be in (0, 2]")
            return "load", self.loads
        if not all(level > 0 for level in self.speeds or []):
            raise ConfigError("replay.speeds: each speed must be positive")
        return "speed", list(self.speeds or [])


class SweepFile(BaseModel):
    """The sweep file's fields."""

    model_config = ConfigDict(extra="forbid")

    config: Path | list[Path] = Field(
        description="The base config, relative to the sweep file; or several, each a scenario (axis `config`)."
    )
    methods: list[str] = Field(default_factory=list, description="Methods of `marllb simulate --method`.")
    seeds: list[int] = Field(default=[0], min_length=1)
    duration_s: float | None = Field(default=None, gt=0)
    set: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted field → its alternatives.")
    trainings: list[TrainingSpec] = Field(default_factory=list, description="Learners to train, then run.")
    replay: ReplaySpec | None = Field(default=None, description="Cells replay a trace on the deployed testbed.")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a simulator run of a method, a training (`train`: its options; `seed` is the
    training seed), or a run of a training's policy (`needs`: the training cell's key; `label`: its name)."""

    overrides: tuple[str, ...]
    method: str
    seed: int
    duration_s: float | None
    key: str
    axes: tuple[tuple[str, Any], ...]
    train: dict[str, Any] | None = None
    needs: str | None = None
    label: str | None = None
    training_seed: int | None = None
    config: str = ""  # its base config (a sweep may name several)
    replay: dict[str, Any] | None = None  # a testbed cell: the trace, its window, the load or speed

    def name(self) -> str:
        """The directory's name: the key first (what makes it findable), then what it is."""
        method = "".join(c if c.isalnum() or c in "-_." else "-" for c in (self.label or self.method))[-40:]
        if self.train is not None:
            return f"{self.key}-{method}-t{self.seed}"
        trained = f"-t{self.training_seed}" if self.training_seed is not None else ""
        return f"{self.key}-{method}{trained}-s{self.seed}"

    def where(self) -> str:
        """The folder of OUT its directory lands in."""
        return TRAININGS if self.train is not None else RUNS


@dataclass
class SweepResult:
    """What a sweep did: cells planned, already done, run now, failed (key → log)."""

    out: Path
    planned: int
    skipped: int
    ran: int
    failed: dict[str, Path]


def load_sweep(path: Path) -> tuple[SweepFile, list[Path]]:
    """The sweep file and its base configs' paths, or a `ConfigError` naming the file and field."""
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
    configs = sweep.config if isinstance(sweep.config, list) else [sweep.config]
    if not configs:
        raise ConfigError(f"{path}: config: an empty list", hint="name one config, or several")
    return sweep, [config if config.is_absolute() else path.parent / config for config in configs]


def plan_cells(sweep: SweepFile, config_paths: list[Path], sweep_path: Path, extra: tuple[str, ...] = ()) -> list[Cell]:
    """Every cell of the grid, validated (configs, overrides, methods) before anything runs."""
    from marllb_cli.sim.run import check_sim_method

    if not sweep.methods and not sweep.trainings:
        raise ConfigError(f"{sweep_path}: methods: none, and no trainings", hint="name a method or a training")
    names = [spec.name for spec in sweep.trainings]
    if len(set(names)) != len(names) or set(names) & set(sweep.methods):
        raise ConfigError(f"{sweep_path}: trainings: two share a name", hint="give each training its own name")
    replay = _replay_plan(sweep, sweep_path) if sweep.replay is not None else None
    trainings = []
    for i, spec in enumerate(sweep.trainings):
        try:
            trainings.append((spec, spec.resolved()))
        except ConfigError as exc:
            raise ConfigError(f"{sweep_path}: trainings.{i}: {exc.message}", hint=exc.hint) from None
    fields = list(sweep.set)
    cells = []
    for config_path, values in itertools.product(config_paths, itertools.product(*(sweep.set[f] for f in fields))):
        axes = tuple(zip(fields, values, strict=True))
        overrides = (*extra, *(f"{field}={_yaml_value(value)}" for field, value in axes))
        if len(config_paths) > 1:
            axes = (("config", config_path.stem), *axes)
        try:
            config = load_config(config_path, overrides)
        except ConfigError as exc:
            where = ", ".join(f"{f}={v}" for f, v in axes) or "the base config"
            raise ConfigError(f"{sweep_path}: {where}: {exc.message}", hint=exc.hint) from None
        source = str(config_path.resolve())
        if replay is not None:
            cells += _replay_cells(sweep, replay, config, overrides, axes, source, sweep_path)
            continue
        for method in sweep.methods:
            try:
                check_sim_method(config, method)
            except ConfigError as exc:
                raise ConfigError(f"{sweep_path}: methods: {exc.message}", hint=exc.hint) from None
            for seed in sweep.seeds:
                key = _key(config, method, seed, sweep.duration_s)
                cells.append(Cell(overrides, method, seed, sweep.duration_s, key, axes, config=source))
        for spec, options in trainings:
            method = f"train:{spec.name}"
            for training_seed in spec.seeds:
                trained = _key(config, "train:" + json.dumps(options, sort_keys=True), training_seed, None)
                cells.append(Cell(overrides, method, training_seed, None, trained, axes, train=options, config=source))
                for seed in sweep.seeds:
                    key = _key(config, f"policy:{trained}", seed, sweep.duration_s)
                    cells.append(
                        Cell(
                            overrides,
                            method,
                            seed,
                            sweep.duration_s,
                            key,
                            axes,
                            needs=trained,
                            label=spec.name,
                            training_seed=training_seed,
                            config=source,
                        )
                    )
    return cells


def _replay_plan(sweep: SweepFile, sweep_path: Path) -> dict[str, Any]:
    """A testbed sweep's replay, checked: its levels, and its trace read (a bad one fails before anything)."""
    from marllb_cli.traces import read_trace

    spec = sweep.replay
    assert spec is not None
    if sweep.trainings:
        raise ConfigError(f"{sweep_path}: trainings: not with replay yet", hint="evaluate learners in the simulator")
    try:
        level, levels = spec.levels()
    except ConfigError as exc:
        raise ConfigError(f"{sweep_path}: {exc.message}", hint=exc.hint) from None
    trace = spec.trace if spec.trace.is_absolute() else sweep_path.parent / spec.trace
    if not trace.is_file():
        raise ConfigError(f"{sweep_path}: replay.trace: no such file {trace}", hint="a path relative to the sweep file")
    read_trace(trace)
    fields = {"trace": str(trace.resolve()), "digest": _digest_files([trace]), "start_s": spec.start_s,
              "duration_s": spec.duration_s}  # fmt: skip
    return {"level": level, "levels": levels, "fields": fields}


def _replay_cells(
    sweep: SweepFile,
    replay: dict[str, Any],
    config: Config,
    overrides: tuple[str, ...],
    axes: tuple[tuple[str, Any], ...],
    source: str,
    sweep_path: Path,
) -> list[Cell]:
    """A testbed sweep's cells for one config: methods × loads (or speeds) × seeds."""
    from marllb_cli.agents.methods import resolve_method

    cells = []
    for method in sweep.methods:
        try:
            resolved = resolve_method(method)
        except ConfigError as exc:
            raise ConfigError(f"{sweep_path}: methods: {exc.message}", hint=exc.hint) from None
        for level in replay["levels"]:
            fields = {**replay["fields"], replay["level"]: level}
            for seed in sweep.seeds:
                what = "replay:" + json.dumps({**fields, "method": resolved}, sort_keys=True)
                key = _key(config, what, seed, fields["duration_s"])
                where = (*axes, (replay["level"], level))
                cells.append(
                    Cell(overrides, resolved, seed, fields["duration_s"], key, where, replay=fields, config=source)
                )
    return cells


@dataclass(frozen=True)
class SweepPlan:
    """A sweep file's cells, every one checked, before anything runs."""

    path: Path
    config: Path
    cells: list[Cell]


def plan_sweep(sweep_path: Path, extra: tuple[str, ...] = ()) -> SweepPlan:
    """Read and check a sweep file (`ConfigError` naming the file and field) and plan its cells."""
    sweep, config_paths = load_sweep(sweep_path)
    cells = plan_cells(sweep, config_paths, sweep_path, extra)
    if len({cell.key for cell in cells}) != len(cells):
        raise ConfigError(f"{sweep_path}: two cells are the same run", hint="remove repeated values from the axes")
    return SweepPlan(sweep_path, config_paths[0], cells)


def cell_states(plan: SweepPlan, out: Path) -> list[tuple[Cell, str]]:
    """Each planned cell and its state in OUT: done (its run directory is in runs/), failed (its last try
    left a log in failed/) or todo."""
    done = {
        path.parent.name.split("-", 1)[0] for where in (RUNS, TRAININGS) for path in (out / where).glob("*/cell.json")
    }
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


def check_testbeds(cells: list[Cell]) -> None:
    """Refuse (`TestbedError`, one line) when a testbed the replay cells among `cells` need is not deployed."""
    from marllb_cli.deploy import testbed_for

    for config_path, overrides in dict.fromkeys((c.config, c.overrides) for c in cells if c.replay is not None):
        testbed_for(load_config(config_path, overrides)).require_deployed()


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
    with sole_sweep(out):  # the command holds it already, from before its progress bar
        return _run_sweep(plan, out, workers=workers, force=force, backend=backend, address=address, on_cell=on_cell)


def sole_sweep(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold OUT for this sweep (`locks.exclusive` on `OUT/.sweep.lock`), or refuse (`ConfigError`, one line
    naming the other sweep's pid) when another sweep runs into it: a sweep clears `OUT/.partial/` when it
    starts (what killed cells left), which would delete the other sweep's running cells."""
    out.mkdir(parents=True, exist_ok=True)
    return exclusive(
        out / LOCK,
        lambda holder: ConfigError(
            f"{out}: another sweep runs into this folder ({holder})",
            hint="wait for it to end, or give this sweep another --out",
        ),
    )


def _run_sweep(
    plan: SweepPlan,
    out: Path,
    *,
    workers: int,
    force: bool,
    backend: str,
    address: str | None,
    on_cell: Callable[[int, int, str], None],
) -> SweepResult:
    cells = plan.cells
    runs = out / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    (out / TRAININGS).mkdir(exist_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # what killed cells left; their workers died with them
    done = {cell.key for cell, state in cell_states(plan, out) if state == "done"}
    if force:
        for cell in cells:
            for path in (out / cell.where()).glob(f"{cell.key}-*"):
                shutil.rmtree(path)
        done -= {cell.key for cell in cells}
    todo = [cell for cell in cells if cell.key not in done]
    index = Index(out)
    failed: dict[str, Path] = {}
    finished = len(cells) - len(todo)
    on_cell(finished, len(cells), "")

    def settle(cell: Cell, error: BaseException | None) -> None:
        nonlocal finished
        finished += 1
        if error is not None:
            failed[cell.key] = _record_failure(out, cell, error)
        index.add(out / cell.where() / cell.name())
        index.write()
        on_cell(finished, len(cells), f"{cell.label or cell.method} s{cell.seed} {_axes_text(cell)}")

    # Trainings and the methods' runs first; a training's runs once it is done (else they fail unrun).
    simulated = [c for c in todo if c.replay is None]
    for phase in ([c for c in simulated if c.needs is None], [c for c in simulated if c.needs is not None]):
        ready = [c for c in phase if c.needs is None or c.needs not in failed]
        for cell in phase:
            if cell.needs is not None and cell.needs in failed:
                settle(cell, RuntimeError(f"its training {cell.needs} failed"))
        if not ready:
            continue
        if backend == "ray":
            outcomes = _on_ray(ready, plan.config, out, workers, address)
        else:
            outcomes = _on_local_pool(ready, plan.config, out, workers)
        for cell, error in outcomes:
            settle(cell, error)
    # Testbed cells last, one at a time, here: nothing else runs beside a testbed.
    on_testbed = [c for c in todo if c.replay is not None]
    check_testbeds(on_testbed)
    for cell in on_testbed:
        try:
            run_cell(str(plan.config), cell, str(out))
            settle(cell, None)
        except (KeyboardInterrupt, TestbedError):
            raise  # Ctrl-C, or the testbed is gone: the cells done so far stay done
        except Exception as exc:  # noqa: BLE001 - the cell's failure, logged for it
            settle(cell, exc)
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
    """One cell, in a worker: simulate (or train) into `.partial/`, add `cell.json`, rename into `runs/`
    (`trainings/`): done."""
    config = load_config(cell.config or config_path, cell.overrides)
    partial = Path(out) / PARTIAL / f"{cell.key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    if cell.train is not None:
        made, summary = _train_cell(config, cell, partial)
    elif cell.replay is not None:
        made, summary = _replay_cell(config, cell, partial)
    else:
        from marllb_cli.sim.run import simulate_to_run_dir

        method, extra = cell.method, {}
        if cell.needs is not None:  # a training's policy: the training's directory, found by its key
            trained = next((Path(out) / TRAININGS).glob(f"{cell.needs}-*/policy.pt")).parent
            method, extra = f"rl:{trained}", {"training_seed": cell.training_seed, "training": trained.name}
        outcome = simulate_to_run_dir(
            config, method, runs_dir=partial, seed=cell.seed, duration_s=cell.duration_s, label=cell.label,
            extra_meta=extra,
        )  # fmt: skip
        made, summary = outcome.path, outcome.summary
    record = {**asdict(cell), "axes": dict(cell.axes), "summary": summary, "version": __version__}
    (made / "cell.json").write_text(json.dumps(record, indent=1, default=str))
    final = Path(out) / cell.where() / cell.name()
    os.rename(made, final)
    shutil.rmtree(partial, ignore_errors=True)
    (Path(out) / FAILED / f"{cell.key}.log").unlink(missing_ok=True)
    return str(final)


def _replay_cell(config: Config, cell: Cell, partial: Path) -> tuple[Path, dict[str, Any]]:
    """A testbed cell: `marllb replay-trace` into `partial`; a run that did not complete fails the cell, and one
    that was interrupted interrupts the sweep (the replay catches Ctrl-C and SIGTERM to keep its requests, so
    without this the sweep went on to the next cell)."""
    from marllb_cli.experiment import ReplayOptions, replay_trace

    replay = cell.replay or {}
    options = ReplayOptions(
        trace=Path(replay["trace"]), method=cell.method, speed=replay.get("speed", 1.0), load=replay.get("load"),
        duration_s=replay["duration_s"], start_s=replay["start_s"], runs_dir=partial, seed=cell.seed,
    )  # fmt: skip
    outcome = replay_trace(config, options)
    if not outcome.complete:  # its requests are kept beside the failure's log, not in runs/
        kept = partial.parent.parent / FAILED / f"{cell.key}-run"
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(outcome.path, kept)
        if outcome.stopped_by:  # SIGTERM or SIGHUP stopped the run inside: it stops the sweep, not one cell
            raise Terminated(outcome.stopped_by)
        if outcome.interrupted:  # Ctrl-C, likewise
            raise KeyboardInterrupt(f"{outcome.failure}; its requests: {kept}")
        raise RuntimeError(f"the run did not complete ({outcome.failure}); its directory: {kept}")
    return outcome.path, outcome.summary


def _train_cell(config: Config, cell: Cell, partial: Path) -> tuple[Path, dict[str, Any]]:
    """A training cell: `marllb train` into `partial/train`; its summary is the curve's last episodes."""
    import torch

    from marllb_cli.training import train

    torch.set_num_threads(1)  # one cell, one core: the pool runs as many cells as there are workers
    options = cell.train or {}
    made = partial / "train"
    curve = train(
        config, options["algo"], out=made, reward=options["reward"], episodes=options["episodes"],
        episode_s=options["episode_s"], seed=cell.seed, hyper=options["hyper"],
    )  # fmt: skip
    last = curve.tail(5)
    summary = {
        "episodes": len(curve),
        "train_wall_s": float(curve["wall_s"].sum()),
        "jct_mean_s": float(last["jct_mean_s"].mean()),
        "jct_p99_s": float(last["jct_p99_s"].mean()),
    }
    return made, summary


class Index:
    """`index.parquet`: a row per done cell (axes, figures, directory). Read from the cells once, then a row
    added per finished cell, and written beside and renamed over after each: a large sweep does not read
    every cell again each time one ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows = {path.parent.name: _index_row(path) for path in sorted((out / RUNS).glob("*/cell.json"))}
        self.rows |= {p.parent.name: _index_row(p) for p in sorted((out / TRAININGS).glob("*/cell.json"))}

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
        "kind": "training" if cell.get("train") else "run",
        "method": cell.get("label") or cell["method"],
        "seed": cell["seed"],
        "training_seed": cell.get("training_seed"),
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
