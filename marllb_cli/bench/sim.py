"""`marllb bench sim`: simulated requests per wall second on sim-moderate, next to a SimPy model of the same
servers, in one run on the same requests.

Simulators of the same 7 Apache-like servers (cores shared by processor sharing, 32 workers, a backlog of
128) and the same Poisson requests at 90 % load:

    marllb, full          `marllb simulate`: 2 LBs with flow tables, reservoirs and agent steps every 250 ms,
                          with the compiled event loop and with the Python one (`sim.engine`)
    marllb, event core    the engine alone, dispatching by SED on the servers' true job counts (oracle-gsq),
                          compiled and Python
    SimPy                 a textbook SimPy model (one process per server, woken by arrivals or by its next
                          completion, remaining work updated per event), dispatching the same way

The event cores and SimPy make the same decisions on the same requests, so their mean JCTs must agree (the
report shows them as a check that the comparison is like for like), and so must the two full runs. The
compiled loop is loaded (or compiled, the first time) before the clock starts; `load_s` says how long that
took. Each figure is the best of three runs. SimPy is a benchmark-only dependency (the `dev` extra).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from marllb_cli.config import Config
from marllb_cli.dataplane.selection import sed
from marllb_cli.errors import MissingTool
from marllb_cli.sim import compiled
from marllb_cli.sim.build import server_models
from marllb_cli.sim.engine import ServerModel, ServerState, simulate
from marllb_cli.sim.run import run_simulation
from marllb_cli.sim.traffic import traffic

__all__ = ["SimBenchResult", "sim_benchmark"]


@dataclass(frozen=True)
class SimBenchResult:
    simulator: str
    requests: int
    wall_s: float
    requests_per_wall_s: float
    jct_mean_s: float


def sim_benchmark(config: Config, duration_s: float = 300.0, seed: int = 0, repeats: int = 3) -> list[SimBenchResult]:
    """Every simulator on the same requests; each figure is the best of `repeats` runs (as `timeit` reports),
    so a first run's page faults and allocator growth do not count."""
    try:
        import simpy  # noqa: F401
    except ImportError:
        raise MissingTool(
            "SimPy is not installed", hint="pip install 'marllb[dev]' (SimPy is benchmark-only)"
        ) from None
    load = traffic(config, seed=seed, duration_s=duration_s)
    models, _, _, cpus = server_models(config)
    engines = ["compiled", "python"] if compiled.supported(models) else ["python"]
    results = []
    if "compiled" in engines:  # load the compiled loop before timing it
        started = time.perf_counter()
        run_simulation(_with_engine(config, "compiled"), "sed", seed=seed, duration_s=1.0)
        results.append(_result("(loading the compiled loop)", 0, time.perf_counter() - started, np.array([np.nan])))

    def best(run: Callable[[], tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
        timings = [run() for _ in range(repeats)]
        return min(timings, key=lambda timing: timing[0])

    for engine in engines:

        def full(engine: str = engine) -> tuple[float, np.ndarray]:
            sim = run_simulation(_with_engine(config, engine), "sed", seed=seed, duration_s=duration_s, load=load)
            return sim.wall_s, sim.requests["jct_s"][sim.requests["error"] == ""].to_numpy()

        results.append(_result(f"marllb, full, {engine} (2 LBs, flow tables, agents)", len(load), *best(full)))

    def core_compiled() -> tuple[float, np.ndarray]:
        core = compiled.CompiledSim(load.arrival, load.work, models, n_lbs=1, oracle_gsq=True)
        started = time.perf_counter()
        core.run()
        return time.perf_counter() - started, core.result().response

    def core_python() -> tuple[float, np.ndarray]:
        states = [ServerState(m) for m in models]

        def true_sed(job: int, now: float) -> int:
            return sed([s.jobs() for s in states], cpus)

        started = time.perf_counter()
        engine = simulate(load.arrival, load.work, models, true_sed, states=states)
        return time.perf_counter() - started, engine.response

    def simpy_model() -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        finish = _simpy_run(load.arrival, load.work, models, cpus)
        wall = time.perf_counter() - started
        done = ~np.isnan(finish)
        return wall, finish[done] - load.arrival[done]

    if "compiled" in engines:
        results.append(_result("marllb, event core, compiled (SED on true counts)", len(load), *best(core_compiled)))
    results.append(_result("marllb, event core, python (SED on true counts)", len(load), *best(core_python)))
    results.append(_result("SimPy (same model and dispatch)", len(load), *best(simpy_model)))
    return results


def _with_engine(config: Config, engine: str) -> Config:
    return config.model_copy(update={"sim": config.sim.model_copy(update={"engine": engine})})


def _result(name: str, n: int, wall: float, jct) -> SimBenchResult:
    return SimBenchResult(name, n, wall, n / wall, float(np.mean(jct)) if n else float("nan"))


def _simpy_run(arrival: np.ndarray, work: np.ndarray, models: list[ServerModel], cpus: list[float]) -> np.ndarray:
    import simpy

    env = simpy.Environment()
    finish = np.full(len(arrival), np.nan)

    class Server:
        def __init__(self, model: ServerModel) -> None:
            self.model = model
            self.active: dict[int, float] = {}  # job → remaining work
            self.waiting: deque[int] = deque()
            self.inbox: list[int] = []  # arrived at this instant, admitted once the others are brought up to date
            self.wakeup = env.event()
            env.process(self.run())

        def jobs(self) -> int:
            return len(self.active) + len(self.waiting) + len(self.inbox)

        def arrive(self, job: int) -> None:
            self.inbox.append(job)
            if not self.wakeup.triggered:
                self.wakeup.succeed()

        def run(self):
            while True:
                last = env.now
                rate = self.model.speed * min(1.0, self.model.cpus / len(self.active)) if self.active else 0.0
                if self.active:
                    soonest = min(self.active.values()) / rate
                    yield env.any_of([env.timeout(soonest), self.wakeup])
                else:
                    yield self.wakeup
                served = (env.now - last) * rate
                for job in list(self.active):
                    self.active[job] -= served
                    if self.active[job] <= 1e-12:
                        del self.active[job]
                        finish[job] = env.now
                        if self.waiting:
                            nxt = self.waiting.popleft()
                            self.active[nxt] = float(work[nxt])
                for job in self.inbox:
                    if len(self.active) < self.model.max_workers:
                        self.active[job] = float(work[job])
                    elif len(self.waiting) < self.model.backlog:
                        self.waiting.append(job)  # else: rejected
                self.inbox.clear()
                if self.wakeup.triggered:
                    self.wakeup = env.event()

    servers = [Server(m) for m in models]

    def source():
        for job, t in enumerate(arrival):
            yield env.timeout(t - env.now)
            servers[sed([s.jobs() for s in servers], cpus)].arrive(job)

    env.process(source())
    env.run()
    return finish


def as_dicts(results: list[SimBenchResult]) -> list[dict]:
    return [asdict(r) for r in results]
