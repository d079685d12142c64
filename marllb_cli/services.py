"""Long-running marllb processes on testbed nodes (dataplanes, agents, GRE terminators).

A service is remembered by pid *and* kernel start time (field 22 of /proc/<pid>/stat), so stopping it
later never signals an unrelated process that happens to reuse the pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from marllb_cli.hosts.local import LocalHost
from marllb_cli.processes import exit_status

__all__ = [
    "EXIT_ON_STDIN_EOF",
    "PID_SUFFIX",
    "Service",
    "exit_on_stdin_eof",
    "start_process",
    "start_service",
    "stop_recorded_clients",
    "until_signalled",
]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is parenthesised and may hold spaces or ')': split after the last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 overall; fields[0] is field 3 (state)


@dataclass(frozen=True)
class Service:
    """One background process we started: its name, pid, start time and log file."""

    name: str
    pid: int
    start_time: int
    log: str

    def as_record(self) -> dict:
        """What a manifest keeps of the service, besides its name."""
        return {"pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_record(cls, name: str, data: dict) -> Service:
        """The service a manifest record describes (records may carry extra keys, such as the LB)."""
        return cls(name, data["pid"], data["start_time"], data["log"])

    def running(self) -> bool:
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] not in "ZX" and int(fields[19]) == self.start_time

    def stop(self, *, grace_s: float = 5.0) -> None:
        """SIGTERM, wait up to `grace_s` for a clean exit, then SIGKILL."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
            if not self.running():
                return
            os.kill(self.pid, sig)
            deadline = time.monotonic() + wait_s
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)

    def log_tail(self, lines: int = 5, *, since: int = 0) -> str:
        """The last `lines` lines of the log, of what was written after byte `since` (a log is appended to
        by every start of the service: `since` keeps a previous run's last words out of this one's)."""
        try:
            with open(self.log, "rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def exit_status(self) -> str | None:
        """How the service ended, when this process started it and it has: "exited with status N" or
        "was killed by SIGNAME"; None while it runs or when another process started it."""
        return exit_status(self.pid)


def start_service(ns: LocalHost, name: str, module: str, args: Sequence[str], log: Path) -> Service:
    """Start `python -m module args…` on node `ns` (a namespace, or this host), detached, with stdout and
    stderr appended to `log`."""
    return start_process(ns, name, [sys.executable, "-m", module, *args], log)


def start_process(
    ns: LocalHost, name: str, argv: Sequence[str], log: Path, *, preexec_fn: Callable[[], None] | None = None
) -> Service:
    """Start `argv` on node `ns`, detached, output appended to `log`; remembered by pid and start time.
    `preexec_fn` runs in the child before exec (e.g. joining a CPU cgroup, which its children inherit)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = ns.popen(argv, preexec_fn=preexec_fn, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    start_time = None
    deadline = time.monotonic() + 2.0
    while start_time is None and time.monotonic() < deadline:
        start_time = _start_time(process.pid)
    return Service(name, process.pid, start_time or 0, str(log))


#: Set by a controller that starts a process over SSH: the process stops when its stdin closes.
EXIT_ON_STDIN_EOF = "MARLLB_EXIT_ON_STDIN_EOF"


#: Beside a remote replayer's or sampler's spec: `<spec>.pid`, its pid and start time.
PID_SUFFIX = ".pid"


def exit_on_stdin_eof(spec: Path) -> None:
    """When `$MARLLB_EXIT_ON_STDIN_EOF` is set, SIGTERM this process once its stdin reaches end of file, and
    record it beside its spec (`<spec>.pid`).

    A process the controller started over SSH has the session's channel as stdin. If the controller dies,
    sshd closes the session and stdin ends: the replayer then stops sending and the sampler stops probing,
    as a local child does when its parent dies (`processes.die_with_parent`). A controller whose machine
    vanished without closing the connection leaves the session open; the record lets the next
    `replay-trace` or `teardown` stop what it left (`stop_recorded_clients`)."""
    if not os.environ.get(EXIT_ON_STDIN_EOF):
        return
    pid = os.getpid()
    record = Service(spec.name, pid, _start_time(pid) or 0, "").as_record()
    spec.with_name(spec.name + PID_SUFFIX).write_text(json.dumps(record))

    def watch() -> None:
        # The raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader would hold its
        # lock when the process exits normally, and the interpreter aborts at shutdown.
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def next_tick(previous: float, period: float, now: float) -> float:
    """For a loop paced every `period` on CLOCK_MONOTONIC: the tick after `previous`, or, when the loop overran,
    the next one after `now` (the missed ticks are skipped instead of bunching up)."""
    tick = previous + period
    if tick < now:
        tick += period * ((now - tick) // period + 1)
    return tick


def until_signalled() -> Callable[[], bool]:
    """For a service's main loop: a function that is true until SIGTERM or SIGINT arrives.

    The handler only sets a flag, so the loop finishes its current step and exits cleanly (logs flushed,
    shared memory unmapped) instead of dying mid-write.
    """
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    return lambda: not stopped.is_set()


def stop_recorded_clients(runs: Path) -> int:
    """Stop the replayers and samplers recorded under `runs/*/` (`exit_on_stdin_eof`) that still run: a
    previous controller's leftovers. The start time in each record keeps a reused pid safe. Returns how many
    it stopped."""
    stopped = 0
    for record in sorted(runs.glob(f"*/*{PID_SUFFIX}")):
        try:
            data = json.loads(record.read_text())
            service = Service.from_record(record.name, {**data, "log": ""})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record half-written by a process killed at once: nothing ran long enough to matter
        if service.running():
            service.stop(grace_s=5.0)
            stopped += 1
        record.unlink(missing_ok=True)
    return stopped
