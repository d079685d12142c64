"""SAC-discrete with GRU: the policy gradient carries Q; reward normalisation; trained policies run in
simulate; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marllb_cli.agents.rl.common import RewardScale
from marllb_cli.agents.rl.sac import SacHyper, SacLearner
from tests.conftest import REPO, SIM_MODERATE_CPUS, weight_levels


def _two_action_toy(reward_of_level_1: float, **settings) -> tuple[float, float, list[float]]:
    """Two actions, one server, one step (γ = 0): reward `reward_of_level_1` for level 1, 0 for level 0.
    Returns π(level 1) before and after 150 updates, and the actor's gradient norms."""
    hyper = SacHyper(
        hidden=16,
        levels=(1.0, 2.0),
        batch_episodes=8,
        lr_actor=3e-3,
        lr_critic=3e-3,
        gamma=0.0,
        target_entropy_scale=0.01,
        alpha_init=1.0,
        lr_alpha=0.0,  # α = 1 throughout: the soft-optimal policy is known in closed form
        **settings,
    )
    learner = SacLearner(1, hyper, seed=0)
    obs = np.zeros((1, 6), dtype=np.float32)
    for i in range(16):
        action = np.array([i % 2])
        x = learner.features(obs, np.array([0]))
        learner.store(x[None], action[None], np.array([reward_of_level_1 * action[0]]), x)
    x = torch.from_numpy(learner.features(obs, np.array([0]))).view(1, 1, -1)
    before = torch.softmax(learner.actor(x)[0][0, 0, 0], -1)[1].item()
    grads = []
    for _ in range(150):
        learner.update()
        grads.append(sum(float(p.grad.abs().sum()) for p in learner.actor.parameters() if p.grad is not None))
    after = torch.softmax(learner.actor(x)[0][0, 0, 0], -1)[1].item()
    return before, after, grads


def test_policy_gradient_moves_probability_toward_the_higher_q_action():
    """Reward 1 for level 1 (raw, not standardised), temperature held at α = 1. The soft-optimal policy
    is π ∝ exp(Q/α): π(level 1) = e/(1 + e) = 0.731. Reaching it needs the Q gradient in the policy loss
    (entropy alone would keep the policy uniform at 0.5)."""
    before, after, grads = _two_action_toy(1.0, reward_norm=False)
    assert min(grads) > 0
    assert 0.3 < before < 0.7
    assert abs(after - np.e / (1 + np.e)) < 0.03


def test_reward_normalisation_makes_a_tiny_reward_count():
    """Reward 1e-5 for level 1, the size of the VBF differences on sim-moderate-io50. Raw, the soft-optimal
    policy is uniform to five decimals and the critic's noise decides. Standardised, the stored rewards
    {0, 1e-5} become {−1, 1}, and π(level 1) → e²/(1 + e²) = 0.881."""
    _, raw, _ = _two_action_toy(1e-5, reward_norm=False)
    _, normalised, _ = _two_action_toy(1e-5, reward_norm=True)
    assert abs(raw - 0.5) < 0.05
    assert abs(normalised - np.e**2 / (1 + np.e**2)) < 0.03


def test_reward_scale_standardises_with_the_moments_of_all_stored_rewards():
    episodes = [np.array([0.0, 1e-4, 3e-4]), np.array([-2e-4]), np.array([5e-4, 5e-4])]
    scale = RewardScale(enabled=True)
    batch = torch.tensor([1e-4, 4e-4], dtype=torch.float64)
    assert torch.equal(scale(batch), batch)  # nothing stored yet
    for rewards in episodes:
        scale.observe(rewards)
    every = np.concatenate(episodes)
    expected = (batch.numpy() - every.mean()) / every.std()
    assert scale(batch).numpy() == pytest.approx(expected, rel=1e-9)
    restored = RewardScale(enabled=True)
    restored.load(scale.state())
    assert torch.equal(restored(batch), scale(batch))
    off = RewardScale(enabled=False)
    off.observe(every)
    assert torch.equal(off(batch), batch)


