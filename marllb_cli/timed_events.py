"""A testbed run's timed events, applied from the controller at their times on the replayer's clock.

The runner waits until the replayer reports its t0 (intended time 0, on the client node's clock;
`client.offset` puts it on this machine's), then hands each event, at its time, to the lane of the node its
change is made on (`TimedEvent.node`). A lane is a thread that applies its events one after the other
(`Faults.apply`); lanes run side by side. Why lanes: some changes take a while (Apache's start waits until
it answers, 0.7 s over SSH; a `marllb node event` command per event took over a second), and events applied
strictly one after the other fell further behind with each one; events on different nodes do not wait for
each other, while two on one node keep their order. Each event is recorded with its intended and applied
time, and whether it took (a failed event is recorded with its error and the run goes on: what happens next
is measured). After the run, `Faults.restore` puts back what the events changed.
"""

from __future__ import annotations

import queue
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
    """Applies `events` (in time order) through `faults`; `t0()` gives the replay's time 0 on this machine's
    monotonic clock once known (None until then)."""

    def __init__(
        self, faults: Faults, events: Sequence[TimedEvent], t0: Callable[[], float | None], *, end_s: float
    ) -> None:
        """`end_s`: when the run's last request is due; what an event starts lives until then and a minute."""
        self.faults, self.events, self.t0, self.end_s = faults, list(events), t0, end_s
        self._records: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._lanes: dict[str, tuple[queue.SimpleQueue[int | None], threading.Thread]] = {}
        self._thread = threading.Thread(target=self._dispatch, name="timed-events", daemon=True)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The events' rows of events.parquet so far, in the events' order (applied or failed ones only,
        until `stop` records the rest)."""
        return [self._records[i] for i in sorted(self._records)]

    def start(self) -> EventRunner:
        if self.events:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Apply nothing more (an event being applied finishes); events not yet applied are recorded so."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for inbox, _ in self._lanes.values():
            inbox.put(None)
        for _, thread in self._lanes.values():
            thread.join()
        for i, event in enumerate(self.events):
            self._records.setdefault(i, event.record(None, "the run ended first"))

    def _dispatch(self) -> None:
        try:
            self.faults.prepare(self.events)
        except Exception:  # each event that needs what failed here reports it when it is applied
            pass
        while (t0 := self.t0()) is None:
            if self._stop.wait(0.02):
                return
        for i, event in enumerate(self.events):
            if self._stop.wait(max(0.0, t0 + event.at - time.monotonic())):
                return
            self._lane(event.node, t0).put(i)

    def _lane(self, name: str, t0: float) -> queue.SimpleQueue[int | None]:
        if name not in self._lanes:
            inbox: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._apply, args=(inbox, t0), name=f"timed-events-{name}", daemon=True)
            self._lanes[name] = (inbox, thread)
            thread.start()
        return self._lanes[name][0]

    def _apply(self, inbox: queue.SimpleQueue[int | None], t0: float) -> None:
        """One lane: apply its events in order until `stop`. The thread stays until then: a process an event
        started (a hog) dies with the thread that started it (PR_SET_PDEATHSIG follows the thread), so that it
        cannot outlive a controller that was killed."""
        while (i := inbox.get()) is not None:
            if self._stop.is_set():
                continue  # recorded as not applied
            event = self.events[i]
            try:
                self.faults.apply(event, lifetime_s=max(0.0, self.end_s - event.at) + LIFETIME_MARGIN_S)
            except Exception as exc:  # the run goes on; the record says the event did not take
                self._records[i] = event.record(time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
                continue
            self._records[i] = event.record(time.monotonic() - t0, "")
