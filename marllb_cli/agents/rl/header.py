"""What a trained policy is, without its weights: `policy.json`, written next to `policy.pt` by `marllb train`.

The controller needs a policy's shape before any agent runs: to refuse a policy trained for other servers or
another number of LBs with a one-line error, and to give each dataplane its first weights. Reading that from
`policy.pt` would load PyTorch into the controller for a few numbers, so training writes them twice: in the
checkpointed `policy.pt` and in this small JSON header. A policy trained before headers existed has none;
then (and only then) the header is read from `policy.pt`.

A greedy policy's first action is the middle level on every head (`common.GreedyPolicy.reset`), so its
first weights follow from the header alone: level × each server's capacity for a `residual` policy, the
level itself otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marllb_cli.errors import ConfigError

__all__ = ["HEADER", "PolicyHeader", "read_header", "write_header"]

HEADER = "policy.json"
MAX_SERVERS = 4096
MAX_HIDDEN = 8192
RETRAIN = "use a directory written by `marllb train`, or train again"


@dataclass(frozen=True)
class PolicyHeader:
    """The shape of a trained policy: `kind` sac (one actor per LB, or one for all), qmix or centr."""

    kind: str
    n_servers: int
    n_agents: int | None
    levels: tuple[float, ...]
    residual: bool
    hidden: int

    @classmethod
    def of(cls, policy: dict[str, Any], source: Path | str = "policy.pt") -> PolicyHeader:
        """The header of a policy as `training` saves it (`policy.pt`'s dict), checked: a damaged or foreign
        file is a one-line `ConfigError`, not an allocation of whatever size it names."""
        try:
            hyper = policy["hyper"]
            header = cls(
                kind=str(policy.get("kind", "sac")),
                n_servers=int(policy["n_servers"]),
                n_agents=int(policy["n_agents"]) if policy.get("n_agents") is not None else None,
                levels=tuple(float(level) for level in hyper["levels"]),
                residual=bool(hyper.get("residual", False)),
                hidden=int(hyper["hidden"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a marllb policy (missing or bad {exc})", hint=RETRAIN) from None
        header.validate(source)
        return header

    def validate(self, source: Path | str) -> None:
        """Sizes a policy trained by marllb can have; anything else is refused before a network is built."""
        problems = [
            f"kind {self.kind!r}" if self.kind not in ("sac", "qmix", "centr") else "",
            f"{self.n_servers} servers" if not 1 <= self.n_servers <= MAX_SERVERS else "",
            f"{self.n_agents} LBs" if self.n_agents is not None and not 1 <= self.n_agents <= MAX_SERVERS else "",
            f"{len(self.levels)} levels" if not 1 <= len(self.levels) <= 64 else "",
            "a level that is not a finite positive number" if not all(0 < x < 1e6 for x in self.levels) else "",
            f"hidden size {self.hidden}" if not 1 <= self.hidden <= MAX_HIDDEN else "",
        ]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ConfigError(f"{source}: not a policy marllb trains ({', '.join(problems)})", hint=RETRAIN)

    def check(self, method: str, n_lbs: int, n_servers: int, *, per_lb: bool) -> None:
        """Refuse a testbed or simulation this policy cannot run on (`per_lb`: each LB acts on its own)."""
        if self.n_servers != n_servers:
            raise ConfigError(f"--method {method}: trained for {self.n_servers} servers, this config has {n_servers}")
        if per_lb and self.kind == "centr":
            raise ConfigError(
                f"--method {method}: a Centr-LB policy needs every LB's observation at once",
                hint="run it in the simulator (marllb simulate); each testbed LB sees only its own",
            )
        if self.kind in ("qmix", "centr") and self.n_agents != n_lbs:
            name = "QMIX" if self.kind == "qmix" else "Centr-LB"
            raise ConfigError(f"--method {method}: {name} trained for {self.n_agents} LBs, this config has {n_lbs}")

    def first_weights(self, capacity: Sequence[float]) -> np.ndarray:
        """The weights of the first action (the middle level everywhere) for servers of `capacity`."""
        level = self.levels[len(self.levels) // 2]
        scale = np.asarray(capacity, dtype=np.float64) if self.residual else np.ones(len(capacity))
        return scale * level


def write_header(directory: Path, header: PolicyHeader) -> None:
    """Replace `directory/policy.json` atomically."""
    tmp = directory / (HEADER + ".tmp")
    tmp.write_text(json.dumps(asdict(header), indent=1))
    os.replace(tmp, directory / HEADER)


def read_header(directory: Path) -> PolicyHeader:
    """The header of the policy in `directory`; from `policy.pt` (with PyTorch) when it has no JSON header."""
    try:
        data = json.loads((directory / HEADER).read_text())
        header = PolicyHeader(**{**data, "levels": tuple(data["levels"])})
    except FileNotFoundError:
        from marllb_cli.agents.rl.common import load_file  # PyTorch: only for a policy without a header

        return PolicyHeader.of(load_file(directory / "policy.pt", "policy"), directory / "policy.pt")
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{directory / HEADER}: not a policy header ({exc})", hint=RETRAIN) from None
    header.validate(directory / HEADER)
    return header
