"""The simulator's LB layer and runs: oracle prediction, SED ≡ JSQ, power of two choices, IO phases, the
method ranking on sim-moderate, and `marllb simulate` → `marllb report`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.sim.engine import ServerModel, ServerState, simulate
from marllb_cli.sim.lbs import LbLayer, finish_if_added
from marllb_cli.sim.run import run_simulation
from tests.conftest import REPO

MODERATE = REPO / "configs" / "sim-moderate.yaml"


@pytest.mark.parametrize("seed", range(5))
def test_oracle_prediction_equals_the_engine(seed):
    """finish_if_added, evaluated when the last job arrives, is exactly when the engine finishes it."""
    rng = np.random.default_rng(seed)
    n = 40
    arrival = np.sort(rng.uniform(0, 5, n))
    arrival[-1] = 5.5
    work = rng.exponential(0.8, n)
    model = ServerModel(cpus=2, speed=1.5, max_workers=4, backlog=30)
    states = [ServerState(model)]
    predicted = {}

    def dispatch(job, now):
        if job == n - 1:
            predicted["t"] = finish_if_added(states[0], work[job], now)
        return 0

    result = simulate(arrival, work, [model], dispatch, states=states)
    assert result.finish[-1] == pytest.approx(predicted["t"], rel=1e-9)
    assert len(states[0].waiting) == 0


def test_oracle_prediction_waits_for_the_fifo_io_device():
    """A job whose IO queues behind others' on the server's IO device computes only after it: the oracle's
    prediction (made on arrival) is the engine's finish time."""
    arrival = np.array([0.0, 0.1, 0.2, 0.3])
    work = np.array([0.05, 0.05, 0.05, 0.2])
    io = np.array([1.0, 1.0, 1.0, 0.5])
    model = ServerModel(cpus=1, io_speed=2.0)
    states = [ServerState(model)]
    predicted = {}

    def dispatch(job, now):
        if job == 3:
            predicted["t"] = finish_if_added(states[0], work[job], now, io[job])
            predicted["no io device"] = finish_if_added(states[0], work[job], now)
        return 0

    result = simulate(arrival, work, [model], dispatch, states=states, io=io)
    # IO ends at 0.5, 1.0, 1.5, then 1.75 for the last job; its 0.2 s of CPU follow, alone on the core.
    assert result.finish[-1] == pytest.approx(1.95) == pytest.approx(predicted["t"], rel=1e-9)
    assert predicted["no io device"] == pytest.approx(0.5)  # what ignoring the device predicted (0.3 + 0.2)


def test_sed_with_equal_weights_on_one_lb_is_jsq():
    rng = np.random.default_rng(3)
    n = 6_000
    arrival = np.cumsum(rng.exponential(1 / 3.6, n))
    work = rng.exponential(1.0, n)
    models = [ServerModel(cpus=1) for _ in range(4)]
    states = [ServerState(m) for m in models]
    # No idle timeout: the LB must count every job until its FIN, as JSQ counts it.
    lbs = LbLayer(method="sed", n_lbs=1, states=states, cpus=[1] * 4, work=work, idle_timeout=1e9)
    sed = simulate(
        arrival, work, models, lbs.dispatch, on_finish=lbs.finish, on_tick=lbs.tick, tick_period=0.25, states=states
    )
    jsq_states = [ServerState(m) for m in models]

    def jsq(job, now):
        jobs = [len(s.active) + len(s.waiting) for s in jsq_states]
        return jobs.index(min(jobs))

    reference = simulate(arrival, work, models, jsq, states=jsq_states)
    assert np.array_equal(sed.server, reference.server)
    assert np.allclose(sed.finish, reference.finish, equal_nan=True)


def test_power_of_two_choices_matches_the_mean_field_limit():
    """N = 100 FCFS servers, λ = 0.9 per server, μ = 1: E[T] = Σ_k λ^(2^k − 2) ≈ 2.614 (Mitzenmacher)."""
    rng = np.random.default_rng(11)
    n_servers, lam, horizon = 100, 0.9, 1_500.0
    n = int(n_servers * lam * horizon)
    arrival = np.cumsum(rng.exponential(1 / (n_servers * lam), n))
    work = rng.exponential(1.0, n)
    models = [ServerModel(cpus=1, max_workers=1, backlog=np.inf) for _ in range(n_servers)]
    states = [ServerState(m) for m in models]
    picks = rng.integers(n_servers, size=(n, 2))

    def two_choices(job, now):
        a, b = picks[job]
        qa = len(states[a].active) + len(states[a].waiting)
        qb = len(states[b].active) + len(states[b].waiting)
        return int(a if qa <= qb else b)

    result = simulate(arrival, work, models, two_choices, states=states)
    warm = result.arrival > 100
    expected = sum(lam ** (2**k - 2) for k in range(1, 30))
    assert expected == pytest.approx(2.614, abs=0.001)
    assert result.response[warm[~result.rejected]].mean() == pytest.approx(expected, rel=0.05)


