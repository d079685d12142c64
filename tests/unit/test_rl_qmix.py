"""QMIX: the mixer is monotonic, TD(λ) equals a hand computation; QMIX, Distr-LB and Centr-LB training
resumes exactly; their policies run where they can."""

from __future__ import annotations

import pytest
import torch

from marllb_cli.agents.rl.qmix import Mixer, td_lambda
from marllb_cli.config import load_config
from marllb_cli.errors import ConfigError
from marllb_cli.training import train
from tests.conftest import REPO, SIM_MODERATE_CPUS, weight_levels


def test_mixer_is_monotonic_in_every_agents_q():
    torch.manual_seed(0)
    mixer = Mixer(n_agents=3, state_dim=5, hidden=8)
    q = torch.randn(256, 3, requires_grad=True)
    state = torch.randn(256, 5)
    mixer(q, state).sum().backward()
    assert (q.grad >= 0).all()  # ∂Q_tot/∂q_i ≥ 0 at 768 random points
    # …and numerically: raising one agent's Q never lowers Q_tot.
    with torch.no_grad():
        base = mixer(q, state)
        for i in range(3):
            bumped = q.clone()
            bumped[:, i] += 0.5
            assert (mixer(bumped, state) >= base - 1e-6).all()


def test_td_lambda_equals_a_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    next_values = torch.tensor([[10.0, 20.0, 30.0]])  # V(s1), V(s2), V(s3)
    gamma, lam = 0.9, 0.6
    g2 = 2.0 + 0.9 * 30.0  # the last step bootstraps (truncated episode)
    g1 = 0.0 + 0.9 * (0.4 * 20.0 + 0.6 * g2)  # = 22.86
    g0 = 1.0 + 0.9 * (0.4 * 10.0 + 0.6 * g1)  # = 16.9444
    assert td_lambda(rewards, next_values, gamma, lam).tolist()[0] == pytest.approx([g0, g1, g2])
    # λ = 0 is one-step TD, λ = 1 the bootstrapped Monte Carlo return.
    assert td_lambda(rewards, next_values, gamma, 0.0).tolist()[0] == pytest.approx([1 + 9.0, 0 + 18.0, 2 + 27.0])
    assert td_lambda(rewards, next_values, gamma, 1.0).tolist()[0][0] == pytest.approx(1 + 0.9 * (0 + 0.9 * g2))


@pytest.mark.parametrize("algo", ["qmix", "distr", "centr"])
def test_resume_equals_an_uninterrupted_run(tmp_path, algo):
    config = load_config(REPO / "configs" / "sim-moderate.yaml")
    settings = {"hidden": 16, "updates_per_episode": 2, "batch_episodes": 2, "warmup_episodes": 1}
    kwargs = {"episodes": 3, "episode_s": 3.0, "seed": 5, "hyper": settings}
    whole = train(config, algo, out=tmp_path / "whole", **kwargs)
    train(config, algo, out=tmp_path / "cut", **{**kwargs, "episodes": 2})
    resumed = train(config, algo, out=tmp_path / "cut", resume=True, **kwargs)
    assert resumed["jct_mean_s"].tolist() == whole["jct_mean_s"].tolist()
    assert resumed["critic_loss"].tolist()[1:] == whole["critic_loss"].tolist()[1:]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for left, right in zip(a["learners"], b["learners"], strict=True):
        for name, value in left.items():
            if name in (
                "agent",
                "mixer",
                "agent_target",
                "mixer_target",
                "actor",
                "q1",
                "q2",
                "q1_target",
                "q2_target",
            ):
                assert all(torch.equal(value[k], right[name][k]) for k in value), name
        assert len(left["episodes"]) == len(right["episodes"]) == 3
    policy = torch.load(tmp_path / "whole" / "policy.pt", weights_only=True)
    assert policy["algo"] == algo and policy["kind"] == {"qmix": "qmix", "centr": "centr"}.get(algo, "sac")


def test_resume_with_other_hyperparameters_is_refused(tmp_path):
    config = load_config(REPO / "configs" / "sim-moderate.yaml")
    settings = {"hidden": 16, "updates_per_episode": 1, "batch_episodes": 1, "warmup_episodes": 1}
    train(config, "distr", out=tmp_path, episodes=1, episode_s=1.0, hyper=settings)
    with pytest.raises(ConfigError, match=r"different settings \(hyper hidden, hyper reward_norm\)"):
        train(
            config,
            "distr",
            out=tmp_path,
            episodes=2,
            episode_s=1.0,
            resume=True,
            hyper={**settings, "hidden": 32, "reward_norm": False},
        )


