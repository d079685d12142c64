"""Timed events: their config and option forms, the timeline (drifts expanded by seed), and their meaning in
the simulator (both engines), checked against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from marllb_cli.config import load_config
from marllb_cli.errors import ConfigError
from marllb_cli.events import CapacityDrift, Event, parse_event_option, phase_bounds, timeline
from marllb_cli.sim.compiled import available
from marllb_cli.sim.engine import Engine, ServerModel
from marllb_cli.sim.run import run_simulation
from tests.conftest import REPO

ENGINES = ["python", "compiled"] if available() else ["python"]


def events_config(tmp_path, events, *, load=0.8, duration=60, lbs=2):
    raw = {
        "testbed": {
            "name": "evt",
            "lbs": lbs,
            "servers": [{"name": "small", "count": 2, "cpus": 1}, {"name": "big", "count": 2, "cpus": 2}],
        },
        "sim": {"traffic": {"load": load, "duration_s": duration}},
        "experiment": {"events": events},
    }
    path = tmp_path / "events.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- the engine -------------------------------------------------------------------------------------------


def _one_server_engine(work, model):
    arrival = np.zeros(len(work))
    return Engine(arrival, np.asarray(work, dtype=float), [model], lambda job, now: 0)


def test_halving_capacity_mid_job_doubles_the_rest_of_its_service():
    """A 2 s job alone on a 1-core server: 1 s at full speed, then the other 1 s of work at half: ends at 3 s."""
    model = ServerModel(cpus=1, speed=1, max_workers=4, backlog=4)
    engine = _one_server_engine([2.0], model)
    engine.run(until=1.0)
    engine.retune(0, ServerModel(cpus=0.5, speed=1, job_rate=0.5, max_workers=4, backlog=4), 1.0)
    engine.run()
    assert engine.result().finish[0] == pytest.approx(3.0)


@pytest.mark.parametrize(("hog", "k", "rate"), [(0.5, 1, 0.5), (0.5, 3, 0.25), (0.2, 1, 0.8), (0.0, 2, 0.5)])
def test_a_hog_is_one_more_task_that_wants_its_share(hog, k, rate):
    """Beside k jobs on one core the hog takes min(h, 1/(k+1)): with h = 0.5 and 3 jobs each job gets 0.25."""
    assert ServerModel(cpus=1, speed=1, hog=hog).rate(k) == pytest.approx(rate)


def test_a_server_down_refuses_arrivals_drops_its_backlog_and_finishes_what_it_serves():
    model = ServerModel(cpus=1, speed=1, max_workers=1, backlog=4)
    arrival = np.array([0.0, 0.1, 0.2, 1.5, 3.0])
    engine = Engine(arrival, np.full(5, 1.0), [model], lambda job, now: 0, on_finish=lambda *_: None)
    engine.run(until=0.5)  # job 0 computing, jobs 1 and 2 waiting
    engine.retune(0, ServerModel(cpus=1, speed=1, max_workers=0, backlog=0), 0.5)
    assert engine.drop_waiting(0, 0.5) == [1, 2]
    engine.run(until=2.5)
    engine.retune(0, model, 2.5)
    engine.run()
    finish = engine.result().finish
    assert finish[0] == pytest.approx(1.0)  # finished although the server went down under it
    assert np.isnan(finish[[1, 2, 3]]).all()  # backlog reset, arrival at 1.5 refused
    assert finish[4] == pytest.approx(4.0)  # served again once up


# -- the timeline -----------------------------------------------------------------------------------------


def test_a_drift_is_fixed_by_the_seed_within_its_bounds_and_holds_for_its_mean():
    drift = CapacityDrift(drift="capacity", low=0.3, high=1.0, hold_s=20)
    servers = [f"srv{i}" for i in range(4)]
    first = timeline([drift], servers=servers, duration_s=10_000, seed=7)
    assert first == timeline([drift], servers=servers, duration_s=10_000, seed=7)
    assert first != timeline([drift], servers=servers, duration_s=10_000, seed=8)
    values = np.array([e.value for e in first])
    assert values.min() >= 0.3 and values.max() <= 1.0 and abs(values.mean() - 0.65) < 0.03
    holds = [np.diff([e.at for e in first if e.target == s]) for s in servers]
    mean_hold = np.concatenate(holds).mean()
    assert 18 < mean_hold < 22, mean_hold  # ≈ 2 000 holds of mean 20 s: ±4 σ
    assert [e.at for e in first] == sorted(e.at for e in first)


def test_the_option_form_and_its_errors():
    assert parse_event_option("at=30,server=srv2,capacity=0.5") == Event(at=30, server="srv2", capacity=0.5)
    with pytest.raises(ConfigError, match="exactly one change"):
        parse_event_option("at=30,server=srv2")
    with pytest.raises(ConfigError, match="agent events take state: down only"):
        parse_event_option("at=3,agent=lb0,state=up")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_event_option("at=3,lb0")


def test_config_errors_name_the_event_and_its_field(tmp_path):
    with pytest.raises(ConfigError, match=r"events\.yaml:\d+: experiment\.events\[0\]\.state: Input should be"):
        load_config(events_config(tmp_path, [{"at": 1, "server": "srv0", "state": "sideways"}]))
    with pytest.raises(ConfigError, match=r"events\[0\] names 'srv9'"):
        load_config(events_config(tmp_path, [{"at": 1, "server": "srv9", "capacity": 0.5}]))
    everything_down = [{"at": 1, "lb": "lb0", "state": "down"}, {"at": 2, "lb": "lb1", "state": "down"}]
    with pytest.raises(ConfigError, match="every LB down at 2 s"):
        load_config(events_config(tmp_path, everything_down))


def test_the_simulator_refuses_a_link_event(tmp_path):
    config = load_config(events_config(tmp_path, [{"at": 1, "link": "srv0", "rate_mbit": 20}]))
    with pytest.raises(ConfigError, match="shapes a link, and the simulator has no network"):
        run_simulation(config, "sed", duration_s=5)


def test_phases():
    assert phase_bounds([20.0, 40.0], 60.0) == [(0.0, 20.0), (20.0, 40.0), (40.0, 60.0)]
    assert phase_bounds([], 60.0) == [(0.0, 60.0)]
    assert phase_bounds([float(t) for t in range(1, 20)], 60.0) is None  # a drift: too many to tabulate


# -- runs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_capacity_halved_on_a_server_doubles_its_service_time(tmp_path, engine):
    """At 10 % load a request is mostly alone: on srv0 (1 core) at half capacity it gets half a core, so its
    JCT roughly doubles (1.6-2.5 ×, the band the testbed's test uses too; a little queueing adds to it)."""
    config = load_config(
        events_config(tmp_path, [{"at": 30, "server": "srv0", "capacity": 0.5}], load=0.1, duration=60),
        [f"sim.engine={engine}"],
    )
    requests = run_simulation(config, "ecmp", seed=3).requests
    mine = requests[requests["server"] == "srv0"]
    before = mine[mine["intended_s"] < 30]["jct_s"].mean()
    after = mine[mine["intended_s"] >= 31]["jct_s"].mean()
    assert 1.6 < after / before < 2.5, (before, after)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_server_down_and_up_loses_nothing_and_is_served_again(tmp_path, engine):
    events = [{"at": 20, "server": "srv1", "state": "down"}, {"at": 30, "server": "srv1", "state": "up"}]
    config = load_config(events_config(tmp_path, events), [f"sim.engine={engine}"])
    sim = run_simulation(config, "sed", seed=1)
    requests = sim.requests
    assert requests["done_s"].notna().sum() + (requests["error"] != "").sum() == len(requests)
    down = requests[(requests["intended_s"] >= 20) & (requests["intended_s"] < 30) & (requests["server"] == "srv1")]
    assert len(down) > 20 and (down["error"] == "refused").all()  # SED keeps sending: the LB is not told
    assert (requests[requests["intended_s"] < 20]["error"] != "refused").all()
    back = requests[(requests["intended_s"] >= 30.5) & (requests["server"] == "srv1")]
    assert len(back) > 50 and (back["status"] == 200).mean() > 0.99  # served again within two agent periods
    assert sim.events[["at_s", "applied_s"]].to_numpy().tolist() == [[20.0, 20.0], [30.0, 30.0]]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_lb_down_sends_every_new_flow_to_the_others(tmp_path, engine):
    events = [{"at": 20, "lb": "lb1", "state": "down"}, {"at": 40, "lb": "lb1", "state": "up"}]
    config = load_config(events_config(tmp_path, events, lbs=3), [f"sim.engine={engine}"])
    requests = run_simulation(config, "sed", seed=2).requests
    during = requests[requests["intended_s"].between(20, 40, inclusive="left")]
    after = requests[requests["intended_s"] >= 40]
    assert "lb1" not in set(during["lb"]) and {"lb0", "lb2"} == set(during["lb"])
    assert set(after["lb"]) == {"lb0", "lb1", "lb2"}
    assert during["lb"].value_counts(normalize=True).min() > 0.4  # the hash spreads them evenly


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dead_agent_stops_stepping_and_its_lb_keeps_the_weights(tmp_path, engine):
    config = load_config(
        events_config(tmp_path, [{"at": 10, "agent": "lb0", "state": "down"}]), [f"sim.engine={engine}"]
    )
    sim = run_simulation(config, "lsq", seed=0, duration_s=20)
    assert sim.agents["lb0"]["t_s"].max() == pytest.approx(9.75)
    assert sim.agents["lb1"]["t_s"].max() >= 19.75
    assert (sim.requests["lb"] == "lb0").sum() > 100 and (sim.requests["status"] == 200).all()


def test_both_engines_agree_on_a_run_with_every_simulated_event(tmp_path):
    if not available():
        pytest.skip("numba is not installed")
    events = [
        {"at": 5, "server": "srv2", "capacity": 0.5},
        {"at": 8, "server": "srv3", "hog": 0.5},
        {"at": 10, "server": "srv1", "state": "down"},
        {"at": 12, "lb": "lb1", "state": "down"},
        {"at": 14, "agent": "lb0", "state": "down"},
        {"at": 16, "server": "srv1", "state": "up"},
        {"drift": "capacity", "servers": ["srv0"], "low": 0.5, "high": 1.0, "hold_s": 4},
    ]
    path = events_config(tmp_path, events, duration=25, load=0.9)
    runs = [run_simulation(load_config(path, [f"sim.engine={e}"]), "sed", seed=4) for e in ("python", "compiled")]
    columns = ["server", "lb", "error", "done_s"]
    pd.testing.assert_frame_equal(runs[0].requests[columns], runs[1].requests[columns], rtol=1e-9)
    pd.testing.assert_frame_equal(runs[0].events, runs[1].events)
    assert (runs[0].events["source"] == "drift").sum() >= 2


def test_training_episodes_draw_their_own_drift(tmp_path):
    """The environment applies the scenario's events; a drift is drawn anew from each episode's seed."""
    from marllb_cli.sim.env import LoadBalancingEnv

    drift = {"drift": "capacity", "low": 0.3, "high": 1.0, "hold_s": 3}
    env = LoadBalancingEnv(load_config(events_config(tmp_path, [drift])), episode_s=10, seed=5)
    seen = []
    for _ in range(2):
        env.reset()
        while env.agents:
            env.step({})
        seen.append([(r["target"], r["value"]) for r in env.lbs.on_step.records])
    assert len(seen[0]) > 5 and len(seen[1]) > 5 and seen[0] != seen[1]


def test_the_report_splits_runs_by_their_events_and_tabulates_phases(tmp_path):
    from marllb_cli.report import build_report, scan_runs, write_report
    from marllb_cli.sim.run import simulate_to_run_dir

    events = [{"at": 10, "server": "srv1", "state": "down"}, {"at": 20, "server": "srv1", "state": "up"}]
    config = load_config(events_config(tmp_path, events, duration=30))
    runs_dir = tmp_path / "runs"
    for method in ("sed", "ecmp"):
        simulate_to_run_dir(config, method, runs_dir=runs_dir)
    still = load_config(events_config(tmp_path, [], duration=30))
    simulate_to_run_dir(still, "sed", runs_dir=runs_dir)  # the same system without events: its own scenario
    found, skipped = scan_runs([runs_dir])
    report = build_report(found, skipped=skipped)
    assert len(set(report.scenarios)) == 2 and any("2 events" in label for label in report.scenarios)
    phases = pd.DataFrame(report.phases)
    assert phases.groupby("method").size().to_dict() == {"ecmp": 3, "sed": 3}
    sed = phases[phases["method"] == "sed"].set_index("start_s")
    assert sed.loc[10.0, "events"] == ["srv1 down"] and sed.loc[20.0, "events"] == ["srv1 up"]
    assert sed.loc[0.0, "failed"] == 0 and sed.loc[10.0, "failed"] > 0.2 and sed.loc[20.0, "failed"] == 0
    files = write_report(report, tmp_path / "report")
    assert {"busy_over_time.png", "jct_over_time.png"} <= {f.name for f in files}
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Phases between timed events" in text and "| sed | 10–20 | srv1 down |" in text


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("at=3,server=srv9,capacity=0.5", "--event: events[0] names 'srv9'"),
        ("at=3,server=srv0", "exactly one change"),
        ("at=3,link=srv0,rate_mbit=5", "shapes a link, and the simulator has no network"),
    ],
)
def test_simulate_refuses_a_bad_event_in_one_line_with_exit_2(cli, tmp_path, event, message):
    result = cli("simulate", REPO / "configs" / "sim-moderate.yaml", "--duration", "1", "--event", event,
                 "--runs-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    assert not list(tmp_path.iterdir())


def test_the_report_pairs_methods_over_the_same_seeds_of_a_drift(tmp_path):
    """sim-moderate-drift, 4 seeds of 40 s: the seeds differ (one drift overloads more than another), sed
    and lsq met the same requests and events per seed, so the ratio's interval is paired: narrower than
    the same runs resampled independently."""
    from marllb_cli.report import build_report, scan_runs
    from marllb_cli.sim.run import simulate_to_run_dir
    from marllb_cli.stats import bootstrap

    config = load_config(REPO / "configs" / "sim-moderate-drift.yaml", ["experiment.events.0.hold_s=8"])
    for seed in range(4):
        for method in ("sed", "lsq"):
            simulate_to_run_dir(config, method, runs_dir=tmp_path / "runs", seed=seed, duration_s=40)
    found, _ = scan_runs([tmp_path / "runs"])
    lsq = next(row for row in build_report(found).rows if row["method"] == "lsq" and row["class"] == "all")
    low, high = lsq["jct_mean_ratio_ci"]
    assert lsq["paired"] and low <= lsq["jct_mean_ratio"] <= high

    def jcts(method):
        runs = sorted((r for r in found if r.method == method), key=lambda r: r.meta["seed"])
        return [r.requests().query("error == ''")["jct_s"].to_numpy() for r in runs]

    apart = bootstrap(jcts("lsq"), 500, seed=1).ratio_interval("jct_mean_s", bootstrap(jcts("sed"), 500, seed=2))
    assert high - low < (apart[1] - apart[0]) / 2, ((low, high), apart)


def test_a_drift_too_fast_for_its_run_is_refused_before_it_expands():
    drift = CapacityDrift(drift="capacity", hold_s=0.001)
    with pytest.raises(ConfigError, match="would draw ≈ 4,000,000 events"):
        timeline([drift], servers=["srv0", "srv1", "srv2", "srv3"], duration_s=1000, seed=0)
