"""A trained policy as an `Agent`: `--method rl:DIR` loads DIR/policy.pt (written by `marllb train`) and
acts greedily — the most useful weight level per server — every agent period, keeping its GRU state.

The same class serves the simulator and the testbed's agent process, so a policy trained in simulation
runs unchanged on real LBs. SAC policies have one actor per LB (a single-LB policy, such as ssac's,
serves every LB); QMIX has one shared agent network that also takes the LB's id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from marllb_cli.agents.factory import RL_PREFIX
from marllb_cli.agents.rl.common import GreedyPolicy, Recurrent
from marllb_cli.errors import ConfigError

__all__ = ["JointPolicy", "RlPolicy", "load_for_simulation", "load_policies"]


class RlPolicy:
    """One LB's greedy policy, with the `Agent` interface (SED weights)."""

    method = "sed"

    def __init__(self, policy: GreedyPolicy) -> None:
        self.policy = policy
        self.weights = policy.weights()

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.weights = self.policy.act(obs)
        return self.weights


class JointPolicy:
    """Centr-LB: one network that reads every LB's observation and sets every LB's weights."""

    method = "sed"

    def __init__(self, policy: GreedyPolicy, n_lbs: int) -> None:
        self.policy, self.m = policy, n_lbs

    def act_all(self, observations: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.policy.act(np.concatenate(observations)).reshape(self.m, -1))


def _scale(saved: dict, capacity: Sequence[float], copies: int = 1) -> np.ndarray | None:
    """Per head, what a level multiplies: the servers' capacities for a `residual` policy, else nothing."""
    return np.tile(np.asarray(capacity, dtype=np.float64), copies) if saved["hyper"].get("residual") else None


def _load(method: str, n_servers: int) -> dict:
    path = Path(method.removeprefix(RL_PREFIX)) / "policy.pt"
    if not path.is_file():
        raise ConfigError(f"--method {method}: no {path}", hint="train one with `marllb train ... --out DIR`")
    saved = torch.load(path, weights_only=True)
    if saved["n_servers"] != n_servers:
        raise ConfigError(f"--method {method}: trained for {saved['n_servers']} servers, this config has {n_servers}")
    torch.set_num_threads(1)  # one small GRU per step: threads only add contention with the dataplane
    return saved


def load_for_simulation(
    method: str, n_lbs: int, capacity: Sequence[float]
) -> tuple[JointPolicy | None, list[RlPolicy]]:
    """`rl:DIR` for the simulator, read once: (the Centr-LB joint policy, []) or (None, one policy per LB).
    `capacity`: each server's cpus × speed."""
    saved = _load(method, len(capacity))
    if saved.get("kind") == "centr":
        return _joint(saved, method, n_lbs, capacity), []
    return None, _per_lb(saved, method, n_lbs, capacity)


def _joint(saved: dict, method: str, n_lbs: int, capacity: Sequence[float]) -> JointPolicy:
    n_servers = len(capacity)
    if saved["n_agents"] != n_lbs:
        raise ConfigError(f"--method {method}: Centr-LB trained for {saved['n_agents']} LBs, this config has {n_lbs}")
    levels = tuple(saved["hyper"]["levels"])
    heads = n_lbs * n_servers
    net = Recurrent(heads * 6 + heads * len(levels), saved["hyper"]["hidden"], heads, len(levels))
    net.load_state_dict(saved["actors"][0])
    return JointPolicy(GreedyPolicy(net, levels, scale=_scale(saved, capacity, n_lbs)), n_lbs)


def load_policies(method: str, n_lbs: int, capacity: Sequence[float]) -> list[RlPolicy]:
    """`rl:DIR` → one policy per LB (not for Centr-LB, which needs every LB's observation); `capacity`:
    each server's cpus (× speed in simulation)."""
    return _per_lb(_load(method, len(capacity)), method, n_lbs, capacity)


def _per_lb(saved: dict, method: str, n_lbs: int, capacity: Sequence[float]) -> list[RlPolicy]:
    n_servers = len(capacity)
    if saved.get("kind") == "centr":
        raise ConfigError(
            f"--method {method}: a Centr-LB policy needs every LB's observation at once",
            hint="run it in the simulator (marllb simulate); each testbed LB sees only its own",
        )
    hyper = saved["hyper"]
    levels = tuple(hyper["levels"])
    qmix = saved.get("kind") == "qmix"
    if qmix and saved["n_agents"] != n_lbs:
        raise ConfigError(f"--method {method}: QMIX trained for {saved['n_agents']} LBs, this config has {n_lbs}")
    n_in = n_servers * 6 + n_servers * len(levels) + (n_lbs if qmix else 0)
    policies = []
    for i in range(n_lbs):
        net = Recurrent(n_in, hyper["hidden"], n_servers, len(levels))
        net.load_state_dict(saved["actors"][i % len(saved["actors"])])
        extra = np.eye(n_lbs, dtype=np.float32)[i] if qmix else None
        policies.append(RlPolicy(GreedyPolicy(net, levels, extra, _scale(saved, capacity))))
    return policies
