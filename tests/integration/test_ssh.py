"""The SSH executor against a real sshd (Debian's openssh-server) running in a network namespace.

Two namespaces of our own (`mlbssh-c`, the client side, and `mlbssh-h`, the "remote" host), a veth
between them, sshd on 10.97.0.2:2222 with a throwaway host key and an authorized client key. The client
socket is made inside `mlbssh-c` and handed to paramiko, so nothing touches the machine's own network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from marllb_cli.errors import TestbedError
from marllb_cli.hosts import LocalNamespace
from marllb_cli.hosts.ssh import SshHost, SshTarget

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="openssh-server is not installed"),
]
CLIENT, HOST = "mlbssh-c", "mlbssh-h"
HOST_IP, PORT = "10.97.0.2", 2222
PRIVSEP = Path("/run/sshd")  # sshd refuses to start without its privilege-separation directory


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sshd")
    for ns in (CLIENT, HOST):
        assert not LocalNamespace(ns).exists(), f"namespace {ns} exists and is not ours"
    created_privsep = not PRIVSEP.exists()
    process = None
    try:
        for ns in (CLIENT, HOST):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", CLIENT, "link", "add", "c0", "type", "veth", "peer", "name", "h0", "netns", HOST)
        sh("ip", "-n", CLIENT, "addr", "add", "10.97.0.1/24", "dev", "c0")
        sh("ip", "-n", HOST, "addr", "add", f"{HOST_IP}/24", "dev", "h0")
        for ns, dev in ((CLIENT, "c0"), (HOST, "h0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client_key"))
        shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
        (tmp / "sshd_config").write_text(
            f"Port {PORT}\nListenAddress {HOST_IP}\nHostKey {tmp / 'host_key'}\nPidFile {tmp / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )
        PRIVSEP.mkdir(mode=0o755, exist_ok=True)
        process = LocalNamespace(HOST).popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                LocalNamespace(CLIENT).connect(HOST_IP, PORT).close()
                break
            except OSError:
                time.sleep(0.1)
        host_key = (tmp / "host_key.pub").read_text().split()
        yield {"tmp": tmp, "host_key_line": f"[{HOST_IP}]:{PORT} {host_key[0]} {host_key[1]}\n"}
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        for ns in (CLIENT, HOST):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if created_privsep:
            PRIVSEP.rmdir()
    assert not {CLIENT, HOST} & set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )


def target(sshd, known_hosts: Path) -> SshTarget:
    return SshTarget(host=HOST_IP, port=PORT, user="root", key_file=sshd["tmp"] / "client_key", known_hosts=known_hosts)


def connect(sshd, known_hosts: Path, **kwargs) -> SshHost:
    return SshHost(target(sshd, known_hosts), sock=LocalNamespace(CLIENT).connect(HOST_IP, PORT), **kwargs)


def test_unknown_host_keys_are_refused_unless_accepted(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(TestbedError, match="unknown host key") as refused:
        connect(sshd, known_hosts)
    assert "--accept-new-host-keys" in refused.value.one_line()
    with connect(sshd, known_hosts, accept_new_host_keys=True) as host:
        assert host.run(["hostname"]).returncode == 0
    recorded = known_hosts.read_text()
    assert f"[{HOST_IP}]:{PORT} ssh-ed25519" in recorded
    assert recorded.split()[2] == sshd["host_key_line"].split()[2]
    with connect(sshd, known_hosts) as host:  # now known: no flag needed
        assert host.run(["echo", "again"]).stdout == "again\n"


def test_a_changed_host_key_is_always_refused(sshd, tmp_path):
    other = tmp_path / "other"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other))
    known_hosts = tmp_path / "known_hosts"
    kind, key = (tmp_path / "other.pub").read_text().split()[:2]
    known_hosts.write_text(f"[{HOST_IP}]:{PORT} {kind} {key}\n")
    for accept in (False, True):
        with pytest.raises(TestbedError, match="host key differs"):
            connect(sshd, known_hosts, accept_new_host_keys=accept)


def test_config_values_cannot_inject_shell_commands(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd["host_key_line"])
    marker = Path("/tmp/marllb-ssh-injected")
    marker.unlink(missing_ok=True)
    hostile = [
        f"srv1; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"srv1 && touch {marker} || touch {marker}",
        f"srv1\ntouch {marker}",
        f"'; touch {marker}; '",
    ]
    with connect(sshd, known_hosts) as host:
        for value in hostile:
            result = host.run(["printf", "%s", value])
            assert result.stdout == value  # one literal argument, byte for byte
        assert not marker.exists()
        with pytest.raises(TestbedError, match=r"root@10\.97\.0\.2:2222: `ls /nonexistent-marllb` failed with exit 2"):
            host.run(["ls", "/nonexistent-marllb"])
        assert host.run(["sh", "-c", "exit 3"], check=False).returncode == 3
        assert host.run(["cat"], input="through stdin").stdout == "through stdin"


def test_keys_accepted_in_parallel_are_all_recorded(sshd, tmp_path):
    """Deploy reaches every host at once: each new key must land in known_hosts, none overwritten by another
    connection's save (paramiko's AutoAddPolicy rewrites the file from its own client's keys)."""
    known_hosts = tmp_path / "known_hosts"
    names = [f"host{i}" for i in range(8)]  # one sshd under eight names: eight unknown hosts to paramiko

    def accept(name: str) -> None:
        aliased = SshTarget(
            host=name, port=PORT, user="root", key_file=sshd["tmp"] / "client_key", known_hosts=known_hosts
        )
        sock = LocalNamespace(CLIENT).connect(HOST_IP, PORT)
        with SshHost(aliased, sock=sock, accept_new_host_keys=True) as host:
            assert host.run(["true"]).returncode == 0

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(accept, names))
    recorded = sorted(line.split()[0] for line in known_hosts.read_text().splitlines())
    assert recorded == sorted(f"[{name}]:{PORT}" for name in names)
    for name in names:  # and each is now known: strict checking lets it in
        aliased = SshTarget(
            host=name, port=PORT, user="root", key_file=sshd["tmp"] / "client_key", known_hosts=known_hosts
        )
        SshHost(aliased, sock=LocalNamespace(CLIENT).connect(HOST_IP, PORT)).close()
