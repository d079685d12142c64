"""The flow table: q_j bookkeeping over SYN, FIN/RST and timeouts; stickiness; the feature samples it takes."""

from __future__ import annotations

import random
import zlib

import pytest

from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.packets import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from marllb_cli.dataplane.selection import Selector, flow_key

VIP = bytes([10, 99, 255, 1])
SYN, ACK, FIN_ACK, RST = TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST


def key(i: int) -> bytes:
    return flow_key(bytes([10, 99, 1, 2]), VIP, 10_000 + i, 80)


def table(n: int = 3, method: str = "sed", weights=None, **kwargs) -> FlowTable:
    return FlowTable(Selector(n, method=method, weights=weights, rng=random.Random(1)), rng=random.Random(2), **kwargs)


def test_syn_opens_fin_closes_and_q_follows():
    flows = table()
    servers = [flows.server_for(key(i), SYN, 0.0) for i in range(6)]
    assert servers == [0, 1, 2, 0, 1, 2]  # sed with equal weights is join-the-shortest-queue
    assert flows.flows == [2, 2, 2] and len(flows) == 6
    for i in range(6):
        assert flows.server_for(key(i), ACK, 0.1) == servers[i]
        flows.server_for(key(i), FIN_ACK if i % 2 else RST, 0.5 + i)
    assert flows.flows == [0, 0, 0] and len(flows) == 0
    assert flows.closed == 6 and flows.timed_out == 0


def test_duration_and_completion_samples_are_measured_from_the_syn():
    flows = table(1)
    flows.server_for(key(0), SYN, 10.0)
    flows.server_for(key(0), ACK, 10.25)
    flows.server_for(key(0), ACK, 11.0)
    flows.server_for(key(0), FIN_ACK, 12.5)
    assert flows.durations[0].samples()[1].tolist() == [0.25, 1.0]
    assert flows.completions[0].samples()[1].tolist() == [2.5]
    flows.server_for(key(1), SYN, 13.0)
    flows.server_for(key(2), SYN, 13.5)
    assert flows.interarrivals.samples()[1].tolist() == [3.0, 0.5]


def test_idle_flows_time_out_and_q_is_decremented():
    flows = table(2, idle_timeout=40.0, linger=2.0)
    flows.server_for(key(0), SYN, 0.0)
    flows.server_for(key(1), SYN, 0.0)
    flows.server_for(key(1), ACK, 30.0)
    assert flows.expire(39.9) == 0
    assert flows.expire(40.0) == 1 and flows.flows == [0, 1]
    assert flows.expire(70.0) == 1 and flows.flows == [0, 0]
    assert flows.timed_out == 2 and len(flows) == 0


def test_an_ended_flow_lingers_for_its_last_ack_then_is_forgotten():
    flows = table(4, method="lsq")
    for i in range(4):
        flows.server_for(key(i), SYN, 0.0)
    server = flows.server_for(key(3), SYN, 0.0)  # a retransmitted SYN is the same flow
    assert server == 3 and flows.flows == [1, 1, 1, 1]
    flows.server_for(key(3), FIN_ACK, 1.0)
    assert flows.server_for(key(3), ACK, 1.5) == 3  # the trailing ACK follows the flow
    assert flows.flows == [1, 1, 1, 0] and flows.untracked == 0
    flows.expire(3.6)
    flows.server_for(key(3), ACK, 3.7)
    assert flows.untracked == 1  # forgotten: now only the hash knows where to go


def test_a_syn_reusing_a_lingering_port_is_a_new_flow():
    flows = table(2, method="lsq")
    flows.server_for(key(0), SYN, 0.0)
    flows.server_for(key(0), RST, 0.1)
    flows.server_for(key(1), SYN, 0.2)  # lsq: server 0 is empty again
    assert flows.server_for(key(0), SYN, 0.3) == 1
    assert flows.flows == [1, 1] and sum(flows.new_flows) == 3


def test_unknown_segments_go_by_hash_and_do_not_count_as_flows():
    flows = table(5)
    selector = flows.selector
    for i in range(50):
        assert flows.server_for(key(i), ACK, 1.0) == selector.by_hash(zlib.crc32(key(i)))
    assert flows.untracked == 50 and flows.flows == [0] * 5


