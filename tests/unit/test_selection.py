"""Server selection: SED/LSQ by hand, drain, WCMP shares, alias-table exactness, Maglev balance and disruption."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from marllb_cli.dataplane.selection import AliasTable, Selector, flow_hash, flow_key, lsq, maglev_table, sed


def test_sed_by_hand():
    assert sed([0, 0], [1, 2]) == 1  # 1/1 vs 1/2
    assert sed([1, 3], [1, 2]) == 0  # 2/1 vs 4/2: tie, lowest index
    assert sed([2, 3, 0], [1.0, 1.5, 0.5]) == 2  # 3, 2.67, 2
    assert sed([0, 5, 5], [0, 1, 1]) == 1  # server 0 drained despite its empty queue


def test_lsq_by_hand_and_drain():
    assert lsq([3, 1, 1], [1, 1, 1]) == 1
    assert lsq([0, 2, 1], [0, 1, 1]) == 2


def test_sed_with_equal_weights_is_join_shortest_queue():
    rng = random.Random(0)
    for _ in range(2000):
        q = [rng.randrange(10) for _ in range(7)]
        assert sed(q, [1.5] * 7) == lsq(q, [1.5] * 7) == q.index(min(q))


def test_sed_splits_long_flows_in_weight_ratio():
    selector = Selector(2, method="sed", weights=[1, 2])
    q = [0, 0]
    for _ in range(300):
        q[selector.choose(0, q)] += 1
    assert q == [100, 200]


def test_wcmp_shares_follow_weights_and_skip_drained():
    selector = Selector(4, method="wcmp", weights=[1, 2, 3, 0], rng=random.Random(5))
    counts = Counter(selector.choose(0, [0] * 4) for _ in range(60_000))
    assert counts[3] == 0
    for j, share in enumerate((1 / 6, 2 / 6, 3 / 6)):
        assert counts[j] / 60_000 == pytest.approx(share, abs=0.01)


@pytest.mark.parametrize("weights", [[1, 1], [1, 2, 3, 0], [0.1, 5, 0, 2.5, 2.5], [7]])
def test_alias_table_is_exact(weights):
    table = AliasTable(weights)
    n = len(weights)
    mass = [table.prob[j] / n for j in range(n)]
    for i in range(n):
        mass[table.alias[i]] += (1 - table.prob[i]) / n
    total = sum(weights)
    assert mass == pytest.approx([w / total for w in weights])


def test_maglev_balances_and_is_consistent():
    size = 65537
    table7 = maglev_table(7, size)
    counts = Counter(table7)
    assert set(counts) == set(range(7))
    assert max(counts.values()) - min(counts.values()) <= 0.01 * size / 7
    table8 = maglev_table(8, size)
    moved = sum(a != b for a, b in zip(table7, table8, strict=True)) / size
    assert moved < 0.2  # the minimum possible is 1/8 = 0.125: only the new server's share moves


def test_ecmp_is_a_pure_function_of_the_flow():
    selector = Selector(5, method="ecmp")
    h = flow_hash(flow_key(bytes([10, 0, 0, 2]), bytes([10, 99, 255, 1]), 40000, 80))
    assert len({selector.choose(h, [i, 0, 0, 0, 0]) for i in range(10)}) == 1
    assert h == flow_hash(flow_key(bytes([10, 0, 0, 2]), bytes([10, 99, 255, 1]), 40000, 80))


def test_method_and_weights_switch_at_run_time():
    selector = Selector(3, method="sed", weights=[1, 1, 1])
    assert selector.choose(0, [0, 0, 0]) == 0
    selector.set_weights([1, 1, 4])
    assert selector.choose(0, [0, 0, 0]) == 2
    selector.set_method("lsq")
    assert selector.choose(0, [1, 0, 1]) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.set_method("random"), "unknown selection method"),
        (lambda s: s.set_weights([1, 1]), "expected 3 weights"),
        (lambda s: s.set_weights([0, 0, 0]), "at least one positive"),
        (lambda s: s.set_weights([1, -1, 1]), "non-negative"),
    ],
)
def test_bad_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(Selector(3))
