"""The open-loop replayer: one process in the client namespace that sends every request of a schedule at its
intended time, on a new TCP connection, without ever waiting for earlier responses.

    python -m marllb_cli.replay SPEC.json

Why open loop: a closed-loop client (wrk, ab) waits for a response before the next request, so a slow
server slows the offered load and hides its own latency ("coordinated omission"). Here the schedule is
fixed in advance, every latency is measured from the request's *intended* send time, and the time the
request actually left (`send_lag_s`) is recorded too, so a generator that fell behind is visible instead of
silently shifting the load.

Output, streamed so that a crash or Ctrl-C keeps what was recorded:
- `spec.out`: CSV, one row per request that was sent (`ROW_FIELDS`), appended every `flush_every_s`;
- stdout: one JSON line per `progress_every_s` with counters and the send-lag p99 so far, the first of
  which carries `t0` (CLOCK_MONOTONIC seconds of intended time 0, the clock the agents' step logs use).

SIGTERM or SIGINT stops sending; requests still in flight are recorded with error `interrupted`.
All timestamps are CLOCK_MONOTONIC seconds relative to `t0`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ctypes
import errno
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from marllb_cli.services import exit_on_stdin_eof

__all__ = ["Pacer", "ReplaySpec", "ROW_FIELDS", "Replayer", "main", "read_schedule", "write_schedule"]

ROW_FIELDS = (
    "index",
    "send_lag_s",
    "connect_s",
    "first_byte_s",
    "done_s",
    "status",
    "bytes",
    "server",
    "error",
)
#: How long after start-up intended time 0 lies: room to import, open files and warm the loop.
LEAD_S = 0.3


class ReplaySpec(BaseModel):
    """What one replayer process needs; written by `marllb replay-trace`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int = 80
    schedule: Path = Field(description="TSV of intended_s (sorted) and path (`write_schedule`).")
    out: Path
    timeout_s: float = 60.0
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    progress_every_s: float = 0.5
    flush_every_s: float = 0.25
    spin_s: float = Field(
        0.0,
        ge=0.0,
        le=0.01,
        description="Wake this long before each send and busy-wait the rest: the loop's wake-up latency is "
        "absorbed, at the cost of a core spinning up to spin_s × rate of each second (`marllb bench replay`).",
    )


