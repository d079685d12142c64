"""A node on this machine: `LocalHost` is the machine itself (a `kind: ssh` node running `marllb node`),
`LocalNamespace` one network namespace of a local testbed. Both offer the same operations, so the code that
sets a node up is written once and runs in either.

In a namespace, commands run through `ip netns exec` (argv lists, never shell strings). Python code that must
live in the namespace — sockets for probes, /proc/sys/net writes — runs in a short-lived thread that has
entered it with setns(2): the setns is per thread, so the calling thread never changes namespace, and a
socket keeps the namespace it was created in after the thread exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from marllb_cli.errors import TestbedError
from marllb_cli.processes import track_popen

__all__ = ["LocalHost", "LocalNamespace", "host_for", "list_namespaces", "NETNS_DIR", "sysctl_path", "telling_line"]

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def list_namespaces() -> set[str]:
    """Names of the named network namespaces on this machine."""
    from pyroute2 import netns  # here, not at import: `marllb status` of an absent testbed never needs it

    return set(netns.listnetns())


def sysctl_path(key: str) -> Path:
    """A sysctl key as its /proc/sys path. Keys are dotted (`net.ipv4.ip_forward`) or, where a name holds a
    dot of its own (a VLAN interface `eth0.100`), slashed (`net/ipv4/conf/eth0.100/arp_ignore`), as
    sysctl(8) accepts both."""
    return Path("/proc/sys") / (key if "/" in key else key.replace(".", "/"))


def host_for(namespace: str) -> LocalHost:
    """The node a topology names: its namespace, or this machine itself when it names none (`kind: ssh`)."""
    return LocalNamespace(namespace) if namespace else LocalHost()


class LocalHost:
    """Run commands and Python callables on this machine, in the caller's own network namespace."""

    name = "localhost"

    def __repr__(self) -> str:
        return "LocalHost()"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as it must be run to execute on this node."""
        return list(argv)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on this node; here, directly."""
        return fn(*args)

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion on the node; on failure raise `TestbedError` with its output."""
        try:
            result = subprocess.run(
                self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False, input=input
            )
        except subprocess.TimeoutExpired:
            raise TestbedError(f"{self.name}: `{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise TestbedError(
                f"{self.name}: `{' '.join(argv)}` failed with exit {result.returncode}: "
                f"{telling_line(result.stderr or result.stdout)}"
            )
        return result

    def popen(
        self, argv: Sequence[str], *, preexec_fn: Callable[[], None] | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """Start a long-running command on the node, in a session of its own (no terminal signals)."""
        process = subprocess.Popen(self.argv(argv), preexec_fn=preexec_fn, start_new_session=True, **kwargs)
        return track_popen(process)  # its exit status is the handle's (`processes.kill_pids`)

    def sysctl(self, key: str, value: int | str) -> None:
        """Set a per-namespace sysctl (`net.ipv4.ip_forward`) and read it back to confirm it took."""
        path = sysctl_path(key)

        def write_and_read() -> str:
            path.write_text(f"{value}\n")
            return path.read_text().strip()

        try:
            got = self.call(write_and_read)
        except OSError as exc:
            raise TestbedError(f"{self.name}: cannot set {key}={value}: {exc.strerror}") from None
        if got.split() != str(value).split():
            raise TestbedError(f"{self.name}: set {key}={value} but the kernel reports {got}")

    def connect(self, address: str, port: int, *, timeout: float = 2.0) -> socket.socket:
        """A TCP socket created on the node (inside its namespace) and connected to `address:port`."""

        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((address, port))
            except OSError:
                sock.close()
                raise
            return sock

        return self.call(open_socket)


class LocalNamespace(LocalHost):
    """Run commands and Python callables inside the named network namespace `name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"LocalNamespace({self.name!r})"

    # -- lifecycle -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def create(self) -> None:
        """`ip netns add`, killed with us: a helper that outlived a killed deploy (pyroute2 creates namespaces
        in a forked child) could finish creating the namespace after the next deploy cleaned up, and leave
        it behind as a namespace no manifest lists."""
        from marllb_cli.processes import die_with_parent

        result = subprocess.run(
            ["ip", "netns", "add", self.name],
            capture_output=True,
            text=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            raise TestbedError(f"cannot create namespace {self.name}: {result.stderr.strip() or 'no output'}")

    def remove(self) -> None:
        """Delete the namespace; its interfaces go with it once no process is left inside."""
        if self.exists():
            from pyroute2 import netns

            netns.remove(self.name)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one (they were started inside it, so they are ours)."""
        result = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(pid) for pid in result.stdout.split()]

    # -- commands --------------------------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    # -- Python inside the namespace -------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a thread that has entered this namespace; return its result or raise its error."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(NETNS_DIR / self.name, os.O_RDONLY)
            except FileNotFoundError:
                outcome["error"] = TestbedError(f"namespace {self.name} does not exist")
                return
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    outcome["error"] = TestbedError(f"setns({self.name}) failed: {os.strerror(err)}")
                    return
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc
            finally:
                os.close(fd)

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def telling_line(output: str) -> str:
    """The line of a failed command's output that says what went wrong: the last one naming an error (nft
    and many tools print the error, then the offending input and a `^^^` marker under it), else the last.
    A usage box (typer) is read without its frame, whose title is the bare word "Error"."""
    lines = [line.strip(" \t│╭╮╰╯─") for line in output.strip().splitlines()]
    lines = [line for line in lines if line and line.lower() != "error"]
    for line in reversed(lines):
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no output"
