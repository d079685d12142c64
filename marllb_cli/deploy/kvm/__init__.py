"""A `kind: kvm` testbed: the LBs and servers are KVM guests on this machine; the client, the edge router
and the switch are namespaces, exactly as in the local testbed (so `replay-trace` runs from the same
client namespace).

    deploy    base image (`deploy.kvm.image`, built once) → the local network without LB and server namespaces
              (`build_network(guests=...)`) plus a management bridge → per guest: host key, seed disk,
              copy-on-write overlay, qemu-system-x86_64 -enable-kvm with one tap on the data bridge and one
              on the management bridge → wait for every sshd → provision and set up the guests like
              `kind: ssh` hosts (`deploy.ssh`: marllb's venv, roles, Apache, kernel GRE with
              `forwarding: gre`), reached through sockets made in the switch namespace
    teardown  stop the guests (qemu), remove overlays, seeds and keys, delete the namespaces (taps and bridges
              go with them); the base image stays unless `--purge`

Guest sizes: a server has ⌈cpus × cpu_unit⌉ vCPUs (its Apache cgroup still enforces cpus × cpu_unit cores),
an LB one; memory is `kvm.memory_mb` each. Every guest's host key is made here and written to the testbed's
own known_hosts before the guest boots, so host keys are checked from the first connection.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyroute2 import NetNS

from marllb_cli.client_node import LocalClient
from marllb_cli.config import Config, SshHostEntry, SshSettings
from marllb_cli.deploy.base import (
    MANIFEST,
    DeployOutcome,
    NodeStatus,
    TestbedStatus,
    deploy_recorded,
    refuse_foreign_namespaces,
    require_root,
    require_tools,
)
from marllb_cli.deploy.kvm.image import GUEST_WORKDIR, BaseImage, base_image, purge_cache, seed_disk
from marllb_cli.deploy.netns import build_network
from marllb_cli.deploy.node.cgroups import CpuUsage
from marllb_cli.deploy.node.manifest import Manifest, state_root
from marllb_cli.deploy.node.roles import OFFLOADS_OFF
from marllb_cli.deploy.node.undo import teardown_recorded
from marllb_cli.deploy.ssh import SshLbs, SshNode, SshTestbed
from marllb_cli.errors import MissingTool, TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.hosts.provision import bundle, torch_bundle
from marllb_cli.processes import run_checked
from marllb_cli.progress import Progress, no_progress
from marllb_cli.services import start_process
from marllb_cli.topology import Node, mac_address, plan

__all__ = ["KvmTestbed"]

MGMT_BRIDGE = "mgmt"
_MGMT_MAC_CODE = 6


class KvmTestbed:
    """LB and server guests under KVM, client and router namespaces, all on this machine."""

    __test__ = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topology = plan(config.testbed)
        self.state_dir: Path = state_root() / config.testbed.name
        self.manifest_path = self.state_dir / MANIFEST
        self.guests: tuple[Node, ...] = (*self.topology.lbs, *self.topology.servers)
        settings = config.testbed.kvm
        self.mgmt_ips = {
            guest.name: settings.mgmt_subnet.network_address + 10 + i for i, guest in enumerate(self.guests)
        }
        ssh_config = config.model_copy(
            update={
                "testbed": config.testbed.model_copy(
                    update={"ssh": SshSettings(known_hosts=self.state_dir / "known_hosts", connect_timeout_s=20)}
                )
            }
        )
        nodes = [
            SshNode(
                guest.name,
                SshHostEntry(
                    role=guest.role,
                    address=str(self.mgmt_ips[guest.name]),
                    key_file=self.state_dir / "id_ed25519",
                    data_ip=guest.interfaces[0].ip,
                    workdir=GUEST_WORKDIR,
                ),
                config.testbed.name,
            )
            for guest in self.guests
        ]
        self.ssh = SshTestbed(ssh_config, hosts=nodes, via=LocalNamespace(self.topology.switch_namespace))
        self.accel = settings.accel if settings.accel != "auto" else ("kvm" if kvm_usable() else "tcg")

    # -- public operations -----------------------------------------------------------------------------
    def deploy(self, progress: Progress = no_progress) -> DeployOutcome:
        """Boot and set up the guests; a no-op when the testbed is up with this config, else a clean rebuild."""
        _preflight(self.accel)
        if self.accel == "tcg":
            progress("no hardware virtualisation: guests run under qemu's emulation (tcg)", 0, 1)
        return deploy_recorded(
            self, progress, lambda manifest: self._build(manifest, progress), on_failure=self._keep_consoles
        )

    def teardown(self, progress: Progress = no_progress, *, purge: bool = False) -> int:
        """Stop the guests and remove everything the manifest lists; `purge` also removes the image cache."""
        removed = teardown_recorded(self.manifest_path, self.state_dir, progress)
        if purge:
            purge_cache(self.config.testbed.kvm.image_cache)
        return removed

    def status(self, *, probe: bool = True) -> TestbedStatus:
        manifest = Manifest.load(self.manifest_path)
        if manifest is None:
            return TestbedStatus.of(self.topology, None, [NodeStatus.of(node) for node in self.topology.nodes])
        guests = {node.name: node for node in self.ssh.status(probe=probe).nodes}
        nodes = [
            guests[node.name]
            if node.name in guests
            else NodeStatus.of(node, up=LocalNamespace(node.namespace).exists())
            for node in self.topology.nodes
        ]
        for node in nodes:
            if node.name in guests:
                node.namespace = f"kvm {self.mgmt_ips[node.name]}"
        return TestbedStatus.of(self.topology, manifest, nodes)

    def require_deployed(self) -> None:
        self.ssh.require_deployed()

    def lbs(self) -> SshLbs:
        return SshLbs(self.ssh)

    def server_usage(self) -> dict[str, CpuUsage]:
        return self.ssh.server_usage()

    def faults(self):  # -> SshFaults: on the guests, and on the router, a namespace here
        from marllb_cli.deploy.ssh_faults import SshFaults

        return SshFaults(self.ssh, router=LocalNamespace(self.topology.router.namespace))

    def client(self) -> LocalClient:
        """The client namespace: a run's replayer and sampler start there, as on a local testbed."""
        return LocalClient(LocalNamespace(self.topology.client.namespace))

    # -- steps -----------------------------------------------------------------------------------------
    def _build(self, manifest: Manifest, progress: Progress) -> None:
        """Everything after `deploy_recorded`'s new manifest: image, network, guests, their set-up."""
        self._refuse_foreign()
        shutil.rmtree(self._consoles_kept, ignore_errors=True)  # from an earlier failed deploy
        settings = self.config.testbed.kvm
        wheels = bundle()  # once: the image holds exactly the marllb that provisioning then finds there
        torch = torch_bundle()
        image = base_image(settings.image_cache, settings.mirror, wheels, torch, lambda what: progress(what, 0, 1))
        guest_names = frozenset(guest.name for guest in self.guests)
        build_network(self.topology, manifest, progress, guests=guest_names)
        self._management_bridge()
        self._keys()
        for done, guest in enumerate(self.guests, 1):
            self._boot(guest, image, manifest)
            progress("guests booting", done, len(self.guests))
        self._wait_for_sshd(progress)
        self.ssh.deploy(progress, wheels=wheels)

    def _management_bridge(self) -> None:
        subnet = self.config.testbed.kvm.mgmt_subnet
        with NetNS(self.topology.switch_namespace) as switch:
            switch.link("add", ifname=MGMT_BRIDGE, kind="bridge")
            index = switch.link_lookup(ifname=MGMT_BRIDGE)[0]
            switch.addr("add", index=index, address=str(subnet.network_address + 1), prefixlen=subnet.prefixlen)
            switch.link("set", index=index, state="up")

    def _keys(self) -> None:
        """The controller's key for the guests, and each guest's host key, known before first contact."""
        keys = self.state_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        _keygen(self.state_dir / "id_ed25519")
        lines = []
        for guest in self.guests:
            host_key = keys / f"{guest.name}_host_ed25519"
            _keygen(host_key)
            kind, key = host_key.with_suffix(".pub").read_text().split()[:2]
            lines.append(f"{self.mgmt_ips[guest.name]} {kind} {key}\n")
        (self.state_dir / "known_hosts").write_text("".join(lines))

    def _boot(self, guest: Node, image: BaseImage, manifest: Manifest) -> None:
        settings = self.config.testbed.kvm
        directory = self.state_dir / "guests" / guest.name
        directory.mkdir(parents=True, exist_ok=True)
        mgmt_prefix = settings.mgmt_subnet.prefixlen
        seed = directory / "seed.img"
        manifest.record("file", f"{guest.name}-seed", path=str(seed))
        seed_disk(
            seed,
            hostname=f"{self.topology.testbed}-{guest.name}",
            addresses=[("eth0", str(guest.interfaces[0].ip)), ("eth1", f"{self.mgmt_ips[guest.name]}/{mgmt_prefix}")],
            gateway=str(self.topology.router.ip),
            authorized_key=(self.state_dir / "id_ed25519.pub").read_text(),
            host_key=self.state_dir / "keys" / f"{guest.name}_host_ed25519",
        )
        overlay = directory / "disk.qcow2"
        manifest.record("file", f"{guest.name}-disk", path=str(overlay))
        run_checked(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "qcow2", str(overlay)],
            "qemu-img create",
        )
        overlay.chmod(0o600)  # the guest's disk: its MediaWiki database credentials, among others
        vcpus = max(1, math.ceil(guest.cores)) if guest.cores else 1
        data_tap, mgmt_tap = f"d-{guest.name}", f"m-{guest.name}"
        mgmt_mac = mac_address(self.topology.testbed, _MGMT_MAC_CODE, guest.index + (0 if guest.role == "lb" else 512))
        argv = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-name", f"marllb-{self.topology.testbed}-{guest.name}",
            # numpy's wheels need x86-64-v2 (SSE4.2, POPCNT): qemu's default CPU model lacks it.
            "-accel", self.accel, "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(vcpus), "-m", str(settings.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-netdev", f"tap,id=data,ifname={data_tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=data,mac={guest.mac}",
            "-netdev", f"tap,id=mgmt,ifname={mgmt_tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=mgmt,mac={mgmt_mac}",
            "-serial", f"file:{directory / 'console.log'}",
        ]  # fmt: skip
        switch = LocalNamespace(self.topology.switch_namespace)
        service = start_process(switch, f"qemu-{guest.name}", argv, directory / "qemu.log")
        manifest.record("process", service.name, **service.as_record())
        deadline = time.monotonic() + 30
        with NetNS(self.topology.switch_namespace) as ipr:
            for tap, bridge in ((data_tap, self.topology.bridge), (mgmt_tap, MGMT_BRIDGE)):
                while not ipr.link_lookup(ifname=tap):
                    if not service.running() or time.monotonic() > deadline:
                        raise TestbedError(f"{guest.name}: qemu did not start: {service.log_tail(1) or 'no output'}")
                    time.sleep(0.05)
                master = ipr.link_lookup(ifname=bridge)[0]
                ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], master=master, state="up")
        switch.run(["ethtool", "-K", data_tap, *OFFLOADS_OFF], check=False)

    def _wait_for_sshd(self, progress: Progress) -> None:
        switch = LocalNamespace(self.topology.switch_namespace)
        timeout = self.config.testbed.kvm.boot_timeout_s
        started = time.monotonic()
        up: list[str] = []

        def wait(guest: Node) -> None:
            address = str(self.mgmt_ips[guest.name])
            while True:
                try:
                    sock = switch.connect(address, 22, timeout=2.0)
                    banner = sock.recv(64)
                    sock.close()
                    if banner.startswith(b"SSH-"):
                        up.append(guest.name)
                        progress("guests up (sshd)", len(up), len(self.guests))
                        return
                except OSError:
                    pass
                if time.monotonic() - started > timeout:
                    console = self.state_dir / "guests" / guest.name / "console.log"
                    tail = console.read_text(errors="replace").strip().splitlines()[-1:] if console.exists() else []
                    raise TestbedError(
                        f"{guest.name}: no sshd at {address} after {timeout:.0f} s"
                        + (f"; console: {tail[0]}" if tail else ""),
                        hint=f"raise testbed.kvm.boot_timeout_s, or read {guest.name}.log in {self._consoles_kept}",
                    )
                time.sleep(1.0)

        with ThreadPoolExecutor(max_workers=len(self.guests)) as pool:
            for future in [pool.submit(wait, guest) for guest in self.guests]:
                future.result()

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def _consoles_kept(self) -> Path:
        return state_root() / f"{self.topology.testbed}.failed-consoles"

    def _keep_consoles(self) -> None:
        """A failed deploy removes everything, but the guests' serial consoles are what explains it."""
        kept = self._consoles_kept
        shutil.rmtree(kept, ignore_errors=True)
        for console in (self.state_dir / "guests").glob("*/console.log"):
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy(console, kept / f"{console.parent.name}.log")

    def _refuse_foreign(self) -> None:
        """After `redeploy` removed our own: any of our namespaces still there belongs to someone else."""
        names = (self.topology.switch_namespace, self.topology.client.namespace, self.topology.router.namespace)
        refuse_foreign_namespaces(self.topology, names, ours=set())


def _keygen(path: Path) -> None:
    if not path.exists():
        run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "marllb", "-f", str(path)], "ssh-keygen")


def kvm_usable() -> bool:
    """Whether guests can run with hardware virtualisation: /dev/kvm usable and the CPU shows vmx or svm.

    (A machine may have /dev/kvm without the flags — nested virtualisation switched off — where qemu's KVM
    guests never get past their first instructions.)"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    flags = Path("/proc/cpuinfo").read_text().split()
    return "vmx" in flags or "svm" in flags


def _preflight(accel: str) -> None:
    require_root("a kvm testbed")
    if accel == "kvm" and not kvm_usable():
        raise MissingTool(
            "hardware virtualisation is not usable here (/dev/kvm, or vmx/svm in /proc/cpuinfo)",
            hint="set testbed.kvm.accel: tcg (emulation, slower) or auto",
        )
    tools = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh-keygen")
    require_tools([(tool, tool) for tool in tools], hint="run `make system-deps-kvm`")
