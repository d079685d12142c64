"""Directories marllb deletes are directories marllb made: each carries a marker file naming its owner.

marllb runs as root and removes whole directories (a testbed's state, a node's state on a host, the KVM
image cache). A path is only ever removed whole when it carries `.marllb-owned` with the same owner: a
`workdir: /` with `name: usr`, or a `kvm.image_cache` pointing at someone's home, is refused at deploy (the
directory exists and is not ours) and never deleted at teardown.

    claim(dir, owner)          make `dir` (its parents as needed) with the marker, or accept it when it
                               already carries ours; refuse one that exists without it
    remove_owned(dir, owner)   rmtree only when the marker is there (and says `owner`); otherwise leave it

The config refuses a `workdir` or `image_cache` that is a system directory (`config.own_directory`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from marllb_cli.errors import TestbedError

__all__ = ["MARKER", "claim", "owner_of", "remove_owned"]

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
    shutil.rmtree(directory, ignore_errors=True)
    return True
