"""A testbed run's timed events, applied from the controller at their times on the replayer's clock.

The runner is a thread beside the replay: it waits until the replayer reports its t0 (intended time 0, on the
client node's clock; `client.offset` puts it on this machine's), then sleeps until each event's time and
applies it (`Faults.apply`). Each event is recorded with its intended and applied time, and whether it took
(a failed event is recorded with its error and the run goes on: what happens next is measured). After the
run, `Faults.restore` puts back what the events changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from marllb_cli.deploy.base import Faults
from marllb_cli.events import TimedEvent

__all__ = ["EventRunner"]

#: How long a process an event started (a hog) outlives the run's last request at most.
LIFETIME_MARGIN_S = 60.0


class EventRunner:
    """Applies `events` through `faults`; `t0()` gives the replay's time 0 on this machine's monotonic clock
    once known (None until then)."""

    def __init__(
        self, faults: Faults, events: Sequence[TimedEvent], t0: Callable[[], float | None], *, end_s: float
    ) -> None:
        """`end_s`: when the run's last request is due; what an event starts lives until then and a minute."""
        self.faults, self.events, self.t0, self.end_s = faults, list(events), t0, end_s
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timed-events", daemon=True)

    def start(self) -> EventRunner:
        if self.events:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Apply nothing more; events not yet due are recorded as not applied."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for event in self.events[len(self.records) :]:
            self._record(event, None, "the run ended first")

    def _run(self) -> None:
        while (t0 := self.t0()) is None:
            if self._stop.wait(0.02):
                return
        for event in self.events:
            if self._stop.wait(max(0.0, t0 + event.at - time.monotonic())):
                return
            try:
                self.faults.apply(event, lifetime_s=max(0.0, self.end_s - event.at) + LIFETIME_MARGIN_S)
            except Exception as exc:  # the run goes on; the record says the event did not take
                self._record(event, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
                continue
            self._record(event, time.monotonic() - t0, "")
        # Stay until the run ends: a process an event started (a hog) dies with the thread that started it
        # (PR_SET_PDEATHSIG follows the thread), so that it cannot outlive a controller that was killed.
        self._stop.wait()

    def _record(self, event: TimedEvent, applied_s: float | None, error: str) -> None:
        self.records.append(event.record(applied_s, error))
