"""Timed events on a real local testbed: one replay through real LBs and Apache in which a server's quota
halves, an LB leaves and rejoins the router's route, a neighbour hogs a server's CPU, a server's Apache stops
and starts, an agent is killed and a link is shaped; each checked in numbers, and the testbed checked to be
as before once the run is over.

Testbed name `itev` (configs/local-small.yaml renamed): servers srv0, srv1 of 0.25 core, srv2, srv3 of 0.5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.hosts import LocalNamespace
from marllb_cli.traces import poisson, write_parquet
from tests.conftest import REPO
from tests.integration.helpers import deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itev"
MARLLB = [sys.executable, "-m", "marllb_cli"]
#: Every request the same: 4 M for-loop iterations, 12-40 ms of CPU as PHP costs 3-10 ns an iteration, four times
#: that on a 0.25-core server alone.
WORK = 4_000_000
EVENTS = [
    "at=5,link=srv3,rate_mbit=20",
    "at=10,server=srv0,capacity=0.5",
    "at=12,lb=lb1,state=down",
    "at=15,server=srv2,hog=0.8",
    "at=18,lb=lb1,state=up",
    "at=20,server=srv1,state=down",
    "at=24,server=srv1,state=up",
    "at=26,agent=lb0,state=down",
]


@pytest.fixture(scope="module")
def testbed():
    with deployed(LocalTestbed(load_config(REPO / "configs" / "local-small.yaml", [f"testbed.name={NAME}"]))) as tb:
        yield tb


def _jct(requests: pd.DataFrame, server: str, start: float, end: float, quantile: float = 0.5) -> float:
    """A quantile of the JCTs of `server`'s requests that arrived in [start, end)."""
    mine = requests[(requests["server"] == server) & requests["intended_s"].between(start, end, inclusive="left")]
    assert len(mine) >= 4, (server, start, end, len(mine))
    return float(mine["jct_s"].quantile(quantile))


