"""SAC-discrete with a GRU, one learner per LB: `isac` (own reward), `ssac` (a single LB that sees all
traffic) and `distr` (Distr-LB: independent learners with the per-LB VBF or VBF+log reward, the Markov
potential game of NeurIPS'22). Read top to bottom: hyperparameters, networks, the replay buffer of whole
episodes, acting, and the update.

Action: one categorical head per server over the weight levels (the LB's SED weight of that server).
Q is decomposed over heads, Q(o, a) = (1/N) Σ_j Q_j(o, a_j): each critic outputs N × L values, and the
soft value, the target and the policy loss are exact expectations over each head's categorical —
the policy loss E_j Σ_a π_j(a|o) (α log π_j(a|o) − Q̃_j(o, a)) carries the Q gradient to the policy (the
papers' artefact sampled an integer action and trained the policy on entropy alone). Q̃ is the twin
critics' minimum taken on the joint value (`pessimistic`), as SAC's clipped double Q.

Temperature: log α starts at log(alpha_init) and follows the entropy target with Adam at lr_alpha; Adam moves
it by about lr_alpha per update, so lr_alpha × updates bounds how far it can go in a run.

Input: the normalised observation (`common.normalise`) and the previous action (one-hot per head), as in
CIKM'22.

Sequences: the GRU is trained on whole episodes from a zero hidden state, as it acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marllb_cli.agents.rl.common import (
    EpisodeBuffer,
    Recurrent,
    RewardScale,
    encode,
    generator,
    generator_state,
    input_size,
    observation_width,
    plain,
)

__all__ = ["SacHyper", "SacLearner"]


@dataclass
class SacHyper:
    """marllb's defaults (what trained best here; `--preset` gives the papers'); every value can be overridden
    by `marllb train --hyper`."""

    hidden: int = 128
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    lr_alpha: float = 3e-3  # Adam moves log α by ≈ lr per update: 3e-4 froze α in [0.59, 1] over a 72-episode run
    alpha_init: float = 1.0  # the temperature's start: every level explored while the critics know nothing
    gamma: float = 0.99
    tau: float = 0.005  # soft target update
    buffer_episodes: int = 3000
    batch_episodes: int = 4
    updates_per_episode: int = 25
    warmup_episodes: int = 2  # act uniformly at random, no updates, for the first episodes
    target_entropy_scale: float = 0.5  # per head: scale × log L (L = weight levels)
    grad_clip: float = 10.0  # gradient-norm clip of the actor and of the critics (as QMIX's): 240-step BPTT
    # A level multiplies the server's capacity (`residual`): the middle level everywhere is SED itself, and the
    # policy learns bounded corrections. Chosen on validation seeds over {1, 1.5, 2} absolute and 0.9/1/1.1
    # (docs/benchmarks.md, "The defaults against sed"); the papers' absolute levels are `--preset`'s.
    levels: tuple[float, ...] = field(default=(0.8, 1.0, 1.25))
    residual: bool = True
    reward_norm: bool = True  # standardise rewards with their running mean and std (`common.RewardScale`)
    joint_min: bool = True  # twin minimum of the two critics' joint values; false: per head and level (ablation)
    gru: bool = True  # false: no recurrent layer (ablation)
    neurips_obs: bool = False  # NeurIPS'22's observation: + completion-time and inter-arrival statistics
    reward_smoothing: float = 0.0  # weight of the previous step's loads in the reward (CIKM'22 Eq. 18: 0.1)


class SacLearner:
    """One LB's SAC-discrete learner: actor, twin critics with targets, temperature, episode buffer."""

    def __init__(self, n_servers: int, hyper: SacHyper, seed: int) -> None:
        self.hyper, self.n = hyper, n_servers
        self.n_levels = len(hyper.levels)
        self.n_in = input_size(n_servers, self.n_levels, features=observation_width(hyper))
        torch.manual_seed(seed)
        make = lambda: Recurrent(self.n_in, hyper.hidden, n_servers, self.n_levels, gru=hyper.gru)  # noqa: E731
        self.actor, self.q1, self.q2 = make(), make(), make()
        self.q1_target, self.q2_target = make(), make()
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        self.log_alpha = torch.full((1,), float(np.log(hyper.alpha_init)), requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=hyper.lr_actor)
        self.critic_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=hyper.lr_critic)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=hyper.lr_alpha)
        self.target_entropy = hyper.target_entropy_scale * float(np.log(self.n_levels))
        self.buffer = EpisodeBuffer(hyper.buffer_episodes)
        self.rng = np.random.default_rng(seed)
        self.reward_scale = RewardScale(hyper.reward_norm)
        self.reset()

    # -- acting -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start of an episode: zero GRU state, previous action = the middle level everywhere."""
        self.hidden: torch.Tensor | None = None
        self.prev_action = np.full(self.n, self.n_levels // 2, dtype=np.int64)

    def features(self, obs: np.ndarray, prev_action: np.ndarray) -> np.ndarray:
        return encode(obs, prev_action, self.n_levels)

    @torch.no_grad()
    def act(self, obs: np.ndarray, *, greedy: bool = False, uniform: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(action per server, network input used); samples from the policy unless `greedy`."""
        x = self.features(obs, self.prev_action)
        logits, self.hidden = self.actor(torch.from_numpy(x).view(1, 1, -1), self.hidden)
        logits = logits[0, 0]
        if uniform:
            action = self.rng.integers(self.n_levels, size=self.n)
        elif greedy:
            action = logits.argmax(-1).numpy()
        else:
            probs = torch.softmax(logits, -1).numpy().astype(np.float64)
            probs /= probs.sum(-1, keepdims=True)
            action = np.array([self.rng.choice(self.n_levels, p=p) for p in probs])
        self.prev_action = action
        return action, x

    # -- replay -----------------------------------------------------------------------------------------
    def store(self, inputs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_input: np.ndarray) -> None:
        """One finished episode: inputs [T, n_in], actions [T, N], rewards [T], and the input after the last
        step (the episode is truncated, not terminated, so its last value is bootstrapped)."""
        self.buffer.append(
            {
                "x": np.concatenate([inputs, next_input[None]]).astype(np.float32),
                "a": actions.astype(np.int64),
                "r": rewards.astype(np.float32),
            }
        )
        self.reward_scale.observe(rewards)

    # -- update -----------------------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        """One gradient step of the critics, the actor and the temperature on a batch of whole episodes."""
        hyper = self.hyper
        batch = self.buffer.sample(self.rng, hyper.batch_episodes)
        x, a = batch["x"], batch["a"]  # [B, T+1, n_in], [B, T, N]
        r = self.reward_scale(batch["r"])  # [B, T]
        alpha = self.log_alpha.exp().detach()
        target = self.soft_target(x, r, alpha)

        def q_taken(q: nn.Module) -> torch.Tensor:
            values = q(x)[0][:, :-1]  # [B, T, N, L]
            return values.gather(-1, a.unsqueeze(-1)).squeeze(-1).mean(-1)  # Q(o, a) = mean over heads

        critic_loss = F.mse_loss(q_taken(self.q1), target) + F.mse_loss(q_taken(self.q2), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_([*self.q1.parameters(), *self.q2.parameters()], hyper.grad_clip)
        self.critic_opt.step()

        logits, _ = self.actor(x[:, :-1])
        log_pi = torch.log_softmax(logits, -1)
        pi = log_pi.exp()
        with torch.no_grad():
            q_min = self.pessimistic(self.q1(x)[0][:, :-1], self.q2(x)[0][:, :-1], pi)
        actor_loss = (pi * (alpha * log_pi - q_min)).sum(-1).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), hyper.grad_clip)
        self.actor_opt.step()

        entropy = -(pi.detach() * log_pi.detach()).sum(-1).mean()
        alpha_loss = self.log_alpha * (entropy - self.target_entropy)
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            for net, target_net in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                for p, tp in zip(net.parameters(), target_net.parameters(), strict=True):
                    tp.mul_(1 - hyper.tau).add_(hyper.tau * p)
        return {
            "critic_loss": float(critic_loss.detach()),
            "actor_loss": float(actor_loss.detach()),
            "alpha": float(alpha),
            "entropy": float(entropy),
        }

    @torch.no_grad()
    def soft_target(self, x: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """r_t + γ V(o_{t+1}) with the soft value V = E_j Σ_a π_j(a) (Q̃⁻_j(a) − α log π_j(a)), Q̃⁻ the
        `pessimistic` minimum of the target critics, under the current policy; x [B, T+1, n_in], r [B, T] →
        [B, T]. The episode is truncated, so its last step bootstraps too."""
        logits, _ = self.actor(x)
        log_pi = torch.log_softmax(logits[:, 1:], -1)  # at o_{t+1}: [B, T, N, L]
        q_next = self.pessimistic(self.q1_target(x)[0][:, 1:], self.q2_target(x)[0][:, 1:], log_pi.exp())
        v_next = (log_pi.exp() * (q_next - alpha * log_pi)).sum(-1).mean(-1)
        return r + self.hyper.gamma * v_next

    def pessimistic(self, q1: torch.Tensor, q2: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """The twin critics' minimum, [B, T, N, L]. Joint (default): at each step, all heads of the critic whose
        expected joint value E_π Q = E_j Σ_a π_j Q_j is lower, as SAC's clipped double Q takes the lower of two
        joint values. Per head (`joint_min=false`): min(Q1_j, Q2_j) level by level; the mean of per-head minima
        lies below both joint values, about √N times further down when the critics' errors are independent
        across heads, and most where the critics disagree, on levels rarely taken."""
        if not self.hyper.joint_min:
            return torch.min(q1, q2)
        first_lower = (pi * q1).sum(-1).mean(-1) <= (pi * q2).sum(-1).mean(-1)  # [B, T]
        return torch.where(first_lower[..., None, None], q1, q2)

    # -- checkpoints (state dicts and tensors only: loadable with torch.load(weights_only=True)) ---------
    def hyper_state(self) -> dict:
        return plain(self.hyper)

    def state(self) -> dict:
        return {
            "hyper": self.hyper_state(),
            "n_servers": self.n,
            "actor": self.actor.state_dict(),
            "q1": self.q1.state_dict(),
            "q2": self.q2.state_dict(),
            "q1_target": self.q1_target.state_dict(),
            "q2_target": self.q2_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "episodes": self.buffer.state(),
            "rng": generator_state(self.rng),
            "reward_scale": self.reward_scale.state(),
        }

    def load(self, state: dict) -> None:
        for name in ("actor", "q1", "q2", "q1_target", "q2_target"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in ("actor_opt", "critic_opt", "alpha_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer.load(state["episodes"])
        self.rng = generator(state["rng"])
        self.reward_scale.load(state.get("reward_scale"))
