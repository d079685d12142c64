"""Helpers the integration tests share: what a testbed may leave behind (nothing)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.node.cgroups import accounting_root, cgroup_root
from marllb_cli.hosts import list_namespaces
from marllb_cli.wikipages import page_text

SHM_DIR = Path("/dev/shm")


def leftovers(name: str) -> dict[str, object]:
    """Everything of testbed `name` still on the machine: namespaces, cgroup, processes, state, shared memory."""
    root, _ = cgroup_root()
    processes = subprocess.run(["pgrep", "-f", f"/run/marllb/{name}/"], capture_output=True, text=True).stdout.split()
    return {
        "namespaces": sorted(ns for ns in list_namespaces() if ns.startswith(f"{name}-")),
        "cgroup": any((where / f"marllb-{name}").exists() for where in (root, accounting_root()) if where),
        "processes": processes,
        "state": Path(f"/run/marllb/{name}").exists(),
        "shm": sorted(p.name for p in SHM_DIR.glob(f"marllb-{name}*")),  # the channel directory, or old-style files
    }


NOTHING = {"namespaces": [], "cgroup": False, "processes": [], "state": False, "shm": []}


@contextmanager
def deployed(testbed: LocalTestbed) -> Iterator[LocalTestbed]:
    """A test's testbed: deployed, torn down afterwards, and checked to have left nothing behind."""
    testbed.deploy()
    try:
        yield testbed
    finally:
        testbed.teardown()
    assert leftovers(testbed.topology.testbed) == NOTHING


def rendered_opening(k: int, pages: int, *, seed: int = 0) -> str:
    """How the opening of generated page k appears in MediaWiki's HTML: the bold title, "is" and the first
    word of the article, which only the real page (not an error or a stand-in page) contains."""
    first = page_text(k, pages, seed=seed).split("''' is ", 1)[1].split()[0]
    return f"</b> is {first}"
