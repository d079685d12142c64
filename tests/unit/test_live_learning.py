"""What a testbed episode stores is what the simulator's path stores: transitions rebuilt from the agents' logs
(`store_logged`) equal those of acting in-process (`act` → `end_episode`), the exploring actors act as the
learners do, and `read_episode` cuts the window, the previous action and the dead LBs as documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from marllb_cli.agents.rl.exploring import ExploringPolicy, JointActor
from marllb_cli.agents.rl.qmix import QmixHyper
from marllb_cli.agents.rl.sac import SacHyper
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.features import N_FEATURES
from marllb_cli.live_training import read_episode
from marllb_cli.training import make_team

M, N, T = 2, 3, 12


def observations(seed: int, steps: int = T + 1) -> np.ndarray:
    """[steps, M, N, features] of plausible magnitudes (flows, durations in seconds)."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(0.001, 0.3, size=(steps, M, N, N_FEATURES)).astype(np.float32)
    obs[..., 0] = rng.integers(0, 20, size=(steps, M, N))
    return obs


@pytest.mark.parametrize("algo", ["distr", "qmix", "centr"])
def test_logged_transitions_equal_the_in_process_ones(algo: str) -> None:
    hyper = QmixHyper() if algo == "qmix" else SacHyper()
    acting, logging = make_team(algo, M, N, hyper, 3), make_team(algo, M, N, hyper, 3)
    obs = observations(1)
    acting.reset()
    actions = np.stack([np.stack(acting.act(list(obs[t]), False)) for t in range(T)])  # [T, M, N]
    rewards = np.random.default_rng(2).normal(size=(T, M))
    acting.end_episode(list(obs[T]), rewards)

    middle = np.full((M, N), len(hyper.levels) // 2)
    logged_actions = np.concatenate([actions, actions[-1:]])  # the last step's action is not a transition
    if algo == "distr":
        for i in range(M):
            logging.store_logged(i, obs[:, i], logged_actions[:, i], middle[i], rewards[:, i])
        pairs = [
            (a.buffer.episodes[0], b.buffer.episodes[0]) for a, b in zip(acting.learners, logging.learners, strict=True)
        ]
    elif algo == "qmix":
        logging.store_logged(obs, logged_actions, middle, rewards.mean(axis=1))
        pairs = [(acting.learner.buffer.episodes[0], logging.learner.buffer.episodes[0])]
    else:
        logging.store_logged(obs, logged_actions, middle, rewards.mean(axis=1))
        pairs = [(acting.sac.learners[0].buffer.episodes[0], logging.sac.learners[0].buffer.episodes[0])]
    for in_process, rebuilt in pairs:
        assert in_process.keys() == rebuilt.keys()
        for key in in_process:
            np.testing.assert_allclose(rebuilt[key], in_process[key], rtol=1e-6, err_msg=key)


def _policy_file(tmp_path: Path, algo: str) -> tuple[Path, object]:
    hyper = QmixHyper() if algo == "qmix" else SacHyper()
    team = make_team(algo, M, N, hyper, 5)
    path = tmp_path / "acting.pt"
    torch.save({"algo": algo, "reward": "vbf-log", "episode": 0, **team.policy()}, path)
    return path, team


def test_the_coordinators_qmix_actor_is_the_learners_greedy_actor(tmp_path: Path) -> None:
    path, team = _policy_file(tmp_path, "qmix")
    actor = JointActor(path, M, N, uniform=False, epsilon=0.0, seed=0)
    team.learner.reset()
    for t, obs in enumerate(observations(4)):
        expected, _ = team.learner.act(list(obs), greedy=True)
        np.testing.assert_array_equal(actor.act(list(obs)), expected, err_msg=f"step {t}")


def test_an_lbs_exploring_actor_samples_its_softmax(tmp_path: Path) -> None:
    path, team = _policy_file(tmp_path, "distr")
    learner = team.learners[1]
    obs = observations(6)[0, 1]
    with torch.no_grad():
        x = learner.features(obs, np.full(N, 1))
        probs = torch.softmax(learner.actor(torch.from_numpy(x).view(1, 1, -1))[0][0, 0], -1).numpy()
    counts = np.zeros((N, 3))
    policy = ExploringPolicy(path, 1, [1.0] * N, uniform=False, seed=0)
    for _ in range(3000):  # the first step again and again: same input, independent draws
        policy.reset()  # no hidden state, the middle level (1) before
        policy.act(obs)
        counts[np.arange(N), policy.prev_action] += 1
    np.testing.assert_allclose(counts / 3000, probs, atol=0.03)
    assert policy.record(obs)["action"] == policy.prev_action.tolist() and len(policy.record(obs)["obs"]) == N


def _agents_frame(steps: int, start_s: float, action_base: int) -> pd.DataFrame:
    t_s = start_s + 0.25 * np.arange(steps)
    obs = observations(7, steps)[:, 0]
    return pd.DataFrame(
        {
            "t_s": t_s,
            "obs": [o.tolist() for o in obs],
            "action": [[(action_base + k) % 3] * N for k in range(steps)],
            "tick": np.arange(steps, dtype=float) + 100,
            "missed": [False] * steps,
            "rtt_s": [0.002] * steps,
            "bytes_in": [300] * steps,
            "bytes_out": [250] * steps,
        }
    )


def test_read_episode_cuts_the_window_keeps_the_action_before_it_and_drops_a_short_lb(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "agents").mkdir(parents=True)
    _agents_frame(50, -2.0, 0).to_parquet(run / "agents" / "lb0.parquet")  # 8 steps before t = 0
    _agents_frame(20, 0.0, 1).to_parquet(run / "agents" / "lb1.parquet")  # died after 5 s
    logged = read_episode(run, None, M, episode_s=10, transitions=38, n_levels=3)
    obs, action, prev = logged.per_lb[0]
    assert obs.shape == (39, N, N_FEATURES) and action.shape == (39, N)
    assert prev.tolist() == [7 % 3] * N  # the action of the last step before the window
    assert action[0].tolist() == [8 % 3] * N
    assert logged.per_lb[1] is None  # too few steps to be a whole episode
    assert logged.figures["window_steps_min"] == 20


def test_read_episode_takes_the_coordinators_joint_steps_from_the_windows_first_tick(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "agents").mkdir(parents=True)
    for i in range(M):
        _agents_frame(50, -2.0, i).to_parquet(run / "agents" / f"lb{i}.parquet")
    trajectory = tmp_path / "trajectory.jsonl"
    with trajectory.open("w") as out:
        for step in range(95, 160):
            obs = np.full((M, N, N_FEATURES), step, dtype=float).tolist()
            fresh = [True, step % 10 != 0]
            row = {"step": step, "t": step * 0.25, "wait_s": 0.01, "act_s": 0.001, "fresh": fresh, "obs": obs,
                   "connected": [0, 1], "action": [[step % 3] * N] * M, "bytes_in": 900, "bytes_out": 800}  # fmt: skip
            out.write(json.dumps(row) + "\n")
    spec = CoordinatorSpec(lbs=["lb0", "lb1"], n_servers=N, host="127.0.0.1", port=1, secret=tmp_path / "s",
                           trajectory=trajectory)  # fmt: skip
    logged = read_episode(run, spec, M, episode_s=10, transitions=38, n_levels=3)
    obs, action, prev = logged.joint
    first = 100 + 8  # the agents' first tick inside the window
    assert obs.shape == (39, M, N, N_FEATURES) and obs[0, 0, 0, 0] == first and obs[-1, 0, 0, 0] == first + 38
    assert prev.tolist() == [[(first - 1) % 3] * N] * M
    assert logged.figures["coordinator_misses"] == 4  # steps 110, 120, 130, 140 of 108…146
    assert logged.figures["coordinator_bytes_per_step"] == 1700
    assert (run / "coordinator.jsonl").exists()  # kept with the run


def test_init_takes_a_simulator_runs_learners_but_not_its_buffer(tmp_path: Path) -> None:
    """Fine-tuning from a simulator run (episodes of 240 steps) on testbed episodes of another length: the
    networks come over, the buffer does not (the first update would otherwise stack unequal episodes)."""
    from marllb_cli.live_training import _initialise
    from marllb_cli.training import save_training

    sim = make_team("qmix", M, N, QmixHyper(), 1)
    long_obs = observations(8, steps=31)
    sim.store_logged(long_obs, np.ones((31, M, N), dtype=np.int64), np.ones((M, N), dtype=np.int64), np.zeros(30))
    save_training(tmp_path, 0, {"algo": "qmix"}, sim, "qmix", "vbf-log", [{"episode": 0}])

    live = make_team("qmix", M, N, QmixHyper(), 2)
    _initialise(live, tmp_path, "qmix")
    assert [len(buffer) for buffer in live.buffers()] == [0]
    for name, tensor in sim.learner.agent.state_dict().items():
        assert torch.equal(live.learner.agent.state_dict()[name], tensor), name
    obs = observations(9)  # T = 12, not 30
    live.store_logged(obs, np.zeros((T + 1, M, N), dtype=np.int64), np.ones((M, N), dtype=np.int64), np.zeros(T))
    assert np.isfinite(live.update()[0]["critic_loss"])
    with pytest.raises(Exception, match="algo|qmix"):
        _initialise(make_team("distr", M, N, SacHyper(), 2), tmp_path, "distr")
