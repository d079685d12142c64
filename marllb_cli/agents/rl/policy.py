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

from marllb_cli.agents.methods import RL_PREFIX
from marllb_cli.agents.rl.common import GreedyPolicy, Recurrent, input_size, load_file, observation_width
from marllb_cli.agents.rl.header import PolicyHeader
from marllb_cli.errors import ConfigError

__all__ = ["JointPolicy", "RlPolicy", "load_for_simulation", "load_policies"]


class RlPolicy:
    """One LB's greedy policy, with the `Agent` interface (SED weights). `neurips_observation`: it reads
    `features.observe_neurips`'s 16 columns, which whoever steps it (the simulator, the agent process) gives."""

    method = "sed"

    def __init__(self, policy: GreedyPolicy, neurips_observation: bool = False) -> None:
        self.policy = policy
        self.weights = policy.weights()
        self.neurips_observation = neurips_observation

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.weights = self.policy.act(obs)
        return self.weights


class JointPolicy:
    """Centr-LB: one network that reads every LB's observation and sets every LB's weights."""

    method = "sed"

    def __init__(self, policy: GreedyPolicy, n_lbs: int, neurips_observation: bool = False) -> None:
        self.policy, self.m = policy, n_lbs
        self.neurips_observation = neurips_observation

    def act_all(self, observations: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.policy.act(np.concatenate(observations)).reshape(self.m, -1))


def _scale(saved: dict, capacity: Sequence[float], copies: int = 1) -> np.ndarray | None:
    """Per head, what a level multiplies: the servers' capacities for a `residual` policy, else nothing."""
    return np.tile(np.asarray(capacity, dtype=np.float64), copies) if saved["hyper"].get("residual") else None


def _load(method: str, n_lbs: int, n_servers: int, *, per_lb: bool) -> dict:
    """policy.pt of a resolved `rl:DIR` (`methods.resolve_method` checked that it exists), checked against
    the LBs and servers it is to run on."""
    path = Path(method.removeprefix(RL_PREFIX)) / "policy.pt"
    saved = load_file(path, "policy")
    PolicyHeader.of(saved, path).check(method, n_lbs, n_servers, per_lb=per_lb)
    torch.set_num_threads(1)  # one small GRU per step: threads only add contention with the dataplane
    return saved


def load_for_simulation(
    method: str, n_lbs: int, capacity: Sequence[float]
) -> tuple[JointPolicy | None, list[RlPolicy]]:
    """`rl:DIR` for the simulator, read once: (the Centr-LB joint policy, []) or (None, one policy per LB).
    `capacity`: each server's cpus × speed."""
    saved = _load(method, n_lbs, len(capacity), per_lb=False)
    if saved.get("kind") == "centr":
        return _joint(saved, n_lbs, capacity), []
    return None, _per_lb(saved, n_lbs, capacity)


def _joint(saved: dict, n_lbs: int, capacity: Sequence[float]) -> JointPolicy:
    levels = tuple(saved["hyper"]["levels"])
    heads = n_lbs * len(capacity)
    hyper = saved["hyper"]
    n_in = input_size(heads, len(levels), features=observation_width(hyper))
    net = _actor(Recurrent(n_in, hyper["hidden"], heads, len(levels), gru=hyper.get("gru", True)), saved, 0)
    neurips = bool(hyper.get("neurips_obs", False))
    return JointPolicy(GreedyPolicy(net, levels, scale=_scale(saved, capacity, n_lbs)), n_lbs, neurips)


def load_policies(method: str, n_lbs: int, capacity: Sequence[float]) -> list[RlPolicy]:
    """`rl:DIR` → one policy per LB (not for Centr-LB, which needs every LB's observation); `capacity`:
    each server's cpus (× speed in simulation)."""
    return _per_lb(_load(method, n_lbs, len(capacity), per_lb=True), n_lbs, capacity)


def _per_lb(saved: dict, n_lbs: int, capacity: Sequence[float]) -> list[RlPolicy]:
    n_servers = len(capacity)
    hyper = saved["hyper"]
    levels = tuple(hyper["levels"])
    qmix = saved.get("kind") == "qmix"
    n_in = input_size(n_servers, len(levels), extra=n_lbs if qmix else 0, features=observation_width(hyper))
    policies = []
    for i in range(n_lbs):
        net = _actor(Recurrent(n_in, hyper["hidden"], n_servers, len(levels), gru=hyper.get("gru", True)), saved, i)
        extra = np.eye(n_lbs, dtype=np.float32)[i] if qmix else None
        neurips = bool(hyper.get("neurips_obs", False))
        policies.append(RlPolicy(GreedyPolicy(net, levels, extra, _scale(saved, capacity)), neurips))
    return policies


def _actor(net: Recurrent, saved: dict, index: int) -> Recurrent:
    """`net` with the weights of actor `index` (modulo the actors saved: one actor may serve every LB)."""
    try:
        actors = saved["actors"]
        net.load_state_dict(actors[index % len(actors)])
    except (KeyError, TypeError, IndexError, RuntimeError, ZeroDivisionError) as exc:
        raise ConfigError(
            f"policy.pt: its actor weights do not fit its header ({type(exc).__name__})",
            hint="use a directory written by `marllb train`, or train again",
        ) from None
    return net
