"""`marllb bench fidelity`: does the simulator tell the truth about the testbed?

    calibrate the deployed testbed (fresh) → for each load: the speed that offers it, and the simulator
    config that models the testbed replaying the same trace window at that speed (`calibration.
    simulator_config`) → for each repeat, each method in turn (interleaved, so a drift of the machine
    spreads over all methods): replay on the testbed → simulate the same requests twice: at the calibrated
    cost ("sim cal"), and at the cost that very testbed run paid (its CPU seconds used over the work the
    calibration counted, `meta.json`'s `load.cost_ratio`; "sim"), which separates an error of the cost model
    from one of the queueing model → per load and method, each side's mean / p90 / p99 JCT, error rate,
    per-server request shares and stability (over repeats: mean and spread), the ratios testbed / sim, and
    each side's ranking of the methods.

Why each run at its own cost, not all at one: this machine's CPU speed drifts by several per cent between
runs minutes apart, and near a load of 1 a server's JCT moves by 1 / (1 − ρ) times that (wcmp at 0.9: two
runs that paid 0.97 and 0.99 × the model took 813 and 1 443 ms). A simulator at the runs' median cost
compares each run with a machine it did not run on. `cost_scale` (the median over the stable runs) is still
reported, and is the cost of a run that measured none.

A run is *unstable* when its queues grow over the run: the mean JCT of the last third of the requests is
more than twice that of the first third (its `growth`), or more than 1 % of the requests failed. A method is
unstable on a side when any of its runs is; the side's mean growth says how close that verdict was (a
server loaded at ρ ≈ 1 grows by 1.4–3 × over 30 s, on either side of the threshold from run to run).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.config import Config, load_config

__all__ = ["FIDELITY_METHODS", "fidelity", "growth", "run_figures", "stability", "unstable"]

FIDELITY_METHODS = ("ecmp", "wcmp", "lsq", "sed", "awcmp")
#: A run whose last third's mean JCT exceeds the first third's by this factor has a growing queue.
GROWTH_FACTOR, ERROR_SHARE = 2.0, 0.01
Progress = Callable[[str], None]


def growth(requests: pd.DataFrame) -> float | None:
    """The mean JCT of the last third of the run's answered requests over that of the first third (None when
    a third has none): 1 for a steady queue, ≫ 1 for one that grows."""
    ok = (requests["error"] == "") & requests["status"].between(200, 399)
    third = requests["intended_s"].max() / 3
    early = requests.loc[ok & (requests["intended_s"] < third), "jct_s"].mean()
    late = requests.loc[ok & (requests["intended_s"] > 2 * third), "jct_s"].mean()
    return float(late / early) if early > 0 and late == late else None


def unstable(requests: pd.DataFrame, ratio: float | None = None) -> bool:
    """Whether the queues grew over the run (see the module docstring). `ratio`: the run's `growth`, when the
    caller has it already (it reads every request)."""
    ok = (requests["error"] == "") & requests["status"].between(200, 399)
    if len(requests) == 0 or (~ok).mean() > ERROR_SHARE:
        return True
    ratio = growth(requests) if ratio is None else ratio
    return ratio is not None and ratio > GROWTH_FACTOR


def run_figures(run: Path, servers: Sequence[str]) -> dict[str, Any]:
    """One run's figures: JCT mean / p90 / p99 (s), error rate, request share per server, stability, and on
    the testbed the cost its requests paid against the calibration (None where it measured none)."""
    summary = json.loads((run / "summary.json").read_text())
    requests = pd.read_parquet(run / "requests.parquet")
    counts = requests["server"].value_counts()
    meta_path = run / "meta.json"
    load = json.loads(meta_path.read_text()).get("load") if meta_path.exists() else None
    ratio = growth(requests)
    return {
        "run": str(run),
        "cost_ratio": (load or {}).get("cost_ratio"),
        "jct_mean_s": summary["jct_mean_s"],
        "jct_p90_s": summary["jct_p90_s"],
        "jct_p99_s": summary["jct_p99_s"],
        "error_rate": summary["error_rate"],
        "shares": {server: float(counts.get(server, 0)) / max(1, len(requests)) for server in servers},
        "unstable": unstable(requests, ratio),
        "growth": ratio,
    }


def _side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures over the repeats of one method on one side: means, and the spread of the mean JCT."""

    def mean(key: str) -> float | None:
        values = [run[key] for run in runs if run[key] is not None]
        return float(np.mean(values)) if values else None

    means = [run["jct_mean_s"] for run in runs if run["jct_mean_s"] is not None]
    return {
        "jct_mean_s": mean("jct_mean_s"),
        "jct_mean_std_s": statistics.stdev(means) if len(means) > 1 else None,
        "jct_p90_s": mean("jct_p90_s"),
        "jct_p99_s": mean("jct_p99_s"),
        "error_rate": mean("error_rate"),
        "shares": {server: float(np.mean([run["shares"][server] for run in runs])) for server in runs[0]["shares"]},
        "unstable": any(run["unstable"] for run in runs),
        "growth": mean("growth"),  # how near the verdict is to its threshold (`GROWTH_FACTOR`)
        "runs": [run["run"] for run in runs],
    }


def _at_cost(calibration: Any, scale: float) -> Any:
    """The calibration with its CPU costs (per iteration, per request) scaled by `scale`."""
    model = calibration.model
    scaled = model.model_copy(
        update={"iteration_s": model.iteration_s * scale, "cpu_overhead_s": model.cpu_overhead_s * scale}
    )
    return calibration.model_copy(update={"model": scaled})


