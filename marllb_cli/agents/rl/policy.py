"""A trained policy as an `Agent`: `--method rl:DIR` loads DIR/policy.pt (written by `marllb train`) and
acts greedily — the most probable weight level per server — every agent period, keeping its GRU state.

The same class serves the simulator and the testbed's agent process, so a policy trained in simulation
runs unchanged on real LBs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from marllb_cli.agents.factory import RL_PREFIX
from marllb_cli.agents.rl.sac import SacHyper, SacLearner
from marllb_cli.errors import ConfigError

__all__ = ["RlPolicy", "load_policies"]


class RlPolicy:
    """One LB's greedy policy."""

    method = "sed"

    def __init__(self, learner: SacLearner) -> None:
        self.learner = learner
        self.learner.reset()
        self.weights = np.asarray(learner.weights(learner.prev_action), dtype=np.float64)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, _ = self.learner.act(obs, greedy=True)
        self.weights = np.asarray(self.learner.weights(action), dtype=np.float64)
        return self.weights


def load_policies(method: str, n_lbs: int, n_servers: int) -> list[RlPolicy]:
    """`rl:DIR` → one policy per LB (a single-LB policy, such as ssac's, serves every LB)."""
    path = Path(method.removeprefix(RL_PREFIX)) / "policy.pt"
    if not path.is_file():
        raise ConfigError(f"--method {method}: no {path}", hint="train one with `marllb train ... --out DIR`")
    saved = torch.load(path, weights_only=True)
    if saved["n_servers"] != n_servers:
        raise ConfigError(f"--method {method}: trained for {saved['n_servers']} servers, this config has {n_servers}")
    hyper = SacHyper(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["hyper"].items()})
    torch.set_num_threads(1)  # one small GRU per step: threads only add contention with the dataplane
    policies = []
    for i in range(n_lbs):
        learner = SacLearner(n_servers, hyper, seed=i)
        learner.actor.load_state_dict(saved["actors"][i % len(saved["actors"])])
        policies.append(RlPolicy(learner))
    return policies
