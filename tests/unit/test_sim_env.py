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
    _store(recorder, "distr", logged, "pbf", 0.1)
    assert recorder.rewards == pytest.approx(smoothed, rel=1e-6)


def test_neurips_observation_is_the_same_in_both_engines_and_trains_and_serves(cli, trained, tmp_path):
    """NeurIPS'22's observation: 16 columns, the first six CIKM'22's. Its completion-time and inter-arrival
    reservoirs hold the same samples in the compiled and the Python engine (1.5 s: no reservoir is full, so
    no slot is drawn at random), each completion sample is a request's JCT, and a policy trained on it runs."""
    from marllb_cli.features import N_NEURIPS_FEATURES, observe_neurips
    from marllb_cli.sim.build import build_simulation, server_models
    from marllb_cli.sim.traffic import traffic

    base = load_config(REPO / "configs" / "sim-moderate.yaml")
    reservoirs = {}
    for engine in ("compiled", "python"):
        config = load_config(REPO / "configs" / "sim-moderate.yaml", [f"sim.engine={engine}"])
        models, _, _, cpus = server_models(config)
        requests = traffic(config, seed=3, duration_s=1.5)
        core, lbs = build_simulation(config, "sed", requests, models, cpus, seed=3, agent_period=0.25,
                                     neurips_observation=True)  # fmt: skip
        core.run()
        result = core.result()
        completions = [[sorted(np.round(r.samples()[1], 9)) for r in table.completions] for table in lbs.tables]
        interarrivals = [sorted(np.round(table.interarrivals.samples()[1], 9)) for table in lbs.tables]
        reservoirs[engine] = (completions, interarrivals)
        jct = result.finish - result.arrival
        obs = lbs.observe_all(1.5)
        assert obs[0].shape == (7, N_NEURIPS_FEATURES)
    assert reservoirs["compiled"] == reservoirs["python"]
    completions, interarrivals = reservoirs["python"]
    every = sorted(v for lb in completions for server in lb for v in server)
    assert every == sorted(np.round(jct[~np.isnan(jct)], 9))  # every request done, each one sample
    assert sum(len(gaps) for gaps in interarrivals) == len(jct) - 2  # the gaps between each LB's new flows
    flows = np.zeros(2)
    one = observe_neurips(flows, [(np.zeros(1), np.ones(1))] * 2, [(np.zeros(2), np.array([1.0, 3.0]))] * 2,
                          [(np.zeros(1), np.array([0.5]))], 0.0)  # fmt: skip
    assert one[0, 6:11].tolist() == pytest.approx([2.0, 2.8, 1.0, 2.0, 2.8]) and one[1, 11] == 0.5
    env = LoadBalancingEnv(base, neurips_observation=True, episode_s=2.0)
    assert env.observation_space("lb0").shape == (7, N_NEURIPS_FEATURES)
    policy = trained("qmix", "nq", REPO / "configs" / "sim-moderate.yaml", "neurips_obs=true")
    result = cli("simulate", REPO / "configs" / "sim-moderate.yaml", "-m", f"rl:{policy}", "--duration", "3",
                 "--runs-dir", tmp_path / "runs")  # fmt: skip
    assert result.exit_code == 0, result.output


def test_the_reservoir_keeps_a_sample_with_probability_reservoir_keep_in_both_engines():
    """CIKM'22 Algorithm 2's p (`experiment.reservoir_keep`): with 0.25, each engine's LBs keep about a quarter
    of the flow-duration samples they keep with 1 (1.5 s: no reservoir fills, so every kept sample stays)."""
    from marllb_cli.errors import ConfigError
    from marllb_cli.sim.build import build_simulation, server_models
    from marllb_cli.sim.traffic import traffic

    kept = {}
    for engine in ("compiled", "python"):
        for keep in (1.0, 0.25):
            config = load_config(
                REPO / "configs" / "sim-moderate.yaml", [f"sim.engine={engine}", f"experiment.reservoir_keep={keep}"]
            )
            models, _, _, cpus = server_models(config)
            core, lbs = build_simulation(config, "sed", traffic(config, seed=1, duration_s=1.5), models, cpus, seed=1)
            core.run()
            kept[engine, keep] = sum(len(r.samples()[1]) for table in lbs.tables for r in table.durations)
    for engine in ("compiled", "python"):
        assert kept[engine, 1.0] > 400
        assert kept[engine, 0.25] / kept[engine, 1.0] == pytest.approx(0.25, abs=0.05), kept
    with pytest.raises(ConfigError, match="experiment.reservoir_keep"):
        load_config(REPO / "configs" / "sim-moderate.yaml", ["experiment.reservoir_keep=0"])
