"""The replayer's schedule file: what the controller writes is exactly what the replayer (on any client node,
without pandas) reads back."""

from __future__ import annotations

import numpy as np

from marllb_cli.replay import read_schedule, write_schedule


def test_schedule_round_trips_every_float_and_path(tmp_path):
    rng = np.random.default_rng(3)
    intended = np.sort(rng.exponential(0.01, 1000).cumsum())
    paths = [f"/dummy.php/?n={k}" for k in range(998)] + ['/wiki/index.php/Caf\u00e9_"quoted",x', "/static/1k.bin"]
    write_schedule(tmp_path / "s.tsv", intended, paths)
    times, read_paths = read_schedule(tmp_path / "s.tsv")
    assert times.dtype == np.float64 and np.array_equal(times, intended)  # bit for bit
    assert read_paths == paths


def _received(channel) -> list[tuple[int, float, int, list[int]]]:
    """Every message the sender sent until the channel's end: (index, lag, errno, descriptors)."""
    import socket

    from marllb_cli.replay import _MESSAGE

    channel.setblocking(True)
    out = []
    while True:
        data, fds, _, _ = socket.recv_fds(channel, _MESSAGE.size, 1)
        if not data:
            return out
        out.append((*_MESSAGE.unpack(data), fds))


def test_the_sender_starts_each_connection_at_its_time_never_early_and_hands_it_over():
    """The sender process on real loopback TCP: one connecting socket per request, in order, none before its
    intended time (how late is `marllb bench replay`'s figure), then the all-sent message."""
    import os
    import socket
    import time

    from marllb_cli.replay import _ALL_SENT, Sender

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        intended = np.array([0.0, 0.0, 0.001, 0.003, 0.0031, 0.01, 0.02, 0.0205, 0.03, 0.05])
        t0 = time.monotonic() + 0.05
        sender = Sender.start(intended, t0, 0.0, socket.AF_INET, listener.getsockname())
        # As root the sender runs SCHED_FIFO (its wake-up preempts at once); elsewhere it says it does not.
        assert sender.realtime == (os.geteuid() == 0)
        assert (os.sched_getscheduler(sender.pid) == os.SCHED_FIFO) == sender.realtime
        messages = _received(sender.channel)
        sender.reap()
        *requests, last = messages
        assert last[0] == _ALL_SENT
        assert [index for index, *_ in requests] == list(range(len(intended)))
        lags = [lag for _, lag, _, _ in requests]
        assert min(lags) >= 0 and max(lags) < 0.05, lags
        peers = set()
        for _, _, code, fds in requests:
            assert code == 0 and len(fds) == 1
            with socket.socket(fileno=fds[0]) as sock:
                peers.add(sock.getpeername())
        assert peers == {listener.getsockname()}
        sender.channel.close()


def test_a_spinning_sender_is_never_early_either():
    """`spin_s` wakes early and busy-waits the rest: the intended time itself must still hold."""
    import socket
    import time

    from marllb_cli.replay import Sender

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        intended = np.cumsum(0.001 * (np.arange(30) % 4))  # gaps of 0-3 ms, some shorter than the spin
        sender = Sender.start(intended, time.monotonic() + 0.05, 0.0005, socket.AF_INET, listener.getsockname())
        messages = _received(sender.channel)
        sender.reap()
        sender.channel.close()
    lags = [lag for index, lag, _, _ in messages if index >= 0]
    assert len(lags) == 30 and min(lags) >= 0


def test_a_stopped_sender_ends_its_channel_and_exits_at_once():
    """Stopping (the receiver's SIGTERM) ends the sending mid-schedule: the channel reaches its end without
    the all-sent message, and the process is gone."""
    import os
    import socket
    import time

    from marllb_cli.replay import _ALL_SENT, Sender

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        sender = Sender.start(np.arange(100) * 0.1, time.monotonic(), 0.0, socket.AF_INET, listener.getsockname())
        time.sleep(0.25)
        sender.stop()
        started = time.monotonic()
        messages = _received(sender.channel)
        sender.reap()
        assert time.monotonic() - started < 1.0
        sender.channel.close()
    assert 1 <= len(messages) < 10 and _ALL_SENT not in [index for index, *_ in messages]
    for *_, fds in messages:
        for fd in fds:
            os.close(fd)
    try:
        os.kill(sender.pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError("the sender is still running")


def test_the_replayer_records_every_request_its_connections_ended_in(tmp_path):
    """Real TCP on loopback: the replayer starts each connection itself (the SYN leaves in the sender's turn)
    and finishes it in a task; answered requests keep their status and server, a refused port gives a row
    with `econnrefused` for every request, and nothing is lost either way."""
    import http.server
    import json
    import os
    import socket
    import subprocess
    import sys
    import threading

    import pandas as pd

    from marllb_cli.replay import ReplaySpec

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            code = 200 if self.path == "/ok" else 404
            self.send_response(code)
            self.send_header("X-Server", "s1")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    n = 60
    write_schedule(tmp_path / "s.tsv", np.arange(n) / 200, ["/ok"] * (n - 1) + ["/missing"])
    try:
        for port, name in ((server.server_port, "open"), (closed_port, "closed")):
            spec = ReplaySpec(host="127.0.0.1", port=port, schedule=tmp_path / "s.tsv", out=tmp_path / f"{name}.csv")
            (tmp_path / "spec.json").write_text(spec.model_dump_json())
            done = subprocess.run(
                [sys.executable, "-m", "marllb_cli.replay", str(tmp_path / "spec.json")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            first = json.loads(done.stdout.splitlines()[0])  # what the controller records in meta.json
            assert first["sender"] == ("realtime" if os.geteuid() == 0 else "normal"), first
    finally:
        server.shutdown()
    answered = pd.read_csv(tmp_path / "open.csv", keep_default_na=False)
    assert sorted(answered["index"]) == list(range(n))
    assert answered["status"].value_counts().to_dict() == {200: n - 1, 404: 1}
    assert set(answered["server"]) == {"s1"} and set(answered["error"]) == {""}
    sent_at = answered["index"] / 200 + answered["send_lag_s"]  # seconds after t0 the connection was started
    assert (answered["send_lag_s"] >= 0).all() and (answered["connect_s"] >= sent_at).all()
    refused = pd.read_csv(tmp_path / "closed.csv", keep_default_na=False)
    assert len(refused) == n and set(refused["error"]) == {"econnrefused"}
