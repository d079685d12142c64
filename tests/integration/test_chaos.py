"""Chaos tier: marllb itself killed at random points (SIGKILL, SIGTERM, SIGHUP) during `deploy`, `lb start`,
`replay-trace`, `simulate` and `train`, 20 kill points in all. After each kill: nothing of the testbed runs
but what the deployed testbed lists, the next command recovers, every request the replayer sent is recorded
with its outcome, the run says it is incomplete and why, and `marllb report` still reports the complete runs.

The kill times are drawn from a seed printed at the start (`MARLLB_CHAOS_SEED=N` replays a failure).
Testbed name `itchaos` (configs/local-small.yaml renamed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.hosts import LocalNamespace
from tests.conftest import REPO
from tests.integration.helpers import NOTHING, leftovers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itchaos"
CONFIG = REPO / "configs" / "local-small.yaml"
SIM = REPO / "configs" / "sim-moderate.yaml"
TRACE = REPO / "traces" / "rate_200_steady_30s.tsv"
MARLLB = [sys.executable, "-m", "marllb_cli"]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGHUP)
KILLS: list[str] = []  # every kill point, for the summary line


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = int(os.environ.get("MARLLB_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"\nchaos seed {seed} (MARLLB_CHAOS_SEED={seed} replays these kill times)")
    return random.Random(seed)


@pytest.fixture(scope="module")
def testbed():
    testbed = LocalTestbed(load_config(CONFIG, [f"testbed.name={NAME}"]))
    yield testbed
    testbed.teardown()
    assert leftovers(NAME) == NOTHING
    hits = [kill for kill in KILLS if "→ 0" not in kill]
    print(f"\nchaos: {len(hits)} kill points hit a running command: {'; '.join(KILLS)}")
    assert len(hits) >= 20


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*MARLLB, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*MARLLB, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def kill_after(process: subprocess.Popen, sig: signal.Signals, delay: float, what: str) -> tuple[int, str]:
    """Send `sig` after `delay` s (unless it finished first); its exit code and stderr."""
    try:
        process.wait(delay)
    except subprocess.TimeoutExpired:
        process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    # A command that finished before its kill says how (its last line), so a surprising exit 0 can be read.
    finished = f" (finished: {(stdout.strip().splitlines() or [''])[-1][:120]})" if process.returncode == 0 else ""
    KILLS.append(f"{what} {sig.name} at {delay:.2f} s → {process.returncode}{finished}")
    return process.returncode, stderr


def expected_code(sig: signal.Signals, code: int) -> bool:
    """SIGKILL: -9; SIGTERM/SIGHUP: marllb cleans up and exits 128 + signal, or dies of it while still
    importing (before it has made anything); 0 when the command finished before the signal."""
    return code in ((-9, 0) if sig == signal.SIGKILL else (128 + sig, -sig, 0))


def ensure_up(testbed: LocalTestbed) -> None:
    """Each test starts from a deployed testbed, so one failure does not cascade into the next tests."""
    if testbed.status().state != "up":
        testbed.deploy()


def pids_in_testbed(testbed: LocalTestbed) -> set[int]:
    """Processes in the client, router and LB namespaces (the servers' Apache lives in cgroups)."""
    topology = testbed.topology
    nodes = (topology.client, topology.router, *topology.lbs)
    return {pid for node in nodes for pid in LocalNamespace(node.namespace).pids()}


def recorded_pids(testbed: LocalTestbed) -> set[int]:
    manifest = Manifest.load(testbed.manifest_path)
    return {int(r.data["pid"]) for r in manifest.of_kind("process")} if manifest else set()


def settle(testbed: LocalTestbed) -> set[int]:
    """Processes of the testbed that its manifest does not list, after a moment to let orphans die."""
    deadline = time.monotonic() + 10
    while True:
        strays = pids_in_testbed(testbed) - recorded_pids(testbed)
        if not strays or time.monotonic() > deadline:
            for pid in strays:  # shown with a failure: which process was left, and what it held
                print(f"stray {pid}: {describe_process(pid)}")
            return strays
        time.sleep(0.2)


def describe_process(pid: int) -> str:
    """A stray's command line and open files, for the failure report."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        return f"gone or unreadable ({exc})"
    files = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return f"{command!r}, files {sorted(files)}"


def kill_while_running(
    args: tuple, sig: signal.Signals, low: float, high: float, rng, what: str, before=lambda: None
) -> tuple[int, str]:
    """`kill_after` at a random time in [low, high] s; when the command finished first, again earlier (a
    kill point must hit the command while it works), each time after `before()`."""
    for attempt in range(4):
        before()
        code, stderr = kill_after(start(*args), sig, rng.uniform(low, high) * 0.6**attempt, what)
        if code != 0:
            return code, stderr
    return code, stderr


def test_killing_deploy_anywhere_leaves_a_testbed_the_next_deploy_rebuilds(testbed, rng):
    def teardown() -> None:  # each kill meets a deploy that builds
        assert run("teardown", CONFIG, "--set", f"testbed.name={NAME}").returncode == 0

    for sig in SIGNALS:
        args = ("deploy", CONFIG, "--set", f"testbed.name={NAME}")
        code, stderr = kill_while_running(args, sig, 0.4, 2.0, rng, "deploy", teardown)
        assert expected_code(sig, code) and code != 0, stderr
        again = run("deploy", CONFIG, "--set", f"testbed.name={NAME}")
        assert again.returncode == 0, again.stderr
        assert testbed.status().state == "up"
        assert settle(testbed) == set()


def stop_lbs() -> None:
    assert run("lb", "stop", CONFIG, "--set", f"testbed.name={NAME}").returncode == 0


def test_killing_lb_start_leaves_only_recorded_processes_and_the_next_start_works(testbed, rng):
    ensure_up(testbed)
    for sig in SIGNALS:
        args = ("lb", "start", CONFIG, "--set", f"testbed.name={NAME}")
        code, stderr = kill_while_running(args, sig, 0.5, 1.5, rng, "lb start", stop_lbs)
        assert expected_code(sig, code) and code != 0, stderr
        assert settle(testbed) == set()  # a dataplane or agent started before the kill is in the manifest
        again = run("lb", "start", CONFIG, "--set", f"testbed.name={NAME}")
        assert again.returncode == 0, again.stderr
        stop = run("lb", "stop", CONFIG, "--set", f"testbed.name={NAME}")
        assert stop.returncode == 0, stop.stderr
        assert pids_in_testbed(testbed) == set()


def replay_args(runs: Path, duration: float) -> list[str]:
    return [
        "replay-trace", CONFIG, "--set", f"testbed.name={NAME}", "--trace", TRACE, "--speed", "0.25",
        "--duration", str(duration), "--runs-dir", runs,
    ]  # fmt: skip


def check_sent_requests_are_recorded(run: Path, sig: signal.Signals) -> None:
    """Every request the replayer sent has a row, in schedule order; the run says it did not finish."""
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is False
    if sig == signal.SIGKILL:  # the controller could not write the results: the replayer's own rows are there
        if (run / "requests.csv").exists():  # (none when the kill came before the replayer started)
            rows = pd.read_csv(run / "requests.csv")
            assert sorted(rows["index"]) == list(range(len(rows)))
    else:
        assert meta["failure"] == f"terminated ({sig.name})"
        requests = pd.read_parquet(run / "requests.parquet")
        assert requests["intended_s"].is_monotonic_increasing
        assert len(requests) == json.loads((run / "summary.json").read_text())["requests"]
        assert set(requests["error"]) <= {"", "interrupted"}


def test_killing_replay_loses_no_sent_request_and_leaves_no_load_running(testbed, rng, tmp_path):
    ensure_up(testbed)
    runs = tmp_path / "runs"
    for sig in (*SIGNALS, *SIGNALS):
        before = set(runs.iterdir()) if runs.exists() else set()
        code, stderr = kill_while_running(tuple(replay_args(runs, 8)), sig, 1.0, 6.0, rng, "replay-trace")
        assert expected_code(sig, code), stderr
        assert settle(testbed) == set()  # no replayer, no sampler: they die with the controller
        assert LocalNamespace(testbed.topology.client.namespace).pids() == []
        made = set(runs.iterdir()) - before if runs.exists() else set()
        if code != 0 and made:  # (no run directory when the kill came while marllb was starting)
            check_sent_requests_are_recorded(max(made, key=lambda path: path.stat().st_mtime), sig)
    complete = run("replay-trace", *replay_args(runs, 3)[1:])
    assert complete.returncode == 0, complete.stderr  # the next run recovers: the LBs are replaced
    killed = [path for path in runs.iterdir() if (path / "requests.csv").exists()]  # SIGKILLed mid-replay
    report = run("report", runs, "--out", tmp_path / "report", "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert any(row["method"] == "sed" for row in data["rows"])
    for path in killed:  # the report finished their files from the replayer's own rows
        meta = json.loads((path / "meta.json").read_text())
        assert meta["complete"] is False and meta["failure"].startswith("killed")
        assert len(pd.read_parquet(path / "requests.parquet")) == meta["replayed_requests"]
        assert any("recovered" in warning and path.name in warning for warning in data["warnings"])
    assert pids_in_testbed(testbed) == set()


def test_an_agent_killed_mid_run_leaves_its_lb_forwarding_and_the_run_degraded(testbed, tmp_path):
    """Fail-static, and honest about it (reliability review, risk 3): SIGKILL of lb0's agent mid-replay. Its
    dataplane keeps forwarding on the last weights, every request is answered, and the run is marked
    incomplete with the reason; on 094bd00 it said `complete: true`."""
    ensure_up(testbed)
    runs = tmp_path / "runs"
    process = start(*replay_args(runs, 10))
    deadline = time.monotonic() + 60
    agent = None
    while agent is None and time.monotonic() < deadline:
        manifest = Manifest.load(testbed.manifest_path)
        records = [r for r in manifest.of_kind("process") if r.name == "lb0-agent"] if manifest else []
        agent = records[0].data["pid"] if records else None
        time.sleep(0.1)
    assert agent is not None
    time.sleep(3.0)
    os.kill(agent, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    run = next(runs.iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is False and meta["degraded"] is True
    assert meta["failure"] == "degraded: lb0 agent died"
    assert [lb["dead"] for lb in meta["lbs"]] == [["agent died"], []]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["error_rate"] < 0.01 and summary["requests"] == meta["scheduled_requests"]
    assert "degraded" in stderr
    assert pids_in_testbed(testbed) == set()


def test_killing_simulate_marks_its_run_and_report_still_reports_the_others(rng, tmp_path):
    runs = tmp_path / "runs"
    complete = run("simulate", SIM, "--duration", "5", "--runs-dir", runs)
    assert complete.returncode == 0, complete.stderr
    killed = 0
    for sig in (*SIGNALS, *SIGNALS):
        before = set(runs.iterdir())
        args = ("simulate", SIM, "--set", "sim.engine=python", "--duration", "3000", "--runs-dir", runs)
        code, stderr = kill_after(start(*args), sig, rng.uniform(1.5, 4.0), "simulate")
        assert expected_code(sig, code) and code != 0, stderr
        made = set(runs.iterdir()) - before
        if not made:  # killed while still starting, before it made its run (the previous run is not this one)
            continue
        (newest,) = made
        killed += 1
        meta = json.loads((newest / "meta.json").read_text())
        assert meta["complete"] is False
        if sig != signal.SIGKILL:
            assert meta["failure"] == f"terminated ({sig.name})"
    report = run("report", runs, "--out", tmp_path / "report", "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert [row["method"] for row in data["rows"] if row["class"] == "all"] == ["sed"]
    assert killed >= 3 and sum("incomplete run" in w or "skipped" in w for w in data["warnings"]) == killed


def test_killing_train_loses_at_most_the_running_episode(rng, tmp_path):
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / f"train-{sig.name}"
        options = ("--episodes", "4", "--episode-s", "3", "--out", out, "--hyper", "hidden=8")
        args = ("train", SIM, "--algo", "distr", *options)
        process = start(*args)
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        code, stderr = kill_after(process, sig, rng.uniform(0.0, 1.0), "train")
        assert expected_code(sig, code), stderr
        done = len(pd.read_parquet(out / "curve.parquet"))
        resumed = run(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        curve = pd.read_parquet(out / "curve.parquet")
        assert done >= 1 and list(curve["episode"]) == [0, 1, 2, 3]
