"""The compiled simulator against the Python reference (engine + the dataplane's FlowTable and Selector):
the same server for every request, the same finish times, the same q_j and reservoir statistics at every
agent step, on the scenarios that exercise every branch (IO phases on a FIFO device and as pure delays,
backlog and rejections, idle timeouts, each selection method, oracle-gsq)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.errors import ConfigError
from marllb_cli.sim import compiled
from marllb_cli.sim.engine import ServerModel
from marllb_cli.sim.run import run_simulation
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba (the fast extra) is not installed")

MODERATE = REPO / "configs" / "sim-moderate.yaml"
IO50 = REPO / "configs" / "sim-moderate-io50.yaml"


def _both(path, method: str, duration_s: float, seed: int = 0, **sim):
    """(python run, compiled run) of `method` on the config at `path` with `sim` fields overridden."""
    runs = []
    for engine in ("python", "compiled"):
        config = load_config(path)
        fields = {"engine": engine, **sim}
        if "load" in fields:
            fields["traffic"] = config.sim.traffic.model_copy(update={"load": fields.pop("load")})
        config = config.model_copy(update={"sim": config.sim.model_copy(update=fields)})
        runs.append(run_simulation(config, method, seed=seed, duration_s=duration_s))
    return runs


def _assert_same_requests(python, fast) -> None:
    a, b = python.requests, fast.requests
    assert a["server"].tolist() == b["server"].tolist()
    assert a["lb"].tolist() == b["lb"].tolist()
    assert np.array_equal(a["done_s"].to_numpy(), b["done_s"].to_numpy(), equal_nan=True)
    assert a["error"].tolist() == b["error"].tolist()


def _steps_until_last_finish(run) -> dict[str, pd.DataFrame]:
    """Agent steps up to the last completion: after it the Python engine may step a few more times on
    superseded events still in its heap, which changes nothing."""
    end = np.nanmax(run.requests["done_s"].to_numpy())
    return {lb: frame[frame["t_s"] <= end].reset_index(drop=True) for lb, frame in run.agents.items()}


@pytest.mark.parametrize(
    ("path", "method", "sim"),
    [
        (MODERATE, "sed", {}),
        (MODERATE, "lsq", {}),
        (MODERATE, "ecmp", {}),
        (MODERATE, "oracle-gsq", {}),
        (IO50, "sed", {}),  # IO phases queueing on each server's FIFO device
        (IO50, "sed", {"io_speed": None}),  # IO phases as pure delays, ending out of order
        (MODERATE, "sed", {"load": 1.4}),  # overload: full backlogs and rejections
        (MODERATE, "ecmp", {"idle_timeout_s": 0.3}),  # long requests end by idle timeout
        (MODERATE, "sed", {"cores_per_unit": 0.25}),  # testbed quotas: a lone job gets the whole quota
    ],
)
def test_every_request_goes_where_the_python_reference_sends_it(path, method, sim):
    python, fast = _both(path, method, duration_s=40.0, **sim)
    _assert_same_requests(python, fast)
    done = python.requests["error"] == ""
    assert done.sum() > 1_500  # (testbed quotas hold a quarter of the rate: ≈ 1 700 requests in 40 s)
    if sim.get("load", 0) > 1:
        assert (~done).sum() > 100  # the rejection branch ran
    if "idle_timeout_s" in sim:
        assert (python.requests["jct_s"] > 0.3).sum() > 100  # so did the timeout branch
    steps_python, steps_fast = _steps_until_last_finish(python), _steps_until_last_finish(fast)
    for lb, frame in steps_python.items():
        other = steps_fast[lb]
        assert len(frame) == len(other) > 100
        assert frame["t_s"].tolist() == other["t_s"].tolist()
        assert frame["flows"].tolist() == other["flows"].tolist()  # q_j at every step, timeouts included
        assert frame["new_flows"].tolist() == other["new_flows"].tolist()


@pytest.mark.parametrize("path", [MODERATE, IO50])
def test_agents_see_the_same_observations_while_the_reservoirs_fill(path):
    """Until a reservoir is full its slots fill in order, so both hold the same samples and the agents'
    whole step records (flows, flow-duration statistics, every reward) are equal; once full, the slot a
    sample replaces is random (different generators), and the statistics agree only in distribution."""
    python, fast = _both(path, "sed", duration_s=1.5)
    _assert_same_requests(python, fast)
    steps_python, steps_fast = _steps_until_last_finish(python), _steps_until_last_finish(fast)
    for lb, frame in steps_python.items():
        assert len(frame) >= 6
        pd.testing.assert_frame_equal(frame, steps_fast[lb])
    assert max(max(v) for v in steps_python["lb0"]["fd_mean"]) > 0  # the reservoirs did fill with samples


def test_wcmp_draws_in_proportion_to_capacity():
    """wcmp uses the random stream, so the runs differ request by request but split the same way."""
    python, fast = _both(MODERATE, "wcmp", duration_s=60.0)
    shares = [run.requests["server"].value_counts(normalize=True).sort_index() for run in (python, fast)]
    expected = np.array([2, 2, 2, 2, 4, 4, 4]) / 20
    for share in shares:
        assert np.abs(share.to_numpy() - expected).max() < 0.015
    again = _both(MODERATE, "wcmp", duration_s=60.0)[1]
    assert again.requests["server"].tolist() == fast.requests["server"].tolist()  # deterministic for a seed


def test_full_reservoirs_give_the_same_statistics_in_distribution():
    python, fast = _both(MODERATE, "sed", duration_s=60.0)
    late = {name: run.agents["lb0"].iloc[100:] for name, run in (("python", python), ("fast", fast))}
    means = {name: np.mean(np.vstack(frame["fd_mean"].to_numpy())) for name, frame in late.items()}
    assert means["python"] == pytest.approx(means["fast"], rel=0.05)


def test_engine_setting():
    models = [ServerModel(cpus=2, max_workers=32, backlog=128)]
    assert compiled.use_compiled("auto", "sed", models)
    assert not compiled.use_compiled("python", "sed", models)
    assert not compiled.use_compiled("auto", "oracle-srt", models)  # needs every job's remaining work
    assert not compiled.use_compiled("auto", "sed", [ServerModel(max_workers=float("inf"))])
    with pytest.raises(ConfigError, match="sim.engine: compiled cannot run here .oracle-srt"):
        compiled.use_compiled("compiled", "oracle-srt", models, "x.yaml")


def test_compiled_engine_for_oracle_srt_is_a_one_line_error(cli, tmp_path):
    result = cli(
        "simulate",
        MODERATE,
        "-m",
        "oracle-srt",
        "--duration",
        "1",
        "--runs-dir",
        tmp_path,
        "--set",
        "sim.engine=compiled",
    )
    assert result.exit_code == 2
    assert "sim.engine: compiled cannot run here" in result.output
    assert "Traceback" not in result.output


def test_bench_sim_compares_like_with_like(cli):
    """`marllb bench sim`: the compiled and Python event cores and SimPy make the same decisions (equal mean
    JCT), and so do the full simulator's two engines."""
    result = cli("bench", "sim", MODERATE, "--duration", "20", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["simulator"].split(" (")[0]: row for row in json.loads(result.stdout)}
    cores = [
        rows[name]["jct_mean_s"] for name in ("marllb, event core, compiled", "marllb, event core, python", "SimPy")
    ]
    assert cores[0] == pytest.approx(cores[1], rel=1e-9) and cores[1] == pytest.approx(cores[2], rel=1e-6)
    full = rows["marllb, full, compiled"]["jct_mean_s"], rows["marllb, full, python"]["jct_mean_s"]
    assert full[0] == pytest.approx(full[1], rel=1e-12)
    assert rows["marllb, full, compiled"]["requests"] > 3_000