def write_schedule(path: Path, intended: Sequence[float], paths: Sequence[str]) -> None:
    """The replayer's input: one `intended_s<TAB>path` line per request. A plain file rather than Parquet,
    so the replayer runs on a client host whose venv has no pandas (`kind: ssh`); repr keeps every float."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerows((repr(float(t)), p) for t, p in zip(intended, paths, strict=True))


def read_schedule(path: Path) -> tuple[np.ndarray, list[str]]:
    """(intended times, paths) as `write_schedule` wrote them."""
    with open(path, newline="") as rows:
        pairs = [(float(t), p) for t, p in csv.reader(rows, delimiter="\t")]
    return np.fromiter((t for t, _ in pairs), np.float64, len(pairs)), [p for _, p in pairs]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Pacer:
    """Wakes the event loop at a CLOCK_MONOTONIC deadline to within tens of microseconds.

    asyncio's timers sleep in epoll's whole milliseconds, so a send woke up to 1 ms late (p99 send lag
    1.3–1.8 ms at 1 000–2 000 requests/s). A timerfd armed at the deadline (an hrtimer) makes epoll return
    when it fires, whatever the loop's own timeout, and costs no CPU while waiting (no spinning beside the
    servers of a local testbed). Where timerfd is missing, the loop's own timers do (`precise` is False)."""

    _CLOCK_MONOTONIC, _TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1

    def __init__(self) -> None:
        self.fd = -1
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self.fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, self._TFD_NONBLOCK | self._TFD_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = -1
        self.precise = self.fd >= 0

    async def until(self, deadline: float, spin_s: float = 0.0) -> None:
        """Return at CLOCK_MONOTONIC `deadline` (seconds; `time.monotonic()`'s clock), or at once if past.

        With `spin_s`, sleep until `spin_s` before the deadline and busy-wait the rest: the loop then has that
        much slack to run whatever else became ready (responses) before this coroutine resumes."""
        await self._sleep_until(deadline - spin_s)
        while time.monotonic() < deadline:
            pass

    async def _sleep_until(self, deadline: float) -> None:
        if deadline <= time.monotonic():
            return
        if not self.precise:
            await asyncio.sleep(deadline - time.monotonic())
            return
        seconds = int(deadline)
        value = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, int((deadline - seconds) * 1e9)))
        if self._libc.timerfd_settime(self.fd, self._TFD_TIMER_ABSTIME, ctypes.byref(value), None) != 0:
            await asyncio.sleep(deadline - time.monotonic())
            return
        loop = asyncio.get_running_loop()
        fired = loop.create_future()

        def on_ready() -> None:
            try:
                os.read(self.fd, 8)
            except BlockingIOError:
                return  # woken early (a stale readiness): keep waiting
            if not fired.done():
                fired.set_result(None)

        loop.add_reader(self.fd, on_ready)
        try:
            await fired
        finally:
            loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Replayer:
    """Sends the schedule, records one row per request, reports progress."""

    def __init__(self, spec: ReplaySpec, intended: np.ndarray, paths: list[str]) -> None:
        self.spec = spec
        self.intended = intended
        self.requests = [f"GET {p} HTTP/1.1\r\nHost: {spec.host}\r\nConnection: close\r\n\r\n".encode() for p in paths]
        self.pending_rows: list[tuple] = []
        self.lags: list[float] = []
        self.sent = self.done = self.errors = 0
        self.stopping = asyncio.Event()
        self.t0 = 0.0
        self.pacer = Pacer()
        # Resolved once: every request connects to the same address, and the sender must not wait on a lookup.
        self.family, _, _, _, self.address = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)[0]

    async def run(self) -> bool:
        """Replay everything (True) or until stopped (False)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        in_flight: set[asyncio.Task] = set()
        with open(self.spec.out, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(ROW_FIELDS)
            self.t0 = time.monotonic() + LEAD_S
            reporter = asyncio.create_task(self._report_and_flush(writer, out))
            finished = await self._send_all(in_flight)
            if not finished:
                for task in in_flight:
                    task.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
            reporter.cancel()
            self._flush(writer, out)
            self._progress(final=True, finished=finished)
        self.pacer.close()
        return finished

    async def _send_all(self, in_flight: set[asyncio.Task]) -> bool:
        burst = 0
        for index, intended in enumerate(self.intended):
            if self.t0 + intended > time.monotonic():
                burst = 0
                while (delay := self.t0 + intended - time.monotonic()) > 0 and not self.stopping.is_set():
                    if delay > 0.1:
                        await self.pacer.until(time.monotonic() + 0.1)
                    else:
                        await self.pacer.until(self.t0 + intended, self.spec.spin_s)
            elif burst >= 64:  # far behind: still let responses be read now and then
                burst = 0
                await asyncio.sleep(0)
            burst += 1
            if self.stopping.is_set():
                return False
            lag = time.monotonic() - self.t0 - float(intended)
            task = asyncio.create_task(self._fetch(index, lag, self._connect()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        return True

    def _connect(self) -> socket.socket | OSError:
        """Start the request's TCP connection now, in the sender's own turn of the loop: the SYN leaves here.
        A task started with `open_connection` would connect only on a later turn, after whatever responses
        were ready, and that wait was most of the send lag. Returns the socket, or the error that stopped it
        (its task records it as the request's error)."""
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as exc:
            return exc
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return OSError(code, os.strerror(code))
        return sock

    async def _fetch(self, index: int, lag: float, connection: socket.socket | OSError) -> None:
        """Finish the request `_connect` started (`lag`: how late its SYN left) and record its row."""
        self.sent += 1
        self.lags.append(lag)
        connect = first_byte = done = math.nan
        status = size = 0
        server = error = ""
        writer = None
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                if isinstance(connection, OSError):
                    raise connection
                await _connected(connection)
                reader, writer = await asyncio.open_connection(sock=connection)
                connect = time.monotonic() - self.t0
                writer.write(self.requests[index])
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionResetError(errno.ECONNRESET, "closed before the response header")
                    if not head:
                        first_byte = time.monotonic() - self.t0
                    head += chunk
                header, _, body = head.partition(b"\r\n\r\n")
                status, server = _parse_header(header)
                size = len(body)
                while chunk := await reader.read(65536):
                    size += len(chunk)
                done = time.monotonic() - self.t0
        except TimeoutError:
            error = "timeout"
        except asyncio.CancelledError:
            error = "interrupted"
        except ValueError:
            error = "bad_response"
        except OSError as exc:
            error = errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()
        finally:
            if writer is not None and error:
                writer.transport.abort()
            elif writer is not None:
                writer.close()
            elif isinstance(connection, socket.socket):
                connection.close()
        if error or not 200 <= status < 400:
            self.errors += 1
        self.done += 1
        self.pending_rows.append((index, lag, connect, first_byte, done, status, size, server, error))

    async def _report_and_flush(self, writer, out) -> None:
        next_progress = 0.0
        while True:
            await asyncio.sleep(self.spec.flush_every_s)
            self._flush(writer, out)
            if time.monotonic() >= next_progress:
                self._progress()
                next_progress = time.monotonic() + self.spec.progress_every_s

    def _flush(self, writer, out) -> None:
        rows, self.pending_rows = self.pending_rows, []
        writer.writerows(rows)
        out.flush()

    def _progress(self, *, final: bool = False, finished: bool | None = None) -> None:
        lags = np.asarray(self.lags)
        line = {
            "t0": self.t0,
            "total": len(self.intended),
            "sent": self.sent,
            "done": self.done,
            "errors": self.errors,
            "lag_p99_s": float(np.quantile(lags, 0.99)) if len(lags) else 0.0,
            "lag_max_s": float(lags.max()) if len(lags) else 0.0,
        }
        if final:
            line.update(final=True, finished=finished)
        print(json.dumps(line), flush=True)


async def _connected(sock: socket.socket) -> None:
    """Wait until a non-blocking connect finishes (the socket turns writable); raise the error it ended in."""
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(sock.fileno())
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def _parse_header(header: bytes) -> tuple[int, str]:
    """(status, X-Server) of an HTTP response header block; ValueError if it is not HTTP."""
    lines = header.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(lines[0][:40])
    server = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-server":
            server = value.strip()
    return int(parts[1]), server


def _raise_fd_limit() -> None:
    """Every in-flight request holds a socket; an overloaded server can leave thousands open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _event_loop(choice: str) -> tuple[str, type[asyncio.AbstractEventLoop] | None]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop

            return "uvloop", uvloop.Loop
        except ImportError:
            if choice == "uvloop":
                raise
    return "asyncio", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-replay", description="open-loop HTTP replayer")
    parser.add_argument("spec", type=Path, help="ReplaySpec JSON written by `marllb replay-trace`")
    args = parser.parse_args(argv)
    spec = ReplaySpec.model_validate_json(args.spec.read_text())
    intended, paths = read_schedule(spec.schedule)
    _raise_fd_limit()
    name, loop_class = _event_loop(spec.loop)
    replayer = Replayer(spec, intended, paths)
    exit_on_stdin_eof(args.spec)
    print(json.dumps({"loop": name}), flush=True)
    runner = asyncio.Runner(loop_factory=loop_class) if loop_class else asyncio.Runner()
    with runner:
        finished = runner.run(replayer.run())
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
