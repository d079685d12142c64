"""One marllb process at a time on a shared thing: a sweep's OUT folder, a deployed testbed.

Two sweeps into one OUT would each clear the other's running cells; two measurements on one testbed would
each load the servers the other measures, and both results would be wrong without a word. The holder takes
a `flock` on a file in the thing's folder and writes its pid and command there, so the one refused can say
who holds it; the kernel drops the lock when the holder dies, SIGKILL included, so nothing stale is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from marllb_cli.errors import MarllbError

__all__ = ["exclusive"]

#: The lock files this process holds, with their open files, so that a holder may take the same one again (a
#: sweep's testbed cells call `replay_trace`, which takes the testbed; the `sweep` command takes OUT before
#: `run_sweep` does).
_held: dict[Path, IO[str]] = {}


def _release_in_child() -> None:
    """In a forked child (pyroute2 forks helpers into namespaces): close its copies of the held files. A lock
    belongs to the open file, which a fork shares, so a helper that outlived a killed holder would otherwise
    hold the testbed for no one."""
    for handle in _held.values():
        handle.close()
    _held.clear()


os.register_at_fork(after_in_child=_release_in_child)


@contextlib.contextmanager
def exclusive(lock: Path, refusal: Callable[[str], MarllbError]) -> Iterator[None]:
    """Hold `lock` (a file in an existing folder, made if missing) for the block, or raise `refusal(holder)`
    when another process holds it (holder: "pid N: its command"). Nested holds in one process are one hold."""
    key = lock.resolve()
    if key in _held:
        yield
        return
    handle = open(lock, "a+")  # noqa: SIM115 - held for the block, closed below
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not said which"
            raise refusal(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {_command()}\n")
        handle.flush()
        _held[key] = handle
        yield
    finally:
        _held.pop(key, None)
        handle.close()


def _command() -> str:
    """This process's command line, short: `marllb sweep sweeps/x.yaml --out …`."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    words = ["marllb", *sys.argv[1:]] if program in ("marllb", "__main__.py") else sys.argv
    text = " ".join(words)
    return text if len(text) <= 120 else text[:119] + "…"
