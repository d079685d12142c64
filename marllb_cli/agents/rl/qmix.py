"""QMIX for the LBs, textbook (Rashid et al. 2018): per-LB recurrent agent networks, a monotonic mixer with
hypernetworks conditioned on the global state, double Q, target networks, TD(λ) targets, ε-greedy.
Read top to bottom: hyperparameters, networks, TD(λ), acting, the update, checkpoints.

- Agent network: ONE network with shared parameters for all LBs; its input is the LB's normalised
  observation, its previous action (one-hot per head) and the LB's id (one-hot). It is the same
  FC-FC-GRU-FC-FC as SAC's and outputs a utility per server head and weight level; an LB's Q is the mean
  over heads of the chosen levels' utilities (the factored action, as in `sac.py`).
- Mixer: Q_tot = w2ᵀ elu(W1ᵀ q + b1) + b2 with W1, w2 = |hypernet(s)| (non-negative, hence ∂Q_tot/∂q_i ≥ 0)
  and s = every LB's normalised observation, concatenated.
- Target: TD(λ) over the episode with the double-Q bootstrap Q_tot⁻(s', argmax_a Q(o', a)),
  λ = 0.6, γ = 0.99; the episode is truncated, not terminated, so its last step bootstraps too.
- Reward: the team reward, the mean of the LBs' rewards (`rewards.team`).
Not the artefact's softmax-of-Q: actions are ε-greedy on the utilities.
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

__all__ = ["Mixer", "QmixHyper", "QmixLearner", "td_lambda"]


@dataclass
class QmixHyper:
    hidden: int = 128
    mixing_hidden: int = 32
    lr: float = 5e-4
    gamma: float = 0.99
    td_lambda: float = 0.6
    buffer_episodes: int = 3000
    batch_episodes: int = 4
    updates_per_episode: int = 25
    target_update_episodes: int = 5  # hard copy of the online networks every so many episodes
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_anneal_episodes: int = 40
    grad_clip: float = 10.0
    warmup_episodes: int = 2
    # A level multiplies the server's capacity (`residual`): the middle level everywhere is SED itself, and the
    # policy learns bounded corrections. Chosen on validation seeds over {1, 1.5, 2} absolute and 0.9/1/1.1
    # (docs/benchmarks.md, "The defaults against sed"); the papers' absolute levels are `--preset`'s.
    levels: tuple[float, ...] = field(default=(0.8, 1.0, 1.25))
    residual: bool = True
    reward_norm: bool = True  # standardise rewards with their running mean and std (`common.RewardScale`)
    gru: bool = True  # false: no recurrent layer (ablation)
    neurips_obs: bool = False  # NeurIPS'22's observation: + completion-time and inter-arrival statistics
    reward_smoothing: float = 0.0  # weight of the previous step's loads in the reward (CIKM'22 Eq. 18: 0.1)


class Mixer(nn.Module):
    """Monotonic mixing of the LBs' Q values, conditioned on the global state."""

    def __init__(self, n_agents: int, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.n_agents, self.hidden = n_agents, hidden
        self.hyper_w1 = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_agents * hidden))
        self.hyper_b1 = nn.Linear(state_dim, hidden)
        self.hyper_w2 = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.hyper_b2 = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """q: [..., n_agents], state: [..., state_dim] → Q_tot [...]."""
        lead = q.shape[:-1]
        w1 = self.hyper_w1(state).abs().view(*lead, self.n_agents, self.hidden)
        hidden = F.elu((q.unsqueeze(-2) @ w1).squeeze(-2) + self.hyper_b1(state))
        w2 = self.hyper_w2(state).abs()
        return (hidden * w2).sum(-1) + self.hyper_b2(state).squeeze(-1)


