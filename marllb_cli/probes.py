"""Plain HTTP probes of a testbed's servers: one GET, and Apache's BusyWorkers from mod_status.

Used wherever a server is asked how it is: `marllb status`, the awcmp agent (every period, from the LB's
namespace), the busy-worker sampler on the client node, and `marllb node status` on a server host. Only the
standard library, so the processes that probe start fast.
"""

from __future__ import annotations

import http.client
import socket
from typing import Protocol

__all__ = ["Connector", "busy_workers", "http_get"]


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
