"""Heuristic agents, rewards, and the agent loop against a real shared-memory channel."""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest

from marllb_cli.agents import ActiveWcmp, heuristic
from marllb_cli.agents.runner import AgentSpec, run_agent
from marllb_cli.dataplane.channel import COUNTERS, Channel
from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.selection import Selector, flow_key
from marllb_cli.features import FEATURE_NAMES
from marllb_cli.probes import BusyWorkersProbe
from marllb_cli.rewards import EPS, REWARDS, all_rewards, jain, ms, pbf, scored, team, vbf, vbf_log


def test_static_heuristics_use_capacity_weights():
    cpus = [1, 1, 2, 2]
    for name in ("ecmp", "wcmp", "sed"):
        agent = heuristic(name, cpus)
        assert agent.method == name and agent.act(np.zeros((4, 6))).tolist() == [1, 1, 2, 2]
    lsq = heuristic("lsq", cpus)
    assert lsq.method == "lsq" and lsq.act(np.zeros((4, 6))).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown heuristic"):
        heuristic("random", cpus)


def test_active_wcmp_discounts_capacity_by_busy_workers_and_keeps_silent_servers():
    answers = iter([[0, 3, 1], [4, None, 0]])
    agent = ActiveWcmp([1, 2, 4], probe=lambda: next(answers))
    assert agent.method == "wcmp"
    assert agent.act(np.zeros((3, 6))).tolist() == [1.0, 0.5, 2.0]
    assert agent.act(np.zeros((3, 6))).tolist() == [0.2, 0.5, 4.0]  # srv1 did not answer: keeps 2/(3+1)


def test_the_busy_workers_probe_asks_every_server_at_once_within_one_deadline():
    """Two of four servers accept the probe's connection and never answer (a server starved of CPU). Asked
    one after another, each would hold the step for the whole deadline, so the step would take twice it and
    the agent would skip periods; asked at once, the step ends at the deadline with both answers it got."""
    import http.server
    import socket
    import threading

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            busy = self.server.server_address[0].rsplit(".", 1)[1]  # 127.0.0.12 says 12 busy workers
            body = f"Total Accesses: 1\nBusyWorkers: {busy}\nIdleWorkers: 3\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet
            pass

    silent = [socket.create_server(("127.0.0.11", 0))]  # accepted by the kernel, never answered
    port = silent[0].getsockname()[1]
    silent.append(socket.create_server(("127.0.0.13", port)))
    answering = [http.server.ThreadingHTTPServer((f"127.0.0.{n}", port), Status) for n in (12, 14)]
    for server in answering:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    probe = BusyWorkersProbe([f"127.0.0.{n}" for n in (11, 12, 13, 14)], port, deadline_s=0.4)
    try:
        started = time.monotonic()
        busy = probe()
        took = time.monotonic() - started
        assert busy == [None, 12, None, 14]
        assert 0.35 < took < 0.7  # one deadline, not two (sequential probes: ≥ 0.8 s)
        assert probe() == [None, 12, None, 14]  # the late probes of the first step did not block the second
    finally:
        probe.close()
        for server in answering:
            server.shutdown()
            server.server_close()
        for sock in silent:
            sock.close()


def test_rewards_on_hand_computed_vectors():
    load = np.array([1.0, 2.0, 3.0])
    assert jain(load) == pytest.approx(36 / (3 * 14))
    assert jain(np.zeros(3)) == 1.0
    assert vbf(load) == pytest.approx(-2 / 3)
    assert ms(load) == -3.0
    assert pbf(load) == pytest.approx((1 / 3) * (2 / 3) * (3 / 3))  # CIKM'22 Eq. 4: ∏ l_j / max(l)
    assert pbf(np.array([0.0, 1.0])) == 0.0 and pbf(np.zeros(3)) == 1.0
    assert pbf(10 * load) == pytest.approx(pbf(load)) and pbf(np.full(7, 0.1)) == 1.0  # scale-free, even = 1
    assert vbf_log(load) == pytest.approx(-2 / 3 - math.log(2 / 3 + EPS))
    r = all_rewards(_observation(load, flows=[3, 0, 5]))
    assert r["flows"] == -8.0  # the flows in progress, not the durations
    assert r["jain-log"] == pytest.approx(math.log(36 / 42))
    assert r["pbf-log"] == pytest.approx(math.log(2 / 9))
    assert r["vbf-exp"] == pytest.approx(math.exp(-2 / 3))
    assert r["ms-exp"] == pytest.approx(math.exp(-3))
    even = all_rewards(_observation(np.array([2.0, 2.0])))
    assert even["jain"] == 1.0 and even["vbf"] == 0.0 and even["ms"] == -2.0
    assert even["vbf-log"] == pytest.approx(-math.log(EPS))  # the most even load is by far the best
    # Larger is better: a more even load scores higher on every fairness reward.
    uneven, fairer = all_rewards(_observation([0.1, 0.5, 0.9])), all_rewards(_observation([0.4, 0.5, 0.6]))
    assert all(fairer[name] > uneven[name] for name in REWARDS if name != "flows")


def _observation(durations, flows=None) -> np.ndarray:
    """An LB's observation [n, 6] with these decayed mean flow durations and flows in progress."""
    obs = np.zeros((len(durations), len(FEATURE_NAMES)))
    obs[:, FEATURE_NAMES.index("fd_decayed_mean")] = durations
    obs[:, FEATURE_NAMES.index("flows")] = flows if flows is not None else 0
    return obs