def test_train_cli_bad_input(cli, tmp_path):
    config = REPO / "configs" / "sim-moderate.yaml"
    for args, expected in (
        (("--algo", "dqn"), "not available"),
        (("--algo", "distr", "--reward", "joy"), "unknown"),
        (("--algo", "distr", "--hyper", "gamma"), "NAME=VALUE"),
        (("--algo", "distr", "--hyper", "hidden=x"), "not a valid"),
        (("--algo", "qmix", "--hyper", "residual=maybe"), "not a valid bool"),
    ):
        result = cli("train", config, *args, "--out", tmp_path / "t")
        assert result.exit_code == 2, result.output
        assert expected in result.stderr and "Traceback" not in result.output


def test_a_trained_policy_runs_in_simulate(cli, trained, tmp_path):
    config = REPO / "configs" / "sim-moderate.yaml"
    policy = trained("isac")
    runs = tmp_path / "runs"
    result = cli("simulate", config, "--method", f"rl:{policy}", "--duration", "10", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    run = next(runs.iterdir())
    steps = __import__("pandas").read_parquet(run / "agents" / "lb0.parquet")
    assert len(steps) >= 40  # every 250 ms over 10 s of arrivals, and on until the last request ends
    # the default residual levels: each weight is a level (0.8, 1, 1.25) times the server's cpus (2 × 4, 3 × 4)
    assert weight_levels(steps, SIM_MODERATE_CPUS) <= {0.8, 1.0, 1.25}
    missing = cli("simulate", config, "--method", f"rl:{tmp_path / 'none'}")
    assert missing.exit_code == 2 and "policy.pt" in missing.stderr


def test_bench_policies_compares_a_trained_policy_on_unseen_seeds(cli, trained, tmp_path):
    import json

    config = REPO / "configs" / "sim-moderate.yaml"
    policy = trained("distr")
    result = cli("bench", "policies", config, "--duration", "5", "-p", f"distr={policy}", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"oracle-srt", "oracle-gsq", "sed", "lsq", "wcmp", "ecmp", "distr"}
    assert rows["sed"]["mean_vs_sed"] == 1.0
    assert rows["oracle-srt"]["jct_mean_ms"] < rows["ecmp"]["jct_mean_ms"]
    assert rows["distr"]["train_episodes"] == 1 and rows["distr"]["train_wall_s"] > 0
    low, high = rows["ecmp"]["mean_vs_sed_ci"]
    assert low < rows["ecmp"]["mean_vs_sed"] < high and rows["sed"]["mean_vs_sed_ci"] == [1.0, 1.0]
    assert rows["sed"]["requests"] > 1000 and rows["ecmp"]["rejected"] >= rows["sed"]["rejected"] >= 0
    bad = cli("bench", "policies", config, "-p", "nodir")
    assert bad.exit_code == 2 and "NAME=DIR" in bad.stderr


def test_bench_policies_reports_on_the_seed_set_asked_for(cli):
    """Settings are chosen on validation seeds and reported on test seeds: `--seeds` says which, and sed's
    figure is the mean of its runs on exactly those seeds."""
    import json

    import numpy as np

    from marllb_cli.config import load_config
    from marllb_cli.seeds import TEST_SEEDS, VALIDATION_SEEDS
    from marllb_cli.sim.run import run_simulation

    config = REPO / "configs" / "sim-moderate.yaml"
    sed = {}
    for name, seeds in (("test", TEST_SEEDS), ("validation", VALIDATION_SEEDS)):
        result = cli("bench", "policies", config, "--duration", "3", "--seeds", name, "--json")
        assert result.exit_code == 0, result.output
        sed[name] = next(r for r in json.loads(result.stdout) if r["name"] == "sed")["jct_mean_ms"]
        runs = [run_simulation(load_config(config), "sed", seed=s, duration_s=3.0).requests for s in seeds]
        assert sed[name] == pytest.approx(np.mean([r.loc[r["error"] == "", "jct_s"].mean() for r in runs]) * 1e3)
    assert sed["test"] != sed["validation"] and not set(TEST_SEEDS) & set(VALIDATION_SEEDS)
    bad = cli("bench", "policies", config, "--seeds", "train")
    assert bad.exit_code == 2 and "--seeds 'train'" in bad.stderr and "validation" in bad.stderr


@pytest.mark.parametrize("joint_min", [True, False])
def test_the_bootstrapped_target_equals_a_hand_computation(joint_min):
    """γ > 0: r_t + γ E_j Σ_a π_j(a|o_{t+1}) (Q̃_j(o_{t+1}, a) − α log π_j(a|o_{t+1})), computed here step by step,
    head by head, level by level from the networks' outputs (the toys above use γ = 0). Q̃ is the target critic
    with the lower expected joint value at that step (`joint_min`), or min(Q1⁻, Q2⁻) per head and level."""
    hyper = SacHyper(hidden=8, levels=(1.0, 1.5, 2.0), gamma=0.9, joint_min=joint_min)
    learner = SacLearner(2, hyper, seed=3)
    torch.manual_seed(4)
    for net in (learner.q1_target, learner.q2_target):  # targets that differ from each other
        for p in net.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 4, learner.n_in)
    r = torch.randn(2, 3)
    alpha = torch.tensor(0.3)
    got = learner.soft_target(x, r, alpha)
    with torch.no_grad():
        probs = torch.softmax(learner.actor(x)[0], -1).numpy()
        q1, q2 = learner.q1_target(x)[0].numpy(), learner.q2_target(x)[0].numpy()
    chosen = {True: 0, False: 0}
    for b in range(2):
        for t in range(3):
            p = probs[b, t + 1]
            joint = [sum(float(p[j] @ q[b, t + 1, j]) for j in range(2)) / 2 for q in (q1, q2)]
            lower = q1 if joint[0] <= joint[1] else q2
            chosen[joint[0] <= joint[1]] += 1
            heads = []
            for j in range(2):
                value = 0.0
                for a in range(3):
                    q = lower[b, t + 1, j, a] if joint_min else min(q1[b, t + 1, j, a], q2[b, t + 1, j, a])
                    value += p[j, a] * (q - 0.3 * np.log(p[j, a]))
                heads.append(value)
            expected = r[b, t].item() + 0.9 * sum(heads) / 2
            assert got[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert min(chosen.values()) > 0  # both critics are the lower one somewhere: the choice is exercised


def test_the_joint_minimum_is_less_pessimistic_than_the_per_head_one():
    """Critics with independent N(0, 1) errors on 7 heads × 3 levels and a uniform policy: the joint minimum
    is the lower of two N(0, 1/21) values, E = −0.218/√π = −0.123; the minimum per head and level averages
    seven heads' E[min of two N(0, 1)] = −1/√π = −0.564, √21 = 4.6 times as pessimistic (review §1.1)."""
    torch.manual_seed(0)
    learner = SacLearner(7, SacHyper(hidden=8), seed=0)
    true = torch.zeros(4000, 1, 7, 3)
    q1, q2 = true + torch.randn_like(true), true + torch.randn_like(true)
    pi = torch.full_like(true, 1 / 3)
    bias = {}
    for joint in (True, False):
        learner.hyper.joint_min = joint
        bias[joint] = -float((pi * learner.pessimistic(q1, q2, pi)).sum(-1).mean(-1).mean())
    assert 0.11 < bias[True] < 0.14
    assert 0.54 < bias[False] < 0.59
    assert 4.0 < bias[False] / bias[True] < 5.2


def test_the_temperature_reaches_its_target_entropy():
    """One server, three levels, γ = 0, standardised rewards −1, 0, +1: at α = 1 the soft-optimal policy has
    0.83 nats, above the target 0.5 · log 3 = 0.55. With the defaults (α from 1, lr_alpha 3e-3) the entropy is
    within 0.05 of the target after 1 200 updates, two thirds of a 72-episode run's 1 775 (α settles near 0.73).
    With the old lr_alpha of 3e-4, log α moves by at most 1 200 · 3e-4 = 0.36 and the entropy stays above it."""

    def train(**settings) -> tuple[float, float]:
        hyper = SacHyper(hidden=16, levels=(1.0, 1.5, 2.0), batch_episodes=8, gamma=0.0, **settings)
        learner = SacLearner(1, hyper, seed=0)
        obs = np.zeros((1, 6), dtype=np.float32)
        for i in range(30):
            x = learner.features(obs, np.array([1]))
            learner.store(x[None], np.array([[i % 3]]), np.array([float(i % 3 - 1)]), x)
        entropies = [learner.update()["entropy"] for _ in range(1200)]
        return float(np.mean(entropies[-50:])), learner.target_entropy

    entropy, target = train()
    assert abs(entropy - target) < 0.05, (entropy, target)
    frozen, _ = train(lr_alpha=3e-4)
    assert frozen - target > 0.05, frozen


def test_without_the_gru_an_output_depends_on_its_own_step_only(cli, trained, tmp_path):
    """`gru=false`: changing the first step's input leaves the third step's output unchanged (it changes with
    the GRU), and a policy trained without it is served with the same network in simulate."""
    from marllb_cli.agents.rl.common import Recurrent

    torch.manual_seed(0)
    x = torch.randn(1, 3, 10)
    changed = x.clone()
    changed[0, 0] += 1.0
    for gru, moves in ((True, True), (False, False)):
        net = Recurrent(10, 8, 2, 3, gru=gru)
        third = (net(x)[0][0, 2] - net(changed)[0][0, 2]).abs().max().item()
        assert (third > 1e-4) is moves, (gru, third)
    policy = trained("distr", "flat", REPO / "configs" / "sim-moderate.yaml", "gru=false")
    saved = torch.load(policy / "policy.pt", weights_only=True)
    assert saved["hyper"]["gru"] is False and not any(k.startswith("gru.") for k in saved["actors"][0])
    result = cli(
        "simulate",
        REPO / "configs" / "sim-moderate.yaml",
        "-m",
        f"rl:{policy}",
        "--duration",
        "3",
        "--runs-dir",
        tmp_path / "runs",
    )
    assert result.exit_code == 0, result.output


def test_greedy_evaluations_are_the_served_policy_on_a_validation_seed(tmp_path):
    """`eval_every`: the curve's greedy columns every N episodes and after the last, each the policy as
    `rl:DIR` serves it in the simulator on request seed 20 000, for an episode's length."""
    from marllb_cli.config import load_config
    from marllb_cli.sim.run import run_simulation
    from marllb_cli.training import GREEDY_EVAL_SEED, train

    config = load_config(REPO / "configs" / "sim-moderate.yaml")
    settings = {"hidden": 8, "updates_per_episode": 2, "batch_episodes": 2, "warmup_episodes": 1}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        curve = train(config, "distr", out=tmp_path, episodes=3, episode_s=2.0, hyper=settings, eval_every=2)
        assert torch.get_num_threads() == 2  # serving pins one thread; training gets its own back
    finally:
        torch.set_num_threads(before)
    assert curve["greedy_jct_mean_s"].isna().tolist() == [True, False, False]
    served = run_simulation(config, f"rl:{tmp_path}", seed=GREEDY_EVAL_SEED, duration_s=2.0).requests["jct_s"]
    assert curve["greedy_jct_mean_s"].iloc[-1] == pytest.approx(served.mean(), rel=1e-12)


def test_the_paired_ratio_interval_is_the_t_interval_of_the_per_seed_ratios():
    from marllb_cli.bench.policies import paired_ratio

    ratio, (low, high) = paired_ratio([1.1, 2.2, 2.9], [1.0, 2.0, 3.0])
    per_seed = np.array([1.1, 1.1, 2.9 / 3])
    half = 4.303 * per_seed.std(ddof=1) / np.sqrt(3)
    assert ratio == pytest.approx(6.2 / 6.0)
    assert (low, high) == pytest.approx((per_seed.mean() - half, per_seed.mean() + half))
    assert paired_ratio([2.0], [1.0]) == (2.0, None)
