"""`marllb train --preset`: the papers' training settings, each value with where it comes from.

marllb's own defaults (`SacHyper`, `QmixHyper`) are not the papers': they are what trained well here (a
temperature that can move, standardised rewards, residual levels around SED, 4-episode batches after 2
warm-up episodes). A preset sets what a paper states and leaves the rest at marllb's defaults; `--hyper`,
`--reward`, `--episodes` and `--episode-s` given on the command line still win.

CIKM'22 Table 2 (moderate | large scale) and §4.6–4.8:
    learning rate 1e-3 | 3e-4 (SAC's actor, critics and temperature alike; QMIX's)
    hidden units 128 | 512, batch 12 episodes, replay buffer 3 000 episodes, 72 episodes of 60 s | 30 s,
    25 updates per episode once more than 25 episodes are stored (`warmup_episodes` 25)
    target entropy −|A|: read per server head as −1 nat (`target_entropy_scale` −1 / log 6), below any
    discrete policy's entropy, so α only falls
    action set {1.0, 1.2, …, 2.0} per server; reward: the product-based fairness of the flow durations,
    smoothed over two steps (Eq. 18, keep 0.1); no reward standardisation
NeurIPS'22 §3.3–4: 120 episodes (moderate scale); Distr-LB on VBF + log, the CTDE learners on VBF; its
    observation (also completion-time and inter-arrival statistics, `neurips_obs`); the same network and
    artefact as CIKM'22, so the values it does not state are CIKM'22's moderate ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from marllb_cli.errors import ConfigError

__all__ = ["DEFAULT_EPISODES", "DEFAULT_EPISODE_S", "PRESETS", "Preset", "preset", "training_options"]

#: marllb's own episodes and episode length, where neither the command line nor a preset says.
DEFAULT_EPISODES, DEFAULT_EPISODE_S = 72, 60.0

CIKM_LEVELS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


@dataclass(frozen=True)
class Preset:
    """A paper's settings: episodes, episode length, the reward per algorithm, and hyperparameters (SAC's
    and QMIX's names; a name one learner does not have is skipped for it)."""

    name: str
    source: str
    episodes: int
    episode_s: float
    rewards: dict[str, str]
    hyper: dict[str, Any] = field(default_factory=dict)

    def hyper_for(self, known: set[str]) -> dict[str, Any]:
        """The preset's hyperparameters that a learner with these field names has."""
        return {name: value for name, value in self.hyper.items() if name in known}


def _cikm(name: str, scale: str, lr: float, hidden: int, episode_s: float) -> Preset:
    return Preset(
        name=name,
        source=f"CIKM'22 Table 2 ({scale} scale), §4.6–4.8, Eq. 18",
        episodes=72,
        episode_s=episode_s,
        rewards=dict.fromkeys(("isac", "ssac", "distr", "qmix", "centr"), "pbf"),
        hyper={
            "lr_actor": lr,
            "lr_critic": lr,
            "lr_alpha": lr,
            "lr": lr,
            "hidden": hidden,
            "batch_episodes": 12,
            "buffer_episodes": 3000,
            "updates_per_episode": 25,
            "warmup_episodes": 25,
            "target_entropy_scale": -1 / math.log(len(CIKM_LEVELS)),
            "levels": CIKM_LEVELS,
            "reward_norm": False,
            "reward_smoothing": 0.1,
            "residual": False,
        },
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _cikm("cikm22-moderate", "moderate", 1e-3, 128, 60.0),
        _cikm("cikm22-large", "large", 3e-4, 512, 30.0),
        Preset(
            name="neurips22",
            source="NeurIPS'22 §3.3–4 (unstated values: CIKM'22 Table 2, moderate scale)",
            episodes=120,
            episode_s=60.0,
            rewards={"isac": "vbf", "ssac": "vbf", "distr": "vbf-log", "qmix": "vbf", "centr": "vbf"},
            hyper={**_cikm("", "", 1e-3, 128, 60.0).hyper, "reward_smoothing": 0.0, "neurips_obs": True},
        ),
    )
}


def training_options(
    name: str | None,
    algo: str,
    known: set[str],
    *,
    reward: str | None = None,
    episodes: int | None = None,
    episode_s: float | None = None,
) -> tuple[str | None, int, float, dict[str, Any]]:
    """(reward, episodes, episode_s, hyperparameters) of a training: each value given, else preset `name`'s
    (None: no preset), else marllb's default (reward None: the algorithm's own). The hyperparameters are
    the preset's that a learner with field names `known` has; values given on top of them win. Serves
    `marllb train --preset` and a sweep's trainings alike."""
    chosen = preset(name) if name else None
    if chosen is None:
        return reward, episodes or DEFAULT_EPISODES, episode_s or DEFAULT_EPISODE_S, {}
    return (
        reward or chosen.rewards.get(algo),
        episodes or chosen.episodes,
        episode_s or chosen.episode_s,
        chosen.hyper_for(known),
    )


def preset(name: str) -> Preset:
    """The preset called `name`; a one-line error naming the choices otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown", hint=f"choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
