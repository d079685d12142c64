"""Helpers the integration tests share: what a testbed may leave behind (nothing)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from marllb_cli.deploy.cgroups import cgroup_root
from marllb_cli.hosts import list_namespaces

SHM_DIR = Path("/dev/shm")


def leftovers(name: str) -> dict[str, object]:
    """Everything of testbed `name` still on the machine: namespaces, cgroup, processes, state, shared memory."""
    root, _ = cgroup_root()
    processes = subprocess.run(["pgrep", "-f", f"/run/marllb/{name}/"], capture_output=True, text=True).stdout.split()
    return {
        "namespaces": sorted(ns for ns in list_namespaces() if ns.startswith(f"{name}-")),
        "cgroup": (root / f"marllb-{name}").exists(),
        "processes": processes,
        "state": Path(f"/run/marllb/{name}").exists(),
        "shm": sorted(p.name for p in SHM_DIR.glob(f"marllb-{name}-*")),
    }


NOTHING = {"namespaces": [], "cgroup": False, "processes": [], "state": False, "shm": []}
