"""The request driver of `marllb calibrate`: one process on the client node (beside where the replayer runs)
that sends phases of identical requests straight to the servers, bypassing the LBs.

    python -m marllb_cli.loadprobe SPEC.json

Each phase sends, to every server it names at once, `count` requests of one path with `concurrency` in
flight; before each phase it idles `gap_s`, so the controller, which samples every server's CPU counter
meanwhile, sees a flat counter on both sides of the phase. One JSON line per phase on stdout: its start and
end on this node's CLOCK_MONOTONIC and, per server, how long its requests took in all, the requests answered
200, the failures and the median and mean response time. Only the standard library (and pydantic for the
spec), so it starts fast anywhere.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from marllb_cli.services import exit_on_stdin_eof

__all__ = ["Phase", "ProbeSpec", "Stream", "main", "run_phase"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stream(_Strict):
    """Requests for one server within a phase."""

    server: str
    ip: str
    path: str
    count: int = Field(ge=1, le=100_000)
    concurrency: int = Field(1, ge=1, le=256)


class Phase(_Strict):
    name: str
    streams: list[Stream]


class ProbeSpec(_Strict):
    port: int = 80
    timeout_s: float = Field(60.0, gt=0)
    gap_s: float = Field(1.0, ge=0)
    phases: list[Phase]


def _one_request(ip: str, port: int, path: str, timeout_s: float) -> float | None:
    """Response time of one GET (seconds), None when it failed or did not answer 200."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return time.monotonic() - started if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _run_stream(stream: Stream, port: int, timeout_s: float, out: dict) -> None:
    times: list[float] = []
    failures = 0
    left = [stream.count]
    lock = threading.Lock()

    def worker() -> None:
        nonlocal failures
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            elapsed = _one_request(stream.ip, port, stream.path, timeout_s)
            with lock:
                if elapsed is None:
                    failures += 1
                else:
                    times.append(elapsed)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(min(stream.concurrency, stream.count))]
    started = time.monotonic()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    out[stream.server] = {
        "elapsed_s": time.monotonic() - started,
        "ok": len(times),
        "failed": failures,
        "median_s": statistics.median(times) if times else None,
        "mean_s": statistics.fmean(times) if times else None,
    }


def run_phase(phase: Phase, spec: ProbeSpec) -> dict:
    """Send one phase (every stream at once) and return its JSON line as a dict."""
    results: dict[str, dict] = {}
    threads = [
        threading.Thread(target=_run_stream, args=(stream, spec.port, spec.timeout_s, results), daemon=True)
        for stream in phase.streams
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"phase": phase.name, "start": start, "end": time.monotonic(), "servers": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-loadprobe", description="calibration request driver")
    parser.add_argument("spec", type=Path, help="ProbeSpec JSON written by `marllb calibrate`")
    args = parser.parse_args(argv)
    spec = ProbeSpec.model_validate_json(args.spec.read_text())
    exit_on_stdin_eof(args.spec)
    for phase in spec.phases:
        time.sleep(spec.gap_s)
        print(json.dumps(run_phase(phase, spec)), flush=True)
    time.sleep(spec.gap_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
