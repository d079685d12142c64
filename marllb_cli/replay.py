"""The open-loop replayer: two processes in the client namespace that send every request of a schedule at its
intended time, on a new TCP connection, without ever waiting for earlier responses. The sender only starts
connections at their times (`Sender`); the receiver, an event loop, finishes each request and records it.

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
import gc
import json
import math
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from marllb_cli.processes import die_with_parent
from marllb_cli.services import exit_on_stdin_eof

__all__ = ["ReplaySpec", "ROW_FIELDS", "Replayer", "Sender", "main", "read_schedule", "write_schedule"]

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
        description="The sender wakes this long before each send and busy-waits the rest: the kernel's wake-up "
        "latency is absorbed, at the cost of a core spinning up to spin_s × rate of each second "
        "(`marllb bench replay`).",
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


#: One message from the sender to the receiver: the request's index, how late its SYN left, and the errno that
#: stopped its connect (0: the connection's descriptor travels with the message, SCM_RIGHTS).
_MESSAGE = struct.Struct("=qdi")
#: The index of the sender's last message: everything was sent.
_ALL_SENT = -1
_PR_SET_TIMERSLACK = 29


class Sender:
    """The process that starts every request's TCP connection at its intended time, and nothing else.

    Why a process of its own: in the event loop that also reads the responses, a send waited behind every
    response that was ready when its time came, and behind the loop's own wake-up (asyncio sleeps in epoll's
    whole milliseconds): p99 send lag 1–2.5 ms at 1 000 requests/s even with a timerfd pacer and a spin. This
    process only sleeps, connects and hands the connecting socket to the receiver over a Unix socket, so its
    lag is the kernel's wake-up latency (`marllb bench replay`). Forked before the receiver's loop or any
    thread starts; it dies with the receiver (PR_SET_PDEATHSIG)."""

    def __init__(self, pid: int, channel: socket.socket, *, realtime: bool) -> None:
        self.pid = pid
        self.channel = channel
        self.realtime = realtime  # SCHED_FIFO (`_make_realtime`), recorded in the run's meta

    @classmethod
    def start(cls, intended: np.ndarray, t0: float, spin_s: float, family: int, address: tuple) -> Sender:
        """Fork the sender; the receiver keeps the returned end of the channel (non-blocking)."""
        receiver_end, sender_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the sender: never returns
            code = 1
            try:
                receiver_end.close()
                die_with_parent(signal.SIGKILL)()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)  # stopped means stopped: the receiver records the rest
                _send_schedule(intended, t0, spin_s, family, address, sender_end)
                code = 0
            except BaseException:  # noqa: BLE001 - the receiver sees the channel end; the log says why
                traceback.print_exc()
            finally:
                os._exit(code)
        sender_end.close()
        receiver_end.setblocking(False)
        return cls(pid, receiver_end, realtime=_make_realtime(pid))  # before t0: the sender sleeps LEAD_S first

    def stop(self) -> None:
        """Stop sending (the receiver still reads what was sent before)."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Wait for the sender's exit, killing it if it does not go within a second."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                return
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _make_realtime(pid: int) -> bool:
    """Give the sender the lowest real-time priority (SCHED_FIFO 1) where allowed (root, and a cgroup with
    real-time time). Then its wake-up preempts whatever runs on its core at once: under CFS/EEVDF a woken
    normal task waited for the running one's slice, and its p99 send lag was 1–2 ms at 1 000 requests/s on a
    shared core against ≈ 0.1 ms now (`marllb bench replay`). It only sleeps, connects and hands over, and
    the kernel's real-time throttling keeps 5 % of each core for others whatever it does."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    return True


def _send_schedule(
    intended: np.ndarray, t0: float, spin_s: float, family: int, address: tuple, channel: socket.socket
) -> None:
    """The sender's loop: sleep until `spin_s` before each intended time, busy-wait the rest, connect."""
    gc.disable()  # nothing here makes cycles, and a collection would be a late send
    # The kernel may delay a sleeper's wake-up by its timer slack (50 µs by default) to batch timers.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    for index, at in enumerate(intended.tolist()):
        deadline = t0 + at
        if (wait := deadline - spin_s - time.monotonic()) > 0:
            time.sleep(wait)
        while time.monotonic() < deadline:
            pass
        lag = time.monotonic() - deadline
        connection = _connect(family, address)
        if isinstance(connection, OSError):
            channel.send(_MESSAGE.pack(index, lag, connection.errno or errno.EIO))
        else:
            socket.send_fds(channel, [_MESSAGE.pack(index, lag, 0)], [connection.fileno()])
            connection.close()
    channel.send(_MESSAGE.pack(_ALL_SENT, 0.0, 0))