def _cost_overrides(calibration: Any, scale: float) -> list[str]:
    """`--set` overrides that give a simulator config the CPU costs of `calibration` scaled by `scale`."""
    model = calibration.model
    return [
        f"sim.traffic.iteration_s={model.iteration_s * scale:.9e}",
        f"sim.traffic.cpu_overhead_s={model.cpu_overhead_s * scale:.9e}",
    ]


def stability(side: dict[str, Any]) -> str:
    """A side's verdict with its mean growth, as the tables print it: "yes ×2.4", "no ×1.1"."""
    verdict = "yes" if side["unstable"] else "no"
    return f"{verdict} ×{side['growth']:.1f}" if side.get("growth") is not None else verdict


def _ratio(testbed: dict[str, Any], sim: dict[str, Any]) -> float | None:
    if testbed["jct_mean_s"] is None or not sim["jct_mean_s"]:
        return None
    return testbed["jct_mean_s"] / sim["jct_mean_s"]


def _ranking(rows: list[dict[str, Any]], side: str) -> list[str]:
    return [row["method"] for row in sorted(rows, key=lambda row: row[side]["jct_mean_s"] or float("inf"))]


def fidelity(
    config: Config,
    trace: Path,
    *,
    loads: Sequence[float],
    methods: Sequence[str],
    repeats: int,
    duration_s: float,
    start_s: float,
    out: Path,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write `fidelity.json` into `out` and return it. Each
    replay holds the testbed (`deploy.base.exclusive_use`); `marllb bench fidelity` holds it throughout,
    so no other command loads it between this one's runs."""
    from marllb_cli.calibrating import calibrate
    from marllb_cli.calibration import plan_load, simulator_config
    from marllb_cli.experiment import ReplayOptions, plan_replay, replay_trace
    from marllb_cli.sim.run import simulate_to_run_dir
    from marllb_cli.topology import plan
    from marllb_cli.traces import read_trace, trace_window

    for method in methods:  # every method checked before anything runs
        plan_replay(config, ReplayOptions(trace=trace, method=method, start_s=start_s, duration_s=duration_s))
    out.mkdir(parents=True, exist_ok=True)
    progress("calibrating")
    calibration, _ = calibrate(config, progress)
    window = trace_window(read_trace(trace)[0], start_s, None)
    servers = [server.name for server in plan(config.testbed).servers]
    report: dict[str, Any] = {
        "testbed": config.testbed.name,
        "trace": str(trace),
        "start_s": start_s,
        "duration_s": duration_s,
        "repeats": repeats,
        "calibration": calibration.model_dump(mode="json"),
        "loads": [],
    }
    for load in loads:
        speed = plan_load(window, calibration, load=load, duration_s=duration_s).speed
        figures: dict[str, dict[str, list[dict[str, Any]]]] = {
            m: {"testbed": [], "sim": [], "sim_calibrated": []} for m in methods
        }
        cost_ratios: list[float] = []  # each stable testbed run's: what its requests really cost
        for repeat in range(repeats):
            for method in methods:
                progress(f"load {load:g}, repeat {repeat + 1}/{repeats}: {method} on the testbed")
                options = ReplayOptions(
                    trace=trace,
                    method=method,
                    load=load,
                    start_s=start_s,
                    duration_s=duration_s,
                    runs_dir=out / "testbed",
                    seed=repeat,
                )
                run = run_figures(replay_trace(config, options).path, servers)
                figures[method]["testbed"].append(run)
                if not run["unstable"] and run["cost_ratio"] is not None:
                    cost_ratios.append(run["cost_ratio"])
        cost_scale = float(np.median(cost_ratios)) if cost_ratios else 1.0
        sim_paths = {}
        for side in ("sim_calibrated", "sim"):
            sim_paths[side] = out / f"{side.replace('_', '-')}-load{load:g}.yaml"
            sim_paths[side].write_text(
                simulator_config(
                    config, calibration if side == "sim_calibrated" else _at_cost(calibration, cost_scale),
                    trace=trace, speed=speed, start_s=start_s,
                )
            )  # fmt: skip
            sim_config = load_config(sim_paths[side])
            for repeat in range(repeats):
                for method in methods:
                    progress(f"load {load:g}: {method} in the simulator ({side})")
                    paid = figures[method]["testbed"][repeat]["cost_ratio"]
                    run_config = sim_config
                    if side == "sim" and paid is not None:  # this run's own cost (the module docstring)
                        run_config = load_config(sim_paths[side], _cost_overrides(calibration, paid))
                    simulated = simulate_to_run_dir(
                        run_config, method, runs_dir=out / side, seed=repeat, duration_s=duration_s
                    )
                    figures[method][side].append(run_figures(simulated.path, servers))
        rows = []
        for method in methods:
            sides = {side: _side(runs) for side, runs in figures[method].items()}
            rows.append({"method": method, **sides, "ratio": _ratio(sides["testbed"], sides["sim"])})
            rows[-1]["ratio_calibrated"] = _ratio(sides["testbed"], sides["sim_calibrated"])
        report["loads"].append(
            {
                "load": load,
                "speed": speed,
                "cost_scale": cost_scale,
                "sim_configs": {side: str(path) for side, path in sim_paths.items()},
                "methods": rows,
                "ranking": {side: _ranking(rows, side) for side in ("testbed", "sim", "sim_calibrated")},
            }
        )
        (out / "fidelity.json").write_text(json.dumps(report, indent=1))  # after every load: nothing lost
    return report
