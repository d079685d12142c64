"""The request seeds that keep choosing settings apart from reporting them.

A setting (a hyperparameter, a static weight vector, a default) is chosen on `VALIDATION_SEEDS`; a result
is reported on `TEST_SEEDS`. Neither set meets the requests a training draws (`LoadBalancingEnv.reset`:
training seed × 100 003 + episode), so a policy is never judged on what it trained on, and a setting is
never judged on what chose it.
"""

from __future__ import annotations

__all__ = ["SEED_SETS", "TEST_SEEDS", "VALIDATION_SEEDS"]

#: What `bench policies` reports on by default, and what docs/benchmarks.md's tables quote.
TEST_SEEDS = tuple(range(10_000, 10_005))
#: What settings are chosen on: the first 3 are static-opt's search, the first is training's greedy evaluation.
VALIDATION_SEEDS = tuple(range(20_000, 20_005))
SEED_SETS = {"test": TEST_SEEDS, "validation": VALIDATION_SEEDS}