def _connect(family: int, address: tuple) -> socket.socket | OSError:
    """Start a TCP connection now: the SYN leaves here. Returns the connecting socket, or the error that
    stopped it (the receiver records it as the request's error)."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return exc
    sock.setblocking(False)
    code = sock.connect_ex(address)
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        return OSError(code, os.strerror(code))
    return sock


class Replayer:
    """Receives each connection the `Sender` started, finishes its request, records one row per request and
    reports progress."""

    def __init__(self, spec: ReplaySpec, intended: np.ndarray, paths: list[str], sender: Sender, t0: float) -> None:
        self.spec = spec
        self.intended = intended
        self.requests = [f"GET {p} HTTP/1.1\r\nHost: {spec.host}\r\nConnection: close\r\n\r\n".encode() for p in paths]
        self.sender = sender
        self.t0 = t0
        self.pending_rows: list[tuple] = []
        self.lags: list[float] = []
        self.sent = self.done = self.errors = 0
        self.stopping = asyncio.Event()

    async def run(self) -> bool:
        """Replay everything (True) or until stopped (False)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        in_flight: set[asyncio.Task] = set()
        all_sent: asyncio.Future[bool] = loop.create_future()  # True: the sender's last message; False: it ended
        loop.add_reader(self.sender.channel.fileno(), self._receive, in_flight, all_sent)
        with open(self.spec.out, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(ROW_FIELDS)
            reporter = asyncio.create_task(self._report_and_flush(writer, out))
            stopped = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([all_sent, stopped], return_when=asyncio.FIRST_COMPLETED)
            finished = all_sent.done() and all_sent.result() and not self.stopping.is_set()
            if not finished:
                self.sender.stop()
                await all_sent  # the end of the channel: every connection already started has its task
                for task in in_flight:
                    task.cancel()
            stopped.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
            reporter.cancel()
            self._flush(writer, out)
            self._progress(final=True, finished=finished)
        loop.remove_reader(self.sender.channel.fileno())
        self.sender.reap()
        self.sender.channel.close()
        return finished

    def _receive(self, in_flight: set[asyncio.Task], all_sent: asyncio.Future[bool]) -> None:
        """Start a task for each connection the sender handed over; resolve `all_sent` at its last message or
        at the end of the channel (the sender stopped or died)."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sender.channel, _MESSAGE.size, 1)
            except BlockingIOError:
                return
            if not data:
                asyncio.get_running_loop().remove_reader(self.sender.channel.fileno())
                if not all_sent.done():
                    all_sent.set_result(False)
                return
            index, lag, code = _MESSAGE.unpack(data)
            if index == _ALL_SENT:
                if not all_sent.done():
                    all_sent.set_result(True)
                continue
            if not fds and not code:  # its descriptor did not fit under this process's limit
                code = errno.EMFILE
            connection = socket.socket(fileno=fds[0]) if fds else OSError(code, os.strerror(code))
            task = asyncio.create_task(self._fetch(index, lag, connection))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def _fetch(self, index: int, lag: float, connection: socket.socket | OSError) -> None:
        """Finish the request whose connection the sender started (`lag`: how late its SYN left) and record
        its row."""
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
    # Resolved once, before the fork: every request connects to the same address.
    family, _, _, _, address = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)[0]
    t0 = time.monotonic() + LEAD_S
    sender = Sender.start(intended, t0, spec.spin_s, family, address)  # before any thread or event loop
    replayer = Replayer(spec, intended, paths, sender, t0)
    exit_on_stdin_eof(args.spec)
    print(json.dumps({"loop": name, "sender": "realtime" if sender.realtime else "normal"}), flush=True)
    runner = asyncio.Runner(loop_factory=loop_class) if loop_class else asyncio.Runner()
    with runner:
        finished = runner.run(replayer.run())
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
