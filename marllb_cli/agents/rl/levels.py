"""What a learned policy's action means: one weight level per server, turned into SED weights.

Shared by everything that acts with levels (the greedy and exploring policies, the coordinated agent, the
simulator's environment), so a level means the same everywhere; free of PyTorch, so an LB's agent that only
receives levels from its coordinator never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["level_weights"]


def level_weights(levels: Sequence[float], action: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """SED weights of level indices: levels[action] (× each server's capacity for a `residual` policy)."""
    weights = np.asarray(levels, dtype=np.float64)[action]
    return weights * scale if scale is not None else weights
