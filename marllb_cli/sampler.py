"""The busy-worker sampler of a run: one process beside the replayer, on the client node, that reads every
server's mod_status each agent period (the CIKM'22 Fig. 9 view of how busy each server was).

    python -m marllb_cli.sampler SPEC.json

Output `spec.out`: CSV `t,server,group,busy`, one row per server per round, flushed every round, so what was
sampled survives a kill. `t` is CLOCK_MONOTONIC on the client node — the replayer's clock. SIGTERM or SIGINT
ends it after the current round. `busy` leaves out the worker answering the probe itself; empty when the
server did not answer within one period.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from marllb_cli.probes import busy_workers
from marllb_cli.services import exit_on_stdin_eof, until_signalled

__all__ = ["SampledServer", "SamplerSpec", "main"]


class SampledServer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    group: str
    ip: str


class SamplerSpec(BaseModel):
    """What one sampler process needs; written by `marllb replay-trace`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    servers: list[SampledServer]
    status_port: int
    period_s: float
    out: Path


def sample(spec: SamplerSpec, keep_going=lambda: True) -> None:
    """Probe every server each `period_s` until `keep_going()` turns false."""
    with open(spec.out, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(("t", "server", "group", "busy"))
        next_tick = time.monotonic()
        while keep_going():
            now = time.monotonic()
            for server in spec.servers:
                try:
                    busy = busy_workers(None, server.ip, spec.status_port, timeout=spec.period_s)
                except OSError:
                    busy = None
                writer.writerow((repr(now), server.name, server.group, "" if busy is None else max(0, busy - 1)))
            out.flush()
            next_tick += spec.period_s
            time.sleep(max(0.0, next_tick - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-sampler", description="busy-worker sampler of a replay")
    parser.add_argument("spec", type=Path, help="SamplerSpec JSON written by `marllb replay-trace`")
    args = parser.parse_args(argv)
    keep_going = until_signalled()
    exit_on_stdin_eof(args.spec)
    sample(SamplerSpec.model_validate_json(args.spec.read_text()), keep_going)
    return 0


if __name__ == "__main__":
    sys.exit(main())
