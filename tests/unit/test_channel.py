"""The shared-memory channel: layout round trip, file mode, and no torn reads under a concurrent writer."""

from __future__ import annotations

import multiprocessing
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from marllb_cli.dataplane.channel import COUNTERS, Channel, TornRead
from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.selection import Selector, flow_key


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "channel"


def test_stats_and_control_round_trip(path):
    writer = Channel.create(path, 3, "sed", [1.0, 1.5, 2.0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    flows = FlowTable(Selector(3), rng=random.Random(0))
    for i in range(7):
        k = flow_key(bytes([10, 0, 0, 1]), bytes([10, 99, 255, 1]), i, 80)
        flows.server_for(k, 0x02, float(i))
        flows.server_for(k, 0x10, i + 0.5)
    counters = list(range(len(COUNTERS)))
    writer.publish(9.0, counters, flows)

    reader = Channel.attach(path)
    stats = reader.read_stats()
    assert stats.time == 9.0
    assert list(stats.counters.values()) == counters
    assert stats.flows.tolist() == flows.flows == [3, 2, 2]
    for j in range(3):
        np.testing.assert_array_equal(stats.durations[j][1], flows.durations[j].samples()[1])
    assert stats.interarrivals[1].tolist() == [1.0] * 6
    assert reader.read_control()[1:] == ("sed", [1.0, 1.5, 2.0])
    reader.write_control("wcmp", [2.0, 0.0, 1.0])
    assert writer.read_control()[1:] == ("wcmp", [2.0, 0.0, 1.0])
    reader.close()
    writer.close()


def test_attach_refuses_other_files(path):
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="not a marllb channel"):
        Channel.attach(path)


def test_create_refuses_an_existing_file(path):
    Channel.create(path, 2, "sed", [1, 1]).close()
    with pytest.raises(FileExistsError):
        Channel.create(path, 2, "sed", [1, 1])


def _hammer(path: Path, rounds: int) -> None:
    """Publish snapshots whose every field encodes the same round number, as fast as possible."""
    channel = Channel.attach(path)
    n = channel.n
    flows = FlowTable(Selector(n), rng=random.Random(0))
    for r in range(1, rounds + 1):
        flows.flows = [r] * n
        flows.packets = [r] * n
        for reservoir in flows.durations:
            reservoir.times[:] = r
            reservoir.filled = reservoir.slots
        channel.publish(float(r), [r] * len(COUNTERS), flows)
    channel.close()


def test_a_reader_never_sees_a_torn_snapshot(path):
    Channel.create(path, 64, "sed", [1.0] * 64).close()
    writer = multiprocessing.get_context("fork").Process(target=_hammer, args=(path, 3_000))
    reader = Channel.attach(path)
    writer.start()
    seen = set()
    while writer.is_alive() or not seen:
        try:
            stats = reader.read_stats()
        except TornRead:  # pragma: no cover - would mean a starving reader, itself a failure below
            continue
        r = stats.time
        assert set(stats.flows.tolist()) <= {r}
        assert set(stats.packets.tolist()) <= {r}
        assert all(set(times.tolist()) <= {r} for times, _ in stats.durations)
        seen.add(r)
    writer.join()
    assert writer.exitcode == 0
    assert len(seen) > 10  # the reader really ran concurrently with the writer


def test_an_agent_killed_mid_write_leaves_the_dataplane_on_its_weights(path):
    """Fail-static (reliability review, risk 3): an agent killed between its two sequence stores leaves the
    control sequence odd for good. On 094bd00 the dataplane busy-waited 1 s and died of `TornRead`; now it
    keeps the weights in force, without waiting, and takes the next complete write."""
    import time

    from marllb_cli.dataplane.fastpath import Dataplane

    channel = Channel.create(path, 3, "sed", [1.0, 2.0, 3.0])
    dataplane = Dataplane.__new__(Dataplane)  # the control path only: no socket
    dataplane.channel = channel
    dataplane.selector = Selector(3, weights=[1.0, 2.0, 3.0])
    dataplane._control_seq = channel.control_seq
    dataplane._torn_seq = None
    agent = Channel.attach(path)
    agent.header["control_seq"] = agent.control_seq + 1  # the first store of a write, then SIGKILL
    agent._control["weights"] = [9.0, 9.0, 9.0]
    started = time.monotonic()
    for _ in range(50):  # 50 publish intervals of a second of traffic
        dataplane._apply_control()
    assert time.monotonic() - started < 0.5
    assert dataplane.selector.weights == [1.0, 2.0, 3.0]
    agent.header["control_seq"] = agent.control_seq + 1  # a new agent's complete write
    agent.write_control("lsq", [1.0, 1.0, 4.0])
    dataplane._apply_control()
    assert (dataplane.selector.method, dataplane.selector.weights) == ("lsq", [1.0, 1.0, 4.0])


def test_non_finite_weights_from_an_agent_keep_the_old_ones(path):
    from marllb_cli.dataplane.fastpath import Dataplane

    channel = Channel.create(path, 2, "sed", [1.0, 2.0])
    dataplane = Dataplane.__new__(Dataplane)
    dataplane.channel, dataplane.selector = channel, Selector(2, weights=[1.0, 2.0])
    dataplane._control_seq, dataplane._torn_seq = channel.control_seq, None
    Channel.attach(path).write_control("sed", [float("nan"), 1.0])
    dataplane._apply_control()
    assert dataplane.selector.weights == [1.0, 2.0]


def test_attach_never_follows_a_link_nor_maps_a_file_others_can_write(path, tmp_path):
    """Reliability review, risk 4: on 094bd00 `attach` followed a symlink planted under the channel's
    predictable name and opened its target read-write, and trusted any file's owner, mode and header."""
    import os

    target = tmp_path / "target"
    Channel.create(target, 2, "sed", [1, 1]).close()
    path.symlink_to(target)
    with pytest.raises(OSError):
        Channel.attach(path)
    path.unlink()
    Channel.create(path, 2, "sed", [1, 1]).close()
    os.chmod(path, 0o666)
    with pytest.raises(ValueError, match="not a private file"):
        Channel.attach(path)
    os.chmod(path, 0o600)
    with open(path, "r+b") as handle:  # a header that claims more servers than the file holds
        handle.truncate(Channel.size(2) - 8)
    with pytest.raises(ValueError, match="header does not match its size"):
        Channel.attach(path)
