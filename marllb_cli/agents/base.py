"""The one interface every agent implements, in the simulator and on the testbed alike (DESIGN.md).

    obs     = features.observe(...)     # [n_servers, 6]: q_j and flow-duration statistics per server
    weights = agent.act(obs)            # [n_servers] non-negative, at least one positive

`method` names the selection rule the dataplane applies with those weights (sed for the learned agents,
as in the papers; wcmp for active WCMP; …). It is fixed for the agent's life.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Agent"]


class Agent(Protocol):
    method: str

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The weights for the next period, given this LB's current observation."""
        ...
