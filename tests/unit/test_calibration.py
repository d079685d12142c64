"""The cost model of `marllb calibrate` (fit, loads, speeds), its file, and the load probe against a real HTTP
server; the calibration of a real testbed is in tests/integration/test_calibrate.py."""

from __future__ import annotations

import http.server
import json
import math
import threading

import numpy as np
import pandas as pd
import pytest

from marllb_cli.calibration import (
    Calibration,
    CostModel,
    CpuFit,
    ServerCalibration,
    config_digest,
    cost_ratio,
    fit_cpu_cost,
    machine_id,
    offered_load,
    plan_load,
    request_costs,
    speed_for_load,
)
from marllb_cli.config import load_config
from marllb_cli.errors import ConfigError, RunDirError
from marllb_cli.traces import trace_window
from tests.conftest import REPO

SMALL = REPO / "configs" / "local-small.yaml"


def test_the_fit_recovers_known_costs_from_noisy_phases():
    rng = np.random.default_rng(3)
    iteration_s, overhead_s = 6.4e-9, 0.0021
    ladder = np.array([0, 500_000, 2_000_000, 6_000_000] * 4, dtype=float)
    noise = rng.normal(0, 0.01, len(ladder))  # the counters' ±1 % per phase
    costs = (overhead_s + ladder * iteration_s) * (1 + noise)
    fit = fit_cpu_cost(ladder, costs)
    assert fit.iteration_s == pytest.approx(iteration_s, rel=0.02)
    assert fit.overhead_s == pytest.approx(overhead_s, rel=0.15)
    assert fit.r2 > 0.99


def test_a_fit_needs_two_sizes_and_a_cost_that_grows():
    with pytest.raises(ValueError):
        fit_cpu_cost([1e6, 1e6], [0.01, 0.011])
    with pytest.raises(ValueError):
        fit_cpu_cost([0, 1e6, 2e6], [0.03, 0.02, 0.01])
    assert fit_cpu_cost([1e6, 2e6], [0.006, 0.014]).overhead_s == 0.0  # a negative intercept is noise: through 0


MODEL = CostModel(iteration_s=7e-9, cpu_overhead_s=0.002, static_s=0.0005, wiki_s=None, work_scale=0.5)


def poisson_trace(rate: float, seconds: float, work: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2)))
    t = t[t < seconds]
    return pd.DataFrame({"t": t, "path": "/dummy.php/?n=1", "class": "cpu", "work": np.full(len(t), work)})


def test_request_costs_follow_the_model_by_class():
    trace = pd.DataFrame(
        {"t": [0.0, 1.0, 2.0], "path": ["/a", "/b", "/c"], "class": ["cpu", "static", "cpu"], "work": [2e6, np.nan, 0]}
    )
    costs = request_costs(trace, MODEL)
    assert costs.tolist() == pytest.approx([0.002 + 2e6 * 0.5 * 7e-9, 0.0005, 0.002])
    wiki = trace.assign(**{"class": ["wiki", "cpu", "cpu"]})
    with pytest.raises(ConfigError, match="wiki"):
        request_costs(wiki, MODEL)


def test_the_speed_for_a_load_offers_that_load():
    trace = poisson_trace(rate=200, seconds=60, work=4e6)
    capacity = 1.5
    # 200/s × (2 ms + 4e6 × 0.5 × 7 ns = 16 ms) = 3.2 cores at speed 1
    assert offered_load(request_costs(trace, MODEL), trace["t"].to_numpy(), speed=1, capacity_cores=capacity) == (
        pytest.approx(3.2 / capacity, rel=0.03)
    )
    for load in (0.5, 0.85, 1.1):
        speed = speed_for_load(trace, MODEL, capacity, load)
        assert speed == pytest.approx(load * capacity / 3.2, rel=0.03)
        cut = speed_for_load(trace, MODEL, capacity, load, duration_s=20)
        kept = trace[trace["t"] < 20 * cut]
        assert offered_load(request_costs(kept, MODEL), kept["t"].to_numpy(), speed=cut, capacity_cores=capacity) == (
            pytest.approx(load, rel=0.005)  # the cut moves by whole requests
        )


