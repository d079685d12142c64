"""`python -m marllb_cli.deploy.node.hog CORES [LIFETIME_S]`: a noisy neighbour that wants CORES of CPU (at
most one core: one thread) and sleeps the rest, started inside a server's CPU cgroup by a `hog` timed event.
It exits after LIFETIME_S (the rest of its run and a margin): on an SSH host nothing else would stop it if
the controller vanished.

Every 2 ms window it spins until it has used CORES × 2 ms of CPU, then sleeps until the window ends (short
windows: its demand is smooth beside requests of tens of milliseconds; with 20 ms windows its effect on a
request depended on their phase). Beside busy Apache workers in a CFS quota it gets less than it wants, as a
real neighbour would: the scheduler shares the quota between runnable tasks.
"""

from __future__ import annotations

import sys
import time

WINDOW_S = 0.002


def burn(cores: float, lifetime_s: float = float("inf")) -> None:
    """Use `cores` of a CPU until killed or `lifetime_s` is over."""
    budget = min(1.0, cores) * WINDOW_S
    end = time.monotonic() + lifetime_s
    while time.monotonic() < end:
        start, used_at_start = time.monotonic(), time.process_time()
        while time.process_time() - used_at_start < budget and time.monotonic() - start < WINDOW_S:
            pass
        rest = start + WINDOW_S - time.monotonic()
        if rest > 0:
            time.sleep(rest)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cores = float(args[0])
        lifetime_s = float(args[1]) if len(args) > 1 else float("inf")
    except (IndexError, ValueError):
        print("usage: python -m marllb_cli.deploy.node.hog CORES [LIFETIME_S]", file=sys.stderr)
        return 2
    try:
        burn(cores, lifetime_s)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
