"""`marllb report`: compare run directories — a table per scenario (method × class, the layout of the papers'
tables), a Markdown report and four figures.

Grouping: runs are compared only within a scenario (`scenarios.scenario_of`: the system and the traffic,
not the method or seed); runs of several scenarios give a table each, and are pooled only when asked
(`pool=True`, with a warning naming what was pooled). Within a scenario the runs of one method (several
seeds) are pooled request by request for mean ± std and the percentiles, and their spread is shown as the
standard deviation of the per-run mean JCT ("± across runs"). Methods are ranked by their pooled mean JCT
over all classes; each is also given as a ratio to a baseline method (default sed, when present) of the
same scenario. Mean, p90, p99 and the ratios come with 95 % bootstrap confidence intervals (`stats`: over
runs when there are several, over blocks of requests within one). Only completed requests have a JCT;
failed ones count in the error rate.

Figures (PNG, matplotlib's Agg backend, no display needed):
    jct_cdf.png          JCT CDF per method (log time axis)
    jct_over_time.png    mean JCT per second of run time, per method
    busy_workers.png     distribution of busy Apache workers per server group, per method (CIKM'22 Fig. 9)
    flow_share.png       share of requests each server received, per method
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.errors import ConfigError, RunDirError
from marllb_cli.events import TimedEvent, phase_bounds
from marllb_cli.runs import Run, load_run, recover_killed
from marllb_cli.scenarios import Scenario, label_scenarios, scenario_of
from marllb_cli.stats import BOOTSTRAP_REPLICATES, Bootstrap, bootstrap, interquartile_mean

__all__ = ["Report", "build_report", "find_runs", "scan_runs", "short_names", "write_report"]

ALL = "all"


@dataclass
class Report:
    """The aggregated comparison: one row per scenario × method × class, ranked within the scenario."""

    runs: list[Run]
    baseline: str | None
    rows: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    #: Each run's scenario label (in the order of `runs`).
    scenarios: list[str] = field(default_factory=list)
    #: Label → scenario (none when pooled): what places a scenario in a load or rate sweep.
    described: dict[str, Scenario] = field(default_factory=dict)
    #: Scenarios with timed events: a row per scenario × method × phase (`event_phases`).
    phases: list[dict[str, Any]] = field(default_factory=list)
    #: How much each method's weights moved (`weight_dynamics`), per scenario × method with agent logs.
    dynamics: list[dict[str, Any]] = field(default_factory=list)

    def scenario_labels(self) -> list[str]:
        """The scenarios in the order their tables are shown."""
        return list(dict.fromkeys(row["scenario"] for row in self.rows))

    def runs_in(self, label: str) -> int:
        """How many runs scenario `label` has."""
        return self.scenarios.count(label)

    def as_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "scenarios": self.scenario_labels(),
            "runs": [
                {
                    "path": str(r.path),
                    "method": r.method,
                    "seed": r.meta.get("seed"),
                    "scenario": scenario,
                    "complete": r.complete,
                }
                for r, scenario in zip(self.runs, self.scenarios, strict=True)
            ],
            "rows": self.rows,
            "phases": self.phases,
            "weight_dynamics": self.dynamics,
            "warnings": self.warnings,
        }


def find_runs(paths: list[Path]) -> list[Run]:
    """Run directories from the arguments; a directory of runs (such as `runs/`) stands for all runs in it."""
    return scan_runs(paths)[0]


def scan_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """(runs, why each unusable one was skipped). A run named as an argument must be readable (else a
    `RunDirError`); inside a directory of runs, one that cannot be read (a run killed before it wrote its
    summary, a damaged file) is skipped with a warning, so the others are still reported."""
    runs: list[Run] = []
    skipped: list[str] = []
    for path in paths:
        inner = _runs_in(path)
        if not inner:
            runs.append(load_run(path))
            continue
        for run_path in inner:
            if recover_killed(run_path):
                skipped.append(f"recovered {run_path}: its controller was killed; requests from the replayer's rows")
            try:
                run = load_run(run_path)
                run.requests()
            except RunDirError as exc:
                skipped.append(f"skipped {exc.one_line()}")
                continue
            runs.append(run)
    if not runs:
        raise RunDirError(
            "no readable run directory given" + (f" ({len(skipped)} skipped)" if skipped else ""),
            hint="pass run directories, or a directory that holds runs",
        )
    return runs, skipped


def _runs_in(path: Path) -> list[Path]:
    """The run directories inside `path` when it is a directory of runs (such as `runs/`), else []."""
    if not path.is_dir() or (path / "meta.json").exists():
        return []
    return sorted(p for p in path.iterdir() if (p / "meta.json").is_file())


def build_report(
    runs: list[Run],
    baseline: str | None = None,
    skipped: list[str] | None = None,
    *,
    pool: bool = False,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> Report:
    """Aggregate runs per scenario, method and class; `baseline` must be one of the methods when given;
    `skipped`: warnings about runs left out (`scan_runs`); `pool`: compare runs of different scenarios as one;
    `replicates`: bootstrap replicates per confidence interval (0: none)."""
    methods = sorted({r.method for r in runs})
    if baseline is not None and baseline not in methods:
        raise ConfigError(f"--baseline {baseline}: no run of that method", hint=f"choose one of {', '.join(methods)}")
    if baseline is None and "sed" in methods:
        baseline = "sed"
    warnings = [*(skipped or [])] + [
        f"{r.path}: incomplete run ({r.meta.get('failure') or 'did not finish'})" for r in runs if not r.complete
    ]
    described = _scenarios(runs)
    scenarios = [label for label, _ in described]
    group_cpus = {run.path: scenario.group_cpus for run, (_, scenario) in zip(runs, described, strict=True)}
    if pool and len(set(scenarios)) > 1:
        warnings.append(f"pooled {len(set(scenarios))} scenarios as asked: {'; '.join(sorted(set(scenarios)))}")
        scenarios, described = ["pooled"] * len(runs), []
    rows = []
    for scenario in sorted(set(scenarios)):
        members = [run for run, s in zip(runs, scenarios, strict=True) if s == scenario]
        found = sorted({r.method for r in members})
        if baseline is not None and baseline not in found and len(set(scenarios)) > 1:
            warnings.append(f"scenario {scenario}: no {baseline} run, so no ratios")
        scenario_rows: list[dict[str, Any]] = []
        boots: dict[tuple[str, str], Bootstrap] = {}
        draws = _draws_of(members, baseline)
        for method in found:
            frames = sorted(((r, r.requests()) for r in members if r.method == method), key=lambda f: _draw(f[0]))
            paired = [_draw(r) for r, _ in frames] == draws
            classes = sorted({c for _, f in frames for c in f["class"].dropna().unique()})
            for cls in [ALL, *classes]:
                # Paired: the same seed as the baseline's, so both resample the same draws in each replicate.
                seed = _seed(scenario, "paired" if paired else method, cls)
                row, boots[(method, cls)] = _row(method, cls, frames, group_cpus[frames[0][0].path], replicates, seed)
                scenario_rows.append({"scenario": scenario, **row, "paired": paired and len(frames) > 1})
        _rank_and_compare(scenario_rows, baseline, boots)
        rows += scenario_rows
    phases = event_phases(runs, scenarios, warnings)
    return Report(runs, baseline, rows, warnings, scenarios, dict(described), phases, weight_dynamics(runs, scenarios))


def weights_matrix(steps: pd.DataFrame) -> np.ndarray:
    """One LB's logged weights, [steps, servers], in step order."""
    ordered = steps.sort_values("t_s") if "t_s" in steps else steps
    return np.array(ordered["weights"].tolist(), dtype=np.float64).reshape(len(ordered), -1)


