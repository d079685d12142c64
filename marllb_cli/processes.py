"""Stopping processes that marllb started, found through something we own (a cgroup, a namespace)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from marllb_cli.errors import TestbedError

__all__ = ["kill_pids"]


def kill_pids(list_pids: Callable[[], list[int]], *, grace_s: float = 3.0) -> None:
    """SIGTERM every pid `list_pids()` returns, wait up to `grace_s`, then SIGKILL what is left.

    `list_pids` is called again after each round, so children forked meanwhile are caught too.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while list_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not list_pids():
            return
    raise TestbedError(f"processes survived SIGKILL: {list_pids()}")
