"""A host reached over SSH (paramiko, key authentication): the executor of `kind: ssh` testbeds and of KVM
guests once they are up.

Safety, by construction:
- host keys are checked against a known_hosts file; an unknown host is refused unless the caller asked
  for `accept_new_host_keys` (then its key is recorded), and a changed key is always refused;
- commands are argv lists, joined with `shlex.join`, so a config value such as `srv1; rm -rf /` reaches
  the remote program as one literal argument and never as shell syntax.

`sock` lets the caller hand over an already connected socket (e.g. one made inside a network namespace by
`LocalNamespace.connect`), which is how the tests reach sshd running in a namespace.
"""

from __future__ import annotations

import fcntl
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import telling_line

__all__ = ["SshHost", "SshTarget", "SshProcess"]


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in."""

    host: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host's key and append it to known_hosts.

    Not paramiko's AutoAddPolicy: that rewrites the whole file from the keys its own client loaded, so
    hosts connected in parallel (deploy reaches every host at once) overwrite each other's new entries and
    the next connection finds its host unknown. Here each key is appended under a lock (threads) and an
    exclusive file lock (processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        line = paramiko.hostkeys.HostKeyEntry([hostname], key).to_line()
        with _KNOWN_HOSTS_LOCK, open(self.path, "a") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(line)


_KNOWN_HOSTS_LOCK = threading.Lock()


class SshHost:
    """One connection to one host; `run` executes an argv there."""

    def __init__(
        self,
        target: SshTarget,
        *,
        accept_new_host_keys: bool = False,
        sock: socket.socket | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.name = f"{target.user}@{target.host}:{target.port}"
        known_hosts = target.known_hosts.expanduser()
        client = paramiko.SSHClient()
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        if accept_new_host_keys:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            known_hosts.touch(exist_ok=True)
            client.set_missing_host_key_policy(_RecordNewHostKey(known_hosts))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                target.host,
                port=target.port,
                username=target.user,
                key_filename=str(target.key_file) if target.key_file else None,
                look_for_keys=target.key_file is None,
                allow_agent=False,
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except paramiko.BadHostKeyException:
            client.close()
            raise TestbedError(
                f"{self.name}: host key differs from {known_hosts}",
                hint="the host was reinstalled, or this is not the host you think; check before removing the entry",
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise TestbedError(
                    f"{self.name}: unknown host key (not in {known_hosts})",
                    hint="verify the host, then pass --accept-new-host-keys to record its key",
                ) from None
            raise TestbedError(f"{self.name}: SSH failed: {exc}") from None
        except OSError as exc:
            client.close()
            raise TestbedError(f"{self.name}: cannot connect: {exc.strerror or exc}") from None
        self.client = client

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on the host (quoted with shlex.join); on failure raise a `TestbedError` with its output."""
        command = shlex.join(argv)
        try:
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            if input is not None:
                stdin.write(input)
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except TimeoutError:
            raise TestbedError(f"{self.name}: `{command}` did not finish within {timeout:.0f} s") from None
        except (paramiko.SSHException, OSError) as exc:
            raise TestbedError(f"{self.name}: `{command}` failed: {exc}") from None
        if check and code != 0:
            raise TestbedError(f"{self.name}: `{command}` failed with exit {code}: {telling_line(err or out)}")
        return subprocess.CompletedProcess(list(argv), code, out, err)

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to `remote` on the host (SFTP, streamed: dumps can be large), replacing it
        atomically (upload, then rename)."""
        self._upload(remote, lambda sftp, partial: sftp.put(str(local), partial, confirm=True))

    def put_bytes(self, data: bytes, remote: str, *, mode: int | None = None) -> None:
        """Write `data` to the file `remote` on the host, atomically; its directory must exist. `mode`: set
        before any byte is written (a secret is never readable by others, not even for a moment)."""

        def write(sftp: paramiko.SFTPClient, partial: str) -> None:
            with sftp.open(partial, "wb") as handle:
                if mode is not None:
                    handle.chmod(mode)
                handle.set_pipelined(True)
                handle.write(data)

        self._upload(remote, write)

    def _upload(self, remote: str, write: Callable[[paramiko.SFTPClient, str], object]) -> None:
        partial = f"{remote}.partial"
        try:
            with self.client.open_sftp() as sftp:
                write(sftp, partial)
                sftp.posix_rename(partial, remote)
        except (OSError, paramiko.SSHException) as exc:
            raise TestbedError(f"{self.name}: cannot write {remote}: {exc}") from None

    def get_bytes(self, remote: str) -> bytes | None:
        """The content of the file `remote` on the host (SFTP), or None when it does not exist."""
        try:
            with self.client.open_sftp() as sftp, sftp.open(remote, "rb") as handle:
                handle.prefetch()
                return handle.read()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as exc:
            raise TestbedError(f"{self.name}: cannot read {remote}: {exc}") from None

    def monotonic_offset(self, python: str) -> float:
        """What to add to the host's CLOCK_MONOTONIC to get this machine's, read over SSH with `python`
        there (error: about half a round trip, a few ms on a LAN)."""
        before = time.monotonic()
        remote = float(self.run([python, "-c", "import time; print(time.monotonic())"]).stdout)
        return (before + time.monotonic()) / 2 - remote

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SshHost:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SshProcess:
    """A command running on an SSH host, with the `Popen` methods the run uses. The remote shell prints its
    pid first and then execs the command, so signals go to the command itself (`kill -TERM <pid>`).

    The command's stdin is the session, held open here: when this process dies, sshd closes it, and a
    marllb process started this way (`MARLLB_EXIT_ON_STDIN_EOF`) stops instead of running on unattended."""

    def __init__(self, ssh: SshHost, argv: Sequence[str], log: str) -> None:
        self.ssh = ssh
        script = f"echo $$; MARLLB_EXIT_ON_STDIN_EOF=1 exec {shlex.join(argv)} 2>{shlex.quote(log)}"
        try:
            self.stdin, out, _ = ssh.client.exec_command(shlex.join(["sh", "-c", script]))
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
