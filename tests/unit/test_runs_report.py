"""Run directories and `marllb report` on synthetic runs whose statistics are known in advance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from marllb_cli.report import build_report, find_runs, shown_rows, write_report
from marllb_cli.runs import create_run_dir, empty_requests, load_run, summarize, write_json


def _requests(jct: np.ndarray, classes: list[str], *, errors: int = 0) -> pd.DataFrame:
    """Requests one per 10 ms with the given JCTs; the last `errors` of them failed (timeout)."""
    n = len(jct)
    frame = empty_requests(n)
    frame["intended_s"] = np.arange(n) * 0.01
    frame["send_lag_s"] = 0.0005
    frame["done_s"] = frame["intended_s"] + jct
    frame["jct_s"] = jct
    frame["status"] = 200
    frame["class"] = pd.array([classes[i % len(classes)] for i in range(n)], dtype="string")
    frame["server"] = pd.array([f"srv{i % 3}" for i in range(n)], dtype="string")
    if errors:
        frame.loc[n - errors :, ["status", "error"]] = [0, "timeout"]
        frame.loc[n - errors :, ["done_s", "jct_s"]] = np.nan
    return frame


def _run(runs_dir, method: str, seed: int, jct: np.ndarray, *, classes=("cpu",), complete=True, errors=0, meta=None):
    path = create_run_dir(runs_dir, method=method, testbed="syn", seed=seed)
    requests = _requests(jct, list(classes), errors=errors)
    requests.to_parquet(path / "requests.parquet", index=False)
    servers = pd.DataFrame({"t_s": [0.0, 0.25], "server": ["srv0"] * 2, "group": ["g"] * 2, "busy": [1.0, 3.0]})
    servers.to_parquet(path / "servers.parquet", index=False)
    write_json(path / "summary.json", summarize(requests, method=method, duration_s=len(jct) * 0.01))
    write_json(
        path / "meta.json", {"kind": "testbed", "method": method, "seed": seed, "complete": complete, **(meta or {})}
    )
    return path


def test_summarize_counts_errors_and_percentiles():
    jct = np.linspace(0.001, 1.0, 1000)
    requests = _requests(jct, ["cpu", "static"], errors=100)
    summary = summarize(requests, method="sed", duration_s=10.0)
    assert summary["requests"] == 1000 and summary["completed"] == 900 and summary["errors"] == 100
    assert summary["error_kinds"] == {"timeout": 100}
    done = jct[:900]
    assert summary["jct_mean_s"] == pytest.approx(done.mean())
    assert summary["jct_p99_s"] == pytest.approx(np.quantile(done, 0.99))
    assert summary["throughput_per_s"] == pytest.approx(90.0)
    assert summary["send_lag_p99_s"] == pytest.approx(0.0005)
    assert set(summary["by_class"]) == {"cpu", "static"}
    assert summary["by_class"]["cpu"]["requests"] == 500
    assert summary["by_class"]["static"]["jct_mean_s"] == pytest.approx(done[1::2].mean())


def test_report_pools_seeds_ranks_and_compares_to_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    runs_dir = tmp_path / "runs"
    a1 = rng.exponential(0.1, 4000)
    a2 = rng.exponential(0.12, 4000)
    b = rng.exponential(0.3, 4000)
    _run(runs_dir, "sed", 0, a1, classes=("cpu", "static"))
    _run(runs_dir, "sed", 1, a2, classes=("cpu", "static"))
    _run(runs_dir, "ecmp", 0, b, classes=("cpu", "static"), complete=False, errors=40)

    report = build_report(find_runs([runs_dir]))
    assert report.baseline == "sed"
    assert len(report.runs) == 3
    assert len(report.warnings) == 1 and "incomplete" in report.warnings[0]
    rows = {(r["method"], r["class"]): r for r in report.rows}
    sed, ecmp = rows[("sed", "all")], rows[("ecmp", "all")]
    assert (sed["rank"], ecmp["rank"]) == (1, 2)
    assert sed["runs"] == 2 and sed["requests"] == 8000
    pooled = np.concatenate([a1, a2])
    assert sed["jct_mean_s"] == pytest.approx(pooled.mean())
    assert sed["jct_p99_s"] == pytest.approx(np.quantile(pooled, 0.99))
    assert sed["jct_mean_spread_s"] == pytest.approx(np.std([a1.mean(), a2.mean()]))
    assert ecmp["jct_mean_spread_s"] is None
    assert ecmp["error_rate"] == pytest.approx(0.01)
    assert ecmp["jct_mean_ratio"] == pytest.approx(b[:-40].mean() / pooled.mean())
    assert sed["jct_mean_ratio"] == pytest.approx(1.0)
    cpu = rows[("sed", "cpu")]
    assert cpu["jct_mean_s"] == pytest.approx(np.concatenate([a1[::2], a2[::2]]).mean())

    files = write_report(report, tmp_path / "out")
    names = {f.name for f in files}
    assert names == {"report.md", "jct_cdf.png", "jct_over_time.png", "busy_workers.png", "flow_share.png"}
    for f in files[1:]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| 1 | sed | all | 2 | 8,000 |" in markdown
    assert "| 2 | ecmp | all | 1 | 4,000 |" in markdown

    # An explicit baseline changes the ratios.
    flipped = {(r["method"], r["class"]): r for r in build_report(report.runs, "ecmp").rows}
    assert flipped[("ecmp", "all")]["jct_mean_ratio"] == pytest.approx(1.0)
    assert flipped[("sed", "all")]["jct_mean_ratio"] == pytest.approx(pooled.mean() / b[:-40].mean())


def _sim(load: float, io_share: float = 0.0) -> dict:
    """The meta of a simulator run of testbed `simmod` at `load`."""
    traffic = {"kind": "poisson", "load": load, "rate": None, "duration_s": 40.0, "io_share": io_share}
    return {"kind": "sim", "testbed": "simmod", "traffic": traffic}


def test_report_never_pools_scenarios_unless_asked(cli, tmp_path):
    """sed and lsq at loads 0.7 and 0.9: one table per load, each ranked and compared with its own sed; pooled
    only with --pool, which says so. Before scenarios, the four runs came out as two rows, `sed, 2 runs`."""
    rng = np.random.default_rng(2)
    runs_dir = tmp_path / "runs"
    light = {m: rng.exponential(mean, 2000) for m, mean in (("sed", 0.1), ("lsq", 0.12))}
    heavy = {m: rng.exponential(mean, 2000) for m, mean in (("sed", 0.3), ("lsq", 0.2))}
    for seed, (method, jct) in enumerate(light.items()):
        _run(runs_dir, method, seed, jct, meta=_sim(0.7))
    for seed, (method, jct) in enumerate(heavy.items()):
        _run(runs_dir, method, seed, jct, meta={**_sim(0.9), "traffic": {**_sim(0.9)["traffic"], "duration_s": 9}})

    report = build_report(find_runs([runs_dir]), replicates=200)
    assert report.scenario_labels() == ["simmod · sim · load 0.7", "simmod · sim · load 0.9"]  # durations differ
    rows = {(r["scenario"], r["method"]): r for r in report.rows if r["class"] == "all"}
    assert len(rows) == 4 and all(r["runs"] == 1 for r in rows.values())
    assert len(shown_rows(report.rows)) == 4  # one class per scenario: no per-class rows
    low, high = rows[("simmod · sim · load 0.7", "lsq")], rows[("simmod · sim · load 0.9", "lsq")]
    assert low["rank"] == 2 and high["rank"] == 1
    assert low["jct_mean_ratio"] == pytest.approx(light["lsq"].mean() / light["sed"].mean())
    assert high["jct_mean_ratio"] == pytest.approx(heavy["lsq"].mean() / heavy["sed"].mean())
    ci = high["jct_mean_ratio_ci"]
    assert ci[0] < high["jct_mean_ratio"] < ci[1] and ci[1] < 0.8  # lsq beats sed at 0.9, and the CI says so
    assert rows[("simmod · sim · load 0.9", "sed")]["jct_mean_ratio_ci"] == (1.0, 1.0)
    mean_ci = rows[("simmod · sim · load 0.7", "sed")]["jct_mean_ci_s"]
    assert mean_ci[0] < light["sed"].mean() < mean_ci[1] and mean_ci[1] - mean_ci[0] < 0.02

    pooled = build_report(find_runs([runs_dir]), pool=True, replicates=0)
    assert pooled.scenario_labels() == ["pooled"] and any("pooled 2 scenarios" in w for w in pooled.warnings)
    assert {r["method"]: r["runs"] for r in pooled.rows if r["class"] == "all"} == {"sed": 2, "lsq": 2}
    assert all(r["jct_mean_ci_s"] is None for r in pooled.rows)

    result = cli("report", runs_dir, "--out", tmp_path / "rep", "--bootstrap", "100")
    assert result.exit_code == 0, result.output
    assert "simmod · sim · load 0.7: 2 runs" in result.stdout and "simmod · sim · load 0.9: 2 runs" in result.stdout
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "### simmod · sim · load 0.7 (2 runs)" in markdown and "### simmod · sim · load 0.9 (2 runs)" in markdown
    assert (tmp_path / "rep" / "jct_vs_load.png").stat().st_size > 5000  # the two loads are one sweep
    assert "![jct_vs_load](jct_vs_load.png)" in markdown
    assert cli("report", runs_dir, "--bootstrap", "-1", "--out", tmp_path / "rep").exit_code == 2


def test_report_cli_json_and_bad_input(cli, tmp_path):
    rng = np.random.default_rng(1)
    runs_dir = tmp_path / "runs"
    good = _run(runs_dir, "lsq", 0, rng.exponential(0.2, 500))
    _run(runs_dir, "sed", 0, rng.exponential(0.1, 500))
    result = cli("report", runs_dir, "--out", tmp_path / "rep", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["method"] for r in data["rows"] if r["class"] == "all"] == ["sed", "lsq"]
    assert data["rows"][-1]["jct_mean_ratio"] > 1.5

    table = cli("report", good, "--out", tmp_path / "rep2")
    assert table.exit_code == 0 and "lsq" in table.stdout

    for args, expected in (
        ((tmp_path / "nothing",), "no such run directory"),
        ((tmp_path,), "not a run directory"),
        ((runs_dir, "--baseline", "qmix"), "no run of that method"),
    ):
        bad = cli("report", *args, "--out", tmp_path / "rep3")
        assert bad.exit_code == 2, bad.output
        assert expected in bad.stderr and "Traceback" not in bad.output
    (good / "requests.parquet").write_text("not parquet")
    broken = cli("report", good, "--out", tmp_path / "rep3")
    assert broken.exit_code == 2 and "unreadable Parquet" in broken.stderr
    assert load_run(good).method == "lsq"


def test_report_draws_learning_curves_of_training_directories(cli, tmp_path):
    training = tmp_path / "train-distr"
    training.mkdir()
    curve = pd.DataFrame(
        {
            "episode": range(10),
            "reward": np.linspace(7, 9, 10),
            "jct_mean_s": np.linspace(0.2, 0.1, 10),
            "wall_s": [6.0] * 10,
            "alpha": np.geomspace(1.0, 0.2, 10),
            "entropy": np.linspace(1.1, 0.55, 10),
            "greedy_jct_mean_s": [np.nan] * 4 + [0.15] + [np.nan] * 4 + [0.095],
        }
    )
    curve.to_parquet(training / "curve.parquet")
    (training / "train.json").write_text(json.dumps({"algo": "distr", "reward": "vbf-log"}))
    only = cli("report", training, "--out", tmp_path / "curves")
    assert only.exit_code == 0, only.output
    markdown = (tmp_path / "curves" / "report.md").read_text()
    assert f"| {training} | distr | vbf-log | 10 | 122.2 | 100.0 | 95.0 | 0.2 | 1.0 |" in markdown
    assert (tmp_path / "curves" / "learning_curves.png").stat().st_size > 5000
    run = _run(tmp_path / "runs", "sed", 0, np.full(100, 0.1))
    both = cli("report", run, training, "--out", tmp_path / "both")
    assert both.exit_code == 0, both.output
    text = (tmp_path / "both" / "report.md").read_text()
    assert "## Learning curves" in text and "| 1 | sed | all |" in text


def test_report_finishes_a_run_whose_controller_was_killed(tmp_path):
    """SIGKILL of `replay-trace` leaves meta.json (complete: false), the schedule and the replayer's own
    rows, but no results: `report` over the folder recovers them (every sent request, in schedule order)."""
    import json

    from marllb_cli.replay import ROW_FIELDS
    from marllb_cli.report import scan_runs

    runs = tmp_path / "runs"
    run = create_run_dir(runs, method="sed", testbed="t", seed=0)
    write_json(run / "meta.json", {"kind": "testbed", "method": "sed", "complete": False})
    schedule = pd.DataFrame(
        {"intended_s": [0.0, 0.5, 1.0], "path": ["/a", "/b", "/c"], "class": ["static"] * 3}
    ).astype({"path": "string", "class": "string"})
    schedule.to_parquet(run / "schedule.parquet", index=False)
    rows = [
        {"index": 1, "send_lag_s": 0.001, "connect_s": 0.51, "first_byte_s": 0.6, "done_s": 0.7, "status": 200,
         "bytes": 10, "server": "srv1", "error": ""},
        {"index": 0, "send_lag_s": 0.001, "connect_s": 0.01, "first_byte_s": 0.1, "done_s": 0.2, "status": 200,
         "bytes": 10, "server": "srv0", "error": ""},
    ]  # fmt: skip
    pd.DataFrame(rows, columns=list(ROW_FIELDS)).to_csv(run / "requests.csv", index=False)
    found, warnings = scan_runs([runs])
    assert [r.path for r in found] == [run] and any("recovered" in w for w in warnings)
    requests = found[0].requests()
    assert requests["intended_s"].tolist() == [0.0, 0.5] and requests["jct_s"].round(6).tolist() == [0.2, 0.2]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is False and meta["failure"].startswith("killed") and meta["replayed_requests"] == 2
    assert not (run / "requests.csv").exists()


def test_report_draws_a_fidelity_benchmark_and_refuses_a_damaged_one(cli, tmp_path):
    side = {"jct_mean_s": 0.07, "jct_mean_std_s": 0.004, "jct_p90_s": 0.1, "jct_p99_s": 0.4, "error_rate": 0.0,
            "shares": {"srv0": 0.5, "srv1": 0.5}, "unstable": False, "runs": []}  # fmt: skip
    row = {"method": "sed", "testbed": side, "sim": {**side, "jct_mean_s": 0.05}, "sim_calibrated": side,
           "ratio": 1.4, "ratio_calibrated": 1.0}  # fmt: skip
    bench = tmp_path / "fidelity"
    bench.mkdir()
    (bench / "fidelity.json").write_text(json.dumps({"loads": [{"load": 0.9, "methods": [row]}]}))
    result = cli("report", bench, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| 0.9 | sed | 70 | 50 | 1.40 | 1.00 | no / no |" in text
    assert (tmp_path / "r" / "fidelity.png").stat().st_size > 10_000
    (bench / "fidelity.json").write_text('{"loads": [{"load": 0.9}]}')
    result = cli("report", bench, "--out", tmp_path / "r2")
    assert result.exit_code == 2 and "fidelity.json: unreadable" in result.stderr


def test_bench_fidelity_says_when_the_testbed_did_not_run_at_the_load_asked_for(capsys):
    """The CPU speed of a shared machine moves: in one benchmark the requests cost 1.21 x the calibration made
    minutes before, so 'load 0.7' was 0.85 and 'load 0.9' overloaded every method. The tables say at what
    load the testbed really ran, and warn where that is more than 10 % off."""
    from marllb_cli.commands.bench import print_fidelity

    side = {"jct_mean_s": 0.27, "jct_mean_std_s": 0.02, "jct_p99_s": 1.3, "error_rate": 0.0, "unstable": False}
    row = {"method": "sed", "testbed": side, "sim": side, "ratio": 0.94, "ratio_calibrated": 1.42}
    ranking = {"testbed": ["sed"], "sim": ["sed"], "sim_calibrated": ["sed"]}
    entry = {"speed": 0.365, "methods": [row], "ranking": ranking}
    loads = [{**entry, "load": 0.7, "cost_scale": 1.213}, {**entry, "load": 0.9, "cost_scale": 1.04}]
    print_fidelity({"repeats": 2, "loads": loads})
    out, err = capsys.readouterr()
    flat = " ".join(out.split())
    assert "(1.21 × calibrated, so an offered load of ≈ 0.85)" in flat
    assert "(1.04 × calibrated, so an offered load of ≈ 0.94)" in flat
    warnings = [line for line in " ".join(err.split()).split("warning: ") if line]
    assert len(warnings) == 1 and "at load 0.7" in warnings[0] and "≈ 0.85, not 0.7" in warnings[0]


def test_policies_get_short_names_that_still_tell_them_apart():
    from marllb_cli.report import short_names

    names = short_names(["sed", "rl:/runs/a/qmix", "rl:/runs/b/distr", "ecmp"])
    assert names == {"sed": "sed", "ecmp": "ecmp", "rl:/runs/a/qmix": "rl:qmix", "rl:/runs/b/distr": "rl:distr"}
    same_leaf = short_names(["rl:/x/one/policy", "rl:/x/two/policy"])
    assert same_leaf == {"rl:/x/one/policy": "rl:one/policy", "rl:/x/two/policy": "rl:two/policy"}
    files = short_names(["static:/tmp/a/w.json", "static:/tmp/b/w.json", "static:/tmp/io50.json"])
    assert files == {
        "static:/tmp/a/w.json": "static:a/w.json",
        "static:/tmp/b/w.json": "static:b/w.json",
        "static:/tmp/io50.json": "static:tmp/io50.json",
    }


def test_busy_workers_ratio_is_the_big_group_over_the_small_one(tmp_path):
    """CIKM'22 Fig. 9's figure: mean busy workers of the group with the most CPUs over the one with the fewest,
    groups told apart by each run's config.yaml."""
    run = _run(tmp_path / "runs", "sed", 0, np.full(100, 0.1))
    busy = pd.DataFrame(
        {
            "t_s": [0.0, 0.25, 0.0, 0.25],
            "server": ["srv0", "srv0", "srv1", "srv1"],
            "group": ["small", "small", "large", "large"],
            "busy": [1.0, 3.0, 4.0, 6.0],
        }
    )
    busy.to_parquet(run / "servers.parquet", index=False)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"testbed": {"servers": [{"name": "small", "cpus": 1}, {"name": "large", "cpus": 2}]}})
    )
    (row,) = [r for r in build_report(find_runs([run]), replicates=0).rows if r["class"] == "all"]
    assert row["busy_by_group"] == {"large": 5.0, "small": 2.0} and row["busy_ratio"] == pytest.approx(2.5)
    (run / "config.yaml").unlink()  # without the groups' CPUs there is no telling which is the big one
    (row,) = [r for r in build_report(find_runs([run]), replicates=0).rows if r["class"] == "all"]
    assert row["busy_ratio"] is None and row["busy_by_group"] == {"large": 5.0, "small": 2.0}


