"""The report's bootstrap intervals reach their nominal 95 % coverage on synthetic runs drawn from known
distributions, and its ratio intervals hold a known ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marllb_cli.stats import _block_weights, _expansion, bootstrap, interquartile_mean

TRIALS, REPLICATES = 300, 300
#: With 300 trials the observed coverage of a true 95 % interval lies in this range 99 % of the time.
NOMINAL = (0.91, 0.985)
EXPONENTIAL = {"jct_mean_s": 0.1, "jct_p90_s": 0.1 * math.log(10), "jct_p99_s": 0.1 * math.log(100)}


def _coverage(draw, truth: dict[str, float], seed: int, strata=None) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(truth, 0)
    for trial in range(TRIALS):
        result = bootstrap(draw(rng), REPLICATES, seed=trial, strata=strata)
        for statistic, value in truth.items():
            low, high = result.interval(statistic)
            hits[statistic] += low <= value <= high
    return {statistic: count / TRIALS for statistic, count in hits.items()}


def test_one_run_of_independent_requests_is_covered_by_its_block_bootstrap():
    coverage = _coverage(lambda rng: [rng.exponential(0.1, 3000)], EXPONENTIAL, seed=1)
    print("one run:", coverage)
    assert NOMINAL[0] < coverage["jct_mean_s"] < NOMINAL[1]
    assert NOMINAL[0] < coverage["jct_p90_s"] < NOMINAL[1]
    assert 0.87 < coverage["jct_p99_s"] < NOMINAL[1]  # 30 requests in the tail: percentile intervals run short


def test_one_run_of_correlated_requests_is_covered_because_blocks_keep_the_correlation():
    """JCTs of a queue: each request's is 0.9 of the previous one's plus new work (mean 0.1 s). Resampling
    single requests would cover about half the time; blocks cover nearly as often as asked."""

    def queue(rng, n=3000):
        work = rng.exponential(0.1, n)
        jct = np.empty(n)
        jct[0] = work[0]
        for i in range(1, n):
            jct[i] = 0.9 * jct[i - 1] + 0.1 * work[i]
        return [jct]

    coverage = _coverage(queue, {"jct_mean_s": 0.1}, seed=2)
    print("correlated run:", coverage)
    assert 0.88 < coverage["jct_mean_s"] < NOMINAL[1]


def test_runs_that_differ_are_covered_by_resampling_runs_with_the_small_sample_expansion():
    """Five seeds whose mean JCT differs by ±20 % (lognormal), 1000 requests each: the interval must cover
    the mean over seeds, which requests alone cannot tell."""

    def seeds(rng):
        return [rng.exponential(0.1 * math.exp(rng.normal(0.0, 0.2) - 0.02), 1000) for _ in range(5)]

    coverage = _coverage(seeds, {"jct_mean_s": 0.1}, seed=3)
    print("five differing runs:", coverage)
    assert NOMINAL[0] < coverage["jct_mean_s"] < NOMINAL[1]


def test_a_ratio_interval_holds_the_true_ratio_and_the_baseline_is_one():
    rng = np.random.default_rng(4)
    hits = 0
    for trial in range(100):
        method = bootstrap([rng.exponential(0.08, 2000)], REPLICATES, seed=2 * trial)
        baseline = bootstrap([rng.exponential(0.1, 2000)], REPLICATES, seed=2 * trial + 1)
        low, high = method.ratio_interval("jct_mean_s", baseline)
        hits += low <= 0.8 <= high
        assert high - low < 0.2
    assert hits >= 88


def test_block_weights_draw_n_requests_in_whole_blocks():
    rng = np.random.default_rng(5)
    weights = _block_weights(1000, rng)
    length = math.ceil(2.0 * 1000 ** (1 / 3))
    assert weights.sum() == math.ceil(1000 / length) * length and weights.min() >= 0
    assert _block_weights(1, rng).tolist() == [1.0]


def test_the_expansion_is_the_t_interval_of_few_runs():
    assert _expansion(1) == 1.0
    assert _expansion(2) == pytest.approx(math.sqrt(2) * 12.706 / 1.959964)
    assert _expansion(5) == pytest.approx(math.sqrt(5 / 4) * 2.776 / 1.959964)
    assert _expansion(100) == pytest.approx(math.sqrt(100 / 99))


def test_no_requests_no_interval():
    empty = bootstrap([np.array([])], REPLICATES)
    assert empty.interval("jct_mean_s") is None
    assert bootstrap([np.ones(10)], 0).interval("jct_p99_s") is None


def test_a_ratio_over_the_same_seeds_is_paired_and_holds_a_constant_factor_tightly():
    """Five seeds whose levels differ tenfold (a drift: some seeds overload the servers); the other method is
    1.1 × as slow on every request of every seed. Resampled together (the same bootstrap seed, runs in seed
    order) the ratio's interval is 1.1 ± 1 %; resampled independently it spans the seeds' spread."""
    rng = np.random.default_rng(3)
    levels = np.exp(rng.normal(0, 1.2, 5))
    base = [level * rng.exponential(0.1, 2000) for level in levels]
    slower = [1.1 * run for run in base]
    paired = bootstrap(slower, 400, seed=7).ratio_interval("jct_mean_s", bootstrap(base, 400, seed=7))
    apart = bootstrap(slower, 400, seed=8).ratio_interval("jct_mean_s", bootstrap(base, 400, seed=7))
    assert 1.09 < paired[0] <= 1.1 <= paired[1] < 1.11, paired
    assert apart[1] - apart[0] > 0.5, apart


def test_trainings_that_differ_are_covered_by_the_two_level_bootstrap_and_not_by_pooling_their_runs():
    """A learner trained 5 times (each training's mean JCT off by ±20 %, lognormal), each policy run on 4
    request seeds (±3 %): what the report must cover is the mean over trainings. Resampling the 20 runs as
    if independent counts each training's luck 4 times and covers too rarely; drawing the trainings, then
    their runs, covers as asked."""
    trainings = [t for t in range(5) for _ in range(4)]

    def learner(rng):
        effects = [math.exp(rng.normal(0.0, 0.2) - 0.02) for _ in range(5)]
        return [rng.exponential(0.1 * effects[t] * math.exp(rng.normal(0.0, 0.03)), 500) for t in trainings]

    two_level = _coverage(learner, {"jct_mean_s": 0.1}, seed=4, strata=trainings)
    pooled = _coverage(learner, {"jct_mean_s": 0.1}, seed=4)
    print("five trainings × four seeds:", two_level, "pooled:", pooled)
    assert NOMINAL[0] < two_level["jct_mean_s"] < NOMINAL[1]
    assert pooled["jct_mean_s"] < 0.85


def test_the_interquartile_mean_is_the_mean_of_the_middle_half():
    assert interquartile_mean([4, 1, 3, 2]) == 2.5
    assert interquartile_mean(range(1, 9)) == 4.5
    assert interquartile_mean([1, 2, 3, 4, 5]) == pytest.approx((0.75 * 2 + 3 + 0.75 * 4) / 2.5)
    assert interquartile_mean([1, 2, 3, 4, 1000]) == interquartile_mean([1, 2, 3, 4, 5])  # robust to one far off