def test_io_phase_holds_a_worker_but_no_cpu():
    model = ServerModel(cpus=1, max_workers=2, backlog=10)
    arrival = np.array([0.0, 0.0, 0.0])
    # Two jobs: 1 s IO then 1 s CPU each, sharing one core → both at 3; the third waits for a worker.
    result = simulate(arrival, np.array([1.0, 1.0, 1.0]), [model], lambda j, t: 0, io=np.array([1.0, 1.0, 1.0]))
    assert result.finish[:2] == pytest.approx([3.0, 3.0])
    assert result.start[2] == pytest.approx(3.0) and result.finish[2] == pytest.approx(5.0)
    # Without IO the same demand (2 s of CPU each) takes longer: PS of two 2 s jobs on one core.
    plain = simulate(arrival[:2], np.array([2.0, 2.0]), [model], lambda j, t: 0)
    assert plain.finish == pytest.approx([4.0, 4.0])


def _mean_jct(config, method, seeds):
    means = []
    for seed in seeds:
        sim = run_simulation(config, method, seed=seed, duration_s=60)
        ok = sim.requests["error"] == ""
        means.append(sim.requests.loc[ok, "jct_s"].mean())
    return float(np.mean(means))


def test_sim_moderate_ranking_with_two_lbs_and_with_one():
    seeds = (0, 1)
    for lbs in (2, 1):
        config = load_config(MODERATE, [f"testbed.lbs={lbs}"])
        jct = {m: _mean_jct(config, m, seeds) for m in ("sed", "lsq", "wcmp", "ecmp", "oracle-srt", "oracle-gsq")}
        assert jct["sed"] < jct["lsq"] < jct["wcmp"] < jct["ecmp"], (lbs, jct)
        assert jct["oracle-srt"] < jct["sed"] * 1.03, (lbs, jct)
        assert jct["oracle-gsq"] < jct["sed"] * 1.03, (lbs, jct)


def test_same_seed_same_requests_for_every_method():
    config = load_config(MODERATE)
    a = run_simulation(config, "sed", seed=4, duration_s=10)
    b = run_simulation(config, "ecmp", seed=4, duration_s=10)
    assert a.requests["intended_s"].equals(b.requests["intended_s"])
    again = run_simulation(config, "sed", seed=4, duration_s=10)
    assert a.requests["done_s"].equals(again.requests["done_s"])
    assert not a.requests["server"].equals(b.requests["server"])


def test_simulate_cli_writes_a_run_that_report_reads(cli, tmp_path):
    runs = tmp_path / "runs"
    for method in ("sed", "ecmp"):
        result = cli("simulate", MODERATE, "--method", method, "--duration", "30", "--runs-dir", runs)
        assert result.exit_code == 0, result.output
    run = next(p for p in runs.iterdir() if "-sed-" in p.name)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["kind"] == "sim" and meta["complete"] is True
    steps = __import__("pandas").read_parquet(run / "agents" / "lb0.parquet")
    assert len(steps) == pytest.approx(30 / 0.25, abs=2)
    assert list(steps["weights"].iloc[0]) == [2.0] * 4 + [4.0] * 3
    report = cli("report", runs, "--out", tmp_path / "rep", "--json")
    rows = [r for r in json.loads(report.stdout)["rows"] if r["class"] == "all"]
    assert [r["method"] for r in rows] == ["sed", "ecmp"]
    assert rows[0]["requests"] == meta["requests"]
    bad = cli("simulate", MODERATE, "--method", "qmix")
    assert bad.exit_code == 2 and "unknown" in bad.stderr


def test_the_simpy_reference_model_agrees_with_the_engine_job_by_job():
    """The benchmark's SimPy model is the same model: identical finish times on the same requests."""
    from marllb_cli.bench.sim import _simpy_run
    from marllb_cli.dataplane.selection import sed
    from marllb_cli.sim.build import server_models
    from marllb_cli.sim.traffic import traffic

    config = load_config(MODERATE, ["sim.traffic.load=1.5"])  # overloaded: backlogs and rejections too
    load = traffic(config, seed=1, duration_s=20)
    models, _, _, cpus = server_models(config)
    states = [ServerState(m) for m in models]
    engine = simulate(
        load.arrival,
        load.work,
        models,
        lambda job, now: sed([len(s.active) + len(s.waiting) for s in states], cpus),
        states=states,
    )
    reference = _simpy_run(load.arrival, load.work, models, cpus)
    assert np.allclose(engine.finish, reference, rtol=1e-9, equal_nan=True)
    assert np.isnan(engine.finish).sum() == np.isnan(reference).sum() > 100


def test_deploy_refuses_a_simulator_only_speed(cli):
    result = cli("deploy", REPO / "configs" / "sim-park.yaml")
    assert result.exit_code == 2
    assert "testbed.servers[0].speed" in result.stderr and "simulator-only" in result.stderr


def test_blind_agents_steps_are_recorded_as_if_observed_each_step(monkeypatch):
    """Static heuristics do not read their observation, so their steps' observations are reduced in batches
    after the fact; the records must be those of reducing at every step."""
    from marllb_cli.agents.heuristics import StaticWeights

    config = load_config(MODERATE)
    batched = run_simulation(config, "sed", seed=3, duration_s=40.0)
    monkeypatch.setattr(StaticWeights, "reads_observation", True)
    stepwise = run_simulation(config, "sed", seed=3, duration_s=40.0)
    for lb, frame in stepwise.agents.items():
        assert len(frame) >= 160
        pd.testing.assert_frame_equal(batched.agents[lb], frame, check_exact=False, rtol=1e-6)
    assert batched.requests["server"].tolist() == stepwise.requests["server"].tolist()
