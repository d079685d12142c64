"""Plain HTTP probes of a testbed's servers: one GET, and Apache's BusyWorkers from mod_status.

Used wherever a server is asked how it is: `marllb status`, the awcmp agent (every period, from the LB's
namespace), the busy-worker sampler on the client node, and `marllb node status` on a server host. Only the
standard library, so the processes that probe start fast.
"""

from __future__ import annotations

import http.client
import socket
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Protocol

__all__ = ["BusyWorkersProbe", "Connector", "busy_workers", "http_get"]


class Connector(Protocol):
    """What can open a TCP connection from somewhere else (a `hosts.LocalNamespace`)."""

    def connect(self, host: str, port: int, *, timeout: float) -> socket.socket: ...


def http_get(
    ns: Connector | None, host: str, port: int, path: str, *, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 GET from inside namespace `ns` (None: the caller's own): (status, headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = ns.connect(host, port, timeout=timeout) if ns else socket.create_connection((host, port), timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    except (TimeoutError, http.client.HTTPException) as exc:
        raise OSError(f"GET {path}: {exc}") from exc
    finally:
        conn.close()


def busy_workers(ns: Connector | None, host: str, status_port: int, *, timeout: float = 2.0) -> int | None:
    """BusyWorkers from an Apache's mod_status (`?auto`), fetched from namespace `ns` (None: our own); None
    when the server does not say, or says something that is not a count (awcmp then keeps its weight)."""
    code, _, body = http_get(ns, host, status_port, "/server-status?auto", timeout=timeout)
    if code != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("BusyWorkers:"):
            value = line.split(":", 1)[1].strip()
            return int(value) if value.isdigit() else None  # what is not a count is no answer
    return None


class BusyWorkersProbe:
    """BusyWorkers of every server at once, within one deadline: what awcmp asks each period.

    Asked one after another, a server starved of CPU (a 0.15-core quota at load 0.9) holds up the probes of
    every server after it: with a timeout of 0.8 period each, a step took up to seven times that, and the
    agent skipped half its periods, acting on figures older than the simulator's. Here every server is asked
    in parallel and the step waits `deadline_s` at most; a server that has not answered by then counts as no
    answer (None), and awcmp keeps its weight. A late probe gives up on its own socket timeout, the same
    deadline, so threads never pile up over periods.
    """

    def __init__(self, hosts: list[str], port: int, *, deadline_s: float) -> None:
        self.hosts, self.port, self.deadline_s = hosts, port, deadline_s
        self._pool = ThreadPoolExecutor(max_workers=2 * max(1, len(hosts)), thread_name_prefix="probe")

    def _one(self, host: str) -> int | None:
        try:
            return busy_workers(None, host, self.port, timeout=self.deadline_s)
        except OSError:
            return None

    def __call__(self) -> list[int | None]:
        started = time.monotonic()
        futures = [self._pool.submit(self._one, host) for host in self.hosts]
        wait(futures, timeout=max(0.0, self.deadline_s - (time.monotonic() - started)))
        return [future.result() if future.done() else None for future in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
