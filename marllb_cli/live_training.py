"""`marllb train --env testbed`: learning on the live testbed, episode by episode, as both papers did.

    for each episode:
        acting.pt ← the learners' current actors (atomically)
        draw the episode's offered load (or use --speed) and a window of the trace, from (seed, episode)
        replay the window through the LBs in learning mode: a run directory under OUT/episodes/, exactly
            a `replay-trace` run, so the learning curve is the real JCT of real requests
            isac, ssac, distr   each LB's agent samples from its own actor (`ExploringPolicy`), no traffic
                                between LBs
            qmix, centr         the coordinator (on `experiment.coordinator.lb`'s address) ticks every agent,
                                gathers the observations and answers with every LB's action
        rebuild the transitions from what was logged (per LB: the agents' step logs; for the coordinated
            algorithms: the coordinator's trajectory, where the joint steps merged), rewards from the next
            observation (`rewards.REWARDS`, as the simulator's environment)
        store, update (CIKM's schedule: `updates_per_episode` once `warmup_episodes` are stored; with --init,
            from the first episode on and without the uniform warm-up),
        checkpoint.pt, policy.pt and curve.parquet atomically (`training.save_training`)

Where learning happens: on the controller, from the shipped transitions, for every algorithm. The agents
stay light (the LBs' CPUs forward packets), one process holds the learners, and checkpoints and `--resume`
are the simulator's own: a SIGKILL loses at most the running episode.

Transitions per episode: T = 95 % of episode_s / period from the replay window's first step on, the same for
every episode so that whole episodes batch together; an LB whose agent logged fewer (it died) stores nothing
that episode, and the coordinator acts on a dead agent's last observation, so QMIX keeps the full episode.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli.agents.methods import ALGOS
from marllb_cli.agents.rl.common import load_file, observation_width
from marllb_cli.agents.rl.qmix import QmixHyper
from marllb_cli.agents.rl.sac import SacHyper
from marllb_cli.agents.runner import LearningSpec
from marllb_cli.calibration import CALIBRATION_FILE, Calibration, plan_load
from marllb_cli.config import Config
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.coordination.link import CoordinatorAddress
from marllb_cli.coordination.protocol import SECRET_FILE, new_secret
from marllb_cli.deploy import testbed_for
from marllb_cli.deploy.base import exclusive_use
from marllb_cli.errors import ConfigError, TestbedError
from marllb_cli.experiment import ReplayOptions, plan_replay, replay_trace
from marllb_cli.presets import DEFAULT_EPISODE_S, DEFAULT_EPISODES
from marllb_cli.rewards import REWARDS, scored, smooth_series
from marllb_cli.sim.traffic import offered_load
from marllb_cli.steps import json_lines
from marllb_cli.traces import read_trace
from marllb_cli.training import (
    CHECKPOINT,
    LOAD_SPREAD,
    atomic_torch,
    make_team,
    mean_finite,
    resume_from,
    save_training,
)

__all__ = ["LiveOptions", "train_live", "COORDINATED"]

#: Algorithms whose agents act through the coordinator.
COORDINATED = ("qmix", "centr")
ACTING = "acting.pt"
#: The generated trace of a training run without --trace: Poisson requests at this rate for this long.
GENERATED_RATE, GENERATED_S = 200.0, 900.0


@dataclass(frozen=True)
class LiveOptions:
    """What `marllb train --env testbed` asks for besides the config and the algorithm."""

    out: Path
    reward: str | None = None
    episodes: int = DEFAULT_EPISODES
    episode_s: float = DEFAULT_EPISODE_S
    seed: int = 0
    resume: bool = False
    hyper: dict[str, Any] = dataclasses.field(default_factory=dict)
    trace: Path | None = None
    load_range: tuple[float, float] | None = None
    speed: float | None = None
    init: Path | None = None


def train_live(
    config: Config,
    algo: str,
    options: LiveOptions,
    *,
    progress: Callable[[dict[str, Any]], None] = lambda _: None,
    started: Callable[[int], None] = lambda _: None,
    replay_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> pd.DataFrame:
    """Train `algo` on the deployed testbed `config` describes; return the learning curve. The testbed is
    held for the whole training (`exclusive_use`), so no other command measures between its episodes."""
    with exclusive_use(testbed_for(config)):
        return _train_live(config, algo, options, progress, started, replay_progress)


def _train_live(
    config: Config,
    algo: str,
    options: LiveOptions,
    progress: Callable[[dict[str, Any]], None],
    started: Callable[[int], None],
    replay_progress: Callable[[dict[str, Any]], None],
) -> pd.DataFrame:
    if algo not in ALGOS:
        raise ConfigError(f"--algo {algo!r}: not available", hint=f"choose one of {', '.join(ALGOS)}")
    reward = options.reward or ALGOS[algo]
    if reward not in REWARDS:
        raise ConfigError(f"--reward {reward!r}: unknown", hint=f"choose one of {', '.join(REWARDS)}")
    testbed = testbed_for(config)
    topology = testbed.topology
    n_lbs, n_servers = len(topology.lbs), len(topology.servers)
    if algo == "ssac" and n_lbs != 1:
        raise ConfigError(f"--algo ssac: one LB that sees all traffic, but testbed {topology.testbed} has {n_lbs}")
    coordinated = algo in COORDINATED
    if coordinated:
        _check_coordinator(config, n_lbs)
    testbed.require_deployed()
    period = config.experiment.agent_period_ms / 1000
    address, coordinator_settings = None, config.experiment.coordinator
    if coordinated:
        address = _coordinator_address(config, testbed.state_dir, topology)
    settings = (QmixHyper if algo == "qmix" else SacHyper)(**options.hyper)
    team = make_team(algo, n_lbs, n_servers, settings, options.seed)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    trace_path = options.trace or _generated_trace(out, options.seed)
    trace, _ = read_trace(trace_path)
    speed, load_range, max_start = _pacing(config, testbed.state_dir, trace, options)
    meta = {
        "algo": algo,
        "reward": reward,
        "seed": options.seed,
        "episode_s": options.episode_s,
        "env": "testbed",
        "testbed": topology.testbed,
        "load_range": list(load_range) if load_range else None,
        "speed": speed,
        "trace": str(trace_path),
        "init": str(options.init.resolve()) if options.init is not None else None,
    }
    start, rows = resume_from(out, meta, settings, team) if options.resume else (0, [])
    if options.init is not None and start == 0:
        _initialise(team, options.init, algo)
    (out / "train.json").write_text(json.dumps({**meta, "hyper": settings.__dict__}, indent=2, default=list))
    transitions = round(0.95 * options.episode_s / period)
    # Fine-tuning (--init) starts from trained actors and a filled buffer: no uniform warm-up, updates at once.
    warmup = 0 if options.init is not None else settings.warmup_episodes
    started(start)
    for episode in range(start, options.episodes):
        began = time.perf_counter()
        atomic_torch({"algo": algo, "reward": reward, "episode": episode, **team.policy()}, out / ACTING)
        rng = np.random.default_rng([options.seed, episode])
        load = float(rng.uniform(*load_range)) if load_range else None
        episode_seed = options.seed * 100_003 + episode
        replay = ReplayOptions(
            trace=trace_path,
            method="sed",
            speed=speed or 1.0,
            duration_s=options.episode_s,
            runs_dir=out / "episodes",
            seed=episode_seed,
            load=load,
            start_s=float(rng.uniform(0, max_start)),
        )
        plan = plan_replay(config, replay)
        warm = episode < warmup
        plan.learning = LearningSpec(
            policy=None if coordinated else out / ACTING,
            levels=list(settings.levels),
            residual=settings.residual,
            uniform=warm,
            seed=episode_seed,
            coordinator=address,
            neurips_obs=settings.neurips_obs,
        )
        if coordinated and address is not None:
            plan.coordinator = CoordinatorSpec(
                lbs=[lb.name for lb in topology.lbs],
                n_servers=n_servers,
                host=address.host,
                port=address.port,
                secret=address.secret,
                period=period,
                deadline=coordinator_settings.deadline_ms / 1000,
                policy=out / ACTING,
                uniform=warm,
                epsilon=team.learner.epsilon() if algo == "qmix" else 0.0,  # type: ignore[union-attr]
                seed=episode_seed,
                trajectory=testbed.state_dir / "lb" / "coordinator.jsonl",
                features=observation_width(settings),
            )
        outcome = replay_trace(config, dataclasses.replace(replay, method=f"train-{algo}"), replay_progress, plan=plan)
        if outcome.interrupted:
            raise KeyboardInterrupt  # the episode is incomplete: the checkpoint stays at the last complete one
        logged = read_episode(
            outcome.path, plan.coordinator, n_lbs, options.episode_s, transitions, len(settings.levels)
        )
        stored = _store(team, algo, logged, reward, settings.reward_smoothing)
        losses: list[dict[str, float]] = []
        if stored and episode + 1 >= warmup:
            for _ in range(settings.updates_per_episode):
                losses += team.update()
        row = {
            "episode": episode,
            "load": load if load is not None else float("nan"),
            "speed": float(plan.meta["speed"]),
            "reward": logged.mean_reward,
            **{key: outcome.summary.get(key) for key in ("jct_mean_s", "jct_p90_s", "jct_p99_s")},
            "requests": int(outcome.summary["requests"]),
            "failed": int(outcome.summary["errors"]),
            "lbs_stored": stored,
            "transitions": transitions if stored else 0,
            **logged.figures,
            "run": str(outcome.path.relative_to(out)),
            "complete": bool(outcome.complete),
            "wall_s": time.perf_counter() - began,
            **{k: mean_finite([x[k] for x in losses]) for k in ("critic_loss", "actor_loss", "alpha", "entropy")},
        }
        rows.append({k: (float("nan") if v is None else v) for k, v in row.items()})
        save_training(out, episode, meta, team, algo, reward, rows)
        progress(rows[-1])
    return pd.DataFrame(rows)


@dataclass
class LoggedEpisode:
    """An episode's transitions as logged on the testbed.

    per_lb      per LB: (obs [T+1, n, F], action [T+1, n], prev [n]); None where its agent logged too few
                steps, and for a coordinated episode (its transitions are the coordinator's, in `joint`)
    joint       the coordinator's, for qmix/centr: (obs [T+1, m, n, F], action [T+1, m, n], prev [m, n])
    figures     step interval, round trip, misses and bytes: the curve's synchronisation columns
    """

    per_lb: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]
    joint: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    figures: dict[str, float]
    mean_reward: float = float("nan")


def read_episode(
    run: Path, coordinator: CoordinatorSpec | None, n_lbs: int, episode_s: float, transitions: int, n_levels: int
) -> LoggedEpisode:
    """The transitions of one training episode's run directory (see `LoggedEpisode`): the window is the
    replay's [0, episode_s]; each sequence is its first `transitions` + 1 steps."""
    middle = n_levels // 2
    per_lb: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    intervals, rtts, missed, bytes_step, first_ticks = [], [], [], [], []
    trajectory_bytes, window_steps = 0, []
    for i in range(n_lbs):
        path = run / "agents" / f"lb{i}.parquet"
        frame = pd.read_parquet(path) if path.exists() else pd.DataFrame()
        if frame.empty or "obs" not in frame:
            per_lb.append(None)
            continue
        trajectory_bytes += path.stat().st_size
        intervals.extend(np.diff(frame["t_s"].to_numpy()))
        inside = frame[(frame["t_s"] >= 0) & (frame["t_s"] <= episode_s)]
        window_steps.append(len(inside))
        if "missed" in frame:
            missed.extend(inside["missed"].astype(bool))
            rtts.extend(inside["rtt_s"].dropna())
            bytes_step.extend(inside["bytes_in"] + inside["bytes_out"])
            ticks = inside["tick"].dropna()
            if len(ticks):
                first_ticks.append(int(ticks.iloc[0]))
        if coordinator is not None or len(inside) < transitions + 1:
            per_lb.append(None)  # the coordinator's trajectory holds a coordinated episode; or too short
            continue
        before = frame[frame["t_s"] < 0]
        prev = np.asarray(before["action"].iloc[-1], dtype=np.int64) if len(before) else None
        obs = np.stack([np.stack(o) for o in inside["obs"].iloc[: transitions + 1]]).astype(np.float32)
        action = np.stack(list(inside["action"].iloc[: transitions + 1])).astype(np.int64)
        per_lb.append((obs, action, prev if prev is not None else np.full(action.shape[1], middle)))
    joint = None
    figures: dict[str, float] = {
        "window_steps_min": float(min(window_steps)) if window_steps else 0.0,
        "step_interval_p50_s": _quantile(intervals, 0.5),
        "step_interval_p99_s": _quantile(intervals, 0.99),
        "trajectory_bytes": float(trajectory_bytes),
    }
    if coordinator is not None:
        joint, coordinator_figures = _coordinator_episode(run, coordinator, first_ticks, transitions, middle)
        figures.update(
            coordinator_figures,
            rtt_p50_s=_quantile(rtts, 0.5),
            rtt_p99_s=_quantile(rtts, 0.99),
            missed_steps=float(np.sum(missed)),
            agent_bytes_per_step=float(np.mean(bytes_step)) if bytes_step else float("nan"),
        )
    return LoggedEpisode(per_lb, joint, figures)


def _coordinator_episode(
    run: Path, spec: CoordinatorSpec, first_ticks: list[int], transitions: int, middle: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, dict[str, float]]:
    """The coordinator's trajectory from the window's first tick (kept in the run as coordinator.jsonl)."""
    text = spec.trajectory.read_text() if spec.trajectory.exists() else ""
    (run / "coordinator.jsonl").write_text(text)
    rows = json_lines(text)
    figures = {
        "coordinator_bytes_per_step": float(np.mean([r["bytes_in"] + r["bytes_out"] for r in rows])) if rows else 0.0,
        "coordinator_wait_p99_s": _quantile([r["wait_s"] for r in rows], 0.99),
        "coordinator_trajectory_bytes": float(len(text.encode())),
    }
    if not first_ticks or not rows:
        return None, figures
    first = min(first_ticks)
    window = [r for r in rows if r["step"] >= first][: transitions + 1]
    before = [r for r in rows if r["step"] < first]
    figures["coordinator_misses"] = float(sum(len(r["fresh"]) - sum(r["fresh"]) for r in window))
    if len(window) < transitions + 1:
        return None, figures
    obs = np.asarray([r["obs"] for r in window], dtype=np.float32)
    action = np.asarray([r["action"] for r in window], dtype=np.int64)
    prev = np.asarray(before[-1]["action"], dtype=np.int64) if before else np.full(action.shape[1:], middle)
    return (obs, action, prev), figures


def _store(team: Any, algo: str, logged: LoggedEpisode, reward_name: str, smoothing: float) -> int:
    """Put the episode into the learners; return how many LBs' transitions were stored."""
    reward = REWARDS[reward_name]

    def rewards(obs: np.ndarray) -> np.ndarray:  # [T+1, n, F] → r_t = R(o_{t+1}), smoothed as the simulator's [T]
        loads = smooth_series(scored(reward_name, obs[1:]), smoothing)
        return np.array([reward(step) for step in loads])

    if algo in COORDINATED:
        if logged.joint is None:
            return 0
        obs, action, prev = logged.joint
        per_lb = np.stack([rewards(obs[:, i]) for i in range(obs.shape[1])], axis=1)  # [T, m]
        logged.mean_reward = float(per_lb.mean())
        team.store_logged(obs, action, prev, per_lb.mean(axis=1))
        return obs.shape[1]
    stored, means = 0, []
    for i, episode in enumerate(logged.per_lb):
        if episode is None:
            continue
        obs, action, prev = episode
        r = rewards(obs)
        means.append(r.mean())
        team.store_logged(i, obs, action, prev, r)
        stored += 1
    logged.mean_reward = float(np.mean(means)) if means else float("nan")
    return stored


def _check_coordinator(config: Config, n_lbs: int) -> None:
    """`experiment.coordinator` fits the testbed and the agent period."""
    settings = config.experiment.coordinator
    if settings.lb >= n_lbs:
        raise ConfigError(
            f"experiment.coordinator.lb: {settings.lb}, but the testbed has {n_lbs} LBs",
            hint=f"an LB index from 0 to {n_lbs - 1}",
        )
    if settings.deadline_ms >= config.experiment.agent_period_ms:
        raise ConfigError(
            f"experiment.coordinator.deadline_ms: {settings.deadline_ms} is not shorter than the agent period "
            f"({config.experiment.agent_period_ms} ms)",
            hint="a deadline well inside the period, e.g. 40 % of it",
        )


def _coordinator_address(config: Config, state_dir: Path, topology: Any) -> CoordinatorAddress:
    """Where the agents find the coordinator: LB `experiment.coordinator.lb`'s data address, and the
    testbed's secret (made now for a testbed deployed before the coordinator existed)."""
    settings = config.experiment.coordinator
    secret = state_dir / SECRET_FILE
    if not secret.exists():
        new_secret(secret)
    return CoordinatorAddress(host=str(topology.lbs[settings.lb].ip), port=settings.port, secret=secret)


def _generated_trace(out: Path, seed: int) -> Path:
    """Without --trace: a Poisson trace of the papers' for-loop requests, made once per training directory."""
    from marllb_cli.traces.formats import write_parquet
    from marllb_cli.traces.generate import poisson

    path = out / "trace.parquet"
    if not path.exists():
        write_parquet(poisson(rate=GENERATED_RATE, duration=GENERATED_S, seed=seed), path)
    return path


def _pacing(
    config: Config, state_dir: Path, trace: pd.DataFrame, options: LiveOptions
) -> tuple[float | None, tuple[float, float] | None, float]:
    """(fixed speed, or None) and (episode load range, or None), and the latest window start that still
    leaves a whole episode of trace. Loads need the testbed's calibration; --speed does not."""
    span = float(trace["t"].max()) if len(trace) else 0.0
    if options.speed is not None:
        if options.load_range is not None:
            raise ConfigError("--load and --speed: give one", hint="--load needs `marllb calibrate`; --speed does not")
        return options.speed, None, max(0.0, span - options.episode_s * options.speed)
    path = state_dir / CALIBRATION_FILE
    try:
        calibration = Calibration.load(path)
        calibration.check(config, path)
    except (ConfigError, TestbedError) as exc:
        raise ConfigError(
            f"{exc.args[0] if exc.args else path}: episodes at a load need the testbed's calibration",
            hint=f"run `marllb calibrate {config.source or 'CONFIG'}` first, or give a fixed --speed",
        ) from None
    load_range = options.load_range or tuple(factor * offered_load(config) for factor in LOAD_SPREAD)
    fastest = plan_load(trace, calibration, load=max(load_range)).speed
    return None, load_range, max(0.0, span - options.episode_s * fastest)  # type: ignore[return-value]


def _initialise(team: Any, init: Path, algo: str) -> None:
    """--init DIR: start from a simulator-trained run of the same algorithm: its networks, targets,
    optimisers, temperature, exploration schedule and reward scale, but not its replay buffer. Fine-tuning
    learns from the testbed's own transitions (a buffer of forty simulated episodes would outvote a few real
    ones in every batch), and simulated episodes are a different length from the testbed's."""
    saved = load_file(init / CHECKPOINT, "training checkpoint")
    if saved.get("meta", {}).get("algo") != algo:
        raise ConfigError(
            f"--init {init}: trained with --algo {saved.get('meta', {}).get('algo')}, not {algo}",
            hint="fine-tune with the algorithm it was trained with",
        )
    try:
        team.load(saved["learners"])
        for buffer in team.buffers():
            buffer.episodes.clear()
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"--init {init}: its learners do not fit this testbed ({type(exc).__name__})",
            hint="train in the simulator on a config with this testbed's LBs, servers and hyperparameters",
        ) from None


def _quantile(values: Any, q: float) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.quantile(values, q)) if len(values) else float("nan")
