"""`marllb train`: episodes on the simulator's PettingZoo environment, a checkpoint after every episode,
a learning curve, and a policy file that `--method rl:DIR` runs in simulation and on the testbed.

    for each episode: offered load drawn from `load_range` (default: 0.8–1.05 × the config's own offered
    load, so a config sets the regime it trains in) and requests from the episode's seed (traffic
    varies per episode, reproducibly) → every LB acts from its own observation each 250 ms → the learners
    store the episode and make `updates_per_episode` updates → curve.parquet gets a row (reward, mean
    and p99 JCT, losses) → checkpoint.pt (nets, optimisers, replay buffers, RNG state) and policy.pt
    (what acting needs) are replaced atomically.

Algorithms: `isac`, `ssac`, `distr` (independent SAC-discrete learners, `sac.py`; ssac runs one LB that
sees all traffic), `centr` (Centr-LB: one SAC learner for all LBs' weights) and `qmix` (`qmix.py`, one
learner for all LBs on the team reward).

`--resume` continues from checkpoint.pt exactly: the same seed gives the same checkpoints whether a run
was interrupted or not. Everything saved is tensors and plain values (torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from marllb_cli.agents.methods import ALGOS
from marllb_cli.agents.rl.common import EpisodeBuffer, load_file, normalise, plain
from marllb_cli.agents.rl.header import MAX_HIDDEN, PolicyHeader, write_header
from marllb_cli.agents.rl.qmix import QmixHyper, QmixLearner
from marllb_cli.agents.rl.sac import SacHyper, SacLearner
from marllb_cli.config import Config
from marllb_cli.errors import ConfigError
from marllb_cli.presets import DEFAULT_EPISODE_S, DEFAULT_EPISODES
from marllb_cli.rewards import REWARDS
from marllb_cli.seeds import VALIDATION_SEEDS
from marllb_cli.sim.env import LoadBalancingEnv
from marllb_cli.sim.traffic import offered_load

__all__ = [
    "ALGOS",
    "logged_inputs",
    "atomic_torch",
    "make_team",
    "mean_finite",
    "hyper_names",
    "greedy_evaluation",
    "parse_hyper",
    "settings_for",
    "resume_from",
    "save_training",
    "train",
]

CHECKPOINT, POLICY, CURVE = "checkpoint.pt", "policy.pt", "curve.parquet"
#: Episode loads are drawn from this range times the config's offered load: a bit below to a bit above it.
LOAD_SPREAD = (0.8, 1.05)


class IndependentSac:
    """One SAC learner per LB, each on its own reward."""

    def __init__(self, n_lbs: int, n_servers: int, hyper: SacHyper, seed: int) -> None:
        self.hyper = hyper
        self.learners = [SacLearner(n_servers, hyper, seed * 1_000 + i) for i in range(n_lbs)]

    def reset(self) -> None:
        self.inputs: list[list[np.ndarray]] = [[] for _ in self.learners]
        self.actions: list[list[np.ndarray]] = [[] for _ in self.learners]
        for learner in self.learners:
            learner.reset()

    def act(self, observations: list[np.ndarray], warm: bool) -> list[np.ndarray]:
        out = []
        for i, (learner, obs) in enumerate(zip(self.learners, observations, strict=True)):
            action, x = learner.act(obs, uniform=warm)
            self.inputs[i].append(x)
            self.actions[i].append(action)
            out.append(action)
        return out

    def end_episode(self, observations: list[np.ndarray], rewards: np.ndarray) -> None:
        """rewards [T, n_lbs]: each LB learns from its own column."""
        for i, learner in enumerate(self.learners):
            next_input = learner.features(observations[i], learner.prev_action)
            learner.store(np.stack(self.inputs[i]), np.stack(self.actions[i]), rewards[:, i], next_input)

    def store_logged(self, i: int, obs: np.ndarray, actions: np.ndarray, prev: np.ndarray, rewards: np.ndarray) -> None:
        """LB i's episode as its testbed agent logged it: observations [T+1, n, F], the levels chosen at each
        [T+1, n] (the last is not a transition), the levels in force before the first, rewards [T]."""
        learner = self.learners[i]
        x = logged_inputs(learner.features, obs, actions, prev)
        learner.store(x[:-1], actions[:-1], rewards, x[-1])

    def update(self) -> list[dict[str, float]]:
        return [learner.update() for learner in self.learners]

    def buffers(self) -> list[EpisodeBuffer]:
        return [learner.buffer for learner in self.learners]

    def state(self) -> list[dict]:
        return [learner.state() for learner in self.learners]

    def load(self, state: list[dict]) -> None:
        for learner, saved in zip(self.learners, state, strict=True):
            learner.load(saved)

    def policy(self) -> dict:
        first = self.learners[0]
        return {
            "kind": "sac",
            "n_servers": first.n,
            "hyper": first.hyper_state(),
            "actors": [learner.actor.state_dict() for learner in self.learners],
        }


class Centralised:
    """Centr-LB: one SAC learner over the LBs' stacked observations, one head per (LB, server)."""

    def __init__(self, n_lbs: int, n_servers: int, hyper: SacHyper, seed: int) -> None:
        self.hyper, self.m, self.n = hyper, n_lbs, n_servers
        self.sac = IndependentSac(1, n_lbs * n_servers, hyper, seed)

    def reset(self) -> None:
        self.sac.reset()

    def act(self, observations: list[np.ndarray], warm: bool) -> list[np.ndarray]:
        (action,) = self.sac.act([np.concatenate(observations)], warm)
        return list(action.reshape(self.m, self.n))

    def end_episode(self, observations: list[np.ndarray], rewards: np.ndarray) -> None:
        self.sac.end_episode([np.concatenate(observations)], rewards.mean(axis=1, keepdims=True))

    def store_logged(self, obs: np.ndarray, actions: np.ndarray, prev: np.ndarray, rewards: np.ndarray) -> None:
        """An episode as the coordinator logged it: obs [T+1, m, n, F], actions [T+1, m, n], prev [m, n], team
        rewards [T]; every LB's servers are one learner's heads."""
        t1 = len(obs)
        self.sac.store_logged(0, obs.reshape(t1, -1, obs.shape[-1]), actions.reshape(t1, -1), prev.reshape(-1), rewards)

    def update(self) -> list[dict[str, float]]:
        return self.sac.update()

    def buffers(self) -> list[EpisodeBuffer]:
        return self.sac.buffers()

    def state(self) -> list[dict]:
        return self.sac.state()

    def load(self, state: list[dict]) -> None:
        self.sac.load(state)

    def policy(self) -> dict:
        return {**self.sac.policy(), "kind": "centr", "n_servers": self.n, "n_agents": self.m}


