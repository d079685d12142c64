"""The PettingZoo environment over the simulator: the API test, and that actions and seeds do what they say."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from marllb_cli.config import load_config
from marllb_cli.sim.env import LoadBalancingEnv
from tests.conftest import REPO

MODERATE = REPO / "configs" / "sim-moderate.yaml"


@pytest.mark.parametrize("action", ["discrete", "continuous"])
def test_passes_the_pettingzoo_parallel_api_test(action):
    parallel_api_test(LoadBalancingEnv(load_config(MODERATE), action=action, episode_s=10), num_cycles=100)


def _episode(env: LoadBalancingEnv, seed: int, levels_per_server: list[int]) -> tuple[float, int, list]:
    observations, _ = env.reset(seed=seed)
    steps, rewards = 0, []
    while env.agents:
        observations, reward, _, truncations, infos = env.step({a: np.array(levels_per_server) for a in env.agents})
        rewards.append(reward)
        steps += 1
    result = env.engine.result()
    done = ~np.isnan(result.finish)
    return float((result.finish[done] - result.arrival[done]).mean()), steps, rewards


def test_weights_steer_the_load_and_seeds_repeat():
    env = LoadBalancingEnv(load_config(MODERATE), episode_s=30)
    # Servers 0–3 have 2 CPUs, 4–6 have 4: weights by capacity (1.0 vs 2.0) against the reverse.
    by_capacity, steps, rewards = _episode(env, 3, [0, 0, 0, 0, 2, 2, 2])
    reversed_, _, _ = _episode(env, 3, [2, 2, 2, 2, 0, 0, 0])
    assert steps == 30 / 0.25
    assert by_capacity < 0.8 * reversed_
    assert set(rewards[-1]) == {"lb0", "lb1"} and all(0 < r <= 1 for r in rewards[-1].values())  # Jain index
    again, _, _ = _episode(env, 3, [0, 0, 0, 0, 2, 2, 2])
    assert again == by_capacity
    other_seed, _, _ = _episode(env, 4, [0, 0, 0, 0, 2, 2, 2])
    assert other_seed != by_capacity


def test_observations_are_each_lbs_own_flows():
    env = LoadBalancingEnv(load_config(MODERATE), episode_s=5)
    env.reset(seed=0)
    for _ in range(8):
        observations, *_ = env.step({a: np.zeros(7, dtype=np.int64) for a in env.agents})
    engine_jobs = sum(s.jobs() for s in env.lbs.states)
    seen = sum(int(o[:, 0].sum()) for o in observations.values())
    assert seen == engine_jobs > 0  # together the LBs see every open flow, each only its own
    assert all(o.shape == (7, 6) and o.dtype == np.float32 for o in observations.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown reward"):
        LoadBalancingEnv(load_config(MODERATE), reward="happiness")


def test_residual_actions_scale_the_servers_capacity():
    """With `residual`, one level everywhere is SED with capacity weights whatever the level; without,
    it is SED with equal weights, and the 2-CPU servers get as many flows as the 4-CPU ones."""
    config = load_config(MODERATE)
    residual = LoadBalancingEnv(config, episode_s=20, residual=True)
    assert residual._weights(np.ones(7, dtype=np.int64)) == [3.0, 3.0, 3.0, 3.0, 6.0, 6.0, 6.0]  # 1.5 × cpus
    low, _, _ = _episode(residual, 5, [0] * 7)
    high, _, _ = _episode(residual, 5, [2] * 7)
    plain = LoadBalancingEnv(config, episode_s=20)
    equal, _, _ = _episode(plain, 5, [0] * 7)
    by_capacity, _, _ = _episode(plain, 5, [0, 0, 0, 0, 2, 2, 2])  # levels 1.0 and 2.0: ∝ cpus
    assert low == high == by_capacity
    assert equal > 1.1 * by_capacity


def test_eq18_smoothing_scores_a_blend_of_two_steps_loads_in_the_simulator_and_from_logs():
    """CIKM'22 Eq. 18 with keep 0.1: the first reward scores the first step's loads, every later one
    0.1 · previous + 0.9 · current; the same requests and actions give the same observations either way. The
    testbed's learner, rebuilding rewards from logged observations (`live_training._store`), gets the same."""
    from marllb_cli.live_training import LoggedEpisode, _store
    from marllb_cli.rewards import pbf

    config = load_config(REPO / "configs" / "sim-moderate.yaml")
    runs = {}
    for keep in (0.0, 0.1):
        env = LoadBalancingEnv(config, reward="pbf", episode_s=3.0, reward_smoothing=keep)
        first, _ = env.reset(seed=4)
        observations, rewards = [first["lb0"]], []
        while env.agents:
            obs, reward, *_ = env.step({a: np.full(7, 1) for a in env.agents})
            observations.append(obs["lb0"])
            rewards.append(reward["lb0"])
        runs[keep] = (np.stack(observations), np.array(rewards))
    (obs, plain), (same_obs, smoothed) = runs[0.0], runs[0.1]
    assert np.array_equal(obs, same_obs) and len(plain) == 12
    loads = obs[1:, :, 4].astype(np.float64)
    assert smoothed[0] == plain[0] == pbf(loads[0])
    for t in range(1, len(plain)):
        assert smoothed[t] == pytest.approx(pbf(0.1 * loads[t - 1] + 0.9 * loads[t]), rel=1e-12)
    assert np.abs(smoothed - plain).max() > 0.01 * np.abs(plain).max()

    class Recorder:
        def store_logged(self, lb, obs, action, prev, rewards):
            self.rewards = rewards

    recorder = Recorder()
    logged = LoggedEpisode(per_lb=[(obs, np.zeros((13, 7), dtype=np.int64), np.ones(7))], joint=None, figures={})
    _store(recorder, "distr", logged, pbf, 0.1)
    assert recorder.rewards == pytest.approx(smoothed, rel=1e-6)