def test_weight_changes_never_move_an_existing_flow():
    flows = table(2, weights=[1, 1])
    first = flows.server_for(key(0), SYN, 0.0)
    for step, weights in enumerate([[1, 0.0001], [0.0001, 1], [0, 1], [1, 0]]):
        flows.selector.set_weights(weights)
        assert flows.server_for(key(0), ACK, 0.25 * step) == first


def test_drained_server_gets_no_new_flows_but_keeps_its_own():
    flows = table(3, weights=[1, 0, 1])
    servers = {flows.server_for(key(i), SYN, 0.0) for i in range(30)}
    assert servers == {0, 2}


@pytest.mark.parametrize("method", ["sed", "lsq", "wcmp", "ecmp"])
def test_q_returns_to_zero_for_every_method(method):
    flows = table(4, method=method, weights=[1, 2, 3, 4])
    rng = random.Random(3)
    open_keys = []
    for i in range(2_000):
        flows.server_for(key(i), SYN, i * 0.01)
        open_keys.append(key(i))
        if open_keys and rng.random() < 0.5:
            flows.server_for(open_keys.pop(rng.randrange(len(open_keys))), FIN_ACK, i * 0.01)
    assert sum(flows.flows) == len(open_keys) == len(flows)
    flows.expire(1_000.0)
    assert flows.flows == [0, 0, 0, 0]


def test_the_table_is_bounded():
    flows = table(2, max_flows=100)
    for i in range(150):
        flows.server_for(key(i), SYN, 0.0)
    assert len(flows) == 100 and flows.overflow == 50 and sum(flows.flows) == 100


def test_syn_rst_pairs_cannot_grow_the_table_past_its_bound():
    """Reliability review §5: with max_flows 100, 50 000 SYN+RST pairs left 50 000 entries (lingering ones
    were not counted against the bound)."""
    flows = FlowTable(Selector(4), max_flows=100, rng=random.Random(0))
    for i in range(50_000):
        flows.server_for(key(i), SYN, i * 1e-5)
        flows.server_for(key(i), RST, i * 1e-5)
    assert len(flows._table) <= 100
    assert flows.overflow == 50_000 - 100 and flows.flows == [0, 0, 0, 0]


def test_a_request_longer_than_the_idle_timeout_keeps_its_server():
    """With direct server return the client is silent while a long request computes: after the idle
    timeout the flow leaves q_j, but the ACK of the response must still reach its server (IPVS keeps an
    established entry 15 minutes), not be hashed to another server that would answer with a reset."""
    flows = table(8, method="lsq", idle_timeout=40.0)
    for i in range(7):
        flows.server_for(key(100 + i), SYN, 0.0)  # lsq fills servers 0..6, so the long one goes to 7
    server = flows.server_for(key(0), SYN, 0.0)
    assert server == 7 and flows.selector.by_hash(zlib.crc32(key(0))) != 7
    flows.server_for(key(0), ACK, 0.01)
    assert flows.expire(41.0) == 8 and flows.flows == [0] * 8  # timed out: no longer counted in q_j
    assert flows.server_for(key(0), ACK, 45.0) == 7 and flows.untracked == 0  # still forwarded to it
    flows.expire(944.0)  # 899 s without a segment
    assert flows.server_for(key(0), ACK, 945.0) == 7 and flows.untracked == 0
    assert flows.server_for(key(0), FIN_ACK, 946.0) == 7  # closing: kept for its trailing ACK only
    assert flows.server_for(key(0), ACK, 946.5) == 7
    flows.expire(949.0)
    flows.server_for(key(0), ACK, 949.5)
    assert flows.untracked == 1 and flows.flows == [0] * 8
    flows.server_for(key(1), SYN, 950.0)
    flows.server_for(key(1), ACK, 950.1)
    assert flows.expire(991.0) == 1  # timed out, then 15 minutes without a segment: forgotten
    flows.expire(991.0 + 900.0)
    flows.server_for(key(1), ACK, 1891.5)
    assert flows.untracked == 2