class Qmix:
    """One QMIX learner for all LBs, on the team reward."""

    def __init__(self, n_lbs: int, n_servers: int, hyper: QmixHyper, seed: int) -> None:
        self.hyper = hyper
        self.learner = QmixLearner(n_lbs, n_servers, hyper, seed)

    def reset(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.learner.reset()

    def act(self, observations: list[np.ndarray], warm: bool) -> list[np.ndarray]:
        actions, x = self.learner.act(observations)
        self.inputs.append(x)
        self.actions.append(actions)
        self.states.append(_state(observations))
        return list(actions)

    def end_episode(self, observations: list[np.ndarray], rewards: np.ndarray) -> None:
        next_inputs = self.learner.features(observations, self.learner.prev_actions)
        states = np.stack([*self.states, _state(observations)])
        self.learner.store(np.stack(self.inputs), np.stack(self.actions), rewards.mean(axis=1), next_inputs, states)

    def store_logged(self, obs: np.ndarray, actions: np.ndarray, prev: np.ndarray, rewards: np.ndarray) -> None:
        """An episode as the coordinator logged it: obs [T+1, m, n, F], actions [T+1, m, n], prev [m, n], team
        rewards [T]."""
        x = logged_inputs(lambda o, p: self.learner.features(list(o), p), obs, actions, prev)
        states = np.stack([_state(list(o)) for o in obs])
        self.learner.store(x[:-1], actions[:-1], rewards, x[-1], states)

    def update(self) -> list[dict[str, float]]:
        return [self.learner.update()]

    def buffers(self) -> list[EpisodeBuffer]:
        return [self.learner.buffer]

    def state(self) -> list[dict]:
        return [self.learner.state()]

    def load(self, state: list[dict]) -> None:
        self.learner.load(state[0])

    def policy(self) -> dict:
        return {
            "kind": "qmix",
            "n_servers": self.learner.n,
            "n_agents": self.learner.m,
            "hyper": self.learner.hyper_state(),
            "actors": [self.learner.agent.state_dict()],
        }


def logged_inputs(features: Callable, obs: np.ndarray, actions: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Network inputs of a logged episode: step k's observation with the levels in force before it (`prev`
    at k = 0, else the action of step k − 1), as the agent encoded them when it acted. [T+1, ...]."""
    before = np.concatenate([prev[None], actions[:-1]])
    return np.stack([features(o, p) for o, p in zip(obs, before, strict=True)])


def _state(observations: list[np.ndarray]) -> np.ndarray:
    """QMIX's global state: every LB's normalised observation, concatenated."""
    return np.concatenate([normalise(obs).reshape(-1) for obs in observations])


def make_team(algo: str, n_lbs: int, n_servers: int, settings: Any, seed: int) -> IndependentSac | Centralised | Qmix:
    """The learners of `algo` for `n_lbs` LBs over `n_servers` servers."""
    kind = {"qmix": Qmix, "centr": Centralised}.get(algo, IndependentSac)
    return kind(n_lbs, n_servers, settings, seed)  # type: ignore[arg-type]


def hyper_names(algo: str) -> set[str]:
    """The hyperparameters `algo`'s learner has (QMIX's or SAC's)."""
    return {f.name for f in fields(QmixHyper if algo == "qmix" else SacHyper)}


def settings_for(
    algo: str, reward: str | None, hyper: dict[str, Any], preset_hyper: dict[str, Any] | None = None
) -> SacHyper | QmixHyper:
    """`algo`'s hyperparameters: a preset's values (trusted as they are), then `hyper` (plain values, as a
    sweep file's YAML gives them), each checked as `--hyper` checks it. A ConfigError names what is wrong,
    an unknown algorithm or reward too."""
    if algo not in ALGOS:
        raise ConfigError(f"algo {algo!r}: not available", hint=f"choose one of {', '.join(ALGOS)}")
    if (reward or ALGOS[algo]) not in REWARDS:
        raise ConfigError(f"reward {reward!r}: unknown", hint=f"choose one of {', '.join(REWARDS)}")
    text = [f"{k}={','.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in hyper.items()]
    cls = QmixHyper if algo == "qmix" else SacHyper
    return cls(**{**(preset_hyper or {}), **parse_hyper(algo, text)})


def parse_hyper(algo: str, items: list[str]) -> dict[str, Any]:
    """`lr=1e-4` … → typed overrides of the algorithm's hyperparameters; a ConfigError names the bad one."""
    cls = QmixHyper if algo == "qmix" else SacHyper
    known = hyper_names(algo)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--hyper {item!r}: expected NAME=VALUE with NAME in {', '.join(sorted(known))}")
        default = getattr(cls(), key)
        try:
            if isinstance(default, bool):
                out[key] = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            elif isinstance(default, tuple):
                out[key] = tuple(float(v) for v in value.split(","))
                if not out[key] or not all(0 < v < 1e6 for v in out[key]):
                    raise ValueError(value)
            elif isinstance(default, float):
                out[key] = float(value)
                if not math.isfinite(out[key]) or out[key] < 0 or (key == "reward_smoothing" and out[key] >= 1):
                    raise ValueError(value)
            else:
                out[key] = int(value)
                if not 0 <= out[key] <= (MAX_HIDDEN if key in ("hidden", "mixing_hidden") else 1_000_000):
                    raise ValueError(value)
        except (ValueError, KeyError):
            raise ConfigError(
                f"--hyper {item!r}: {value!r} is not a valid {type(default).__name__} for {key}",
                hint="a finite, non-negative value of the size marllb's learners take",
            ) from None
    return out


def train(
    config: Config,
    algo: str,
    *,
    out: Path,
    reward: str | None = None,
    episodes: int = DEFAULT_EPISODES,
    episode_s: float = DEFAULT_EPISODE_S,
    seed: int = 0,
    resume: bool = False,
    hyper: dict[str, Any] | None = None,
    load_range: tuple[float, float] | None = None,
    eval_every: int = 0,
    progress: Callable[[dict[str, Any]], None] = lambda _: None,
    started: Callable[[int], None] = lambda _: None,
) -> pd.DataFrame:
    """Train `algo` for `episodes` episodes into `out`; return the learning curve. `started(first episode)`
    is called once every input is checked, before the first episode; `progress(row)` after each. Every
    `eval_every` episodes, and after the last, the greedy policy is evaluated (`greedy_evaluation`)."""
    if algo not in ALGOS:
        raise ConfigError(f"--algo {algo!r}: not available", hint=f"choose one of {', '.join(ALGOS)}")
    reward = reward or ALGOS[algo]
    if reward not in REWARDS:
        raise ConfigError(f"--reward {reward!r}: unknown", hint=f"choose one of {', '.join(REWARDS)}")
    if algo == "ssac":
        config = config.model_copy(update={"testbed": config.testbed.model_copy(update={"lbs": 1})})
    settings = (QmixHyper if algo == "qmix" else SacHyper)(**(hyper or {}))
    env = LoadBalancingEnv(
        config,
        reward=reward,
        levels=settings.levels,
        episode_s=episode_s,
        residual=settings.residual,
        reward_smoothing=settings.reward_smoothing,
        neurips_observation=settings.neurips_obs,
    )
    n_lbs, n_servers = len(env.possible_agents), len(env.models)
    team = make_team(algo, n_lbs, n_servers, settings, seed)
    out.mkdir(parents=True, exist_ok=True)
    load_range = load_range or tuple(factor * offered_load(config) for factor in LOAD_SPREAD)
    meta = {"algo": algo, "reward": reward, "seed": seed, "episode_s": episode_s, "load_range": list(load_range)}
    start, rows = resume_from(out, meta, settings, team) if resume else (0, [])
    (out / "train.json").write_text(
        json.dumps({**meta, "hyper": settings.__dict__, "config": config.testbed.name}, indent=2, default=list)
    )
    started(start)
    for episode in range(start, episodes):
        began = time.perf_counter()
        load = float(np.random.default_rng([seed, episode]).uniform(*load_range))
        observations, _ = env.reset(seed=seed * 100_003 + episode, options={"load": load})
        team.reset()
        warm = episode < settings.warmup_episodes
        rewards: list[list[float]] = []
        while env.agents:
            actions = team.act([observations[a] for a in env.possible_agents], warm)
            observations, reward_now, *_ = env.step(dict(zip(env.possible_agents, actions, strict=True)))
            rewards.append([reward_now[a] for a in env.possible_agents])
        team.end_episode([observations[a] for a in env.possible_agents], np.asarray(rewards))
        losses: list[dict[str, float]] = []
        if episode + 1 >= settings.warmup_episodes:
            for _ in range(settings.updates_per_episode):
                losses += team.update()
        result = env.engine.result()
        done = ~np.isnan(result.finish)
        jct = result.finish[done] - result.arrival[done]
        row = {
            "episode": episode,
            "load": load,
            "reward": float(np.mean(rewards)),
            "jct_mean_s": float(jct.mean()) if len(jct) else float("nan"),
            "jct_p99_s": float(np.quantile(jct, 0.99)) if len(jct) else float("nan"),
            "requests": int(len(result.finish)),
            "rejected": int((~done).sum()),
            "wall_s": time.perf_counter() - began,
            **{k: mean_finite([x[k] for x in losses]) for k in ("critic_loss", "actor_loss", "alpha", "entropy")},
        }
        rows.append(row)
        due = eval_every and ((episode + 1) % eval_every == 0 or episode + 1 == episodes)
        evaluate = (lambda: greedy_evaluation(config, out, episode_s)) if due else None
        save_training(out, episode, meta, team, algo, reward, rows, evaluate)
        progress(row)
    return pd.DataFrame(rows)


#: The request seed of greedy evaluations during training: a validation seed (`marllb_cli.seeds`), never
#: one that `bench policies` reports on, nor one an episode trains on.
GREEDY_EVAL_SEED = VALIDATION_SEEDS[0]


def greedy_evaluation(config: Config, out: Path, episode_s: float) -> dict[str, float]:
    """The policy just saved in `out`, acting greedily as it is served (`rl:OUT` in the simulator), for one
    episode's length on the validation seed at the config's load: the curve's greedy columns. Exploration
    hides how good the policy is; this does not."""
    from marllb_cli.sim.run import run_simulation

    threads = torch.get_num_threads()  # serving pins one thread; training keeps its own
    try:
        requests = run_simulation(config, f"rl:{out}", seed=GREEDY_EVAL_SEED, duration_s=episode_s).requests
    finally:
        torch.set_num_threads(threads)
    jct = requests["jct_s"].dropna().to_numpy()
    return {
        "greedy_jct_mean_s": float(jct.mean()) if len(jct) else float("nan"),
        "greedy_jct_p99_s": float(np.quantile(jct, 0.99)) if len(jct) else float("nan"),
        "greedy_rejected": int(requests["jct_s"].isna().sum()),
    }


def resume_from(out: Path, meta: dict[str, Any], settings: Any, team: Any) -> tuple[int, list[dict]]:
    """`--resume`: load OUT/checkpoint.pt into `team` when it exists and was made with the same `meta` and
    hyperparameters; return (the first episode to run, the curve's rows so far). (0, []) without one."""
    if not (out / CHECKPOINT).exists():
        return 0, []
    saved = load_file(out / CHECKPOINT, "training checkpoint")
    if not isinstance(saved.get("meta"), dict) or not isinstance(saved.get("learners"), list):
        raise ConfigError(f"{out / CHECKPOINT}: not a marllb training checkpoint", hint="use another --out")
    differs = {key for key in meta if saved["meta"].get(key) != meta[key]}
    saved_hyper = saved["learners"][0].get("hyper", {}) if saved["learners"] else {}
    differs |= {f"hyper {key}" for key, value in plain(settings).items() if saved_hyper.get(key) != value}
    if differs:
        raise ConfigError(
            f"{out}: --resume with different settings ({', '.join(sorted(differs))})",
            hint="resume with the options the run started with, or use another --out",
        )
    rows = pd.read_parquet(out / CURVE).to_dict("records") if (out / CURVE).exists() else []
    try:
        team.load(saved["learners"])
        start = int(saved["episode"]) + 1
        # The curve as of the checkpoint (a kill between the two writes must not lose or repeat a row).
        rows = [dict(row) for row in saved["curve"]] if "curve" in saved else rows
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{out / CHECKPOINT}: a damaged training checkpoint ({type(exc).__name__})", hint="use another --out"
        ) from None
    return start, rows


def mean_finite(values: list[float]) -> float:
    """Mean of the finite values (QMIX has no actor loss), NaN when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def save_training(
    out: Path,
    episode: int,
    meta: dict,
    team,
    algo: str,
    reward: str,
    rows: list[dict],
    evaluate: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Policy, checkpoint and curve, each replaced atomically (a kill leaves the previous episode's).
    `evaluate()` runs once the policy is written, and what it returns joins the episode's row before the
    checkpoint and the curve hold it (the greedy evaluation reads the policy file, as serving does)."""
    policy = team.policy()
    atomic_torch({"algo": algo, "reward": reward, "episode": episode, **policy}, out / POLICY)
    write_header(out, PolicyHeader.of(policy))
    if evaluate is not None:
        rows[-1].update(evaluate())
    atomic_torch({"episode": episode, "meta": meta, "learners": team.state(), "curve": rows}, out / CHECKPOINT)
    tmp = out / (CURVE + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, out / CURVE)


def atomic_torch(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
