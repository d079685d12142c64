"""CPU cgroups on this machine's kernel: what a group used is read exactly (v2 `cpu.stat`, v1 cpuacct), not
from its processes' clock ticks, which lose up to 10 ms per live process. Group names `marllb-itcg-*`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from marllb_cli.deploy.node.cgroups import CpuCgroup, accounting_root, cgroup_root

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root"),
]

#: Each worker burns this much CPU (interpreter start included), then waits, alive, until stdin closes.
#: 45 ms is 4.5 clock ticks: a live process's ticks read 40 ms, 11 % short. A worker joins the group from a
#: shell that then becomes Python (spawned without a pre-exec hook, so nothing runs before it joins: a child
#: of pytest that joins in a pre-exec hook has already spent CPU copying its parent's pages).
BURN = """
import sys, time
while time.process_time() < 0.045:
    pass
print(time.process_time(), flush=True)
sys.stdin.read()
"""
WORKERS = 8


def test_a_groups_cpu_time_is_what_its_processes_used_to_the_millisecond():
    group = CpuCgroup.at(f"marllb-itcg-{os.getpid()}")
    group.create()
    workers: list[subprocess.Popen] = []
    try:
        group.set_cores(1.0, 100_000)
        before = group.usage().cpu_s
        procs = [str(d / "cgroup.procs") for d in (group.path, group.accounting) if d is not None]
        join = 'for procs in "$@"; do echo $$ > "$procs"; done; exec "$0" -c "$BURN"'
        for _ in range(WORKERS):
            workers.append(
                subprocess.Popen(
                    ["sh", "-c", join, sys.executable, *procs],
                    env={**os.environ, "BURN": BURN},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        used = sum(float(worker.stdout.readline()) for worker in workers)
        time.sleep(0.05)
        measured = group.usage().cpu_s - before
        print(f"{WORKERS} workers used {used * 1e3:.1f} ms; the group reads {measured * 1e3:.1f} ms")
        assert set(group.pids()) == {worker.pid for worker in workers}
        assert measured == pytest.approx(used, rel=0.03, abs=0.004)

        # What the product's processes do to join (Apache, MariaDB): both the group and its cpuacct twin.
        sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=group.add_self)
        workers.append(sleeper)
        for directory in (group.path, group.accounting):
            if directory is not None:
                assert str(sleeper.pid) in (directory / "cgroup.procs").read_text().split()
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            else:
                worker.kill()
            worker.wait(timeout=10)
        twin = group.accounting
        group.remove()
    assert not group.path.exists() and (twin is None or not twin.exists())
    assert not list(cgroup_root()[0].glob("marllb-itcg-*"))
    if (separate := accounting_root()) is not None:
        assert not list(separate.glob("marllb-itcg-*"))