def test_weight_dynamics_read_zero_for_static_weights_and_the_moves_of_moving_ones(cli, tmp_path):
    """Two LBs' logs each. Weights rescaled every step but always in the ratio 1:2 are static (SED sees
    ratios): 0 changed, σ 0. Weights that flip between 1:1 and 1:e every step: every step changed, and each
    server's log ratio to the geometric mean alternates 0 and ±0.5, so σ = 0.25. The figure is drawn."""
    runs_dir = tmp_path / "runs"
    steps = 101
    logs = {
        "static": [[1.0, 2.0] if t % 2 else [2.0, 4.0] for t in range(steps)],
        "moving": [[1.0, 1.0] if t % 2 else [1.0, float(np.e)] for t in range(steps)],
    }
    for method, weights in logs.items():
        path = _run(runs_dir, method, 0, np.full(100, 0.1))
        for lb in ("lb0", "lb1"):
            frame = pd.DataFrame({"t_s": np.arange(steps) * 0.25, "lb": lb, "weights": weights})
            frame.to_parquet(path / "agents" / f"{lb}.parquet", index=False)
    report = build_report(find_runs([runs_dir]))
    dynamics = {d["method"]: d for d in report.dynamics}
    assert dynamics["static"]["changed_share"] == 0.0 and dynamics["static"]["log_weight_std"] < 1e-12
    assert dynamics["moving"]["steps"] == 2 * steps and dynamics["moving"]["changed_share"] == 1.0
    assert dynamics["moving"]["log_weight_std"] == pytest.approx(0.25, abs=0.003)
    result = cli("report", runs_dir, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| moving | 202 | 100.0% | 0.250 |" in markdown and "| static | 202 | 0.0% | 0.000 |" in markdown
    assert (tmp_path / "report" / "weights_over_time.png").stat().st_size > 5000


def test_fidelity_gives_each_stability_verdict_with_the_growth_behind_it():
    """A steady queue grows ×1, one whose JCT climbs from 2 s to 4 s over the run ×1.6, one that climbs from
    0.1 s to 6 s ×4 (unstable: the threshold is ×2), as does one where 3 % of the requests failed;
    the verdict is printed with its growth, since a server at ρ ≈ 1 lands on either side of the threshold."""
    from marllb_cli.bench.fidelity import growth, stability, unstable

    t = np.linspace(0, 30, 301)

    def requests(jct: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"intended_s": t, "jct_s": jct, "error": "", "status": 200})

    steady, climbing = requests(np.full(t.size, 0.2)), requests(2 + t / 15)
    assert growth(steady) == pytest.approx(1.0) and not unstable(steady)
    assert growth(climbing) == pytest.approx((2 + 25 / 15) / (2 + 5 / 15), rel=0.02) and not unstable(climbing)
    assert growth(requests(0.1 + t / 5)) > 2 and unstable(requests(0.1 + t / 5))
    failing = requests(np.full(t.size, 0.2)).assign(error=["reset"] * 10 + [""] * 291)  # 3 % failed
    assert unstable(failing)
    assert stability({"unstable": True, "growth": 2.44}) == "yes ×2.4"
    assert stability({"unstable": False}) == "no"  # a report written before growth was recorded
