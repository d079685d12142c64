"""`marllb calibrate` and `replay-trace --load` on a real local testbed: the load asked for is the load the
servers carry, measured from their CPU counters, on whatever CPU this runs on.

Testbed name `itcal` (configs/local-small.yaml renamed); the trace is generated here, not the shipped one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from tests.conftest import REPO
from tests.integration.helpers import deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itcal"
CONFIG = REPO / "configs" / "local-small.yaml"
MARLLB = [sys.executable, "-m", "marllb_cli"]


def marllb(*args: object) -> subprocess.CompletedProcess[str]:
    argv = [*MARLLB, *map(str, args)]
    if args[0] != "trace":
        argv += ["--set", f"testbed.name={NAME}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def testbed():
    with deployed(LocalTestbed(load_config(CONFIG, [f"testbed.name={NAME}"]))) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibrate") / "poisson.parquet"
    made = marllb("trace", "gen", "poisson", "--rate", "100", "--duration", "60", "--seed", "11", "--out", path)
    assert made.returncode == 0, made.stderr
    return path


def replay_at(load: float, trace: Path, runs: Path) -> tuple[dict, pd.DataFrame]:
    result = marllb("replay-trace", CONFIG, "--trace", trace, "--load", load, "--duration", 30, "--runs-dir", runs)
    assert result.returncode == 0, result.stderr[-2000:]
    run = max(runs.iterdir(), key=lambda path: path.stat().st_mtime)
    return json.loads((run / "meta.json").read_text()), pd.read_parquet(run / "requests.parquet")


def test_a_load_asked_for_is_the_load_the_servers_carry(testbed, trace, tmp_path):
    refused = marllb("replay-trace", CONFIG, "--trace", trace, "--load", "0.85", "--runs-dir", tmp_path / "none")
    assert refused.returncode == 2 and "no calibration" in refused.stderr and "marllb calibrate" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()

    calibrated = marllb("calibrate", CONFIG, "--trace", trace, "--json")
    assert calibrated.returncode == 0, calibrated.stderr[-2000:]
    calibration = json.loads(calibrated.stdout)
    assert (testbed.state_dir / "calibration.json").is_file()
    assert 5e-10 < calibration["model"]["iteration_s"] < 3e-8  # a PHP loop iteration: ns, on any CPU
    print("saturated cpu share:", {s["name"]: round(s["saturated_cpu_share"], 3) for s in calibration["servers"]})
    for server in calibration["servers"]:
        assert server["fit"]["r2"] > 0.95 and server["loaded_fit"]["r2"] > 0.9, server
        assert 0.8 < server["saturated_cpu_share"] < 1.25, server  # a saturated server uses its quota
    assert calibration["trace"]["load"] == pytest.approx(0.85, rel=0.01)
    pilot = calibration["pilot"]  # the phases' model, corrected by what a replay through the LBs carried
    # 20 s at load 0.85: how many requests that is depends on the CPU (≈ 50/s at 3.2 ns a loop iteration,
    # ≈ 36/s at 4.5 ns, ≈ 10/s were it 15 ns): at least that many, or the pilot did not replay its trace.
    assert pilot["requests"] > 200 and 0.8 < pilot["scale"] < 1.25, pilot

    meta, requests = replay_at(0.85, trace, tmp_path / "runs")
    print("load 0.85:", json.dumps(meta["utilisation"]))
    assert meta["load"]["target"] == 0.85 and meta["load"]["offered"] == pytest.approx(0.85, rel=0.01)
    # Carried: the servers' CPU seconds over their quotas × the replay's span. The counters' window is longer
    # (it runs until the last request is served), so their mean busy share is lower, by more the longer
    # requests take.
    # What a loop iteration costs drifts on a shared VM: within one CI run here the calibration's phases read
    # 6.9 ns, and replays minutes apart cost 0.87 and 1.04 × the calibrated model (elsewhere 9.1–10.1 ns,
    # replays 1.01–1.03 ×). The load is right to within that drift, not closer.
    assert meta["load"]["carried"] == pytest.approx(0.85, abs=0.1)
    assert 0.6 < meta["utilisation"]["mean"] < meta["load"]["carried"] + 0.02
    assert (requests["status"] == 200).all()
    normal = requests["jct_s"].mean()

    # 1.3: above capacity by more than that drift (1.1 once carried 1.04, and its queues did not grow in 30 s).
    meta, requests = replay_at(1.3, trace, tmp_path / "runs")
    print("load 1.3:", json.dumps(meta["utilisation"]))
    assert meta["utilisation"]["mean"] > 0.88  # saturated: every server near its quota ...
    third = requests["intended_s"].max() / 3
    early = requests.loc[requests["intended_s"] < third, "jct_s"].mean()
    late = requests.loc[requests["intended_s"] > 2 * third, "jct_s"].mean()
    # ... and the queues grow over the run. How fast depends on how far above capacity the run really was, which
    # drifts with this VM's CPU: once (CI, 2026-12-01) the first third already averaged 2.7 s and the last
    # 3.5 s, where a barely overloaded run grows slowly from sed's few hundred ms.
    assert late > 1.2 * early and late > 4 * normal, (normal, early, late)


def test_the_simulator_ranks_methods_as_the_testbed_does(testbed, trace, tmp_path):
    """A short `bench fidelity` (CI bounds; the real figures are in docs/benchmarks.md): at load 0.8 SED is
    stable and near the simulator's JCT, while ECMP, which splits evenly over servers of 1 and 2 units,
    overloads the small ones on both sides (0.8 × 1.5 / 4 = 0.3 core asked of a 0.25-core quota). Whether
    20 s is long enough for that queue to double its JCT depends on what a request costs on this CPU, so the
    test asks for ECMP's JCT against SED's instead (7.7× on the testbed and 6.6× in the simulator at
    9 ns a loop iteration)."""
    out = tmp_path / "fidelity"
    result = marllb(
        "bench", "fidelity", CONFIG, "--trace", trace, "--load", "0.8", "-m", "sed", "-m", "ecmp",
        "--repeats", "1", "--duration", "20", "--out", out, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    (entry,) = report["loads"]
    rows = {row["method"]: row for row in entry["methods"]}
    figures = {
        m: {side: (row[side]["jct_mean_s"], row[side]["unstable"]) for side in ("testbed", "sim")}
        for m, row in rows.items()
    }
    print("fidelity (JCT s, unstable):", figures, "cost scale:", entry["cost_scale"])
    assert entry["ranking"]["testbed"] == entry["ranking"]["sim"] == ["sed", "ecmp"]
    assert 0.6 < rows["sed"]["ratio"] < 1.7 and not rows["sed"]["testbed"]["unstable"]
    assert all(rows["ecmp"][side]["jct_mean_s"] > 3 * rows["sed"][side]["jct_mean_s"] for side in figures["sed"])
    assert 0.8 < entry["cost_scale"] < 1.25  # what requests cost on the testbed against the calibration (drift)
    assert (out / "fidelity.json").is_file() and len(list((out / "testbed").iterdir())) == 2
