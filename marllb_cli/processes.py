"""Stopping processes that marllb started, found through something we own (a cgroup, a namespace)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

from marllb_cli.errors import TestbedError

__all__ = [
    "become_subreaper",
    "die_with_parent",
    "exit_status",
    "is_running",
    "kill_pids",
    "reap_exited",
    "run_checked",
    "track_popen",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER). Apache
    daemonises: a master killed during a failed start would otherwise be a zombie that only the machine's
    init may reap, and some inits reap late; until then its cgroup cannot be removed. As reaper, teardown
    reaps it itself (`cgroups._reap_exited_children`)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


#: The `subprocess.Popen` handles of the long-running children this process started (`LocalHost.popen`), by pid,
#: kept until they have exited and a later child is started. One registry for three needs: `kill_pids` leaves
#: these children's exit status to their handle (a reap there would leave it "exited 0" whatever happened);
#: `exit_status` says how a service ended; and a caller may drop a handle of a process meant to outlive it.
_children: dict[int, subprocess.Popen] = {}


def track_popen(process: subprocess.Popen) -> subprocess.Popen:
    """Remember a child started here; forget (and reap, through their handles) those that have exited."""
    for pid in [pid for pid, known in _children.items() if known.poll() is not None]:
        del _children[pid]
    _children[process.pid] = process
    return process


def exit_status(pid: int) -> str | None:
    """How child `pid` ended, if this process started it (`track_popen`) and it has: "exited with status N"
    or "was killed by SIGNAME"; None while it runs, or when it is not a child we hold a handle of."""
    process = _children.get(pid)
    if process is None or process.poll() is None:
        return None
    code = process.returncode
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def reap_exited(pids: Iterable[int]) -> set[int]:
    """Reap those of `pids` that are exited children of this process; returns the pids that need no more
    watching (reaped now, or not a child of ours: another process reaps them).

    As subreaper, a long-lived command (a sweep, `train --env testbed`, a test session) inherits every Apache
    master that a graceful stop lets exit, and without this would keep one zombie per server restart until it
    exits. Reaped by pid, never `waitpid(-1)`, which could take the exit status of a child that a
    `subprocess.Popen` elsewhere in this process still waits for."""
    done = set()
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                done.add(pid)
        except ChildProcessError:
            done.add(pid)
    return done


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` when this process dies (prctl PR_SET_PDEATHSIG, kept across
    exec), and gets it at once if this process died before the child got that far."""

    def arm() -> None:
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return arm


def run_checked(argv: Sequence[str], what: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a build step on this machine; a failure or timeout is one `TestbedError` naming `what` and the
    last line the step printed."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{what} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise TestbedError(f"{what} failed with exit {result.returncode}: {lines[-1] if lines else 'no output'}")
    return result


def kill_pids(list_pids: Callable[[], list[int]], *, grace_s: float = 3.0) -> None:
    """SIGTERM every pid `list_pids()` returns, wait up to `grace_s`, then SIGKILL what is left.

    `list_pids` is called again after each round, so children forked meanwhile are caught too. The killed
    processes that became this process's children (orphans it inherited as subreaper: Apache's workers and
    masters, a dataplane whose launcher died) are reaped here; a long-lived controller (a sweep, a test session)
    kept each as a zombie until it exited. Children with a `Popen` handle (`track_popen`) are left to it.
    """
    signalled: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list_pids():
            signalled.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while list_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not list_pids():
            _wait_reaped(signalled, grace_s)
            reap_exited(pid for pid in signalled if pid not in _children)
            return
    raise TestbedError(f"processes survived SIGKILL: {list_pids()}")


def _wait_reaped(pids: set[int], grace_s: float) -> None:
    """Wait until the killed processes have exited (gone, or a zombie that only waits for its parent to reap it)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.02)


def is_running(pid: int) -> bool:
    """Whether `pid` runs: exists and is neither a zombie nor dead."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - tiny procfs read
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces or ')'.
    return stat[stat.rindex(")") + 2] not in "ZX"
