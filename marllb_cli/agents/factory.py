"""Agents by method name, for the testbed's agent processes and the simulator alike: a heuristic
(`HEURISTICS`) or `rl:DIR`, a policy trained by `marllb train --out DIR`.

PyTorch is imported only for `rl:` methods, so heuristic agent processes start fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from marllb_cli.agents.base import Agent
from marllb_cli.agents.heuristics import HEURISTICS, Probe, heuristic
from marllb_cli.errors import ConfigError

__all__ = ["RL_PREFIX", "make_agent", "resolve_method"]

RL_PREFIX = "rl:"


def resolve_method(method: str, allowed: Sequence[str] = HEURISTICS) -> str:
    """`method` checked (exit-2 error naming the choices) and, for `rl:DIR`, with DIR made absolute."""
    if method.startswith(RL_PREFIX):
        directory = Path(method.removeprefix(RL_PREFIX)).resolve()
        if not (directory / "policy.pt").is_file():
            raise ConfigError(
                f"--method {method}: no {directory / 'policy.pt'}", hint="train one with `marllb train ... --out DIR`"
            )
        return RL_PREFIX + str(directory)
    if method not in allowed:
        raise ConfigError(f"--method {method!r}: unknown", hint=f"choose one of {', '.join(allowed)}, or rl:DIR")
    return method


def make_agent(method: str, cpus: Sequence[float], probe: Probe | None, lb_index: int = 0) -> Agent:
    """The agent of LB `lb_index` for `method` over servers of capacities `cpus`."""
    if method.startswith(RL_PREFIX):
        from marllb_cli.agents.rl.policy import load_policies

        return load_policies(method, lb_index + 1, cpus)[lb_index]
    return heuristic(method, cpus, probe)
