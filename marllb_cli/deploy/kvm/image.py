"""The KVM guests' base image: Debian 12 built once with debootstrap from the Debian archive, then cached.

    build    debootstrap (minbase + kernel, sshd, Apache + PHP, MediaWiki + MariaDB + memcached, nftables,
             ethtool, Python) → configure:
             fstab, no host keys of its own, the stock Apache and memcached services off (marllb starts its
             own instances),
             `ip_gre` loaded at boot, the seed unit below → the kernel and initrd copied out → the root tree
             packed into an ext4 file (`mkfs.ext4 -d`: no loop mount) → qcow2
    seed     every guest boots the same base through a copy-on-write overlay; what makes it *this* node is
             a small second disk (`seed_disk`): hostname, addresses, default route, the controller's SSH key
             and the guest's own host key (made on the controller, so its key is known before first contact)

Cache keys are digests of what goes in, so a change here builds a new image (from the cached debootstrap
tree unless the package list changed); a new build prunes the cache to the tree in use and the two newest
images, and `marllb teardown --purge` removes it all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from marllb_cli.deploy.node import mediawiki
from marllb_cli.deploy.node.owned import MARKER, claim, owner_of, remove_owned, remove_tree
from marllb_cli.errors import MissingTool
from marllb_cli.hosts.local import LocalHost
from marllb_cli.hosts.provision import Bundle, install_torch, provision
from marllb_cli.processes import run_checked

__all__ = ["claim_cache", "purge_cache", "BaseImage", "Chroot", "GUEST_WORKDIR", "PACKAGES", "base_image", "seed_disk"]

SUITE = "bookworm"
#: The archive keyring debootstrap checks the release against (package debian-archive-keyring).
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Where marllb lives in a guest: the `workdir` a guest's SSH host entry gets (`deploy.kvm`).
GUEST_WORKDIR = "/var/lib/marllb"
PACKAGES = (
    "systemd-sysv",
    "linux-image-amd64",
    "openssh-server",
    "apache2",
    "libapache2-mod-php",
    "php-cli",
    "nftables",
    "ethtool",
    "iproute2",
    "python3",
    "python3-venv",
    "curl",
    "procps",
    "kmod",
    "udev",
    *mediawiki.PACKAGES,  # servers with `app: mediawiki`
)
IMAGE_SIZE = "4G"

#: Runs before sshd on every boot: applies the seed disk (/dev/vdb).
SEED_SCRIPT = """#!/bin/sh
set -eux
mkdir -p /run/seed
mount -o ro /dev/vdb /run/seed
cat /run/seed/hostname > /etc/hostname
cat /run/seed/hostname > /proc/sys/kernel/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(cat /run/seed/hostname)" > /etc/hosts
install -m 600 /run/seed/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
install -m 644 /run/seed/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
mkdir -p -m 700 /root/.ssh
install -m 600 /run/seed/authorized_keys /root/.ssh/authorized_keys
ip link set lo up
while read -r iface address; do
    ip link set "$iface" up
    ip addr add "$address" dev "$iface"
done < /run/seed/addresses
if [ -s /run/seed/gateway ]; then ip route add default via "$(cat /run/seed/gateway)"; fi
umount /run/seed
"""
SEED_UNIT = """[Unit]
Description=marllb node identity from the seed disk
DefaultDependencies=no
Wants=dev-vdb.device
After=dev-vdb.device local-fs.target systemd-remount-fs.service
Before=ssh.service network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/marllb-seed
RemainAfterExit=yes
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class BaseImage:
    """A built image: the qcow2 root disk and the kernel and initrd to boot it with."""

    disk: Path
    kernel: Path
    initrd: Path


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def base_image(
    cache: Path, mirror: str, wheels: Bundle, torch: Bundle, progress: Callable[[str], None] = lambda _: None
) -> BaseImage:
    """The cached base image for this recipe and this marllb, built first if missing.

    Two cache levels: the debootstrapped tree (minutes; keyed by suite, mirror and packages) and the image
    made from a copy of it (tens of seconds; keyed by everything else too, marllb's wheels included), so a
    new marllb or guest set-up does not download the distribution again. marllb is installed into the image
    exactly as `provision` installs it on a host (same venv, same marker), so guests need no provisioning,
    and so is PyTorch (`install_torch`), so an LB guest runs `rl:` policies without a download."""
    claim_cache(cache)
    tree = cache / f"debootstrap-{SUITE}-{_digest(SUITE, mirror, *PACKAGES)}"
    recipe = (SUITE, mirror, IMAGE_SIZE, *PACKAGES, SEED_SCRIPT, SEED_UNIT, wheels.digest, torch.digest)
    directory = cache / f"image-{SUITE}-{_digest(*recipe)}"
    image = BaseImage(directory / "base.qcow2", directory / "vmlinuz", directory / "initrd.img")
    if (directory / "complete").exists():
        return image
    for tool in ("debootstrap", "qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} is not installed", hint="run `make system-deps-kvm`")
    if not Path(DEBIAN_KEYRING).is_file():
        raise MissingTool(f"{DEBIAN_KEYRING} is missing", hint="run `make system-deps-kvm` (debian-archive-keyring)")
    if not (tree / "complete").exists():
        remove_tree(tree)  # a killed debootstrap leaves /proc and /sys mounted in it
        (tree / "root").mkdir(parents=True)
        progress(f"debootstrap {SUITE} (once, minutes; cached in {tree})")
        # Signed: the release file is checked against Debian's archive keyring, whatever the mirror's scheme.
        keyring = ["--force-check-gpg", f"--keyring={DEBIAN_KEYRING}"]
        command = ["debootstrap", "--variant=minbase", *keyring, f"--include={','.join(PACKAGES)}", SUITE]
        command.append(str(tree / "root"))
        run_checked([*command, mirror], "debootstrap", timeout=3600)
        (tree / "complete").touch()
    started = time.monotonic()
    progress("configuring the image")
    remove_tree(directory)
    directory.mkdir(parents=True)
    root = directory / "root"
    run_checked(["cp", "-a", str(tree / "root"), str(root)], "copying the debootstrapped tree", timeout=900)
    _configure(root)
    progress("installing marllb into the image")
    provision(Chroot(root), GUEST_WORKDIR, "python3", wheels)
    progress("installing PyTorch into the image (learned policies on the LB guests)")
    install_torch(Chroot(root), GUEST_WORKDIR, torch)
    boot = root / "boot"
    shutil.copy(next(boot.glob("vmlinuz-*")), image.kernel)
    shutil.copy(next(boot.glob("initrd.img-*")), image.initrd)
    progress("packing the image")
    raw = directory / "base.raw"
    run_checked(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw), IMAGE_SIZE], "mkfs.ext4", timeout=900
    )
    run_checked(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image.disk)], "qemu-img convert", timeout=900)
    raw.unlink()
    remove_tree(root)
    (directory / "complete").write_text(f"configured and packed in {time.monotonic() - started:.0f} s\n")
    _prune(cache, keep=(tree, directory))
    return image


