"""Agents by method name, for the testbed's agent processes and the simulator alike: a heuristic
(`methods.HEURISTICS`), `static:FILE` (fixed SED weights from a file) or `rl:DIR`, a policy trained by
`marllb train --out DIR`.

PyTorch is imported only where an `rl:` agent acts (`make_agent`); the controller that only plans an LB
(`initial_control`) reads the policy's JSON header instead, so it never loads PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marllb_cli.agents.base import Agent
from marllb_cli.agents.heuristics import Probe, StaticWeights, heuristic
from marllb_cli.agents.methods import policy_dir
from marllb_cli.agents.weights_file import read_weights, static_file

__all__ = ["initial_control", "make_agent"]


def make_agent(method: str, cpus: Sequence[float], probe: Probe | None, lb_index: int = 0, n_lbs: int = 1) -> Agent:
    """The agent of LB `lb_index` (of `n_lbs`) for a resolved `method` over servers of capacities `cpus`."""
    if policy_dir(method) is not None:
        from marllb_cli.agents.rl.policy import load_policies

        return load_policies(method, n_lbs, cpus)[lb_index]
    weights = static_file(method)
    if weights is not None:
        return StaticWeights("sed", read_weights(weights, len(cpus))["weights"])
    return heuristic(method, cpus, probe)


def initial_control(method: str, cpus: Sequence[float], n_lbs: int) -> tuple[str, np.ndarray]:
    """(selection, first weights) an LB's dataplane starts with before its agent takes a step; for `rl:DIR`
    the policy is checked against this testbed (servers, LBs) from its header."""
    directory = policy_dir(method)
    if directory is None:
        agent = make_agent(method, cpus, probe=lambda: [None] * len(cpus))
        return agent.method, np.asarray(agent.weights, dtype=np.float64)
    from marllb_cli.agents.rl.header import read_header

    header = read_header(directory)
    header.check(method, n_lbs, len(cpus), per_lb=True)
    return "sed", header.first_weights(cpus)
