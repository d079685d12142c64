"""`marllb replay-trace` and `marllb report` for real: the shipped trace, open loop, through our LBs to
Apache on servers of 1, 1, 2 and 2 units, with the CLI run as a user runs it.

Testbed name `itrp` (configs/local-small.yaml renamed), so it never meets a user's testbed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.node.lbs import SHM_DIR
from marllb_cli.hosts import LocalNamespace
from tests.conftest import REPO, weight_levels
from tests.integration.helpers import NOTHING, deployed, leftovers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itrp"
TRACE = REPO / "traces" / "rate_200_steady_30s.tsv"
SPEED, DURATION = 0.25, 25.0
MARLLB = [sys.executable, "-m", "marllb_cli"]


@pytest.fixture(scope="module")
def testbed():
    with deployed(
        LocalTestbed(load_config(REPO / "configs" / "local-small.yaml", [f"testbed.name={NAME}"]))
    ) as testbed:
        yield testbed


def replay(method: str, runs_dir: Path, *extra: str, **kwargs) -> subprocess.Popen:
    args = [
        *MARLLB,
        "replay-trace",
        str(REPO / "configs" / "local-small.yaml"),
        "--set",
        f"testbed.name={NAME}",
        "--trace",
        str(TRACE),
        "--method",
        method,
        "--speed",
        str(SPEED),
        "--runs-dir",
        str(runs_dir),
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **kwargs)


def expected_requests(duration: float) -> int:
    times = pd.read_csv(TRACE, sep="\t")["time"]
    return int((times / SPEED < duration).sum())


def nothing_running_in(testbed: LocalTestbed) -> list[int]:
    """PIDs in the LB and client namespaces (the run's processes live there; Apache lives elsewhere)."""
    topology = testbed.topology
    return [pid for node in (topology.client, *topology.lbs) for pid in LocalNamespace(node.namespace).pids()]


def test_ecmp_and_sed_runs_are_complete_and_sed_wins_on_heterogeneous_servers(testbed, tmp_path):
    runs_dir = tmp_path / "runs"
    summaries = {}
    for method in ("ecmp", "sed"):
        process = replay(method, runs_dir, "--duration", str(DURATION))
        out, err = process.communicate(timeout=DURATION + 60)
        assert process.returncode == 0, err
        run = next(p for p in runs_dir.iterdir() if f"-{method}-" in p.name)
        meta = json.loads((run / "meta.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        requests = pd.read_parquet(run / "requests.parquet")
        assert meta["complete"] is True and meta["failure"] is None
        assert len(requests) == meta["scheduled_requests"] == expected_requests(DURATION) == summary["requests"]
        assert requests["intended_s"].is_monotonic_increasing
        assert summary["send_lag_p99_s"] < 0.05 and "send lag p99" in out
        assert (requests["done_s"].dropna() >= requests["intended_s"][requests["done_s"].notna()]).all()
        servers = pd.read_parquet(run / "servers.parquet")
        assert set(servers["server"]) == {"srv0", "srv1", "srv2", "srv3"}
        assert servers.groupby("server").size().min() >= 0.8 * DURATION / 0.25
        for lb in ("lb0", "lb1"):
            steps = pd.read_parquet(run / "agents" / f"{lb}.parquet")
            assert len(steps) >= 0.8 * DURATION / 0.25
            assert list(steps["weights"].iloc[-1]) == [1.0, 1.0, 2.0, 2.0]  # ∝ cpus (ecmp ignores them)
            assert (steps["method"] == method).all()
            assert steps["flows"].map(sum).max() > 0
        served = requests[requests["server"] != ""]  # a reset on a full backlog has no server (ecmp: 3 in 1 288)
        assert len(served) > 0.99 * len(requests)
        shares = served["server"].value_counts(normalize=True)
        if method == "ecmp":  # equal split whatever the capacity
            assert max(abs(shares[s] - 0.25) for s in shares.index) < 0.06
        else:  # SED favours the 2-unit servers
            assert shares["srv2"] + shares["srv3"] > 0.6
            assert summary["error_rate"] < 0.01
        summaries[method] = summary
        assert nothing_running_in(testbed) == []
        assert not list(SHM_DIR.glob(f"marllb-{NAME}-*/*"))
    assert summaries["sed"]["jct_p99_s"] < summaries["ecmp"]["jct_p99_s"]
    assert summaries["sed"]["jct_mean_s"] < summaries["ecmp"]["jct_mean_s"]

    report = subprocess.run(
        [*MARLLB, "report", str(runs_dir), "--out", str(tmp_path / "report"), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert report.returncode == 0, report.stderr
    rows = [r for r in json.loads(report.stdout)["rows"] if r["class"] == "all"]
    assert [r["method"] for r in rows] == ["sed", "ecmp"]
    assert rows[1]["jct_p99_ratio"] > 1.0
    assert (tmp_path / "report" / "jct_cdf.png").stat().st_size > 5000


def test_static_weights_from_a_file_are_the_weights_both_lbs_apply(testbed, tmp_path):
    """`--method static:FILE` on the testbed: SED with the file's weights. With srv0 and srv1 at 1/1000 of
    the others', SED's (flows + 1) / weight sends them a request only when srv2 or srv3 hold a thousand
    flows, so every request goes to srv2 and srv3, and both LBs log the file's weights at every step."""
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"weights": [0.001, 0.001, 1.0, 2.0]}))
    process = replay(f"static:{weights}", tmp_path / "runs", "--duration", "6")
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr
    run = next((tmp_path / "runs").iterdir())
    requests = pd.read_parquet(run / "requests.parquet")
    assert len(requests) == expected_requests(6) and (requests["status"] == 200).all()
    assert set(requests["server"]) == {"srv2", "srv3"}
    assert requests["server"].value_counts()["srv3"] > requests["server"].value_counts()["srv2"]
    for lb in ("lb0", "lb1"):
        steps = pd.read_parquet(run / "agents" / f"{lb}.parquet")
        assert len(steps) >= 0.8 * 6 / 0.25 and (steps["method"] == "sed").all()
        assert {tuple(w) for w in steps["weights"]} == {(0.001, 0.001, 1.0, 2.0)}
    assert json.loads((run / "meta.json").read_text())["static_weights"]["weights"] == [0.001, 0.001, 1.0, 2.0]
    (tmp_path / "three.json").write_text(json.dumps({"weights": [1, 1, 2]}))
    for name, expected in (("none.json", "no such file"), ("three.json", "3 weights for 4 servers")):
        bad = replay(f"static:{tmp_path / name}", tmp_path / "refused", "--duration", "1")
        _, stderr = bad.communicate(timeout=60)
        assert bad.returncode == 2 and expected in stderr and "Traceback" not in stderr
        assert not (tmp_path / "refused").exists()  # refused before a run directory exists


def test_a_second_measurement_on_a_testbed_in_use_is_refused_and_the_first_is_untouched(testbed, tmp_path):
    """Two replays on one testbed would load each other's servers and both be wrong without a word. The
    second is refused in one line naming the first's pid and command (exit 1), before it writes a run
    directory or touches the LBs; the first completes. Once it has ended, the testbed is free again."""
    first = replay("sed", tmp_path / "first", "--duration", "8")
    deadline = time.monotonic() + 60
    while not list((tmp_path / "first").glob("*/requests.csv")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first replay ended before the second could meet it"
    second = replay("lsq", tmp_path / "second", "--duration", "2")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"testbed {NAME} is in use by another marllb (pid {first.pid}: marllb replay-trace" in lines[0]
    assert not (tmp_path / "second").exists() or not any((tmp_path / "second").iterdir())
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    (run,) = (tmp_path / "first").iterdir()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is True and meta["method"] == "sed"
    assert json.loads((run / "summary.json").read_text())["error_rate"] == 0

    after = replay("lsq", tmp_path / "after", "--duration", "2")
    out, err = after.communicate(timeout=120)
    assert after.returncode == 0, err


def test_ctrl_c_keeps_every_sent_request_and_leaves_nothing_running(testbed, tmp_path):
    runs_dir = tmp_path / "runs"
    process = replay("sed", runs_dir)
    deadline = time.monotonic() + 30
    csv = None
    while time.monotonic() < deadline:
        csv = next(runs_dir.glob("*/requests.csv"), None)
        if csv is not None and len(csv.read_text().splitlines()) > 150:
            break
        time.sleep(0.2)
    assert csv is not None, "the replay never started"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "incomplete" in out
    run = csv.parent
    meta = json.loads((run / "meta.json").read_text())
    requests = pd.read_parquet(run / "requests.parquet")
    assert meta["complete"] is False and meta["failure"] == "interrupted"
    assert 150 < len(requests) == meta["replayed_requests"] < meta["scheduled_requests"]
    # The rows are a prefix of the schedule, every finished request has its timings, the rest say why not.
    schedule = pd.read_parquet(run / "schedule.parquet")
    assert requests["path"].tolist() == schedule["path"].iloc[: len(requests)].tolist()
    finished = requests["error"] == ""
    assert finished.sum() > 150 and requests.loc[finished, "done_s"].notna().all()
    assert set(requests.loc[~finished, "error"]) <= {"interrupted"}
    assert json.loads((run / "summary.json").read_text())["requests"] == len(requests)
    assert not (run / "requests.csv").exists()
    assert nothing_running_in(testbed) == []
    assert not list(SHM_DIR.glob(f"marllb-{NAME}-*/*"))


def test_a_qmix_policy_trained_in_simulation_runs_on_both_lbs(testbed, tmp_path, trained):
    """QMIX's shared agent network, served on each LB with its own id: trained on local-small's simulator
    (2 LBs), replayed through both of the testbed's LBs."""
    policy = trained("qmix", "qmix", REPO / "configs" / "local-small.yaml")
    process = replay(f"rl:{policy}", tmp_path / "runs", "--duration", "8")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert_a_complete_policy_run(next((tmp_path / "runs").iterdir()), 8, [1, 1, 2, 2])  # local-small
    assert nothing_running_in(testbed) == []


def assert_a_complete_policy_run(run: Path, duration: float, cpus: list[float]) -> None:
    """Every request of `duration` s answered, and both LBs stepping with the policy's SED weight levels: the
    default residual levels (0.8, 1, 1.25) times each server's `cpus`."""
    assert json.loads((run / "meta.json").read_text())["complete"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert summary["requests"] == expected_requests(duration) and summary["error_rate"] < 0.01
    for lb in ("lb0", "lb1"):
        steps = pd.read_parquet(run / "agents" / f"{lb}.parquet")
        assert len(steps) >= 0.8 * duration / 0.25
        assert weight_levels(steps, cpus) <= {0.8, 1.0, 1.25}
        assert (steps["method"] == "sed").all()  # the policy sets SED weights


def test_a_policy_trained_in_simulation_runs_on_the_testbed(tmp_path, trained):
    """Sim-to-real in one command: train on sim-moderate (tiny), replay on local-moderate with rl:DIR."""
    name = "itrl"
    policy = trained("distr", "policy")
    testbed = LocalTestbed(load_config(REPO / "configs" / "local-moderate.yaml", [f"testbed.name={name}"]))
    testbed.deploy()
    try:
        runs = tmp_path / "runs"
        result = subprocess.run(
            [
                *MARLLB,
                "replay-trace",
                str(REPO / "configs" / "local-moderate.yaml"),
                "--set",
                f"testbed.name={name}",
                "--trace",
                str(TRACE),
                "--method",
                f"rl:{policy}",
                "--speed",
                str(SPEED),
                "--duration",
                "8",
                "--runs-dir",
                str(runs),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert_a_complete_policy_run(next(runs.iterdir()), 8, [2, 2, 2, 2, 4, 4, 4])  # local-moderate
    finally:
        testbed.teardown()
    assert leftovers(name) == NOTHING
