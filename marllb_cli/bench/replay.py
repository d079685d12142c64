"""`marllb bench replay`: the highest open-loop request rate the replayer sustains on one core with a p99
send lag below 2 ms, next to `wrk` on the same page.

Bench testbed `mlbbenchrp` (removed at the end, also on failure): one Apache server with a 1-core quota
behind the router; the client sends to the server's own address (kernel routing, no LB in the way), a
1 KiB static file, one new TCP connection per request. The generator is pinned to CPU 0 (`taskset`).

- Replayer: evenly spaced requests at each offered rate for `seconds` s, with the receiver on the asyncio
  and the uvloop event loop, and on uvloop with the sender busy-waiting the last `SPIN_S` before each send
  (`ReplaySpec.spin_s`). Sender and receiver share the pinned core. A rate passes when the p99 send lag is
  < 2 ms and < 1 % of requests fail (above about 2 000 requests/s on a 2-core machine, the server's
  backlog overflows first: SYNs retried after 1 s, then resets).
- wrk: closed loop (it cannot do open loop), one thread, 16 connections, `Connection: close` so that every
  request is a new connection too: its requests/s is the ceiling of a C generator on the same core, page
  and server.
On a 2-core machine the server shares the cores with the generator, so both figures are lower bounds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from marllb_cli.config import Config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.errors import MissingTool
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.replay import ReplaySpec, write_schedule

__all__ = ["ReplayPoint", "replay_benchmark"]

NAME = "mlbbenchrp"
PAGE = "/static/1k.bin"
RATES = (250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000)
LAG_LIMIT_S = 0.002
#: The spin the third variant uses: longer than the loop's usual wake-up latency under load (0.2–0.7 ms p99
#: without it at 1 000–2 000 requests/s), short enough to cost a fifth of a core at 1 000 requests/s.
SPIN_S = 0.0002
#: (event loop, spin_s) per replayer variant.
VARIANTS = (("asyncio", 0.0), ("uvloop", 0.0), ("uvloop", SPIN_S))


@dataclass(frozen=True)
class ReplayPoint:
    generator: str
    offered_per_s: float
    completed_per_s: float
    lag_p99_ms: float | None
    errors: float
    passed: bool


def _config() -> Config:
    return Config.model_validate(
        {
            "testbed": {
                "name": NAME,
                "lbs": 1,
                "cpu_unit": 1.0,
                "servers": [{"name": "static", "count": 1, "cpus": 1}],
            }
        }
    )


def replay_benchmark(seconds: float = 3.0, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Run every point; returns {"replayer": [...], "wrk": {...}, "max_rate": {loop: rate}}."""
    for tool in ("wrk", "taskset"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise MissingTool(f"{tool} is not installed", hint="apt-get install wrk util-linux")
    testbed = LocalTestbed(_config())
    progress("deploying the bench testbed")
    testbed.deploy()
    try:
        client = LocalNamespace(testbed.topology.client.namespace)
        server_ip = str(testbed.topology.servers[0].ip)
        points: list[ReplayPoint] = []
        max_rate: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="marllb-bench-replay-") as tmp:
            for loop, spin_s in VARIANTS:
                failures = 0
                for rate in RATES:
                    point = _replayer_point(client, server_ip, loop, spin_s, rate, seconds, Path(tmp))
                    progress(f"{point.generator} at {rate} requests/s")
                    points.append(point)
                    if point.passed:
                        max_rate[point.generator] = rate
                    else:
                        failures += 1
                        if failures == 2:
                            break
        progress("wrk")
        wrk = _wrk(client, server_ip, seconds)
    finally:
        testbed.teardown()
    return {"replayer": [asdict(p) for p in points], "wrk": wrk, "max_rate": max_rate}


def _replayer_point(
    client: LocalNamespace, host: str, loop: str, spin_s: float, rate: float, seconds: float, tmp: Path
) -> ReplayPoint:
    n = int(rate * seconds)
    schedule = tmp / "schedule.tsv"
    write_schedule(schedule, np.arange(n) / rate, [PAGE] * n)
    spec_path = tmp / "spec.json"
    out = tmp / f"{loop}-{spin_s}-{rate}.csv"
    spec = ReplaySpec(host=host, schedule=schedule, out=out, timeout_s=10, loop=loop, spin_s=spin_s)  # type: ignore[arg-type]
    spec_path.write_text(spec.model_dump_json())
    result = client.run(
        ["taskset", "-c", "0", sys.executable, "-m", "marllb_cli.replay", str(spec_path)], timeout=seconds + 60
    )
    final = json.loads(result.stdout.strip().splitlines()[-1])
    rows = pd.read_csv(out, keep_default_na=False, dtype={"error": str})
    failed = float(((rows["error"] != "") | (rows["status"] != 200)).mean())
    done = pd.to_numeric(rows["done_s"], errors="coerce").dropna()
    span = float(done.max() - done.min()) if len(done) > 1 else seconds
    lag = final["lag_p99_s"]
    return ReplayPoint(
        generator=f"marllb replayer ({loop}" + (f", spin {spin_s * 1e6:.0f} µs)" if spin_s else ")"),
        offered_per_s=rate,
        completed_per_s=len(done) / max(span, 1e-9),
        lag_p99_ms=lag * 1000,
        errors=failed,
        passed=lag < LAG_LIMIT_S and failed < 0.01,
    )


def _wrk(client: LocalNamespace, host: str, seconds: float) -> dict:
    duration = max(1, int(round(seconds)))
    result = client.run(
        [
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            "-c16",
            f"-d{duration}s",
            "-H",
            "Connection: close",
            "--latency",
            f"http://{host}{PAGE}",
        ],
        timeout=duration + 30,
    )
    text = result.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "generator": "wrk (closed loop, 16 connections)",
        "requests_per_s": float(rate.group(1)) if rate else None,
        "latency_p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else None,
        "errors": errors.group(0) if errors else None,
    }
