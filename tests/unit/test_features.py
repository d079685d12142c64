"""Reservoirs and their reduction: hand-computed statistics, filled slots only, recency of random replacement."""

from __future__ import annotations

import random

import numpy as np
import pytest

from marllb_cli.features import FEATURE_NAMES, Reservoir, observe, summarize


def test_summary_matches_hand_computation():
    # times 0, 1, 2 s; values 1, 2, 3; now = 2 s: decay factors 0.81, 0.9, 1.
    s = summarize(np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]), now=2.0)
    assert s.mean == pytest.approx(2.0)
    assert s.p90 == pytest.approx(2.8)  # linear interpolation: 2 + 0.8 × (3 − 2)
    assert s.std == pytest.approx((2 / 3) ** 0.5)
    assert s.decayed_mean == pytest.approx((0.81 + 1.8 + 3.0) / 3)
    assert s.decayed_p90 == pytest.approx(1.8 + 0.8 * (3.0 - 1.8))
    assert s.count == 3


def test_statistics_ignore_empty_slots():
    reservoir = Reservoir(slots=128, rng=random.Random(1))
    for t, v in ((0.0, 0.5), (0.1, 1.5), (0.2, 1.0)):
        reservoir.add(t, v)
    s = summarize(*reservoir.samples(), now=0.2)
    assert s.count == 3
    assert s.mean == pytest.approx(1.0)  # over 128 slots with zeros it would be 3/128


def test_empty_reservoir_summarizes_to_zero():
    s = summarize(*Reservoir().samples(), now=5.0)
    assert s.as_tuple() == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert s.count == 0


def test_random_replacement_keeps_recent_samples():
    """A slot survives k later samples with probability (1 − 1/K)^k: the median age is ≈ K ln 2 ≈ 89."""
    reservoir = Reservoir(slots=128, rng=random.Random(7))
    n = 20_000
    for i in range(n):
        reservoir.add(float(i), float(i))
    times, _ = reservoir.samples()
    assert len(times) == 128
    median_age = float(np.median(n - 1 - times))
    assert 60 <= median_age <= 120


def test_keep_probability_thins_samples():
    reservoir = Reservoir(slots=100_000, keep_probability=0.25, rng=random.Random(3))
    for i in range(40_000):
        reservoir.add(float(i), 1.0)
    assert reservoir.seen == 40_000
    assert reservoir.filled == pytest.approx(10_000, rel=0.05)


def test_observation_layout():
    reservoirs = [Reservoir(rng=random.Random(j)) for j in range(3)]
    reservoirs[1].add(9.0, 0.2)
    reservoirs[1].add(10.0, 0.4)
    obs = observe(np.array([4, 0, 2]), [r.samples() for r in reservoirs], now=10.0)
    assert obs.shape == (3, len(FEATURE_NAMES)) == (3, 6)
    assert obs.dtype == np.float32
    assert obs[:, 0].tolist() == [4, 0, 2]
    assert obs[1, 1] == pytest.approx(0.3)
    assert obs[1, 4] == pytest.approx((0.2 * 0.9 + 0.4) / 2)
    assert not obs[[0, 2], 1:].any()
    with pytest.raises(ValueError):
        observe(np.array([1, 2]), [r.samples() for r in reservoirs], now=0.0)


def test_full_reservoirs_take_the_vectorised_path_with_the_same_numbers():
    rng = random.Random(2)
    reservoirs = [Reservoir(16, rng=rng) for _ in range(5)]
    for k in range(200):
        reservoirs[k % 5].add(k * 0.01, rng.expovariate(1 + k % 5))
    samples = [r.samples() for r in reservoirs]
    assert {len(v) for _, v in samples} == {16}
    obs = observe([1, 2, 3, 4, 5], samples, now=2.5)
    for j, (times, values) in enumerate(samples):
        assert obs[j, 1:] == pytest.approx(np.float32(summarize(times, values, 2.5).as_tuple()), rel=1e-6)
    # Unequal fills fall back to the per-server reduction.
    mixed = observe([0, 0], [samples[0], (samples[1][0][:3], samples[1][1][:3])], now=2.5)
    assert mixed[1, 1] == pytest.approx(samples[1][1][:3].mean(), rel=1e-6)
