"""A `kind: ssh` testbed end to end, against real sshd (Debian's openssh-server) on stand-in hosts.

The hosts are bare machines on a wire, built by the local testbed's own wiring (`build_network(roles=False)`:
namespaces `mlbhosts-*` with addresses and default routes, nothing else) plus a management network from
namespace `mlbhosts-ctl`, where `marllb` itself runs, to an sshd on every host. Each host gets its own
workdir (they share this machine's filesystem), so provisioning really installs six venvs.

Asserted: an unknown host key stops deploy before anything is installed; deploy provisions and sets up
every host, the 2-unit server as a MediaWiki server with the pages of a dump uploaded from the controller;
`curl` from the client reaches the servers through the VIP with SED (and a wiki page), then ECMP LBs; a
replay-trace runs its replayer and sampler on the client host and writes a complete run directory here; a
QMIX trains for two short episodes through its coordinator on an LB host; a second deploy changes nothing;
teardown puts the hosts back (VIP, routes, sysctls, nftables, cgroups,
processes: MariaDB and memcached too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from marllb_cli.config import Testbed as BedSpec
from marllb_cli.deploy.netns import build_network
from marllb_cli.deploy.node.cgroups import accounting_root, cgroup_root
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.deploy.node.undo import remove_resources
from marllb_cli.hosts import LocalNamespace
from marllb_cli.hosts.provision import bundle
from marllb_cli.topology import plan
from marllb_cli.wikipages import page_path, write_dump
from tests.conftest import REPO
from tests.integration.helpers import rendered_opening

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="openssh-server is not installed"),
]
HOSTS, TESTBED = "mlbhosts", "mlbssh"
CTL = f"{HOSTS}-ctl"
VIP = "10.98.255.1"
PRIVSEP = Path("/run/sshd")
MARLLB = str(Path(sys.executable).with_name("marllb"))
DUMP_PAGES, DUMP_SEED = 6, 11


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def mgmt_ip(index: int) -> str:
    return f"10.96.0.{10 + index}"


@pytest.fixture(scope="module")
def hosts():
    """Six stand-in hosts (client, router, lb0, lb1, srv0, srv1) with sshd, and the kind-ssh config for them."""
    # Apache's unprivileged user must reach the servers' workdirs (pytest's own tmp is private to root).
    tmp = Path(tempfile.mkdtemp(prefix="marllb-ssh-"))
    tmp.chmod(0o755)
    wiring = plan(
        BedSpec(
            name=HOSTS,
            lbs=2,
            vip=VIP,
            network={"data_subnet": "10.98.0.0/24", "client_subnet": "10.98.1.0/24"},
            servers=[{"name": "small", "count": 1, "cpus": 1}, {"name": "big", "count": 1, "cpus": 2}],
        )
    )
    for name in (*wiring.namespaces, CTL):
        assert not LocalNamespace(name).exists(), f"namespace {name} exists and is not ours"
    manifest = Manifest(tmp / "hosts-manifest.json", HOSTS)
    created_privsep = not PRIVSEP.exists()
    bundle()  # fill the controller's wheel cache here, where a package index is reachable
    try:
        build_network(wiring, manifest, lambda *_: None, roles=False)
        manifest.record("namespace", CTL)
        LocalNamespace(CTL).create()
        sh("ip", "-n", CTL, "link", "add", "mgmt", "type", "bridge")
        sh("ip", "-n", CTL, "addr", "add", "10.96.0.1/24", "dev", "mgmt")
        sh("ip", "-n", CTL, "link", "set", "mgmt", "up")
        sh("ip", "-n", CTL, "link", "set", "lo", "up")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client_key"))
        shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
        PRIVSEP.mkdir(mode=0o755, exist_ok=True)
        entries = []
        for index, node in enumerate(wiring.nodes):
            port = f"m{index}"
            sh("ip", "-n", CTL, "link", "add", port, "type", "veth", "peer", "name", "mgmt0", "netns", node.namespace)
            sh("ip", "-n", CTL, "link", "set", port, "master", "mgmt", "up")
            sh("ip", "-n", node.namespace, "addr", "add", f"{mgmt_ip(index)}/24", "dev", "mgmt0")
            sh("ip", "-n", node.namespace, "link", "set", "mgmt0", "up")
            key = tmp / f"host_key_{node.name}"
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
            (tmp / f"sshd_{node.name}").write_text(
                f"ListenAddress {mgmt_ip(index)}\nHostKey {key}\nPidFile {tmp / f'sshd_{node.name}.pid'}\n"
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "Subsystem sftp internal-sftp\n"
            )
            # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree a real host has.
            subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{node.namespace}",
                    "/usr/sbin/sshd",
                    "-D",
                    "-e",
                    "-f",
                    str(tmp / f"sshd_{node.name}"),
                ],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"sshd_{node.name}.log", "wb"),  # noqa: SIM115 - closed with the process
            )
            entry = {
                "role": node.role,
                "address": mgmt_ip(index),
                "key_file": str(tmp / "client_key"),
                "data_ip": str(node.interfaces[0].ip),
                "workdir": str(tmp / "hostfs" / node.name),
            }
            if node.role == "client":
                entry["gateway"] = str(wiring.router.interfaces[1].ip.ip)
            entries.append(entry)
        for index in range(len(wiring.nodes)):
            _wait_for_port(mgmt_ip(index), 22)
        dump = tmp / "controller" / "dump.xml"
        dump.parent.mkdir()
        write_dump(dump, DUMP_PAGES, seed=DUMP_SEED)
        config = {
            "testbed": {
                "name": TESTBED,
                "kind": "ssh",
                "lbs": 2,
                "vip": VIP,
                "cpu_unit": 0.25,
                "servers": [
                    {"name": "small", "count": 1, "cpus": 1},
                    # The big server is a MediaWiki server with pages from a user's dump, uploaded by deploy.
                    {"name": "big", "count": 1, "cpus": 2, "app": "mediawiki", "mediawiki": {"dump": str(dump)}},
                ],
                "hosts": entries,
                "ssh": {"known_hosts": str(tmp / "known_hosts")},
            }
        }
        path = tmp / "ssh.yaml"
        path.write_text(yaml.safe_dump(config))
        yield {"config": path, "tmp": tmp, "wiring": wiring, "state": tmp / "state"}
    finally:
        errors = remove_resources(manifest, lambda *_: None)  # the namespaces, and with them sshd and links
        if created_privsep:
            PRIVSEP.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not errors, errors
    left = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {name for name in left if name.startswith(HOSTS)}


def _wait_for_port(address: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            LocalNamespace(CTL).connect(address, port).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def marllb(hosts, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI, run from the management namespace (the controller's seat), with the test's state dir."""
    env = {**os.environ, "MARLLB_STATE_DIR": str(hosts["state"]), "COLUMNS": "200"}
    return subprocess.run(
        ["ip", "netns", "exec", CTL, MARLLB, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def wait_until_up(hosts, within_s: float = 30.0) -> dict:
    """`marllb status --json` until the testbed reads up (servers at a quarter core warm up slowly)."""
    deadline = time.monotonic() + within_s
    while True:
        status = json.loads(marllb(hosts, "status", str(hosts["config"]), "--json").stdout)
        if status["state"] == "up" or time.monotonic() > deadline:
            return status
        time.sleep(2)


def curl_vip(wiring, count: int) -> Counter:
    """`count` requests from the client host to the VIP; how many each server answered."""
    served: Counter = Counter()
    client = LocalNamespace(wiring.client.namespace)
    for _ in range(count):
        out = client.run(["curl", "-s", "-m", "5", "-D", "-", "-o", "/dev/null", f"http://{VIP}/"]).stdout
        assert out.startswith("HTTP/1.1 200"), out
        served[next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("X-Server"))] += 1
    return served


def agent_process(host: LocalNamespace) -> int:
    """The pid of the LB agent running on a stand-in host."""
    for pid in host.pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"marllb_cli.agents.runner" in cmdline:
            return pid
    raise AssertionError(f"no agent process on {host.name}")


def replay_on_client_host(hosts) -> Path:
    """A 10 s Poisson trace with CPU, static and wiki requests, replayed with ECMP; the run directory.

    ECMP, not SED: at 6 requests/s most requests find no flow open, and SED then sends every one to the 2-unit
    server (srv1); whether srv0 sees any depends on overlaps. ECMP spreads the ≈ 60 requests over both servers
    (all on one: p ≈ 2⁻⁵⁹), so the test can ask that both servers' requests come back."""
    trace, runs = hosts["tmp"] / "poisson.parquet", hosts["tmp"] / "runs"
    made = subprocess.run(
        [MARLLB, "trace", "gen", "poisson", "--rate", "6", "--duration", "10", "--work-mean", "200000"]
        + ["--mix", "cpu=0.5,static=0.3,wiki=0.2", "--out", str(trace)],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    replayed = marllb(
        hosts, "replay-trace", str(hosts["config"]), "--trace", str(trace), "--method", "ecmp", "--runs-dir", str(runs)
    )
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    return next(runs.iterdir())


SSH_EVENTS = [
    "at=1,link=srv1,rate_mbit=50",
    "at=2,server=srv0,capacity=0.5",
    "at=2,server=srv1,hog=0.5",
    "at=3,lb=lb1,state=down",
    "at=4,server=srv0,state=down",
    "at=6,lb=lb1,state=up",
    "at=7,server=srv0,state=up",
    "at=8,agent=lb0,state=down",
]


def check_events_over_ssh(hosts) -> None:
    """The 10 s trace again with every kind of timed event, applied on the stand-in hosts over SSH."""
    wiring = hosts["wiring"]
    quota = cgroup_root()[0] / f"marllb-{TESTBED}-srv0"
    quota_file = next(quota / name for name in ("cpu.max", "cpu.cfs_quota_us") if (quota / name).exists())
    quota_before = quota_file.read_text()
    runs = hosts["tmp"] / "event-runs"
    replayed = marllb(
        hosts, "replay-trace", str(hosts["config"]), "--trace", str(hosts["tmp"] / "poisson.parquet"),
        "--method", "ecmp", "--runs-dir", str(runs), *[arg for e in SSH_EVENTS for arg in ("--event", e)],
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    run = next(runs.iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] is True, (meta["failure"], meta["warnings"])
    events = pd.read_parquet(run / "events.parquet")
    assert len(events) == len(SSH_EVENTS) and events["ok"].all(), events[["kind", "target", "error"]]
    lags = events["applied_s"] - events["at_s"]
    print("ssh event lags (s):", list(zip(events["kind"] + " " + events["target"], lags.round(3), strict=True)))
    # Each node's `node events` runs from before time 0: a change costs its own time, not a Python start
    # (≈ 1 s a command on this loaded machine, which made events 1.1–2.0 s late). Apache's start waits until it
    # answers (0.67 s seen); the rest took 6–50 ms.
    assert lags.between(0, 1.5).all(), events[["at_s", "applied_s"]]
    assert (lags[events["kind"] != "server_state"] < 0.5).all(), events[["kind", "at_s", "applied_s"]]
    requests = pd.read_parquet(run / "requests.parquet")
    # Nothing lost: every request has its outcome. Failures only while srv0 was down (refused, or reset in its
    # listen backlog) or around lb1's route changes at 3 and 6 s (a flow in flight that the router moved to the
    # other LB, which does not know it); srv0's down window refused some.
    print("ssh events:", requests["error"].value_counts().to_dict(), requests["status"].value_counts().to_dict())
    failed = requests[requests["status"] != 200]
    assert (failed["error"] != "").all(), failed[["intended_s", "status", "error"]]
    assert failed["intended_s"].between(2, 7.5).all(), failed[["intended_s", "status", "error"]]
    refused = failed[failed["error"] == "econnrefused"]
    assert len(refused) >= 1 and refused["intended_s"].between(4, 7.5).all()
    # Undone on the hosts: srv0's quota, no hog left, the router's route over both LBs, srv1's link unshaped.
    assert quota_file.read_text() == quota_before
    assert not any(b"node.hog" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit())
    route = LocalNamespace(wiring.router.namespace).run(["ip", "route", "show", VIP]).stdout
    assert route.count("nexthop via") == 2, route
    srv1 = next(node for node in wiring.servers if node.name == "srv1")
    shown = LocalNamespace(srv1.namespace).run(["tc", "qdisc", "show", "dev", srv1.interfaces[0].name]).stdout
    assert "tbf" not in shown


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_an_unknown_host_key_stops_deploy_before_anything_is_installed(hosts):
    result = marllb(hosts, "deploy", str(hosts["config"]))
    assert result.returncode == 1, result.stderr
    assert "unknown host key" in result.stderr and "--accept-new-host-keys" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (hosts["tmp"] / "hostfs").exists()


def test_deploy_serves_the_vip_and_teardown_restores_the_hosts(hosts, trained):
    wiring = hosts["wiring"]
    router = LocalNamespace(wiring.router.namespace)
    forward_before = router.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()

    try:
        started = time.monotonic()
        deployed = marllb(hosts, "deploy", str(hosts["config"]), "--accept-new-host-keys")
        assert deployed.returncode == 0, deployed.stderr
        deploy_s = time.monotonic() - started
        status = wait_until_up(hosts)
        assert status["state"] == "up", [
            (n["name"], n["up"], n["http_status"], n.get("error")) for n in status["nodes"]
        ]
        assert [n["http_status"] for n in status["nodes"] if n["role"] == "server"] == [200, 200]
        for node in wiring.nodes:  # each host got its own venv with marllb in it
            assert (hosts["tmp"] / "hostfs" / node.name / "venv" / ".bundle").is_file()

        again = marllb(hosts, "deploy", str(hosts["config"]))  # keys are known now; nothing to change
        assert again.returncode == 0, again.stderr
        assert "unchanged" in again.stdout

        # A rebooted router forgets its VIP route while its record on disk says complete (reliability
        # review §2.5): status must not say up, and deploy must set it up again.
        router.run(["ip", "route", "del", f"{VIP}/32"])
        status = json.loads(marllb(hosts, "status", str(hosts["config"]), "--json").stdout)
        router_status = next(n for n in status["nodes"] if n["name"] == "router")
        assert status["state"] == "degraded" and router_status["up"] is False
        assert f"route {VIP}/32" in router_status["error"]
        healed = marllb(hosts, "deploy", str(hosts["config"]))
        assert healed.returncode == 0 and "rebuilt" in healed.stdout, healed.stderr
        assert VIP in router.run(["ip", "route"]).stdout

        started_lbs = marllb(hosts, "lb", "start", str(hosts["config"]), "--method", "sed")
        assert started_lbs.returncode == 0, started_lbs.stderr
        # One request at a time, so no flow is ever open: SED's (flows + 1) / weight picks the 2-unit server.
        assert curl_vip(wiring, 20) == Counter({"srv1": 20})
        # srv1 is the MediaWiki server: a page of the uploaded dump, rendered from its database.
        page = LocalNamespace(wiring.client.namespace).run(["curl", "-s", "-m", "30", f"http://{VIP}{page_path(3)}"])
        assert "<title>Page 3 - marllb</title>" in page.stdout
        assert rendered_opening(3, DUMP_PAGES, seed=DUMP_SEED) in page.stdout
        # lb stats over SSH: every LB host reads its own channel; 21 requests, all to srv1, each at least SYN,
        # request and FIN (the dataplane publishes its counters every period, hence the pause).
        time.sleep(1.0)
        stats = json.loads(marllb(hosts, "lb", "stats", str(hosts["config"]), "--json").stdout)
        assert [lb["lb"] for lb in stats] == ["lb0", "lb1"]
        assert all(lb["dataplane_running"] and lb["agent_running"] and lb["method"] == "sed" for lb in stats)
        packets: Counter = Counter()
        for lb in stats:
            packets.update({server["name"]: server["packets"] for server in lb["servers"]})
        assert packets["srv0"] == 0 and packets["srv1"] >= 21 * 3, (packets, stats)
        restarted = marllb(hosts, "lb", "start", str(hosts["config"]), "--method", "ecmp")
        assert restarted.returncode == 0, restarted.stderr
        served = curl_vip(wiring, 40)  # ECMP: uniform over both (all on one server: p = 2⁻³⁹)
        assert sum(served.values()) == 40 and set(served) == {"srv0", "srv1"}, served

        # A learned policy: PyTorch goes into each LB host's venv on first use, the policy file with it.
        policy = trained("distr", "policy", hosts["config"])
        learned = marllb(hosts, "lb", "start", str(hosts["config"]), "--method", f"rl:{policy}")
        assert learned.returncode == 0, learned.stderr
        for lb in wiring.lbs:
            agent = agent_process(LocalNamespace(lb.namespace))
            python = Path(Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")[0].decode())
            assert python.is_relative_to(hosts["tmp"] / "hostfs" / lb.name / "venv")  # the host's own venv
            assert "libtorch" in Path(f"/proc/{agent}/maps").read_text()  # the policy network runs there
        assert sum(curl_vip(wiring, 10).values()) == 10

        # A replayer a vanished controller left on the client host (its session never closed) is stopped
        # by the next replay-trace, found by the record it left beside its spec.
        client_runs = hosts["tmp"] / "hostfs" / "client" / "testbeds" / TESTBED / "runs"
        (client_runs / "earlier").mkdir(parents=True)
        leftover = LocalNamespace(wiring.client.namespace).popen(["sleep", "600"])
        start_time = int(Path(f"/proc/{leftover.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        record = {"pid": leftover.pid, "start_time": start_time, "log": ""}
        (client_runs / "earlier" / "replay.json.pid").write_text(json.dumps(record))

        # replay-trace: the replayer and the sampler run on the client host, their files come back here.
        run = replay_on_client_host(hosts)
        assert leftover.wait(timeout=5) == -15  # SIGTERM from `node stop-clients`
        assert not list(client_runs.glob("*/*.pid"))
        (client_runs / "earlier").rmdir()  # what the earlier run staged stays until teardown
        requests = pd.read_parquet(run / "requests.parquet")
        assert json.loads((run / "meta.json").read_text())["complete"] is True
        assert len(requests) > 40 and (requests["status"] == 200).all(), requests["error"].value_counts()
        assert set(requests["server"]) == {"srv0", "srv1"}
        assert requests["done_s"].between(0, 30).all()  # the client host's times, relative to its t0
        servers = pd.read_parquet(run / "servers.parquet")
        assert set(servers["server"]) == {"srv0", "srv1"} and servers["busy"].notna().mean() > 0.9
        steps = pd.read_parquet(run / "agents" / "lb0.parquet")
        # The agents' times were shifted onto this machine's clock, the t0 onto it as well: they overlap.
        assert len(steps) > 20 and steps["t_s"].between(-5, 40).all(), steps["t_s"].describe()
        assert not list(
            (hosts["tmp"] / "hostfs" / "client" / "testbeds" / TESTBED / "runs").iterdir()
        )  # staged files removed

        # Timed events over SSH: lines to a `marllb node events` on each host, undone after the run.
        check_events_over_ssh(hosts)

        # Two short QMIX episodes: the coordinator on lb0's host, both agents reach it over the wire with the
        # secret (0600 on every LB host), the trajectory comes back here and the learner stores it.
        out = hosts["tmp"] / "qmix"
        trace = hosts["tmp"] / "poisson.parquet"
        trained_live = marllb(
            hosts, "train", str(hosts["config"]), "--env", "testbed", "--algo", "qmix", "--episodes", "2",
            "--episode-s", "8", "--speed", "1", "--trace", str(trace), "--out", str(out),
        )  # fmt: skip
        assert trained_live.returncode == 0, trained_live.stderr[-3000:]
        curve = pd.read_parquet(out / "curve.parquet")
        assert curve["episode"].tolist() == [0, 1] and (curve["lbs_stored"] == 2).all()
        assert (curve["coordinator_bytes_per_step"] > 0).all() and (curve["step_interval_p99_s"] < 0.35).all()
        for lb in wiring.lbs:
            secret = hosts["tmp"] / "hostfs" / lb.name / "testbeds" / TESTBED / "coordinator.secret"
            assert secret.stat().st_mode & 0o777 == 0o600
            steps = pd.read_parquet(out / curve["run"].iloc[-1] / "agents" / f"{lb.name}.parquet")
            inside = steps[steps["t_s"].between(0, 8)]
            assert len(inside) >= 28 and (~inside["missed"]).mean() > 0.9, (lb.name, inside["missed"].mean())

    finally:  # whatever failed above, the hosts must not keep our VIP, processes, cgroups or channels
        # As after a controller reboot (its record lives in /run): teardown asks the hosts all the same.
        shutil.rmtree(hosts["state"] / TESTBED, ignore_errors=True)
        removed = marllb(hosts, "teardown", str(hosts["config"]))
    assert removed.returncode == 0, removed.stderr
    print(f"ssh deploy (6 hosts, fresh venvs) took {deploy_s:.1f} s")
    for server in wiring.servers:
        addresses = LocalNamespace(server.namespace).run(["ip", "-4", "addr", "show", "dev", "lo"]).stdout
        assert VIP not in addresses
    assert VIP not in router.run(["ip", "route"]).stdout
    assert router.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == forward_before
    for lb in wiring.lbs:
        assert "marllb_" not in LocalNamespace(lb.namespace).run(["nft", "list", "tables"]).stdout
    for root in (cgroup_root()[0], accounting_root()):  # the CPU groups and their cpuacct twins
        assert root is None or not list(root.glob(f"marllb-{TESTBED}-*"))
    for node in wiring.nodes:  # only sshd is left on each host: no Apache, dataplane or agent
        pids = LocalNamespace(node.namespace).pids()
        commands = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids if Path(f"/proc/{pid}").exists()}
        assert commands <= {"sshd"}, (node.name, commands)
        assert not (hosts["tmp"] / "hostfs" / node.name / "testbeds" / TESTBED).exists()
    assert marllb(hosts, "status", str(hosts["config"]), "--json").returncode == 0
