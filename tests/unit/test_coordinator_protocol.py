"""The coordinator protocol: framing, admission, deadlines, a slow agent, a disconnect and a reconnect, with a
real coordinator on loopback and real agents' links (`coordination.link.CoordinatedAgent`)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from marllb_cli.coordination.coordinator import Coordinator, CoordinatorSpec
from marllb_cli.coordination.link import CoordinatedAgent, CoordinatorAddress
from marllb_cli.coordination.protocol import (
    HEADER,
    MAGIC,
    MAX_BODY,
    VERSION,
    Kind,
    ProtocolError,
    decode_body,
    decode_header,
    encode,
    mac,
    new_secret,
    read_secret,
    recv_frame,
    send_frame,
)

N_SERVERS = 3
PERIOD = 0.1


# -- framing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(Kind))
def test_every_message_type_round_trips(kind: Kind) -> None:
    body = {"step": 7, "obs": [[0.5] * 6] * 2, "lb": "lb1"}
    data = encode(kind, body)
    decoded_kind, length = decode_header(data[: HEADER.size])
    frame = decode_body(decoded_kind, data[HEADER.size :])
    assert (frame.kind, frame.body, frame.size, length) == (kind, body, len(data), len(data) - HEADER.size)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (struct.pack("!4sBBI", b"HTTP", VERSION, 1, 2), "magic"),
        (struct.pack("!4sBBI", MAGIC, VERSION + 1, 1, 2), "version"),
        (struct.pack("!4sBBI", MAGIC, VERSION, 99, 2), "unknown message type"),
        (struct.pack("!4sBBI", MAGIC, VERSION, 1, MAX_BODY + 1), "exceeds"),
    ],
)
def test_a_bad_header_is_refused_with_its_reason(header: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_header(header)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"{not json"])
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(Kind.OBS, body)


def test_an_oversized_body_is_not_sent() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Kind.OBS, {"obs": "x" * MAX_BODY})


def test_the_secret_is_private_and_the_proof_depends_on_nonce_and_lb(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    new_secret(path)
    secret = read_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(secret) == 64
    assert len({mac(secret, "n1", "lb0"), mac(secret, "n2", "lb0"), mac(secret, "n1", "lb1")}) == 3


# -- a live coordinator ---------------------------------------------------------------------------------
class LiveCoordinator:
    """A coordinator on 127.0.0.1 in a thread, stopped by `stop()`."""

    def __init__(self, tmp_path: Path, deadline: float = 0.04) -> None:
        new_secret(tmp_path / "secret")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.spec = CoordinatorSpec(
            lbs=["lb0", "lb1"],
            n_servers=N_SERVERS,
            host="127.0.0.1",
            port=port,
            secret=tmp_path / "secret",
            period=PERIOD,
            deadline=deadline,
            trajectory=tmp_path / "trajectory.jsonl",
        )
        self.address = CoordinatorAddress(host="127.0.0.1", port=port, secret=tmp_path / "secret")
        self.running = True
        self.coordinator: Coordinator | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline_at = time.monotonic() + 5
        while time.monotonic() < deadline_at:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("the coordinator did not listen")

    def _run(self) -> None:
        async def serve() -> None:
            self.coordinator = Coordinator(self.spec, read_secret(self.spec.secret))
            await self.coordinator.run(lambda: self.running)

        asyncio.run(serve())

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.spec.trajectory.read_text().splitlines()]

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)


@pytest.fixture
def live(tmp_path: Path):
    coordinator = LiveCoordinator(tmp_path)
    yield coordinator
    coordinator.stop()


def agent(live: LiveCoordinator, lb: str = "lb0", index: int = 0) -> CoordinatedAgent:
    return CoordinatedAgent(live.address, lb, index, (1.0, 1.5, 2.0), np.ones(N_SERVERS), PERIOD)


def steps(agent: CoordinatedAgent, count: int, *, delay: float = 0.0) -> list[dict]:
    """`count` steps of `agent` as the runner takes them; `delay` before each observation (a slow agent)."""
    records, ticks = [], agent.ticks(lambda: True)
    obs = np.full((N_SERVERS, 6), 0.01, dtype=np.float32)
    for _ in range(count):
        next(ticks)
        time.sleep(delay)
        weights = agent.act(obs)
        records.append({**agent.record(obs), "weights": weights.tolist()})
    return records


def test_an_admitted_agent_steps_at_each_tick_and_gets_its_action(live: LiveCoordinator) -> None:
    records = steps(agent(live), 12)
    answered = [r for r in records if not r["missed"]]
    assert len(answered) >= 10  # the first may be before its first TICK
    assert all(r["action"] == [1, 1, 1] and r["weights"] == [1.5, 1.5, 1.5] for r in answered)
    assert all(0 < r["rtt_s"] < live.spec.deadline + 0.02 for r in answered)
    intervals = [r["tick_interval_s"] for r in answered if r["tick_interval_s"] is not None]
    assert np.median(intervals) == pytest.approx(PERIOD, abs=0.02)
    assert all(r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in answered)
    rows = live.rows()
    ticks = {r["tick"] for r in answered}
    assert all(row["fresh"][0] for row in rows if row["step"] in ticks)


def test_a_wrong_secret_or_a_foreign_lb_is_refused(live: LiveCoordinator, tmp_path: Path) -> None:
    for lb, index, secret in (("lb0", 0, b"0" * 64), ("lb7", 1, read_secret(live.spec.secret))):
        with socket.create_connection(("127.0.0.1", live.spec.port), timeout=2) as sock:
            nonce = recv_frame(sock).body["nonce"]
            send_frame(sock, Kind.HELLO, {"lb": lb, "index": index, "mac": mac(secret, nonce, lb)})
            answer = recv_frame(sock)
            assert answer.kind == Kind.REFUSED
            assert sock.recv(1) == b""  # and the connection is closed
    time.sleep(2 * PERIOD)
    assert live.coordinator is not None and live.coordinator.refused == 2 and not live.coordinator.sessions


def test_malformed_frames_cost_only_their_connection(live: LiveCoordinator) -> None:
    good = agent(live, "lb1", 1)
    steps(good, 3)
    garbage_frames = (
        b"GET / HTTP/1.1\r\n\r\n",  # not our protocol
        struct.pack("!4sBBI", MAGIC, VERSION + 1, int(Kind.HELLO), 2) + b"{}",  # a newer marllb
        struct.pack("!4sBBI", MAGIC, VERSION, int(Kind.OBS), MAX_BODY + 5),  # oversized
        struct.pack("!4sBBI", MAGIC, VERSION, int(Kind.HELLO), 6) + b"[1, 2]",  # not an object
    )
    for garbage in garbage_frames:
        with socket.create_connection(("127.0.0.1", live.spec.port), timeout=2) as sock:
            recv_frame(sock)  # the challenge
            sock.sendall(garbage)
            sock.settimeout(2)
            assert sock.recv(1024) == b""  # closed without an answer
    after = steps(good, 5)
    assert sum(not r["missed"] for r in after) >= 4  # the coordinator and the good agent go on


def test_a_slow_agent_misses_its_deadline_and_keeps_its_weights_while_the_other_is_answered(
    live: LiveCoordinator,
) -> None:
    fast, slow = agent(live, "lb0", 0), agent(live, "lb1", 1)
    slow_records: list[dict] = []
    thread = threading.Thread(target=lambda: slow_records.extend(steps(slow, 8, delay=0.06)))
    thread.start()
    fast_records = steps(fast, 8)
    thread.join()
    assert sum(not r["missed"] for r in fast_records) >= 6
    assert sum(r["missed"] for r in slow_records) >= 6  # 60 ms late for a 40 ms deadline
    assert all(r["weights"] == [1.5, 1.5, 1.5] for r in slow_records)  # the middle level it started on
    late = [row for row in live.rows() if row["connected"] == [0, 1]]
    assert sum(row["fresh"][0] for row in late) >= 6 and sum(row["fresh"][1] for row in late) <= 1
    assert all(row["wait_s"] <= live.spec.deadline + 0.03 for row in late)  # the round closed at the deadline


def test_a_disconnect_leaves_the_others_stepping_and_a_reconnect_is_admitted(live: LiveCoordinator) -> None:
    first, other = agent(live, "lb0", 0), agent(live, "lb1", 1)
    steps(first, 3)
    first.close()
    records = steps(other, 6)
    assert sum(not r["missed"] for r in records) >= 5
    assert live.rows()[-1]["connected"] == [1]
    again = agent(live, "lb0", 0)
    assert sum(not r["missed"] for r in steps(again, 5)) >= 3
    rows = live.rows()
    assert 0 in rows[-1]["connected"] and rows[-1]["fresh"][0]
