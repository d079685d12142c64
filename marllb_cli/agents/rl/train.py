"""`marllb train`: episodes on the simulator's PettingZoo environment, a checkpoint after every episode,
a learning curve, and a policy file that `simulate --method rl:DIR` (and the testbed's agents) can run.

    for each episode: offered load drawn from `load_range` and requests from the episode's seed (traffic
    varies per episode, reproducibly) → every LB acts from its own observation each 250 ms → each
    learner stores the episode and makes `updates_per_episode` updates → curve.parquet gets a row
    (reward, mean and p99 JCT, losses) → checkpoint.pt (nets, optimisers, replay buffers, RNG state) and
    policy.pt (the actors) are replaced atomically.

`--resume` continues from checkpoint.pt exactly: the same seed gives the same checkpoints whether a run
was interrupted or not. Everything saved is tensors and plain values (torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from marllb_cli.agents.rl.sac import SacHyper, SacLearner
from marllb_cli.config import Config
from marllb_cli.errors import ConfigError
from marllb_cli.rewards import REWARDS
from marllb_cli.sim.env import LoadBalancingEnv

__all__ = ["ALGOS", "parse_hyper", "train"]

#: Algorithm → default reward. isac: independent learners; ssac: one LB that sees all traffic;
#: distr: Distr-LB, independent learners on the per-LB VBF+log (the Markov potential game).
ALGOS = {"isac": "jain", "ssac": "jain", "distr": "vbf-log"}
CHECKPOINT, POLICY, CURVE = "checkpoint.pt", "policy.pt", "curve.parquet"


def parse_hyper(items: list[str]) -> dict[str, Any]:
    """`lr_actor=1e-4` … → typed overrides of `SacHyper`; a ConfigError names the bad one."""
    known = {f.name: f for f in fields(SacHyper)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--hyper {item!r}: expected NAME=VALUE with NAME in {', '.join(known)}")
        default = getattr(SacHyper(), key)
        try:
            out[key] = (
                tuple(float(v) for v in value.split(","))
                if isinstance(default, tuple)
                else type(default)(float(value) if isinstance(default, float) else int(value))
            )
        except ValueError:
            raise ConfigError(f"--hyper {item!r}: {value!r} is not a valid {type(default).__name__}") from None
    return out


def train(
    config: Config,
    algo: str,
    *,
    out: Path,
    reward: str | None = None,
    episodes: int = 72,
    episode_s: float = 60.0,
    seed: int = 0,
    resume: bool = False,
    hyper: dict[str, Any] | None = None,
    load_range: tuple[float, float] = (0.7, 0.95),
    progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> pd.DataFrame:
    """Train `algo` for `episodes` episodes into `out`; return the learning curve."""
    if algo not in ALGOS:
        raise ConfigError(f"--algo {algo!r}: not available", hint=f"choose one of {', '.join(ALGOS)}")
    reward = reward or ALGOS[algo]
    if reward not in REWARDS:
        raise ConfigError(f"--reward {reward!r}: unknown", hint=f"choose one of {', '.join(REWARDS)}")
    if algo == "ssac":
        config = config.model_copy(update={"testbed": config.testbed.model_copy(update={"lbs": 1})})
    settings = SacHyper(**(hyper or {}))
    env = LoadBalancingEnv(config, reward=reward, levels=settings.levels, episode_s=episode_s)
    n_servers = len(env.models)
    learners = [SacLearner(n_servers, settings, seed * 1_000 + i) for i in range(len(env.possible_agents))]
    out.mkdir(parents=True, exist_ok=True)
    meta = {"algo": algo, "reward": reward, "seed": seed, "episode_s": episode_s, "load_range": list(load_range)}
    start, rows = 0, []
    if resume and (out / CHECKPOINT).exists():
        saved = torch.load(out / CHECKPOINT, weights_only=True)
        if saved["meta"] != meta:
            raise ConfigError(f"{out}: --resume with different settings ({saved['meta']})", hint="use another --out")
        for learner, state in zip(learners, saved["learners"], strict=True):
            learner.load(state)
        start = int(saved["episode"]) + 1
        rows = pd.read_parquet(out / CURVE).to_dict("records") if (out / CURVE).exists() else []
    (out / "train.json").write_text(
        json.dumps({**meta, "hyper": settings.__dict__, "config": config.testbed.name}, indent=2, default=list)
    )
    for episode in range(start, episodes):
        started = time.perf_counter()
        load = float(np.random.default_rng([seed, episode]).uniform(*load_range))
        observations, _ = env.reset(seed=seed * 100_003 + episode, options={"load": load})
        for learner in learners:
            learner.reset()
        warm = episode < settings.warmup_episodes
        inputs: list[list[np.ndarray]] = [[] for _ in learners]
        actions: list[list[np.ndarray]] = [[] for _ in learners]
        rewards: list[list[float]] = [[] for _ in learners]
        while env.agents:
            step_actions = {}
            for i, agent in enumerate(env.possible_agents):
                action, x = learners[i].act(observations[agent], uniform=warm)
                inputs[i].append(x)
                actions[i].append(action)
                step_actions[agent] = action
            observations, reward_now, *_ = env.step(step_actions)
            for i, agent in enumerate(env.possible_agents):
                rewards[i].append(reward_now[agent])
        losses: list[dict[str, float]] = []
        for i, (learner, agent) in enumerate(zip(learners, env.possible_agents, strict=True)):
            next_input = learner.features(observations[agent], learner.prev_action)
            learner.store(np.stack(inputs[i]), np.stack(actions[i]), np.asarray(rewards[i]), next_input)
            if episode + 1 >= settings.warmup_episodes:
                losses += [learner.update() for _ in range(settings.updates_per_episode)]
        result = env.engine.result()
        done = ~np.isnan(result.finish)
        jct = result.finish[done] - result.arrival[done]
        row = {
            "episode": episode,
            "load": load,
            "reward": float(np.mean([np.mean(r) for r in rewards])),
            "jct_mean_s": float(jct.mean()) if len(jct) else float("nan"),
            "jct_p99_s": float(np.quantile(jct, 0.99)) if len(jct) else float("nan"),
            "requests": int(len(result.finish)),
            "rejected": int((~done).sum()),
            "wall_s": time.perf_counter() - started,
            **{
                k: float(np.mean([x[k] for x in losses])) if losses else float("nan")
                for k in ("critic_loss", "actor_loss", "alpha", "entropy")
            },
        }
        rows.append(row)
        _save(out, episode, meta, learners, algo, reward, rows)
        progress(row)
    return pd.DataFrame(rows)


def _save(out: Path, episode: int, meta: dict, learners: list[SacLearner], algo: str, reward: str, rows) -> None:
    """Checkpoint, policy and curve, each replaced atomically (a kill leaves the previous episode's)."""
    _atomic_torch({"episode": episode, "meta": meta, "learners": [ln.state() for ln in learners]}, out / CHECKPOINT)
    policy = {
        "algo": algo,
        "reward": reward,
        "episode": episode,
        "n_servers": learners[0].n,
        "hyper": learners[0].hyper_state(),
        "actors": [ln.actor.state_dict() for ln in learners],
    }
    _atomic_torch(policy, out / POLICY)
    tmp = out / (CURVE + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, out / CURVE)


def _atomic_torch(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