CACHE_OWNER = "kvm image cache"
_CACHE_ENTRIES = ("image-*", "debootstrap-*", "*.tmp")


def claim_cache(cache: Path) -> None:
    """The image cache is marllb's (`owned.claim`); a cache from before markers, holding nothing but image
    and debootstrap entries, is adopted."""
    if cache.is_dir() and owner_of(cache) is None:
        entries = list(cache.iterdir())
        if entries and all(any(entry.match(pattern) for pattern in _CACHE_ENTRIES) for entry in entries):
            (cache / MARKER).write_text(CACHE_OWNER + "\n")
    claim(cache, CACHE_OWNER)


def purge_cache(cache: Path) -> int:
    """`teardown --purge`: the images and debootstrap trees marllb built, and nothing else; the directory
    goes too when that leaves it empty. A directory without marllb's marker is left alone. Returns the
    entries removed."""
    if owner_of(cache) != CACHE_OWNER:
        return 0
    entries = [entry for pattern in _CACHE_ENTRIES for entry in cache.glob(pattern)]
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)
    if {entry.name for entry in cache.iterdir()} <= {MARKER}:
        remove_owned(cache, CACHE_OWNER)
    return len(entries)


def _prune(cache: Path, keep: tuple[Path, Path], *, images_kept: int = 2) -> None:
    """Old builds out of the cache: every debootstrap tree but the one in use, and all images but the
    `images_kept` newest (each marllb build makes one of ≈ 1.6 GB). Guests still running from a removed
    image are unaffected: qemu holds its backing file open until they stop."""
    images = sorted(cache.glob(f"image-{SUITE}-*"), key=lambda path: path.stat().st_mtime, reverse=True)
    old = [path for path in images if path not in keep][images_kept - 1 :]
    old += [path for path in cache.glob(f"debootstrap-{SUITE}-*") if path not in keep]
    for path in old:
        remove_tree(path)


class Chroot(LocalHost):
    """The image's root tree as a host for `provision`: commands run under chroot(8), files land inside."""

    def __init__(self, root: Path) -> None:
        self.root, self.name = root, f"image {root}"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["chroot", str(self.root), *argv]

    def put(self, local: Path, remote: str) -> None:
        shutil.copy(local, self.root / remote.lstrip("/"))

    def put_bytes(self, data: bytes, remote: str) -> None:
        (self.root / remote.lstrip("/")).write_bytes(data)


def seed_disk(
    path: Path,
    *,
    hostname: str,
    addresses: list[tuple[str, str]],
    gateway: str | None,
    authorized_key: str,
    host_key: Path,
) -> None:
    """Write the small ext4 disk that gives one guest its identity (see `SEED_SCRIPT`)."""
    content = path.with_suffix(".d")
    shutil.rmtree(content, ignore_errors=True)
    content.mkdir(parents=True, mode=0o700)
    (content / "hostname").write_text(hostname + "\n")
    (content / "addresses").write_text("".join(f"{iface} {address}\n" for iface, address in addresses))
    (content / "gateway").write_text((gateway or "") + "\n" if gateway else "")
    (content / "authorized_keys").write_text(authorized_key.strip() + "\n")
    shutil.copy(host_key, content / "ssh_host_ed25519_key")
    shutil.copy(host_key.with_suffix(".pub"), content / "ssh_host_ed25519_key.pub")
    # The seed holds the guest's private host key: the image is root's alone, made so before a byte is in it.
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    run_checked(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path), "4M"], "mkfs.ext4 (seed)", timeout=60)
    path.chmod(0o600)
    shutil.rmtree(content)


def _configure(root: Path) -> None:
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc" / "hostname").write_text("marllb\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")  # debootstrap leaves none; the seed adds ours
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # every guest gets its own from its seed disk
    (root / "etc" / "ssh" / "sshd_config.d" / "marllb.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "UseDNS no\n"
    )
    (root / "etc" / "modules-load.d" / "marllb.conf").write_text("ip_gre\n")
    script = root / "usr" / "local" / "sbin" / "marllb-seed"
    script.write_text(SEED_SCRIPT)
    script.chmod(0o755)
    (root / "etc" / "systemd" / "system" / "marllb-seed.service").write_text(SEED_UNIT)
    for command in (
        ["systemctl", "enable", "marllb-seed.service", "ssh.service"],
        ["systemctl", "disable", "apache2.service", "memcached.service"],
        ["systemctl", "mask", "getty@tty1.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer"],
    ):
        run_checked(["chroot", str(root), *command], " ".join(command))