@pytest.mark.parametrize("load", [0, -1, math.nan, math.inf, 2.5])
def test_a_load_out_of_range_is_refused(load):
    with pytest.raises(ConfigError, match="--load"):
        speed_for_load(poisson_trace(10, 10, 1e6), MODEL, 1.0, load)


def test_a_window_skips_the_start_and_begins_at_zero():
    trace = poisson_trace(rate=50, seconds=30, work=1e6)
    window = trace_window(trace, 10.0, 5.0)
    assert window["t"].min() >= 0 and window["t"].max() < 5
    assert len(window) == ((trace["t"] >= 10) & (trace["t"] < 15)).sum()
    for bad in (-1.0, math.nan, 31.0):
        with pytest.raises(ConfigError, match="--start"):
            trace_window(trace, bad, None)


def calibration_for(config) -> Calibration:
    fit = CpuFit(iteration_s=7e-9, overhead_s=0.002, r2=0.999)
    servers = [
        ServerCalibration(
            name=f"srv{i}",
            group="g",
            cores=cores,
            fit=fit,
            loaded_fit=fit,
            static_s=0.0005,
            alone_ms=[(0.0, 3.0), (2e6, 60.0)],
            saturated_cpu_share=0.97,
            saturated_rps=20.0,
        )
        for i, cores in enumerate((0.25, 0.25, 0.5, 0.5))
    ]
    return Calibration(
        testbed=config.testbed.name,
        config_digest=config_digest(config),
        machine=machine_id(),
        created="2026-11-30T00:00:00+00:00",
        model=MODEL.model_copy(update={"work_scale": config.testbed.work_scale}),
        servers=servers,
    )


def test_a_calibration_round_trips_and_is_refused_for_another_config_or_machine(tmp_path):
    config = load_config(SMALL)
    calibration = calibration_for(config)
    path = tmp_path / "calibration.json"
    calibration.save(path)
    again = Calibration.load(path)
    assert again == calibration and again.capacity_cores == 1.5
    again.check(config, path)
    again.check(load_config(SMALL, ["testbed.name=other"]), path)  # the name is the state directory's already
    with pytest.raises(ConfigError, match="different testbed config"):
        again.check(load_config(SMALL, ["testbed.work_scale=2"]), path)
    elsewhere = calibration.model_copy(update={"machine": "another (CPU)"})
    with pytest.raises(ConfigError, match="measured on another"):
        elsewhere.check(config, path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "model": {"iteration_s": -1}}))
    with pytest.raises(RunDirError, match="damaged calibration"):
        Calibration.load(path)
    with pytest.raises(ConfigError, match="no calibration"):
        Calibration.load(tmp_path / "missing.json")


def test_a_plan_at_a_speed_and_at_a_load_agree():
    config = load_config(SMALL)
    calibration = calibration_for(config)
    trace = poisson_trace(rate=200, seconds=60, work=4e6)
    by_load = plan_load(trace, calibration, load=0.9, duration_s=30)
    by_speed = plan_load(trace, calibration, speed=by_load.speed, duration_s=30)
    assert by_speed.load == pytest.approx(0.9, rel=0.005) and by_load.load == pytest.approx(0.9, rel=0.005)
    assert by_load.rate_rps == pytest.approx(200 * by_load.speed, rel=0.05)