def test_a_qmix_policy_runs_in_simulate(cli, trained, tmp_path):
    config = REPO / "configs" / "sim-moderate.yaml"
    policy = trained("qmix")
    result = cli("simulate", config, "--method", f"rl:{policy}", "--duration", "5", "--runs-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    one_lb = cli("simulate", config, "--method", f"rl:{policy}", "--set", "testbed.lbs=1")
    assert one_lb.exit_code == 2 and "QMIX trained for 2 LBs" in one_lb.stderr


def test_a_centr_policy_runs_in_simulation_only(cli, trained, tmp_path):
    from marllb_cli.agents.rl.policy import load_policies
    from marllb_cli.errors import ConfigError

    config = REPO / "configs" / "sim-moderate.yaml"
    policy = trained("centr")
    runs = tmp_path / "r"
    result = cli("simulate", config, "--method", f"rl:{policy}", "--duration", "5", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    steps = __import__("pandas").read_parquet(next(runs.iterdir()) / "agents" / "lb1.parquet")
    # the default residual levels: each weight is a level (0.8, 1, 1.25) times the server's cpus (2 × 4, 3 × 4)
    assert weight_levels(steps, SIM_MODERATE_CPUS) <= {0.8, 1.0, 1.25}
    with pytest.raises(ConfigError, match="every LB's observation"):
        load_policies(f"rl:{policy}", 2, [2, 2, 2, 2, 4, 4, 4])  # what a testbed agent process would do


def test_a_residual_policy_sets_capacity_times_its_levels(cli, trained, tmp_path):
    """With `residual`, a level multiplies the server's capacity (cpus × speed): every weight the policy
    sets, divided by its server's cpus, is one of the levels, and the untrained policy's first weights (the
    middle level everywhere) are SED's."""
    from marllb_cli.agents.rl.policy import load_policies

    config = REPO / "configs" / "sim-moderate.yaml"
    policy = trained("qmix", "residual", config, "residual=true", "levels=0.5,1,2")
    cpus = [2, 2, 2, 2, 4, 4, 4]
    agent = load_policies(f"rl:{policy}", 2, cpus)[1]
    assert list(agent.weights) == cpus  # level 1.0 everywhere before the first step
    runs = tmp_path / "r"
    result = cli("simulate", config, "--method", f"rl:{policy}", "--duration", "5", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    steps = __import__("pandas").read_parquet(next(runs.iterdir()) / "agents" / "lb0.parquet")
    ratios = {round(w / c, 6) for ws in steps["weights"] for w, c in zip(ws, cpus, strict=True)}
    assert ratios <= {0.5, 1.0, 2.0} and len(steps) >= 20


def test_the_double_q_target_equals_a_hand_computation():
    """At o_{t+1} each head's level is the online network's argmax, its value the target network's; the target
    mixer mixes the LBs' means and TD(λ) runs over them. Online and target networks are made to differ, so
    double Q is told apart from the target's own max."""
    import numpy as np

    from marllb_cli.agents.rl.qmix import QmixHyper, QmixLearner

    hyper = QmixHyper(hidden=8, mixing_hidden=4, gamma=0.9, td_lambda=0.6)
    learner = QmixLearner(2, 2, hyper, seed=5)
    torch.manual_seed(6)
    for p in learner.agent.parameters():
        p.data.add_(0.5 * torch.randn_like(p))
    x = torch.randn(1, 4, 2, learner.n_in)
    s = torch.randn(1, 4, learner.mixer.hyper_b1.in_features)
    r = torch.tensor([[0.5, -1.0, 2.0]])
    with torch.no_grad():
        online = learner._utilities(learner.agent, x)
        target_u = learner._utilities(learner.agent_target, x).numpy()
        got = learner.double_q_target(online, x, s, r)
    online = online.numpy()

    def values(pick) -> torch.Tensor:  # v(o_{t+1}) for t = 0..2, each LB's mean over heads, then the mixer
        q = np.zeros((1, 3, 2), dtype=np.float32)
        for t in range(3):
            for i in range(2):
                q[0, t, i] = np.mean([target_u[0, t + 1, i, j, pick(t, i, j)] for j in range(2)])
        with torch.no_grad():
            return learner.mixer_target(torch.from_numpy(q), s[:, 1:])

    v = values(lambda t, i, j: int(np.argmax(online[0, t + 1, i, j])))
    g2 = r[0, 2] + 0.9 * v[0, 2]
    g1 = r[0, 1] + 0.9 * (0.4 * v[0, 1] + 0.6 * g2)
    g0 = r[0, 0] + 0.9 * (0.4 * v[0, 0] + 0.6 * g1)
    assert got[0].tolist() == pytest.approx([g0.item(), g1.item(), g2.item()], rel=1e-5)
    greedy_target = values(lambda t, i, j: int(np.argmax(target_u[0, t + 1, i, j])))
    assert not torch.allclose(v, greedy_target)  # the online argmax chose other levels than the target's