def _watch_qdisc(namespace: str, seen: list[str], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        seen.append(LocalNamespace(namespace).run(["tc", "qdisc", "show", "dev", "eth0"]).stdout)


def test_each_event_takes_effect_at_its_time_nothing_is_lost_and_the_run_undoes_them(testbed, tmp_path):
    # Poisson at 6/s, and 12 more requests spread over srv1's down window: ECMP sends each new flow to srv1 with
    # probability 1/4, and the Poisson draw alone has 17 arrivals there (fewer than 2 for srv1 in 5 % of runs;
    # with 29, in 0.3 %).
    burst = pd.DataFrame({"t": np.linspace(20.3, 23.8, 12), "class": "cpu"})
    trace = pd.concat([poisson(rate=6, duration=40, seed=1), burst]).sort_values("t", ignore_index=True)
    trace["work"], trace["path"] = float(WORK), f"/dummy.php/?n={WORK}"
    write_parquet(trace, tmp_path / "fixed.parquet")
    srv3 = next(n for n in testbed.topology.servers if n.name == "srv3")
    qdiscs: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_qdisc, args=(srv3.namespace, qdiscs, stop), daemon=True)
    watcher.start()
    try:
        result = subprocess.run(
            [*MARLLB, "replay-trace", str(REPO / "configs" / "local-small.yaml"), "--set", f"testbed.name={NAME}"]
            + ["--trace", str(tmp_path / "fixed.parquet"), "--method", "ecmp", "--duration", "30"]
            + ["--runs-dir", str(tmp_path / "runs"), *[arg for e in EVENTS for arg in ("--event", e)]],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr[-2000:]
    run = next((tmp_path / "runs").iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is True, (meta["failure"], meta["warnings"])  # a killed agent was the experiment
    assert len(meta["events"]) == len(EVENTS)

    events = pd.read_parquet(run / "events.parquet")
    assert events["ok"].all() and len(events) == len(EVENTS), events
    lag = events["applied_s"] - events["at_s"]
    assert lag.between(0, 0.5).all(), events  # a graceful stop waits until Apache refuses: ≈ 0.1 s

    requests = pd.read_parquet(run / "requests.parquet")
    assert len(requests) == meta["scheduled_requests"]  # nothing lost
    # Every failure has its outcome, and failures happen only from lb1's route change at 12 s (a flow in flight
    # that the router moves to lb0, which does not know it) to the end of srv1's down window.
    failed = requests[requests["status"] != 200]
    assert (failed["error"] != "").all(), failed[["intended_s", "status", "error"]]
    assert failed["intended_s"].between(11, 24.5).all(), failed[["intended_s", "status", "error"]]
    refused = requests["error"] == "econnrefused"

    # capacity 0.5 on srv0: a lone request takes twice as long. A low quantile, since requests that overlapped
    # another on srv0 took longer: after the cut srv0 is about half busy, so only about 3 in 10 of its requests
    # run alone. The lower quartile sometimes caught overlapped ones (2.02-2.81 in six runs, 3.06 once); the
    # lower decile read 1.97-2.29 in the same six runs.
    ratio = _jct(requests, "srv0", 10.5, 30, 0.1) / _jct(requests, "srv0", 0, 10, 0.1)
    assert 1.6 < ratio < 2.8, ratio  # 2 × the CPU time, and a CFS period's granularity
    # hog 0.8 on srv2 (0.5 core): the hog wants 0.4 core, and beside a request CFS gives each half the quota, so
    # the request runs at half speed (the simulator's model: min(0.8, 1/2) for the hog, 2 ×). With hog 0.5 the
    # ratio read 1.29-1.98 over six runs, too close to noise for a test.
    hogged = _jct(requests, "srv2", 15.5, 30) / _jct(requests, "srv2", 0, 15)
    assert hogged > 1.4, hogged
    median = _jct(requests, "srv0", 10.5, 30) / _jct(requests, "srv0", 0, 10)
    print(f"capacity 0.5: {ratio:.2f} x (median {median:.2f} x), hog 0.8: {hogged:.2f} x, lag ≤ {lag.max():.2f} s")
    # srv1 down 20-24: its connections refused (the LBs are not told), then served again.
    assert refused.sum() >= 2 and requests.loc[refused, "intended_s"].between(20, 24.5).all()
    assert (requests["server"] == "srv1")[requests["intended_s"] >= 24.5].sum() >= 2
    # lb1 out of the route 12-18: it sees no new flow from the second after it left until it is back.
    steps = {lb: pd.read_parquet(run / "agents" / f"{lb}.parquet") for lb in ("lb0", "lb1")}

    def new_flows(lb: str, start: float, end: float) -> int:
        """New flows the LB's dataplane saw between two times (its counter is cumulative)."""
        counts = steps[lb][steps[lb]["t_s"].between(start, end)]["new_flows"].map(sum)
        return int(counts.iloc[-1] - counts.iloc[0])

    assert new_flows("lb1", 13, 18) == 0 and new_flows("lb0", 13, 18) > 10
    assert new_flows("lb1", 19, 30) > 5
    # lb0's agent killed at 26: no step after it; lb1's agent goes on.
    assert steps["lb0"]["t_s"].max() < 26.5 and steps["lb1"]["t_s"].max() > 29
    # srv3's link shaped during the run.
    assert any("tbf" in shown and "20Mbit" in shown for shown in qdiscs), qdiscs[-3:]

    # Undone: quotas, hogs, Apache, the route, the link.
    srv0 = next(n for n in testbed.topology.servers if n.name == "srv0")
    assert testbed.apache(srv0).cgroup.cores() == pytest.approx(0.25)
    assert not [p for p in testbed.apache(srv3).cgroup.pids() if b"node.hog" in _cmdline(p)]
    assert not any(b"node.hog" in _cmdline(int(p)) for p in os.listdir("/proc") if p.isdigit())
    route = LocalNamespace(testbed.topology.router.namespace).run(["ip", "route", "show", "10.99.255.1"]).stdout
    assert route.count("nexthop via") == 2
    assert "tbf" not in LocalNamespace(srv3.namespace).run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    status = testbed.status()
    assert status.state == "up" and all(n.http_status == 200 for n in status.nodes if n.role == "server")


def test_a_server_started_again_answers_at_once_while_its_old_workers_finish(testbed):
    """Apache's graceful stop removes its pid file at once so that a new server can start while the old one's
    workers finish what they serve: `server_up` starts it without waiting (a timed event's lag), the request
    in flight is still served to its end, the old master then leaves, and a server that answers is left as
    it is (undoing a recorded stop that never happened)."""
    from marllb_cli.deploy.node import faults
    from marllb_cli.probes import http_get

    srv1 = next(n for n in testbed.topology.servers if n.name == "srv1")
    instance = testbed.apache(srv1)
    answers: list[int] = []
    slow = f"/dummy.php/?n={WORK * 100}"  # 1.2-4 s of CPU: 5-16 s on a 0.25-core quota
    worker = threading.Thread(
        target=lambda: answers.append(http_get(LocalNamespace(srv1.namespace), str(srv1.ip), 80, slow, timeout=60)[0])
    )
    worker.start()
    time.sleep(0.3)
    faults.server_down(instance)  # refusing; Apache removes its pid file up to about 0.6 s later
    (old,) = _masters(instance)
    faults.server_up(instance, testbed.config.testbed)
    assert instance.ready() and not answers  # serving again while the old worker still computes
    worker.join(timeout=60)
    assert answers == [200]  # the request in flight was served to its end, not cut
    deadline = time.monotonic() + 5  # the old master checks its children once a second
    while old in _masters(instance) and time.monotonic() < deadline:
        time.sleep(0.2)
    (new,) = _masters(instance)
    assert new != old and int(instance.pidfile.read_text()) == new
    faults.server_up(instance, testbed.config.testbed)  # undoing a stop that never happened: left as it is
    assert _masters(instance) == [new]


def test_a_controller_that_restarts_servers_is_left_no_zombie_masters(testbed):
    """A long-lived controller (a sweep, `train --env testbed`) is the subreaper of every Apache master it
    starts; a master that a graceful stop lets exit is its child to reap. Before `server_up` and
    `server_down` reaped them, it kept one zombie per restart until it exited (57 after a CI run)."""
    from marllb_cli.deploy.node import faults
    from marllb_cli.processes import become_subreaper

    become_subreaper()  # as every marllb command is (`cli_support`)
    srv1 = next(n for n in testbed.topology.servers if n.name == "srv1")
    instance = testbed.apache(srv1)
    became_ours, left = [], []
    for _ in range(4):
        master = int(instance.pidfile.read_text())
        faults.server_down(instance)
        deadline = time.monotonic() + 5  # the old master checks its children once a second
        while not _our_zombie(master) and time.monotonic() < deadline:
            time.sleep(0.1)
        became_ours.append(_our_zombie(master))
        faults.server_up(instance, testbed.config.testbed)
        assert instance.ready()
        left.append(_our_zombie(master))
    # Each master this test started exited on its stop, a zombie of ours until the restart reaped it (the first
    # was deployed before this process became a subreaper: init's to reap). Other tests' zombies do not count.
    assert became_ours[1:] == [True, True, True]
    assert left == [False, False, False, False]


def _our_zombie(pid: int) -> bool:
    """Whether `pid` has exited as a child of this process and is not yet reaped."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - tiny procfs read
    except OSError:  # reaped: gone
        return False
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state == "Z" and int(ppid) == os.getpid()


def _masters(instance) -> list[int]:
    """Apache masters in an instance's cgroup, read with ps (apache2 processes whose parent is not one)."""
    pids = ",".join(map(str, instance.cgroup.pids()))
    rows = [line.split() for line in subprocess.run(["ps", "-o", "pid=,ppid=,comm=", "-p", pids],
                                                     capture_output=True, text=True).stdout.splitlines()]  # fmt: skip
    apaches = {int(pid): int(ppid) for pid, ppid, comm in rows if comm == "apache2"}
    return sorted(pid for pid, ppid in apaches.items() if ppid not in apaches)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_run_killed_mid_way_leaves_its_events_in_force_and_the_next_run_undoes_them(testbed, tmp_path):
    """SIGKILL the controller after its events halved srv0's quota and stopped srv1's Apache: nothing could
    restore them then. The next replay undoes them before it starts, and says so."""
    trace = poisson(rate=6, duration=40, seed=2)
    trace["work"], trace["path"] = float(WORK), f"/dummy.php/?n={WORK}"
    write_parquet(trace, tmp_path / "fixed.parquet")
    base = [*MARLLB, "replay-trace", str(REPO / "configs" / "local-small.yaml"), "--set", f"testbed.name={NAME}"]
    base += ["--trace", str(tmp_path / "fixed.parquet"), "--method", "sed", "--runs-dir", str(tmp_path / "runs")]
    events = ["--event", "at=1,server=srv0,capacity=0.5", "--event", "at=1,server=srv1,state=down"]
    killed = subprocess.Popen([*base, "--duration", "20", *events], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    srv0, srv1 = (next(n for n in testbed.topology.servers if n.name == name) for name in ("srv0", "srv1"))
    deadline = time.monotonic() + 30
    while not (testbed.apache(srv0).cgroup.cores() < 0.2 and not testbed.apache(srv1).ready()):
        assert time.monotonic() < deadline and killed.poll() is None, "the events never took effect"
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    time.sleep(1.0)
    assert testbed.apache(srv0).cgroup.cores() == pytest.approx(0.125) and not testbed.apache(srv1).ready()

    result = subprocess.run([*base, "--duration", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "undid what an earlier run's events left" in result.stdout + result.stderr
    assert testbed.apache(srv0).cgroup.cores() == pytest.approx(0.25)
    assert any(testbed.apache(srv1).ready() or time.sleep(0.5) for _ in range(10)), "srv1 did not answer again"
    latest = max((tmp_path / "runs").iterdir(), key=lambda p: p.name)
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["complete"] and "srv0" in meta["undone_at_start"][0] and "srv1" in meta["undone_at_start"][0]
