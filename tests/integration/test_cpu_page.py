"""The CPU page as the papers' artefact served it (`testbed.cpu_page_echo_every: 4000`): the body grows while
the request computes, so the client holds bytes (and ACKs them) long before the request ends; with the
default (0) the first byte comes with the end. Measured from the client's namespace, straight to a server.

Testbed name `itcp` (configs/local-small.yaml renamed), deployed twice, torn down after.
"""

from __future__ import annotations

import os
import time

import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.hosts import LocalNamespace
from tests.conftest import REPO
from tests.integration.helpers import NOTHING, leftovers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itcp"
#: ≈ 32 KiB of counter lines at 4 000 iterations a line: Apache sends the body 8 KiB at a time, so the client
#: gets its first bytes about a quarter of the way through.
ITERATIONS = 16_000_000


def timed_get(testbed: LocalTestbed, path: str) -> tuple[float, float, bytes]:
    """(seconds to the first body byte, seconds to the end, body) of one GET from the client to srv2."""
    server = testbed.topology.servers[2]
    client = LocalNamespace(testbed.topology.client.namespace)
    sock = client.connect(str(server.ip), 80, timeout=30)
    try:
        start = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data, first_body = b"", None
        while chunk := sock.recv(65536):
            data += chunk
            if first_body is None and b"\r\n\r\n" in data and len(data) > data.index(b"\r\n\r\n") + 4:
                first_body = time.monotonic() - start
        end = time.monotonic() - start
    finally:
        sock.close()
    assert first_body is not None, data[:200]
    return first_body, end, data.split(b"\r\n\r\n", 1)[1]


def test_the_artefact_page_streams_its_counter_and_the_default_answers_at_the_end():
    config = REPO / "configs" / "local-small.yaml"
    results = {}
    try:
        for every in (4000, 0):
            testbed = LocalTestbed(
                load_config(config, [f"testbed.name={NAME}", f"testbed.cpu_page_echo_every={every}"])
            )
            testbed.deploy()
            first, end, body = timed_get(testbed, f"/dummy.php/?n={ITERATIONS}")
            lines = body.decode().split()
            results[every] = (first / end, len(lines), lines[-1])
            print(f"\necho every {every}: first body byte at {first * 1e3:.0f} of {end * 1e3:.0f} ms")
    finally:
        LocalTestbed(load_config(config, [f"testbed.name={NAME}"])).teardown()
    streamed, lines, last = results[4000]
    assert lines == ITERATIONS // 4000 + 1 and last == str(ITERATIONS)  # 0, 4 000, …, 7 996 000, then the total
    assert streamed < 0.4  # measured: 0.26 (the first 8 KiB ≈ 4 M iterations)
    at_end, lines, last = results[0]
    assert lines == 1 and last == str(ITERATIONS) and at_end > 0.8  # measured: 0.89–1.0
    assert leftovers(NAME) == NOTHING