def td_lambda(rewards: torch.Tensor, next_values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """λ-returns G_t = r_t + γ((1 − λ) V_{t+1} + λ G_{t+1}), with G_{T−1} = r_{T−1} + γ V_T (truncation).

    rewards [B, T] and next_values [B, T] (V_{t+1} for each t) → [B, T]."""
    returns = torch.zeros_like(rewards)
    running = next_values[:, -1]
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * ((1 - lam) * next_values[:, t] + lam * running)
        returns[:, t] = running
    return returns


class QmixLearner:
    """All LBs' agents and the mixer; acts for every LB, learns from the team reward."""

    def __init__(self, n_agents: int, n_servers: int, hyper: QmixHyper, seed: int) -> None:
        self.hyper, self.m, self.n = hyper, n_agents, n_servers
        self.n_levels = len(hyper.levels)
        width = observation_width(hyper)
        self.n_in = input_size(n_servers, self.n_levels, extra=n_agents, features=width)
        state_dim = n_agents * n_servers * width
        torch.manual_seed(seed)
        self.agent = Recurrent(self.n_in, hyper.hidden, n_servers, self.n_levels, gru=hyper.gru)
        self.mixer = Mixer(n_agents, state_dim, hyper.mixing_hidden)
        self.agent_target = Recurrent(self.n_in, hyper.hidden, n_servers, self.n_levels, gru=hyper.gru)
        self.mixer_target = Mixer(n_agents, state_dim, hyper.mixing_hidden)
        self._sync_targets()
        self.optimizer = torch.optim.Adam([*self.agent.parameters(), *self.mixer.parameters()], lr=hyper.lr)
        self.buffer = EpisodeBuffer(hyper.buffer_episodes)
        self.rng = np.random.default_rng(seed)
        self.reward_scale = RewardScale(hyper.reward_norm)
        self.episodes_seen = 0
        self.reset()

    def _sync_targets(self) -> None:
        self.agent_target.load_state_dict(self.agent.state_dict())
        self.mixer_target.load_state_dict(self.mixer.state_dict())

    # -- acting -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.hidden: torch.Tensor | None = None  # [1, m, hidden]: the LBs are the batch
        self.prev_actions = np.full((self.m, self.n), self.n_levels // 2, dtype=np.int64)

    def features(self, observations: list[np.ndarray], prev_actions: np.ndarray) -> np.ndarray:
        """Agent-network inputs of every LB: [m, n_in]."""
        ids = np.eye(self.m, dtype=np.float32)
        return np.stack([encode(obs, prev_actions[i], self.n_levels, ids[i]) for i, obs in enumerate(observations)])

    def epsilon(self) -> float:
        h = self.hyper
        done = min(1.0, self.episodes_seen / max(1, h.eps_anneal_episodes))
        return h.eps_start + (h.eps_end - h.eps_start) * done

    @torch.no_grad()
    def act(self, observations: list[np.ndarray], *, greedy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(actions [m, n], inputs [m, n_in]); ε-greedy unless `greedy`."""
        x = self.features(observations, self.prev_actions)
        utilities, self.hidden = self.agent(torch.from_numpy(x).unsqueeze(1), self.hidden)
        actions = utilities[:, 0].argmax(-1).numpy()
        if not greedy:
            explore = self.rng.random((self.m, self.n)) < self.epsilon()
            actions = np.where(explore, self.rng.integers(self.n_levels, size=(self.m, self.n)), actions)
        self.prev_actions = actions
        return actions, x

    # -- replay and update ------------------------------------------------------------------------------
    def store(
        self, inputs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_inputs: np.ndarray, states: np.ndarray
    ) -> None:
        """inputs [T, m, n_in], actions [T, m, n], team rewards [T], next_inputs [m, n_in], states [T+1, S]."""
        self.buffer.append(
            {
                "x": np.concatenate([inputs, next_inputs[None]]).astype(np.float32),
                "a": actions.astype(np.int64),
                "r": rewards.astype(np.float32),
                "s": states.astype(np.float32),
            }
        )
        self.reward_scale.observe(rewards)
        self.episodes_seen += 1
        if self.episodes_seen % self.hyper.target_update_episodes == 0:
            self._sync_targets()

    def _utilities(self, net: Recurrent, x: torch.Tensor) -> torch.Tensor:
        """x [B, T+1, m, n_in] → utilities [B, T+1, m, n, L] (each LB's sequence through the shared GRU)."""
        b, t1, m, n_in = x.shape
        u, _ = net(x.permute(0, 2, 1, 3).reshape(b * m, t1, n_in))
        return u.view(b, m, t1, self.n, self.n_levels).permute(0, 2, 1, 3, 4)

    def update(self) -> dict[str, float]:
        h = self.hyper
        batch = self.buffer.sample(self.rng, h.batch_episodes)
        x, a, s = batch["x"], batch["a"], batch["s"]  # [B, T+1, m, n_in], [B, T, m, n], [B, T+1, S]
        r = self.reward_scale(batch["r"])  # [B, T]

        utilities = self._utilities(self.agent, x)  # [B, T+1, m, n, L]
        q_taken = utilities[:, :-1].gather(-1, a.unsqueeze(-1)).squeeze(-1).mean(-1)  # [B, T, m]
        q_tot = self.mixer(q_taken, s[:, :-1])  # [B, T]
        target = self.double_q_target(utilities.detach(), x, s, r)
        loss = F.mse_loss(q_tot, target)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_([*self.agent.parameters(), *self.mixer.parameters()], h.grad_clip)
        self.optimizer.step()
        return {
            "critic_loss": float(loss.detach()),
            "actor_loss": float("nan"),
            "alpha": self.epsilon(),
            "entropy": float("nan"),
        }

    @torch.no_grad()
    def double_q_target(
        self, utilities: torch.Tensor, x: torch.Tensor, s: torch.Tensor, r: torch.Tensor
    ) -> torch.Tensor:
        """TD(λ) targets with double Q: at o_{t+1} each head's level is the online network's argmax
        (`utilities` [B, T+1, m, n, L]), its value the target network's, mixed by the target mixer."""
        h = self.hyper
        best_next = utilities[:, 1:].argmax(-1, keepdim=True)
        target_u = self._utilities(self.agent_target, x)[:, 1:]
        q_next = target_u.gather(-1, best_next).squeeze(-1).mean(-1)  # [B, T, m]
        v_next = self.mixer_target(q_next, s[:, 1:])  # [B, T]
        return td_lambda(r, v_next, h.gamma, h.td_lambda)

    # -- checkpoints ------------------------------------------------------------------------------------
    def hyper_state(self) -> dict:
        return plain(self.hyper)

    def state(self) -> dict:
        return {
            "hyper": self.hyper_state(),
            "agent": self.agent.state_dict(),
            "mixer": self.mixer.state_dict(),
            "agent_target": self.agent_target.state_dict(),
            "mixer_target": self.mixer_target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "episodes": self.buffer.state(),
            "episodes_seen": self.episodes_seen,
            "rng": generator_state(self.rng),
            "reward_scale": self.reward_scale.state(),
        }

    def load(self, state: dict) -> None:
        for name in ("agent", "mixer", "agent_target", "mixer_target", "optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer.load(state["episodes"])
        self.episodes_seen = int(state["episodes_seen"])
        self.rng = generator(state["rng"])
        self.reward_scale.load(state.get("reward_scale"))
