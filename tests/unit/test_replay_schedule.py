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


def test_the_pacer_never_wakes_before_its_deadline():
    """The timerfd pacer (how close to the deadline it wakes is `marllb bench replay`'s figure)."""
    import asyncio
    import time

    from marllb_cli.replay import Pacer

    async def wake_ups() -> list[float]:
        pacer = Pacer()
        early = []
        try:
            for step in range(50):
                deadline = time.monotonic() + 0.0007 * (step % 5)
                await pacer.until(deadline)
                early.append(deadline - time.monotonic())
            started = time.monotonic()
            await pacer.until(started - 1.0)  # a deadline past: at once
            assert time.monotonic() - started < 0.05
        finally:
            pacer.close()
        assert pacer.fd == -1
        return early

    assert max(asyncio.run(wake_ups())) <= 0
    probe = Pacer()
    assert probe.precise  # Linux has timerfd: the precise path is the one tested
    probe.close()


def test_a_spinning_pacer_still_never_wakes_before_its_deadline():
    """`spin_s` wakes early and busy-waits the rest: the deadline itself must still hold."""
    import asyncio
    import time

    from marllb_cli.replay import Pacer

    async def earliness() -> list[float]:
        pacer = Pacer()
        try:
            out = []
            for step in range(30):
                deadline = time.monotonic() + 0.001 * (step % 4)
                await pacer.until(deadline, spin_s=0.0005)
                out.append(deadline - time.monotonic())
            return out
        finally:
            pacer.close()

    assert max(asyncio.run(earliness())) <= 0


def test_the_replayer_records_every_request_its_connections_ended_in(tmp_path):
    """Real TCP on loopback: the replayer starts each connection itself (the SYN leaves in the sender's turn)
    and finishes it in a task; answered requests keep their status and server, a refused port gives a row
    with `econnrefused` for every request, and nothing is lost either way."""
    import http.server
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