def weight_dynamics(runs: list[Run], scenarios: list[str]) -> list[dict[str, Any]]:
    """Are a method's weights dynamic? Per scenario and method with agent logs: the agent steps, the share of
    steps that changed any weight, and σ of log weight over time (the mean over LBs and servers, after
    dividing each step's weights by their geometric mean: SED depends on ratios only). Static weights read
    0 and 0; a policy that rewrites its weights every step but always to the same ratios reads 0 too."""
    out: list[dict[str, Any]] = []
    found: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for run, scenario in zip(runs, scenarios, strict=True):
        agents = run.agents()
        if agents.empty or "weights" not in agents:
            continue
        for _, steps in agents.groupby("lb"):
            weights = weights_matrix(steps)
            if len(weights) < 2 or (weights <= 0).any():
                continue
            logs = np.log(weights)
            ratios = logs - logs.mean(axis=1, keepdims=True)
            changed = float((np.abs(np.diff(ratios, axis=0)) > 1e-9).any(axis=1).mean())
            found.setdefault((scenario, run.method), []).append(
                (len(weights), changed, float(ratios.std(axis=0).mean()))
            )
    for (scenario, method), parts in sorted(found.items()):
        steps = sum(n for n, _, _ in parts)
        out.append(
            {
                "scenario": scenario,
                "method": method,
                "steps": steps,
                "changed_share": sum(n * c for n, c, _ in parts) / steps,
                "log_weight_std": sum(n * s for n, _, s in parts) / steps,
            }
        )
    return out


def event_phases(runs: list[Run], scenarios: list[str], warnings: list[str]) -> list[dict[str, Any]]:
    """Per scenario with timed events, per method and phase (the intervals between the events' applied times,
    `events.phase_bounds`): requests that arrived in it, the share that failed, mean and p99 JCT. A scenario
    with too many events to tabulate (a drift) gets a warning instead; its events are drawn on the figures."""
    out: list[dict[str, Any]] = []
    for scenario in dict.fromkeys(scenarios):
        members = [run for run, s in zip(runs, scenarios, strict=True) if s == scenario]
        events = members[0].events()
        if events.empty:
            continue
        end = max(float(run.summary.get("duration_s") or 0.0) for run in members)
        bounds = phase_bounds(events["applied_s"].tolist(), end)
        if bounds is None:
            warnings.append(f"scenario {scenario}: {len(events)} events, too many phases to tabulate (see the figures)")
            continue
        starting = {round(t, 6): [] for t, _ in bounds}
        for row in events.itertuples():
            starting.setdefault(round(row.applied_s, 6), []).append(TimedEvent.from_row(row).describe())
        for method in sorted({run.method for run in members}):
            frame = pd.concat([run.requests() for run in members if run.method == method], ignore_index=True)
            for start, stop in bounds:
                phase = frame[(frame["intended_s"] >= start) & (frame["intended_s"] < stop)]
                ok = (phase["error"] == "") & phase["status"].between(200, 399)
                jct = phase.loc[ok, "jct_s"].to_numpy(np.float64)
                out.append(
                    {
                        "scenario": scenario,
                        "method": method,
                        "start_s": start,
                        "end_s": stop,
                        "events": starting.get(round(start, 6), []),
                        "requests": int(len(phase)),
                        "failed": float(1 - ok.mean()) if len(phase) else 0.0,
                        "jct_mean_s": float(jct.mean()) if len(jct) else None,
                        "jct_p99_s": float(np.quantile(jct, 0.99)) if len(jct) else None,
                    }
                )
    return out


