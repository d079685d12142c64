"""What a timed event does to one node, where the node is (`events.py` says what each event means):

    set_capacity   the server's CFS quota becomes cores (its config's × the event's capacity)
    start_hog      `hog.py` processes inside the server's CPU cgroup, wanting `cores` of CPU together;
                   recorded as the server's `-hog` processes (teardown stops them; they die with the
                   controller, PR_SET_PDEATHSIG), and `stop_hog` stops them
    server_down    Apache's graceful stop: it closes its listener at once (new connections are refused, those
                   in the listen backlog reset) and its workers finish the requests they serve
    server_up      Apache started again, as deploy starts it
    kill_agent     SIGKILL to an LB's agent; the dataplane keeps the last weights it was given
    shape_link     tbf on an interface (0: no shaping). This kernel has tbf and htb but no netem, so delay and
                   loss are not offered.

The local testbed calls these in each node's namespace (`deploy.local_faults.LocalFaults`), and changes the
router's route with `roles.route_replace` (an LB leaves or rejoins it).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

from marllb_cli.deploy.node.apache import ApacheInstance, apache_binary
from marllb_cli.deploy.node.cgroups import CpuCgroup
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.processes import die_with_parent, is_running, reap_exited
from marllb_cli.services import Service, start_process

__all__ = [
    "kill_agent",
    "server_down",
    "server_up",
    "set_capacity",
    "shape_link",
    "start_hog",
    "stop_hog",
]


def set_capacity(cgroup: CpuCgroup, cores: float, period_us: int) -> None:
    cgroup.set_cores(cores, period_us)


def start_hog(
    host: LocalHost,
    manifest: Manifest,
    server: str,
    cgroup: CpuCgroup,
    cores: float,
    logs: Path,
    *,
    lifetime_s: float,
    tied: bool = True,
) -> None:
    """Hog processes in `server`'s cgroup wanting `cores` of CPU in all (one per started core), for at most
    `lifetime_s`. `tied`: they die with the thread that starts them (the controller's event runner); those
    `marllb node events` starts on an SSH host are not the controller's, so they live out their lifetime
    unless stopped."""
    stop_hog(manifest, server)
    count = max(1, math.ceil(cores - 1e-9))

    def join_and_arm() -> None:
        cgroup.add_self()
        if tied:
            die_with_parent(signal.SIGKILL)()

    for i in range(count):
        name = f"{server}-hog{i}"
        argv = [sys.executable, "-m", "marllb_cli.deploy.node.hog", repr(cores / count), repr(lifetime_s)]
        service = start_process(host, name, argv, logs / f"{name}.log", preexec_fn=join_and_arm)
        manifest.record("process", name, node=server, hog=True, **service.as_record())


def stop_hog(manifest: Manifest, server: str) -> int:
    """Stop `server`'s hog processes; how many were running."""
    records = [r for r in manifest.of_kind("process") if r.data.get("hog") and r.data.get("node") == server]
    running = 0
    for record in records:
        service = Service.from_record(record.name, record.data)
        running += service.running()
        service.stop(grace_s=1.0)
    if records:
        manifest.forget(records)
    return running


#: Apache masters this process stopped gracefully. Each leaves once its workers are done and is then, as the
#: command is a subreaper (`processes.become_subreaper`), a zombie of ours until reaped: a sweep or a live
#: training that restarts servers would otherwise keep one per restart. Reaped by pid: a scan of /proc for them
#: (20 ms on an idle machine) coincided with timed 'down' events 1.2 s late in 2 of 4 test runs, none in 3 without.
_stopped_masters: set[int] = set()


def _reap_stopped_masters() -> None:
    _stopped_masters.difference_update(reap_exited(_stopped_masters))


def server_down(instance: ApacheInstance, *, timeout_s: float = 5.0) -> None:
    """Apache's graceful stop; returns once the server refuses connections. The master leaves once its workers
    are done; `server_up` or the next stop reaps it."""
    master = _master(instance)
    result = instance.namespace.run(
        [str(apache_binary()), "-f", str(instance.conf), "-k", "graceful-stop"], check=False
    )
    if result.returncode != 0:
        raise TestbedError(f"{instance.node.name}: apache2 graceful-stop failed: {result.stderr.strip()[-200:]}")
    deadline = time.monotonic() + timeout_s
    while instance.ready():
        if time.monotonic() > deadline:
            raise TestbedError(f"{instance.node.name}: apache2 still answers {timeout_s:g} s after graceful-stop")
        time.sleep(0.02)
    if master is not None:
        _stopped_masters.add(master)
    _reap_stopped_masters()


def server_up(instance: ApacheInstance, testbed, *, drain_s: float = 10.0) -> None:
    """Start Apache again. A server that answers is left as it is: undoing a stop that a killed run recorded
    but never made must not restart it. Apache's graceful stop removes its pid file at once, so that a new
    server can start while the old one's workers finish their requests (in the same cgroup, on the same
    quota, until they are done); a master that still holds its pid file but does not answer (a stop not yet
    under way, or hung) gets `drain_s` to finish, then SIGTERM (Apache's own stop; nothing else in the cgroup
    is touched: a MediaWiki server's database lives there too)."""
    _reap_stopped_masters()
    if instance.ready():
        return
    # A graceful stop removes the pid file up to about 0.6 s after the listeners close (the master first wakes
    # its idle children). An `up` right after a `down` waits for that, so it does not take the draining
    # master for a running one, wait for its workers and stop it (cutting what they still serve).
    gone = time.monotonic() + 1.0
    while instance.pidfile.exists() and time.monotonic() < gone:
        time.sleep(0.005)
    master = _master(instance)
    deadline = time.monotonic() + drain_s
    while master is not None and is_running(master) and time.monotonic() < deadline:
        time.sleep(0.05)
    if master is not None and is_running(master):
        os.kill(master, signal.SIGTERM)
        _stopped_masters.add(master)
        stop_deadline = time.monotonic() + 5.0
        while is_running(master) and time.monotonic() < stop_deadline:
            time.sleep(0.05)
    instance.pidfile.unlink(missing_ok=True)
    instance.start(testbed)


def _master(instance: ApacheInstance) -> int | None:
    """The pid in the instance's pid file, if that process is in its cgroup (ours)."""
    try:
        pid = int(instance.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid in instance.cgroup.pids() else None


def kill_agent(manifest: Manifest, lb: str) -> bool:
    """SIGKILL LB `lb`'s agent; whether it was running."""
    for record in manifest.of_kind("process"):
        if record.name == f"{lb}-agent":
            service = Service.from_record(record.name, record.data)
            if service.running():
                os.kill(service.pid, signal.SIGKILL)
                return True
    return False


#: Root qdiscs a kernel sets up by itself: replacing one of these, or our own tbf, touches nothing a user made.
DEFAULT_QDISCS = ("noqueue", "pfifo_fast", "fq_codel", "mq", "fq", "tbf")


def shape_link(host: LocalHost, iface: str, rate_mbit: float) -> None:
    """tbf at `rate_mbit` on `iface`'s egress (0: remove it). The bucket holds 10 ms at the rate, at least
    16 KiB (a few full segments), and packets wait at most 50 ms. An interface whose root qdisc someone set
    up (anything but a kernel default or a tbf) is refused: removing ours later would lose theirs."""
    shown = host.run(["tc", "qdisc", "show", "dev", iface, "root"]).stdout.split()
    current = shown[1] if len(shown) > 1 else "noqueue"
    if current not in DEFAULT_QDISCS:
        raise TestbedError(
            f"{iface} has a root qdisc {current} that marllb did not set up; it will not replace it",
            hint="remove the link event, or that qdisc (tc qdisc del dev IFACE root) if nothing needs it",
        )
    if rate_mbit <= 0:
        host.run(["tc", "qdisc", "del", "dev", iface, "root"], check=False)
        return
    burst = max(16 * 1024, int(rate_mbit * 1e6 / 8 * 0.01))
    argv = ["tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate", f"{rate_mbit:g}mbit"]
    argv += ["burst", str(burst), "latency", "50ms"]
    result = host.run(argv, check=False)
    if result.returncode != 0:
        raise TestbedError(f"tc on {iface}: {result.stderr.strip()[-200:]}", hint="is the sch_tbf module available?")
