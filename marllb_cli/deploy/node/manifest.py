"""What a testbed created, written down as it is created, so teardown removes exactly that and nothing else.

The manifest is `<state dir>/<testbed>/manifest.json`. Each create step appends its resource *before* it
touches the kernel and the file is replaced atomically, so after a crash at any point the manifest lists a
superset of what exists, and teardown (which tolerates already-absent resources) still removes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from marllb_cli.config import own_directory
from marllb_cli.errors import ConfigError, TestbedError

__all__ = ["MANIFEST", "Manifest", "Resource", "require_complete", "state_root", "testbed_digest"]

#: The manifest's file name in a state directory (a testbed's on the controller, a node's on a host).
MANIFEST = "manifest.json"

#: namespace … file: what a testbed creates; route … offloads: changes to a real host's network settings,
#: recorded with what was there before (`deploy.roles`).
ResourceKind = Literal[
    "namespace",
    "cgroup",
    "apache",
    "directory",
    "process",
    "file",
    "route",
    "address",
    "sysctl",
    "nft",
    "offloads",
    "link",
]


def testbed_digest(testbed: BaseModel) -> str:
    """Names a testbed's settings: a deploy with the same digest has nothing to change."""
    return hashlib.sha256(testbed.model_dump_json().encode()).hexdigest()[:16]


def state_root() -> Path:
    """Where testbeds keep their state: `$MARLLB_STATE_DIR`, else /run/marllb (gone at reboot, like netns).

    What is there drives teardown (it deletes what a manifest lists), so the root must be absolute, not a
    system directory, and, when it exists, owned by this user and writable by no one else."""
    value = os.environ.get("MARLLB_STATE_DIR", "/run/marllb")
    try:
        root = Path(own_directory(value))
    except ValueError as exc:
        raise ConfigError(
            f"MARLLB_STATE_DIR: {exc}", hint="unset it (/run/marllb) or name a directory of its own"
        ) from None
    try:
        info = root.stat()
    except FileNotFoundError:
        return root
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigError(
            f"MARLLB_STATE_DIR: {root} is writable by another user than this one",
            hint=f"chmod go-w {root} (and own it), or use another directory",
        )
    return root


@dataclass
class Resource:
    """One thing a testbed created: its kind and what teardown needs to find it again."""

    kind: ResourceKind
    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """The record of one testbed's resources, in creation order."""

    path: Path
    testbed: str
    config_digest: str = ""
    complete: bool = False
    resources: list[Resource] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    #: What the testbed learnt while deploying and needs later (kind ssh: each host's data MAC).
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at `path`, or None when no testbed state is there."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            raise _damaged(path, exc) from None
        try:
            manifest = cls(
                path=path,
                testbed=str(raw["testbed"]),
                config_digest=str(raw.get("config_digest", "")),
                complete=bool(raw.get("complete", False)),
                resources=[Resource(**item) for item in raw.get("resources", [])],
                created_at=float(raw.get("created_at", 0.0)),
                facts=dict(raw.get("facts", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _damaged(path, exc) from None
        if not all(isinstance(r.kind, str) and isinstance(r.data, dict) for r in manifest.resources):
            raise _damaged(path, ValueError("a resource is not a kind with its data"))
        return manifest

    def save(self) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a manifest."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "testbed": self.testbed,
            "config_digest": self.config_digest,
            "complete": self.complete,
            "created_at": self.created_at,
            "resources": [vars(resource) for resource in self.resources],
            "facts": self.facts,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, self.path)

    def record(self, kind: ResourceKind, name: str, **data: Any) -> Resource:
        """Note a resource about to be created, and persist the note first."""
        resource = Resource(kind, name, data)
        self.resources.append(resource)
        self.save()
        return resource

    def forget(self, resources: list[Resource]) -> None:
        """Drop resources that were removed (`marllb lb stop`), and persist."""
        self.resources = [resource for resource in self.resources if resource not in resources]
        self.save()

    def of_kind(self, kind: ResourceKind) -> list[Resource]:
        return [resource for resource in self.resources if resource.kind == kind]

    def names(self, kind: ResourceKind) -> set[str]:
        return {resource.name for resource in self.of_kind(kind)}


def _damaged(path: Path, exc: BaseException) -> TestbedError:
    """A record that cannot be read: say which, and how to recover by hand (it is what teardown follows)."""
    return TestbedError(
        f"{path}: damaged record of what marllb made ({type(exc).__name__}: {exc})",
        hint=f"move it away (mv {path} {path}.bad), remove what it listed by hand (ip netns list; cgroups "
        "named marllb-<testbed>), then deploy again",
    )


def require_complete(path: Path, what: str, hint: str) -> Manifest:
    """The manifest at `path` of a deploy that completed, or a `TestbedError` "`what` is not deployed" with
    `hint` (the one not-deployed check of the controller and of `marllb node`)."""
    manifest = Manifest.load(path)
    if manifest is None or not manifest.complete:
        raise TestbedError(f"{what} is not deployed", hint=hint)
    return manifest
