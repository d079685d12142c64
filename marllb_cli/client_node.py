"""Where a run's client-side processes — the replayer and the busy-worker sampler — run: the client namespace
on this machine (`kind: local` and `kvm`), or the client host over SSH (`kind: ssh`).

Both sides offer the same few operations, so `experiment.replay_trace` has one path for every kind:

    staging   the directory on the client node for the run's input and output files
    upload    a file of the run directory to the client node (a no-op locally: it is the same file)
    download  a file back into the run directory (likewise)
    start     a long-running `python -m …` there, its stdout a stream of lines, its stderr into a log there
    offset    what to add to the client node's CLOCK_MONOTONIC to get this machine's (0 locally), so the
              replayer's times line up with the LB agents' step logs (which are on this machine's clock)
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

import paramiko

from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.hosts.ssh import SshHost

__all__ = ["ClientNode", "ClientProcess", "LocalClient", "SshClient", "stop_process"]


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
        with open(log, "w") as stderr:
            return self.ns.popen(
                [self.python, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )


class SshClient:
    """The client host of a `kind: ssh` testbed, over its own SSH connection; `python` is its marllb venv."""

    def __init__(self, ssh: SshHost, python: str, state: str) -> None:
        self.ssh, self.python, self.state = ssh, python, state
        self.offset = ssh.monotonic_offset(python)
        self._staged: list[str] = []

    def staging(self, run: Path) -> str:
        remote = f"{self.state}/runs/{run.name}"
        self.ssh.run(["mkdir", "-p", remote])
        self._staged.append(remote)
        return remote

    def close(self) -> None:
        """Remove the staged files from the host (their results are in the run directory by now)."""
        try:
            for remote in self._staged:
                self.ssh.run(["rm", "-rf", remote], check=False)
        except TestbedError:
            pass  # the host went away; `marllb teardown` removes the state directory with the rest
        self.ssh.close()

    def upload(self, local: Path, remote: str) -> None:
        self.ssh.put(local, remote)

    def download(self, remote: str, local: Path) -> bool:
        content = self.ssh.get_bytes(remote)
        if content is None:
            return False
        local.write_bytes(content)
        return True

    def start(self, module: str, args: Sequence[str], log: str) -> ClientProcess:
        return SshProcess(self.ssh, [self.python, "-m", module, *args], log)


class SshProcess:
    """A command running on an SSH host, with the `Popen` methods the run uses. The remote shell prints its
    pid first and then execs the command, so signals go to the command itself (`kill -TERM <pid>`)."""

    def __init__(self, ssh: SshHost, argv: Sequence[str], log: str) -> None:
        self.ssh = ssh
        script = f"echo $$; exec {shlex.join(argv)} 2>{shlex.quote(log)}"
        try:
            _, out, _ = ssh.client.exec_command(shlex.join(["sh", "-c", script]))
            self.channel = out.channel
            self.pid = int(out.readline())
        except (paramiko.SSHException, OSError, ValueError) as exc:
            raise TestbedError(f"{ssh.name}: cannot start `{shlex.join(argv)}`: {exc}") from None
        self.stdout: Iterator[str] = iter(out)

    def poll(self) -> int | None:
        return self.channel.recv_exit_status() if self.channel.exit_status_ready() else None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid} on {self.ssh.name}", timeout or 0.0)
            time.sleep(0.05)
        return self.channel.recv_exit_status()

    def send_signal(self, sig: int) -> None:
        self.ssh.run(["kill", f"-{signal.Signals(sig).name.removeprefix('SIG')}", str(self.pid)], check=False)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
