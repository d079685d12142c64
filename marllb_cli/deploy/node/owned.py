"""Directories marllb deletes are directories marllb made: each carries a marker file naming its owner.

marllb runs as root and removes whole directories (a testbed's state, a node's state on a host, the KVM
image cache). A path is only ever removed whole when it carries `.marllb-owned` with the same owner: a
`workdir: /` with `name: usr`, or a `kvm.image_cache` pointing at someone's home, is refused at deploy (the
directory exists and is not ours) and never deleted at teardown.

    claim(dir, owner)          make `dir` (its parents as needed) with the marker, or accept it when it
                               already carries ours; refuse one that exists without it
    remove_owned(dir, owner)   rmtree only when the marker is there (and says `owner`); otherwise leave it
    remove_tree(dir)           rmtree that first unmounts whatever is mounted below `dir`: a debootstrap
                               killed mid-run leaves the host's /proc and /sys mounted in its tree, and an
                               rmtree that crossed into them would delete the host's files

The config refuses a `workdir` or `image_cache` that is a system directory (`config.own_directory`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from marllb_cli.errors import TestbedError

__all__ = ["MARKER", "claim", "mounts_below", "owner_of", "remove_owned", "remove_tree"]

MARKER = ".marllb-owned"


def owner_of(directory: Path) -> str | None:
    """The owner its marker names, None when it has none."""
    try:
        return (directory / MARKER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def claim(directory: Path, owner: str) -> None:
    """Make `directory` for `owner`, or accept it when it is already ours; refuse anything else."""
    if directory.exists() or directory.is_symlink():
        if directory.is_dir() and not directory.is_symlink() and owner_of(directory) == owner:
            return
        raise TestbedError(
            f"{directory} exists and marllb did not make it for {owner}",
            hint="choose another directory or testbed name; marllb never takes over or deletes what it did not make",
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir()
    (directory / MARKER).write_text(owner + "\n")


def remove_owned(directory: Path, owner: str | None = None) -> bool:
    """Delete `directory` when it carries marllb's marker (naming `owner`, when given); return whether it
    did. A directory without the marker is left where it is, whatever it holds."""
    found = None if directory.is_symlink() else owner_of(directory)
    if found is None or (owner is not None and found != owner):
        return False
    remove_tree(directory)
    return True


def mounts_below(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (from /proc/self/mountinfo)."""
    root = os.path.realpath(directory)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].encode().decode("unicode_escape")  # octal escapes (\040 for a space)
        if point == root or point.startswith(root.rstrip("/") + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda path: len(path.parts), reverse=True)


def remove_tree(directory: Path) -> None:
    """rmtree `directory` without ever deleting through a mount: detach every mount below it first, and
    leave the tree in place when one cannot be detached."""
    for point in mounts_below(directory):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
    if mounts_below(directory):
        raise TestbedError(
            f"{directory}: something is still mounted below it; not removed",
            hint=f"unmount what `findmnt -R {directory}` lists, then run the command again",
        )
    shutil.rmtree(directory, ignore_errors=True)
