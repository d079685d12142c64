"""Where a run's client-side processes — the replayer and the busy-worker sampler — run: the client namespace
on this machine (`kind: local` and `kvm`, `LocalClient` here), or the client host over SSH (`kind: ssh`,
`deploy.ssh.SshClient`). A testbed hands out its own (`Testbed.client()`).

Both sides offer the same few operations, so `experiment.replay_trace` has one path for every kind:

    staging   the directory on the client node for the run's input and output files
    upload    a file of the run directory to the client node (a no-op locally: it is the same file)
    download  a file back into the run directory (likewise)
    start     a long-running `python -m …` there, its stdout a stream of lines, its stderr into a log there
    offset    what to add to the client node's CLOCK_MONOTONIC to get this machine's (0 locally), so the
              replayer's times line up with the LB agents' step logs (which are on this machine's clock)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.processes import die_with_parent

__all__ = ["ClientNode", "ClientProcess", "LocalClient", "stop_process"]


class ClientProcess(Protocol):
    """The part of `subprocess.Popen` the run uses (text stdout)."""

    stdout: Iterator[str] | IO[str] | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ClientNode(Protocol):
    python: str
    offset: float

    def staging(self, run: Path) -> str: ...
    def upload(self, local: Path, remote: str) -> None: ...
    def download(self, remote: str, local: Path) -> bool: ...
    def start(self, module: str, args: Sequence[str], log: str) -> ClientProcess: ...
    def close(self) -> None: ...


def stop_process(process: ClientProcess, grace_s: float) -> None:
    """SIGTERM (the replayer and sampler flush and exit), up to `grace_s` to do so, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalClient:
    """The client namespace of a local or KVM testbed: the run directory itself is the staging area."""

    python = sys.executable
    offset = 0.0

    def __init__(self, ns: LocalNamespace) -> None:
        self.ns = ns

    def staging(self, run: Path) -> str:
        return str(run)

    def upload(self, local: Path, remote: str) -> None:
        if Path(remote) != local:
            shutil.copy(local, remote)

    def download(self, remote: str, local: Path) -> bool:
        if Path(remote) != local and Path(remote).exists():
            shutil.copy(remote, local)
        return local.exists()

    def close(self) -> None:
        pass  # the staging area is the run directory: nothing to clean

    def start(self, module: str, args: Sequence[str], log: str) -> ClientProcess:
        """Start `module`; it gets SIGTERM when this process dies (`die_with_parent`), so a controller killed
        mid-run (even by SIGKILL) leaves no replayer sending the rest of its schedule, and no sampler."""
        with open(log, "w") as stderr:
            return self.ns.popen(
                [self.python, "-m", module, *args],
                preexec_fn=die_with_parent(signal.SIGTERM),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