def test_what_requests_cost_does_not_depend_on_how_long_the_counters_ran():
    """A replay that offered 0.85 for 20 s and was served at exactly the model's cost: its cost ratio is 1
    whether the counters' window ran 20 s or, as it does while the last requests are served, 24 s; the
    window's mean busy share (what the pilot used to divide by the offered load) reads 0.71 for the latter."""
    from marllb_cli.deploy.node.cgroups import CpuUsage
    from marllb_cli.experiment import utilisation
    from marllb_cli.topology import plan

    topology = plan(load_config(SMALL).testbed)
    capacity = sum(server.cores for server in topology.servers)
    work = 0.85 * capacity * 20.0  # core-seconds the plan counted
    idle = {s.name: CpuUsage(0.0, 0, 0, 0.0) for s in topology.servers}
    done = {s.name: CpuUsage(work * s.cores / capacity, 100, 90, 1.0) for s in topology.servers}
    for window in (20.0, 24.0):
        used = utilisation([(0.0, idle, (0.0, 0.0)), (window, done, (1.0, 0.0))], topology)
        assert cost_ratio(used, work) == pytest.approx(1.0)
        assert used["mean"] == pytest.approx(0.85 * 20.0 / window)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        code = 200 if self.path.startswith("/ok") else 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_the_load_probe_sends_each_phase_and_counts_what_was_answered():
    from marllb_cli.loadprobe import Phase, ProbeSpec, Stream, run_phase

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        phase = Phase(
            name="p",
            streams=[
                Stream(server="a", ip="127.0.0.1", path="/ok", count=30, concurrency=4),
                Stream(server="b", ip="127.0.0.1", path="/fail", count=7, concurrency=1),
            ],
        )
        line = run_phase(phase, ProbeSpec(port=port, timeout_s=5, gap_s=0, phases=[phase]))
    finally:
        server.shutdown()
    assert line["end"] >= line["start"]
    assert line["servers"]["a"]["ok"] == 30 and line["servers"]["a"]["failed"] == 0
    assert line["servers"]["b"] == {**line["servers"]["b"], "ok": 0, "failed": 7, "median_s": None}
    assert 0 < line["servers"]["a"]["median_s"] < 5


def test_phases_are_sized_for_each_server_and_ask_wiki_pages_only_of_wikis():
    from marllb_cli.calibrating import LADDER, SATURATED_LADDER, plan_phases
    from marllb_cli.topology import plan

    config = load_config(SMALL)
    phases = plan_phases(config, plan(config.testbed).servers)
    names = [phase.name for phase in phases]
    saturated_names = [f"saturated-{n}" for n in SATURATED_LADDER]
    assert names == ["warm-up", *[f"cpu-{n}" for n in LADDER], *saturated_names, "static"]
    saturated = next(phase for phase in phases if phase.name == saturated_names[0])
    counts = {stream.server: stream.count for stream in saturated.streams}
    assert counts["srv2"] == pytest.approx(2 * counts["srv0"], abs=1)  # twice the cores, twice the requests
    assert all(stream.path == "/dummy.php/?n=0" for stream in phases[1].streams)
    wiki_config = load_config(REPO / "configs" / "local-wiki.yaml")
    wiki_phases = plan_phases(wiki_config, plan(wiki_config.testbed).servers)
    wiki = next(phase for phase in wiki_phases if phase.name == "wiki")
    groups = {s.name: s.group for s in plan(wiki_config.testbed).servers}
    assert wiki.streams and all(
        wiki_config.testbed.group(groups[stream.server]).app == "mediawiki" for stream in wiki.streams
    )


def test_the_simulator_config_models_the_calibrated_testbed(tmp_path):
    import yaml

    from marllb_cli.calibration import simulator_config
    from marllb_cli.sim.build import server_models
    from marllb_cli.sim.traffic import traffic

    config = load_config(SMALL)
    calibration = calibration_for(config)
    trace = tmp_path / "t.parquet"
    poisson_trace(rate=50, seconds=30, work=4e6).assign(path="/dummy.php/?n=4000000").to_parquet(trace)
    text = simulator_config(config, calibration, trace=trace, speed=0.5, start_s=5.0)
    (tmp_path / "sim.yaml").write_text(text)
    sim = load_config(tmp_path / "sim.yaml")
    assert yaml.safe_load(text)["testbed"] == config.testbed.model_dump(mode="json")
    assert sim.sim.cores_per_unit == 0.25 and sim.sim.traffic.iteration_s == 7e-9
    models, _, _, cpus = server_models(sim)
    assert [m.cpus * m.speed for m in models] == [0.25, 0.25, 0.5, 0.5]  # the quotas, in cores
    assert [m.job_cap for m in models] == [0.25, 0.25, 0.5, 0.5] and cpus == [1, 1, 2, 2]
    load = traffic(sim, seed=0, duration_s=1e6)
    assert load.arrival.min() >= 0 and load.arrival.max() <= 50  # (30 − 5) s of trace at half speed
    assert load.work.tolist() == pytest.approx([0.002 + 4e6 * 7e-9] * len(load.work))  # work_scale 1 here
