"""The replayer's schedule file: what the controller writes is exactly what the replayer (on any client node,
without pandas) reads back."""

from __future__ import annotations

import numpy as np

from marllb_cli.replay import read_schedule, write_schedule


def test_schedule_round_trips_every_float_and_path(tmp_path):
    rng = np.random.default_rng(3)
    intended = np.sort(rng.exponential(0.01, 1000).cumsum())
    paths = [f"/dummy.php/?n={k}" for k in range(998)] + ['/wiki/index.php/Caf\u00e9_"quoted",x', "/static/1k.bin"]
    write_schedule(tmp_path / "s.tsv", intended, paths)
    times, read_paths = read_schedule(tmp_path / "s.tsv")
    assert times.dtype == np.float64 and np.array_equal(times, intended)  # bit for bit
    assert read_paths == paths


def test_the_pacer_never_wakes_before_its_deadline():
    """The timerfd pacer (how close to the deadline it wakes is `marllb bench replay`'s figure)."""
    import asyncio
    import time

    from marllb_cli.replay import Pacer

    async def wake_ups() -> list[float]:
        pacer = Pacer()
        early = []
        try:
            for step in range(50):
                deadline = time.monotonic() + 0.0007 * (step % 5)
                await pacer.until(deadline)
                early.append(deadline - time.monotonic())
            started = time.monotonic()
            await pacer.until(started - 1.0)  # a deadline past: at once
            assert time.monotonic() - started < 0.05
        finally:
            pacer.close()
        assert pacer.fd == -1
        return early

    assert max(asyncio.run(wake_ups())) <= 0
    probe = Pacer()
    assert probe.precise  # Linux has timerfd: the precise path is the one tested
    probe.close()
