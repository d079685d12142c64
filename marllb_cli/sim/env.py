"""The simulator as a PettingZoo `ParallelEnv`: one agent per LB, one step = one agent period (250 ms).

    env = LoadBalancingEnv(load_config("configs/sim-moderate.yaml"))
    observations, infos = env.reset(seed=0)
    while env.agents:
        actions = {agent: env.action_space(agent).sample() for agent in env.agents}
        observations, rewards, terminations, truncations, infos = env.step(actions)

- agents: `lb0` … `lb{m-1}`; each sees only its own flows (the edge router hashes flows over LBs).
- observation: the LB's feature matrix [servers, 6] (`features.FEATURE_NAMES`: q_j, then flow-duration
  mean, p90, std, decayed mean, decayed p90), the same numbers its agent computes on the testbed; with
  `neurips_observation`, [servers, 16] (`features.NEURIPS_FEATURE_NAMES`: also completion-time and the LB's
  inter-arrival statistics, NeurIPS'22).
- action: the LB's SED weights. `action: discrete` (default) picks one of `levels` per server
  (MultiDiscrete; the artefact's {1.0, 1.5, 2.0}); `continuous` gives weights in [low, high] directly (Box).
  With `residual`, the weight is the server's capacity (cpus × speed) times the chosen value, so choosing
  the same level everywhere is SED with the operator's weights, and the agent learns corrections to it.
- reward: a function of the LB's own observation (`rewards.REWARDS`: a fairness of its decayed mean flow
  durations, or its flows in progress; default jain),
  optionally smoothed over two steps (`reward_smoothing`, CIKM'22 Eq. 18).
- episode: `episode_s` simulated seconds of `sim.traffic` requests; every agent is truncated at the end
  (there is no terminal state). A reset with a seed draws new requests; the same seed, the same requests.
  `reset(options={"load": x})` sets that episode's offered CPU load.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from marllb_cli.agents.rl.levels import level_weights
from marllb_cli.config import Config
from marllb_cli.features import N_FEATURES, N_NEURIPS_FEATURES
from marllb_cli.rewards import REWARDS, scored, smooth
from marllb_cli.sim.build import build_simulation, run_events, server_models
from marllb_cli.sim.events import attach_events
from marllb_cli.sim.traffic import traffic

__all__ = ["LoadBalancingEnv", "WEIGHT_LEVELS"]

#: SED weight levels of the papers' artefact.
WEIGHT_LEVELS = (1.0, 1.5, 2.0)


class LoadBalancingEnv(ParallelEnv):
    """Multi-LB load balancing in the event-driven simulator."""

    metadata = {"name": "marllb_load_balancing_v0", "render_modes": []}

    def __init__(
        self,
        config: Config,
        *,
        reward: str = "jain",
        action: Literal["discrete", "continuous"] = "discrete",
        levels: Sequence[float] = WEIGHT_LEVELS,
        weight_range: tuple[float, float] = (0.1, 2.0),
        episode_s: float = 60.0,
        seed: int | None = None,
        residual: bool = False,
        reward_smoothing: float = 0.0,
        neurips_observation: bool = False,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if action not in ("discrete", "continuous"):
            raise ValueError("action must be 'discrete' or 'continuous'")
        self.config = config
        self.reward_name = reward
        self.reward_smoothing = reward_smoothing  # CIKM'22 Eq. 18 (`rewards.smooth`)
        self.neurips_observation = neurips_observation  # 16 columns (`features.observe_neurips`), else 6
        self._last_loads: dict[str, np.ndarray] = {}
        self.action_mode = action
        self.levels = np.asarray(levels, dtype=np.float64)
        self.weight_range = weight_range
        self.episode_s = episode_s
        self.period = config.experiment.agent_period_ms / 1000
        self.models, self.server_names, _, self.cpus = server_models(config)
        self.scale = np.array([m.cpus * m.speed for m in self.models]) if residual else np.ones(len(self.models))
        self.possible_agents = [f"lb{i}" for i in range(config.testbed.lbs)]
        self.agents: list[str] = []
        self._seed = config.experiment.seed if seed is None else seed
        self._episodes = 0

    @functools.cache  # noqa: B019 - one space object per agent, as PettingZoo expects
    def observation_space(self, agent: str) -> spaces.Box:
        width = N_NEURIPS_FEATURES if self.neurips_observation else N_FEATURES
        return spaces.Box(0.0, np.inf, shape=(len(self.models), width), dtype=np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Space:
        n = len(self.models)
        if self.action_mode == "discrete":
            return spaces.MultiDiscrete([len(self.levels)] * n)
        low, high = self.weight_range
        return spaces.Box(low, high, shape=(n,), dtype=np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._seed, self._episodes = seed, 0
        episode_seed = self._seed * 100_003 + self._episodes
        self._episodes += 1
        config = self.config
        if options and "load" in options:  # this episode's offered load (training varies it)
            sim = config.sim.model_copy(
                update={"traffic": config.sim.traffic.model_copy(update={"load": float(options["load"]), "rate": None})}
            )
            config = config.model_copy(update={"sim": sim})
        load = traffic(config, seed=episode_seed, duration_s=self.episode_s)
        self.engine, self.lbs = build_simulation(
            config, "sed", load, self.models, self.cpus, seed=episode_seed, neurips_observation=self.neurips_observation
        )
        # The scenario's timed events, its drifts drawn anew for each episode (the episode's seed).
        events = run_events(config, seed=episode_seed, duration_s=self.episode_s)
        attach_events(events, self.engine, self.lbs, self.models)
        self.now = 0.0
        self.agents = list(self.possible_agents)
        self._last_loads = {}
        return self._observations(), {agent: {} for agent in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        for i, agent in enumerate(self.possible_agents):
            if agent in actions:
                self.lbs.tables[i].selector.set_weights(self._weights(actions[agent]))
        self.now += self.period
        self.engine.run(until=self.now)
        self.lbs.housekeeping(self.now)
        observations = self._observations()
        reward = REWARDS[self.reward_name]
        rewards = {}
        for a in self.agents:
            loads = scored(self.reward_name, observations[a])
            rewards[a] = reward(smooth(self._last_loads.get(a), loads, self.reward_smoothing))
            self._last_loads[a] = loads
        done = self.now >= self.episode_s - 1e-9
        terminations = {a: False for a in self.agents}
        truncations = {a: done for a in self.agents}
        infos = {a: {"time_s": self.now} for a in self.agents}
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def _weights(self, action: Any) -> list[float]:
        if self.action_mode == "discrete":
            return level_weights(self.levels, np.asarray(action, dtype=np.int64), self.scale).tolist()
        low, high = self.weight_range
        return (self.scale * np.clip(np.asarray(action, dtype=np.float64), low, high)).tolist()

    def _observations(self) -> dict[str, np.ndarray]:
        every_lb = self.lbs.observe_all(self.now)
        return {agent: every_lb[i] for i, agent in enumerate(self.possible_agents) if agent in self.agents}