def phase_lines(report: Report) -> list[str]:
    """report.md's phase tables: one per scenario with timed events."""
    lines: list[str] = []
    for scenario in dict.fromkeys(row["scenario"] for row in report.phases):
        rows = [row for row in report.phases if row["scenario"] == scenario]
        lines += [f"### {_markdown_cell(scenario)}", ""]
        lines += ["| method | phase (s) | events at its start | requests | failed | mean (ms) | p99 (ms) |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for row in rows:
            events = "; ".join(row["events"]) or "(start)"
            cells = [
                row["method"],
                f"{row['start_s']:g}–{row['end_s']:g}",
                events,
                f"{row['requests']:,}",
                f"{row['failed']:.1%}",
                _ms(row["jct_mean_s"]),
                _ms(row["jct_p99_s"]),
            ]
            lines.append("| " + " | ".join(map(_markdown_cell, cells)) + " |")
        lines += [""]
    return lines


def _scenarios(runs: list[Run]) -> list[tuple[str, Scenario]]:
    """Each run's scenario and its label, unique per scenario."""
    found = []
    for run in runs:
        config = run.path / "config.yaml"
        found.append(scenario_of(run.meta, config.read_text() if config.is_file() else None))
    labels = label_scenarios(found)
    return [(labels[s.key], s) for s in found]


def _draw(run: Run) -> str:
    """What made a run's requests (and its events' draws): its seed, and on a testbed its trace window. Two
    runs of one scenario with the same draw met the same traffic (the simulator's common random numbers)."""
    meta = run.meta
    trace = meta.get("trace") or {}
    return json.dumps([meta.get("seed"), meta.get("duration_s"), trace.get("start_s"), meta.get("speed")])


def _draws_of(members: list[Run], baseline: str | None) -> list[str] | None:
    """The baseline's draws in order (a group with the same list is paired with it); None without two runs."""
    if baseline is None:
        return None
    draws = sorted(_draw(run) for run in members if run.method == baseline)
    return draws if len(draws) >= 2 else None


def _seed(*parts: str) -> int:
    """A bootstrap seed fixed by what the row is: the same runs give the same intervals."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


def _row(
    method: str,
    cls: str,
    runs: list[tuple[Run, pd.DataFrame]],
    group_cpus: dict[str, float],
    replicates: int,
    seed: int,
) -> tuple[dict[str, Any], Bootstrap]:
    picked = [(run, f if cls == ALL else f[f["class"] == cls]) for run, f in runs]
    pooled = pd.concat([f for _, f in picked], ignore_index=True)
    ok = (pooled["error"] == "") & pooled["status"].between(200, 399)
    jct = pooled.loc[ok, "jct_s"].to_numpy(np.float64)
    completed = [f[(f["error"] == "") & f["status"].between(200, 399)].sort_values("intended_s") for _, f in picked]
    per_run_means = [float(f["jct_s"].mean()) for f in completed if len(f)]
    duration = sum(float(run.summary.get("duration_s") or 0.0) for run, _ in picked)
    quantiles = np.quantile(jct, [0.5, 0.9, 0.99]) if len(jct) else [None] * 3
    trainings = [run.meta.get("training_seed") for run, _ in picked]
    strata = trainings if any(t is not None for t in trainings) else None  # a sweep's learner: two levels
    boot = bootstrap([f["jct_s"].to_numpy(np.float64) for f in completed], replicates, seed, strata)
    row = {
        "method": method,
        "class": cls,
        "runs": len(picked),
        "requests": int(len(pooled)),
        "completed": int(ok.sum()),
        "error_rate": float(1 - ok.mean()) if len(pooled) else 0.0,
        "throughput_per_s": float(ok.sum() / duration) if duration > 0 else None,
        "jct_mean_s": float(jct.mean()) if len(jct) else None,
        "jct_std_s": float(jct.std()) if len(jct) else None,
        "jct_mean_spread_s": float(np.std(per_run_means)) if len(per_run_means) >= 2 else None,
        "trainings": len({t for t in trainings if t is not None}) or None,
        "jct_mean_iqm_s": interquartile_mean(per_run_means) if len(per_run_means) >= 4 else None,
        "jct_p50_s": _float(quantiles[0]),
        "jct_p90_s": _float(quantiles[1]),
        "jct_p99_s": _float(quantiles[2]),
    }
    for stat in RATIO_STATISTICS:
        row[f"{stat.removesuffix('_s')}_ci_s"] = boot.interval(stat)
    row["busy_by_group"], row["busy_ratio"] = _busy(picked, group_cpus) if cls == ALL else ({}, None)
    return row, boot


def _busy(runs: list[tuple[Run, pd.DataFrame]], cpus: dict[str, float]) -> tuple[dict[str, float], float | None]:
    """Mean busy workers per server group over the runs, and the ratio of the group with the most CPUs per
    server to the one with the fewest (CIKM'22 Fig. 9: SED put 2.329 × the work on the more powerful group;
    an even split of busy workers reads 1). `cpus`: the groups' CPUs (the scenario's); None without them."""
    frames = [run.servers() for run, _ in runs]
    busy = pd.concat(frames, ignore_index=True).dropna(subset=["busy"]) if frames else pd.DataFrame()
    if busy.empty:
        return {}, None
    by_group = {str(group): float(mean) for group, mean in busy.groupby("group")["busy"].mean().items()}
    known = sorted((cpus[group], group) for group in by_group if group in cpus)
    if len(known) < 2 or known[0][0] == known[-1][0] or by_group[known[0][1]] == 0:
        return by_group, None
    return by_group, by_group[known[-1][1]] / by_group[known[0][1]]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


#: The statistics given with a confidence interval and as a ratio to the baseline (p90: CIKM's headline).
RATIO_STATISTICS = ("jct_mean_s", "jct_p90_s", "jct_p99_s")


def _rank_and_compare(
    rows: list[dict[str, Any]], baseline: str | None, boots: dict[tuple[str, str], Bootstrap]
) -> None:
    """Rank one scenario's methods by overall mean JCT (1 = best); add each row's ratios to the baseline's
    same class, with their confidence intervals."""
    overall = {r["method"]: r["jct_mean_s"] for r in rows if r["class"] == ALL}
    order = sorted(overall, key=lambda m: (overall[m] is None, overall[m] or 0.0))
    ranks = {method: i + 1 for i, method in enumerate(order)}
    base = {r["class"]: r for r in rows if r["method"] == baseline}
    for row in rows:
        row["rank"] = ranks[row["method"]]
        ref = base.get(row["class"])
        for stat in RATIO_STATISTICS:
            name = stat.removesuffix("_s")
            ratio = interval = None
            if ref and ref[stat] and row[stat] is not None:
                ratio = row[stat] / ref[stat]
                if row["method"] != baseline:
                    interval = boots[(row["method"], row["class"])].ratio_interval(
                        stat, boots[(baseline, row["class"])]
                    )
                else:
                    interval = (1.0, 1.0)
            row[f"{name}_ratio"] = ratio
            row[f"{name}_ratio_ci"] = interval
    rows.sort(key=lambda r: (r["rank"], r["class"] != ALL, r["class"]))


# -- Markdown and figures -----------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _mean_cell(row: dict[str, Any]) -> str:
    cell = f"{_ms(row['jct_mean_s'])} ± {_ms(row['jct_std_s'])}"
    if row["jct_mean_spread_s"] is not None:
        cell += f" (runs ± {_ms(row['jct_mean_spread_s'])})"
    return cell


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _span(interval: Any, scale: float = 1.0, digits: int = 0) -> str:
    """An interval as `low–high` (— when there is none)."""
    if interval is None:
        return "—"
    low, high = interval
    return f"{low * scale:.{digits}f}–{high * scale:.{digits}f}"


def _ratio_ci(value: float | None, interval: Any) -> str:
    """A ratio with its 95 % interval: `0.93 [0.90, 0.96]`."""
    if value is None:
        return "—"
    return f"{value:.2f}" if interval is None else f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


#: Every column of the table: header → cell text of a row.
COLUMNS: dict[str, Any] = {
    "rank": lambda r: str(r["rank"]),
    "method": lambda r: r["method"],
    "class": lambda r: r["class"],
    "runs": lambda r: str(r["runs"]),
    "requests": lambda r: f"{r['requests']:,}",
    "JCT mean ± std (ms)": _mean_cell,
    "mean": lambda r: _ms(r["jct_mean_s"]),
    "std": lambda r: _ms(r["jct_std_s"]),
    "runs ±": lambda r: _ms(r["jct_mean_spread_s"]),
    "p50": lambda r: _ms(r["jct_p50_s"]),
    "p90": lambda r: _ms(r["jct_p90_s"]),
    "p99": lambda r: _ms(r["jct_p99_s"]),
    "throughput/s": lambda r: "—" if r["throughput_per_s"] is None else f"{r['throughput_per_s']:.1f}",
    "errors": lambda r: f"{r['error_rate']:.1%}",
    "mean 95% CI": lambda r: _span(r["jct_mean_ci_s"], 1000),
    "p90 95% CI": lambda r: _span(r["jct_p90_ci_s"], 1000),
    "mean / baseline": lambda r: _ratio(r["jct_mean_ratio"]),
    "mean× 95% CI": lambda r: _span(r["jct_mean_ratio_ci"], digits=2),
    "p90 / baseline": lambda r: _ratio(r["jct_p90_ratio"]),
    "p99 / baseline": lambda r: _ratio(r["jct_p99_ratio"]),
    "mean / baseline [95% CI]": lambda r: _ratio_ci(r["jct_mean_ratio"], r["jct_mean_ratio_ci"]),
    "p90 / baseline [95% CI]": lambda r: _ratio_ci(r["jct_p90_ratio"], r["jct_p90_ratio_ci"]),
    "p99 / baseline [95% CI]": lambda r: _ratio_ci(r["jct_p99_ratio"], r["jct_p99_ratio_ci"]),
    "busy big/small": lambda r: _ratio(r["busy_ratio"]),
}
MARKDOWN_COLUMNS = (
    "rank",
    "method",
    "class",
    "runs",
    "requests",
    "JCT mean ± std (ms)",
    "mean 95% CI",
    "p50",
    "p90",
    "p90 95% CI",
    "p99",
    "throughput/s",
    "errors",
    "mean / baseline [95% CI]",
    "p90 / baseline [95% CI]",
    "p99 / baseline [95% CI]",
    "busy big/small",
)
#: The terminal's narrower selection (fits 80 columns; report.md has the p90 and p99 ratios and every interval).
TERMINAL_COLUMNS = (
    "rank",
    "method",
    "class",
    "runs",
    "requests",
    "mean",
    "p90",
    "p99",
    "errors",
    "mean / baseline",
    "mean× 95% CI",
)


def short_names(methods: list[str]) -> dict[str, str]:
    """A name for the terminal for each method: `rl:DIR` and `static:FILE` by the last parts of their path
    that tell them apart (`rl:/runs/demo-…/qmix` → `rl:qmix`, `static:/tmp/io50.json` → `static:io50.json`);
    any other method as it is. The report's Markdown keeps the paths."""
    out = {m: m for m in methods}
    for prefix in ("rl:", "static:"):
        paths = sorted({m for m in methods if m.startswith(prefix)})
        for depth in range(1, 64):
            names = {m: prefix + "/".join(Path(m[len(prefix) :]).parts[-depth:]) for m in paths}
            if len(set(names.values())) == len(names) and not set(names.values()) & (set(methods) - set(paths)):
                out.update(names)
                break
    return out