def test_each_reward_scores_its_own_column_of_the_observation():
    """`flows` reads the flows in progress (Little's law: the LB's mean JCT times its arrival rate); every other
    reward the decayed mean durations, also in NeurIPS'22's wider observation."""
    obs = np.arange(3 * 16, dtype=np.float64).reshape(3, 16)
    assert scored("flows", obs).tolist() == [0.0, 16.0, 32.0]
    assert scored("vbf-log", obs).tolist() == [4.0, 20.0, 36.0]
    episode = np.stack([obs, obs + 1])  # [T, n, F]
    assert scored("jain", episode).shape == (2, 3)
    assert team("vbf", [np.array([1.0, 3.0]), np.array([2.0, 2.0])]) == pytest.approx((-1.0 + 0.0) / 2)


def test_the_agent_loop_reads_stats_writes_weights_and_logs_each_step(tmp_path):
    path = tmp_path / "channel"
    dataplane = Channel.create(path, 2, "sed", [1.0, 1.0])
    table = FlowTable(Selector(2), rng=random.Random(0))
    for i in range(3):
        table.server_for(flow_key(b"\x0a\x00\x00\x01", b"\x0a\x63\xff\x01", i, 80), 0x02, 1.0)
    dataplane.publish(1.0, [0] * len(COUNTERS), table)
    spec = AgentSpec(
        lb="lb0",
        lb_index=0,
        n_lbs=1,
        channel=path,
        method="awcmp",
        cpus=[1, 2],
        servers=[],
        period=0.01,
        steps_log=tmp_path / "steps",
    )
    agent = ActiveWcmp([1, 2], probe=lambda: [1, 1])
    reader = Channel.attach(path)
    steps = iter(range(4))
    assert run_agent(spec, agent, reader, lambda: next(steps, None) is not None) == 4
    seq, method, weights = dataplane.read_control()
    assert (method, weights) == ("wcmp", [0.5, 1.0]) and seq > 2
    assert dataplane.header["agent_heartbeat"] > 0
    rows = [json.loads(line) for line in (tmp_path / "steps").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert rows[0]["flows"] == [2, 1] and rows[0]["weights"] == [0.5, 1.0] and rows[0]["busy_workers"] == [1, 1]
    assert set(rows[0]["rewards"]) == set(REWARDS)


def test_a_sampler_started_over_ssh_stops_when_its_session_ends(tmp_path):
    """A process the controller starts over SSH has the session as stdin (`hosts.ssh.SshProcess`): when the
    controller dies, sshd closes it, and the sampler must stop rather than probe forever (reliability
    review, risk 2). Here the session is a pipe that this test closes."""
    import os
    import subprocess
    import sys
    import time

    from marllb_cli.sampler import SamplerSpec

    spec = tmp_path / "sampler.json"
    spec.write_text(
        SamplerSpec(servers=[], status_port=8080, period_s=0.05, out=tmp_path / "out.csv").model_dump_json()
    )
    env = {**os.environ, "MARLLB_EXIT_ON_STDIN_EOF": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "marllb_cli.sampler", str(spec)], stdin=subprocess.PIPE, env=env, cwd=tmp_path
    )
    time.sleep(1.0)
    assert process.poll() is None  # the session is open: it keeps sampling
    process.stdin.close()
    assert process.wait(timeout=5) == 0  # session gone: SIGTERM to itself, a clean stop
    assert (tmp_path / "out.csv").read_text().startswith("t,server,group,busy")


def test_a_process_watching_its_session_still_exits_cleanly_when_done(tmp_path):
    """The stdin watcher must not keep a finished process from exiting (a daemon thread blocked in a
    buffered read made the interpreter abort at shutdown: the replayer ended with -1 over SSH)."""
    import os
    import subprocess
    import sys

    script = "from marllb_cli.services import exit_on_stdin_eof as e; import sys, pathlib; e(pathlib.Path(sys.argv[1]))"
    env = {**os.environ, "MARLLB_EXIT_ON_STDIN_EOF": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script + "; print('done')", str(tmp_path / "spec.json")],
        stdin=subprocess.PIPE,  # held open, as the controller holds the session: the watcher stays blocked
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out = process.stdout.read()
    assert process.wait(timeout=30) == 0 and out == "done\n", process.stderr.read()
    process.stdin.close()


def test_a_remote_client_left_running_is_stopped_by_its_record_and_nothing_else(tmp_path):
    """Over SSH a replayer records itself beside its spec; the next replay-trace or teardown stops such
    leftovers (`node stop-clients`), and a record whose pid now belongs to another process stops nothing."""
    import json
    import os
    import subprocess
    import sys

    from marllb_cli.services import stop_recorded_clients

    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    spec = runs / "r1" / "replay.json"
    script = "from marllb_cli.services import exit_on_stdin_eof as e; import sys, pathlib, time; "
    script += "e(pathlib.Path(sys.argv[1])); time.sleep(300)"
    env = {**os.environ, "MARLLB_EXIT_ON_STDIN_EOF": "1"}
    leftover = subprocess.Popen([sys.executable, "-c", script, str(spec)], stdin=subprocess.PIPE, env=env)
    record = runs / "r1" / "replay.json.pid"
    deadline = time.monotonic() + 20
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(record.read_text())["pid"] == leftover.pid
    bystander = subprocess.Popen(["sleep", "300"])
    (runs / "r2").mkdir()
    reused = {"pid": bystander.pid, "start_time": 1, "log": ""}  # the pid, but not the process recorded
    (runs / "r2" / "sampler.json.pid").write_text(json.dumps(reused))
    try:
        assert stop_recorded_clients(runs) == 1
        assert leftover.wait(timeout=10) != 0 and bystander.poll() is None
        assert not list(runs.glob("*/*.pid"))
    finally:
        bystander.kill()
        leftover.kill()
        bystander.wait()
        leftover.wait()