def table_cells(row: dict[str, Any], columns: tuple[str, ...]) -> list[str]:
    """One table row as text, for `columns`; shared by the terminal and the Markdown table."""
    return [COLUMNS[name](row) for name in columns]


def _markdown_cell(text: str) -> str:
    """A cell's text that cannot end the cell, the row or start HTML: a method name is whatever a run says."""
    return html.escape(" ".join(text.split())).replace("|", "\\|")


def shown_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows worth printing: per-class rows only where a method's runs have more than one class."""
    classes: dict[tuple[str, str], int] = {}
    for row in rows:
        group = (row["scenario"], row["method"])
        classes[group] = classes.get(group, 0) + (row["class"] != ALL)
    return [r for r in rows if r["class"] == ALL or classes[(r["scenario"], r["method"])] > 1]


def is_training_dir(path: Path) -> bool:
    """A directory written by `marllb train` (it has a learning curve)."""
    return (path / "curve.parquet").is_file()


CURVE_COLUMNS = ("episode", "reward", "jct_mean_s", "wall_s")


def _read_training(path: Path) -> tuple[pd.DataFrame, dict]:
    """A training directory's curve and train.json, or a RunDirError naming the file that is damaged."""
    try:
        curve = pd.read_parquet(path / "curve.parquet")
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path / 'curve.parquet'}: unreadable learning curve ({exc.__class__.__name__})") from None
    missing = [column for column in CURVE_COLUMNS if column not in curve.columns]
    wrong = [c for c in CURVE_COLUMNS if c in curve.columns and not pd.api.types.is_numeric_dtype(curve[c])]
    if missing or wrong:
        problem = f"no {', '.join(missing)}" if missing else f"{', '.join(wrong)} of the wrong type"
        raise RunDirError(f"{path / 'curve.parquet'}: damaged learning curve ({problem})")
    try:
        meta = json.loads((path / "train.json").read_text()) if (path / "train.json").exists() else {}
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path / 'train.json'}: unreadable ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{path / 'train.json'}: damaged (not a JSON object)")
    return curve, meta


def learning_curves(trainings: list[Path], out: Path) -> tuple[Path, list[str]]:
    """`learning_curves.png` per training directory: episode reward; mean JCT of the exploring episodes and
    of the greedy evaluations (`train --eval-every`, dots); SAC's temperature α (QMIX's ε in the same
    column); the policy's entropy per head. And a Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True)
    reward_ax, jct_ax, alpha_ax, entropy_ax = axes
    lines = [
        "| training | algo | reward | episodes | last 5: mean JCT (ms) | best mean JCT (ms) | last greedy JCT (ms) "
        "| last α (ε) | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in trainings:
        curve, meta = _read_training(path)
        label = f"{path.name} ({meta.get('algo', '?')})"
        reward_ax.plot(curve["episode"], curve["reward"], label=label)
        (line,) = jct_ax.plot(curve["episode"], curve["jct_mean_s"] * 1e3, label=label)
        greedy = curve.dropna(subset=["greedy_jct_mean_s"]) if "greedy_jct_mean_s" in curve else curve.iloc[:0]
        if len(greedy):
            jct_ax.plot(greedy["episode"], greedy["greedy_jct_mean_s"] * 1e3, "o", color=line.get_color(), ms=4)
        for ax, column in ((alpha_ax, "alpha"), (entropy_ax, "entropy")):  # no updates yet: no column
            if column in curve:
                ax.plot(curve["episode"], curve[column], label=label)
        last_greedy = f"{greedy['greedy_jct_mean_s'].iloc[-1] * 1e3:.1f}" if len(greedy) else "—"
        alpha = curve["alpha"].dropna() if "alpha" in curve else curve["episode"].iloc[:0]
        lines.append(
            f"| {path} | {meta.get('algo', '?')} | {meta.get('reward', '?')} | {len(curve)} "
            f"| {curve['jct_mean_s'].tail(5).mean() * 1e3:.1f} | {curve['jct_mean_s'].min() * 1e3:.1f} "
            f"| {last_greedy} | {f'{alpha.iloc[-1]:.3g}' if len(alpha) else '—'} | {curve['wall_s'].sum() / 60:.1f} |"
        )
    reward_ax.set(ylabel="mean step reward", title="Learning curves")
    jct_ax.set(ylabel="mean JCT (ms)\nline: exploring, dots: greedy")
    alpha_ax.set(ylabel="SAC α (QMIX ε)", yscale="log")
    entropy_ax.set(xlabel="episode", ylabel="entropy per head (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
    reward_ax.legend(fontsize=7)
    return _save(fig, out / "learning_curves.png"), lines


def is_live_training(path: Path) -> bool:
    """A training directory of `marllb train --env testbed` (its episodes are runs on the testbed)."""
    return (path / "episodes").is_dir() and is_training_dir(path)


def _step_intervals(path: Path, curve: pd.DataFrame) -> np.ndarray:
    """Every LB's agent step intervals (s) over a live training's episodes, from their agents/*.parquet."""
    intervals = []
    for run in curve.get("run", pd.Series(dtype=str)).dropna():
        for frame_path in sorted((path / str(run) / "agents").glob("lb*.parquet")):
            try:
                times = pd.read_parquet(frame_path, columns=["t_s"])["t_s"].to_numpy(np.float64)
            except (OSError, ValueError, KeyError):
                continue
            intervals.append(np.diff(times))
    return np.concatenate(intervals) if intervals else np.zeros(0)


def live_training(trainings: list[Path], out: Path) -> tuple[list[Path], list[str]]:
    """For `train --env testbed` directories: real JCT per episode (mean and p90), the CDF of the agents'
    step interval per training (CIKM'22 Fig. 12) and a table of what synchronisation costs per step and per
    episode (NeurIPS'22 Table 1's comparison of CTDE with independent learners)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mean_ax, p90_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    cdf_fig, cdf_ax = plt.subplots(figsize=(7, 4))
    lines = [
        "| training | algo | episodes | step p50 (ms) | step p99 (ms) | RTT p99 (ms) | missed steps "
        "| network bytes/step | trajectory KiB/episode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in trainings:
        curve, meta = _read_training(path)
        label = f"{path.name} ({meta.get('algo', '?')})"
        mean_ax.plot(curve["episode"], curve["jct_mean_s"] * 1e3, marker=".", label=label)
        if "jct_p90_s" in curve:
            p90_ax.plot(curve["episode"], curve["jct_p90_s"] * 1e3, marker=".", label=label)
        intervals = _step_intervals(path, curve)
        if len(intervals):
            ordered = np.sort(intervals) * 1e3
            cdf_ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
        network = curve["coordinator_bytes_per_step"].mean() if "coordinator_bytes_per_step" in curve else 0.0
        trajectory = curve["trajectory_bytes"] + curve.get("coordinator_trajectory_bytes", 0.0)
        rtt = curve["rtt_p99_s"].max() * 1e3 if "rtt_p99_s" in curve else float("nan")
        misses = curve["missed_steps"].sum() if "missed_steps" in curve else 0
        p50, p99 = (np.quantile(intervals, q) * 1e3 if len(intervals) else float("nan") for q in (0.5, 0.99))
        lines.append(
            f"| {path} | {meta.get('algo', '?')} | {len(curve)} | {p50:.1f} | {p99:.1f} | {_number(rtt)} "
            f"| {misses:.0f} | {network:.0f} | {trajectory.mean() / 1024:.0f} |"
        )
    mean_ax.set(ylabel="mean JCT (ms)", title="Training on the testbed: real JCT per episode")
    p90_ax.set(xlabel="episode", ylabel="p90 JCT (ms)")
    cdf_ax.set(xlabel="agent step interval (ms)", ylabel="CDF", title="Step interval per training (CIKM'22 Fig. 12)")
    for ax in (mean_ax, p90_ax, cdf_ax):
        ax.grid(alpha=0.3)
    mean_ax.legend(fontsize=7)
    cdf_ax.legend(fontsize=7)
    figures = [_save(fig, out / "testbed_learning.png"), _save(cdf_fig, out / "step_intervals.png")]
    return figures, lines


def _number(value: float) -> str:
    """One decimal, or – where there is nothing to show (an independent learner has no round trip)."""
    return "–" if not math.isfinite(value) else f"{value:.1f}"


def is_fidelity_dir(path: Path) -> bool:
    """A directory written by `marllb bench fidelity` (it has fidelity.json)."""
    return (path / "fidelity.json").is_file()


def fidelity_figure(directories: list[Path], out: Path) -> tuple[Path, list[str]]:
    """`fidelity.png` (testbed against simulator mean JCT, per method and load, with each side's spread over
    repeats, on the diagonal when they agree) and a Markdown table of the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marllb_cli.bench.fidelity import stability

    lines = [
        "| fidelity | load | method | testbed mean (ms) | sim mean (ms) | testbed / sim | at calibrated cost | "
        "unstable tb / sim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(6, 6))
    markers = "osD^v<>"
    low, high = math.inf, 0.0
    for directory in directories:
        try:
            data = json.loads((directory / "fidelity.json").read_text())
            entries = [(entry["load"], row) for entry in data["loads"] for row in entry["methods"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{directory / 'fidelity.json'}: unreadable ({exc.__class__.__name__})") from None
        for index, (load, row) in enumerate(entries):
            tb, sim = row["testbed"], row["sim"]
            if tb["jct_mean_s"] is None or sim["jct_mean_s"] is None:
                continue
            x, y = sim["jct_mean_s"] * 1e3, tb["jct_mean_s"] * 1e3
            low, high = min(low, x, y), max(high, x, y)
            ax.errorbar(
                x,
                y,
                xerr=(sim["jct_mean_std_s"] or 0) * 1e3,
                yerr=(tb["jct_mean_std_s"] or 0) * 1e3,
                fmt=markers[sorted({e[0] for e in entries}).index(load) % len(markers)],
                color=f"C{index % len(set(r['method'] for _, r in entries))}",
                label=f"{row['method']} @ {load:g}",
            )
            ratio = f"{row['ratio']:.2f}" if row.get("ratio") else ""
            calibrated = f"{row['ratio_calibrated']:.2f}" if row.get("ratio_calibrated") else ""
            unstable = f"{stability(tb)} / {stability(sim)}"
            lines.append(
                f"| {_markdown_cell(str(directory))} | {load:g} | {_markdown_cell(row['method'])} | {y:.0f} | "
                f"{x:.0f} | {ratio} | {calibrated} | {unstable} |"
            )
    if high > 0:
        span = [low / 1.5, high * 1.5]
        ax.plot(span, span, color="grey", lw=1)
        ax.fill_between(span, [v / 1.15 for v in span], [v * 1.15 for v in span], color="grey", alpha=0.15)
        ax.set(xscale="log", yscale="log", xlim=span, ylim=span)
    ax.set(xlabel="simulator mean JCT (ms)", ylabel="testbed mean JCT (ms)", title="Simulator fidelity (band: ±15 %)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, out / "fidelity.png"), lines


def write_report(
    report: Report | None, out: Path, trainings: list[Path] | None = None, fidelities: list[Path] | None = None
) -> list[Path]:
    """Write `report.md` and the figures into `out` (runs compared, training directories' learning curves,
    `bench fidelity` directories' testbed-against-simulator figure); return the files written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {out}: not a directory", hint="name a new or existing directory") from None
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create it ({exc.strerror})") from None
    lines = ["# marllb report", ""]
    written: list[Path] = []
    if trainings:
        figure, table = learning_curves(trainings, out)
        written.append(figure)
        lines += ["## Learning curves", "", *table, "", f"![learning curves]({figure.name})", ""]
        live = [path for path in trainings if is_live_training(path)]
        if live:
            figures, table = live_training(live, out)
            written += figures
            lines += ["## Training on the testbed", "", *table, ""]
            lines += ["Network bytes/step: the coordinator's frames, both ways (0 for independent learners). "]
            lines += ["Trajectory: what the controller reads back per episode (step logs, coordinator's).", ""]
            lines += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    if fidelities:
        figure, table = fidelity_figure(fidelities, out)
        written.append(figure)
        lines += ["## Simulator fidelity", "", *table, "", f"![simulator fidelity]({figure.name})", ""]
    if report is None:
        path = out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return [path, *written]
    figures = _figures(report, out) + written
    if report.baseline:
        lines += [
            f"Baseline for the ratios: **{report.baseline}**, in each scenario. JCT in milliseconds, completed "
            "requests only. Intervals: 95 % bootstrap (over runs when a method has several, else over blocks of "
            "requests); a ratio is paired run for run with the baseline where the method ran the same seeds.",
            "",
        ]
    labels = report.scenario_labels()
    shown = shown_rows(report.rows)
    for label in labels:
        if len(labels) > 1:
            lines += [f"### {_markdown_cell(label)} ({report.runs_in(label)} runs)", ""]
        lines += ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
        lines += [
            "| " + " | ".join(map(_markdown_cell, table_cells(row, MARKDOWN_COLUMNS))) + " |"
            for row in shown
            if row["scenario"] == label
        ]
        lines += [""]
    if report.phases:
        lines += ["## Phases between timed events", ""]
        lines += ["Requests by arrival time; failed: refused, reset or timed out (any error or a status outside "]
        lines[-1] += "2xx–3xx)."
        lines += ["", *phase_lines(report)]
    if report.dynamics:
        lines += ["## Are the weights dynamic?", ""]
        lines += ["Per method with agent logs: the share of agent steps that changed the weights' ratios, and σ of"]
        lines += ["log weight over time (mean over LBs and servers; 0 for weights that never change).", ""]
        lines += ["| scenario | method | agent steps | steps that changed | σ log weight |", "|---|---|---|---|---|"]
        lines += [
            f"| {_markdown_cell(d['scenario'])} | {_markdown_cell(d['method'])} | {d['steps']} "
            f"| {d['changed_share']:.1%} | {d['log_weight_std']:.3f} |"
            for d in report.dynamics
        ]
        lines += [""]
    lines += ["## Runs", "", "| run | method | seed | scenario | complete |", "|---|---|---|---|---|"]
    for run, scenario in zip(report.runs, report.scenarios, strict=True):
        cells = [run.path, run.method, run.meta.get("seed", ""), scenario]
        lines.append(
            "| "
            + " | ".join(_markdown_cell(str(cell)) for cell in cells)
            + f" | {'yes' if run.complete else '**no**'} |"
        )
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {_markdown_cell(w)}" for w in report.warnings]
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures if p not in written]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path, *figures]


def _figures(report: Report, out: Path) -> list[Path]:
    """The four figures, a series per method (per method and scenario when there are several scenarios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(set(report.scenarios)) > 1
    series: dict[str, list[Run]] = {}
    for run, scenario in zip(report.runs, report.scenarios, strict=True):
        series.setdefault(f"{run.method} · {scenario}" if several else run.method, []).append(run)
    methods = sorted(series)
    requests = {m: pd.concat([r.requests() for r in series[m]], ignore_index=True) for m in methods}
    done = {m: f[(f["error"] == "") & f["status"].between(200, 399)] for m, f in requests.items()}
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        jct = np.sort(done[method]["jct_s"].to_numpy())
        if len(jct):
            ax.plot(jct, np.arange(1, len(jct) + 1) / len(jct), label=method)
    ax.set(xscale="log", xlabel="job completion time (s)", ylabel="CDF", title="JCT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "jct_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        frame = done[method]
        if len(frame):
            per_second = frame.groupby(np.floor(frame["intended_s"]))["jct_s"].mean()
            ax.plot(per_second.index, per_second.to_numpy(), label=method)
    ax.set(xlabel="run time (s)", ylabel="mean JCT (s)", title="JCT over time (1 s bins)")
    marks = _event_marks(report.runs)
    _mark_events(ax, marks)
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "jct_over_time.png"))
    if marks:
        written.append(_busy_over_time(series, marks, out))

    servers = pd.concat(
        [run.servers().assign(method=name) for name in methods for run in series[name]], ignore_index=True
    ).dropna(subset=["busy"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(servers):
        groups = sorted(servers["group"].unique())
        data, labels = [], []
        for group in groups:
            for method in methods:
                data.append(servers.loc[(servers["group"] == group) & (servers["method"] == method), "busy"].to_numpy())
                labels.append(f"{group}\n{method}")
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set(ylabel="busy Apache workers", title="Busy workers per server group")
    ax.grid(alpha=0.3, axis="y")
    written.append(_save(fig, out / "busy_workers.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({s for f in requests.values() for s in f["server"].dropna().unique() if s}, key=_natural)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        shares = requests[method]["server"].value_counts(normalize=True)
        ax.bar(np.arange(len(names)) + i * width, [shares.get(n, 0.0) for n in names], width, label=method)
    ax.set_xticks(np.arange(len(names)) + width * (len(methods) - 1) / 2, names)
    ax.set(ylabel="share of requests", title="Requests per server")
    ax.legend()
    written.append(_save(fig, out / "flow_share.png"))
    if (sweep := _level_sweep(report, out)) is not None:
        written.append(sweep)
    moving = sorted({d["method"] for d in report.dynamics if d["changed_share"] > 0})
    if moving:
        written.append(_weights_over_time(report.runs, moving, out))
    return written


def _weights_over_time(runs: list[Run], methods: list[str], out: Path) -> Path:
    """`weights_over_time.png`: for each method whose weights move, lb0's weights of its first run over time,
    each server's weight over the step's geometric mean (what SED's choice depends on)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(methods), 1, figsize=(7, 2.4 * len(methods)), sharex=True, squeeze=False)
    for ax, method in zip(axes[:, 0], methods, strict=True):
        run = next(r for r in runs if r.method == method)
        agents = run.agents()
        steps = agents[agents["lb"] == sorted(agents["lb"].unique())[0]].sort_values("t_s")
        weights = weights_matrix(steps)
        relative = weights / np.exp(np.log(weights).mean(axis=1, keepdims=True))
        for j in range(relative.shape[1]):
            ax.step(steps["t_s"], relative[:, j], where="post", linewidth=0.8, label=f"srv{j}")
        ax.set(ylabel="weight / geo. mean")
        ax.set_title(f"{short_names(methods)[method]}: lb0 of its first run", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set(xlabel="run time (s)")
    axes[0, 0].legend(fontsize=6, ncol=8)
    return _save(fig, out / "weights_over_time.png")


def _event_marks(runs: list[Run]) -> list[tuple[float, str]]:
    """(applied time, what) of every distinct timed event of the runs, in time order."""
    marks: dict[tuple[float, str], None] = {}
    for run in runs:
        for row in run.events().itertuples():
            what = TimedEvent.from_row(row).describe()
            marks[(round(float(row.applied_s), 2), what)] = None
    return sorted(marks)


def _mark_events(ax, marks: list[tuple[float, str]]) -> None:
    """A dotted line at each event; labelled when there are few enough to read (a drift has many)."""
    for t, what in marks:
        ax.axvline(t, color="0.3", linestyle=":", linewidth=0.8)
        if len(marks) <= 8:
            ax.annotate(what, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        va="top", ha="right", color="0.3")  # fmt: skip


def _busy_over_time(series: dict[str, list[Run]], marks: list[tuple[float, str]], out: Path) -> Path:
    """`busy_over_time.png`: mean busy workers per server group per second, per method, with the events."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in sorted(series.items()):
        busy = pd.concat([run.servers() for run in runs], ignore_index=True).dropna(subset=["busy"])
        for group, frame in busy.groupby("group"):
            per_second = frame.groupby(np.floor(frame["t_s"]))["busy"].mean()
            ax.plot(per_second.index, per_second.to_numpy(), label=f"{name} · {group}", linewidth=1)
    ax.set(xlabel="run time (s)", ylabel="busy workers per server", title="Busy workers over time (1 s bins)")
    _mark_events(ax, marks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "busy_over_time.png")


def _level_sweep(report: Report, out: Path) -> Path | None:
    """`jct_vs_load.png` (or rate, speed): mean JCT with its 95 % interval per method against the offered
    level, for scenarios that differ only in it (the papers' rate sweeps); None when there are none."""
    import matplotlib.pyplot as plt

    families: dict[str, dict[float, str]] = {}
    for label, scenario in report.described.items():
        if scenario.level is not None:
            families.setdefault(scenario.family, {})[scenario.level] = label
    sweeps = [levels for levels in families.values() if len(levels) >= 2]
    if not sweeps:
        return None
    level_name = report.described[next(iter(sweeps[0].values()))].level_name
    rows = {(r["scenario"], r["method"]): r for r in report.rows if r["class"] == ALL}
    fig, ax = plt.subplots(figsize=(7, 4))
    for number, levels in enumerate(sweeps, 1):
        for method in sorted({method for label, method in rows if label in levels.values()}):
            xs, ys, below, above = [], [], [], []
            for level in sorted(levels):
                row = rows.get((levels[level], method))
                if row is None or row["jct_mean_s"] is None:
                    continue
                mean = row["jct_mean_s"]
                low, high = row["jct_mean_ci_s"] or (mean, mean)
                xs.append(level)
                ys.append(mean)
                below.append(mean - low)
                above.append(high - mean)
            tag = method if len(sweeps) == 1 else f"{method} · sweep {number}"
            ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=tag)
    ax.set(xlabel=f"offered {level_name}", ylabel="mean JCT (s)", yscale="log")
    ax.set_title(f"JCT against offered {level_name} (95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / f"jct_vs_{level_name}.png")


def _natural(name: str) -> tuple[str, int]:
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or 0)


def _save(fig, path: Path) -> Path:
    """Write a figure. Layout advice (a legend of many series, margins too small for tight_layout) is
    matplotlib's business, not the user's: a figure of many scenarios is drawn as well as it can be."""
    import warnings

    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
