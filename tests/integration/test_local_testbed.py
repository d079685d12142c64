"""The local testbed for real: namespaces, veths, a bridge, Apache in CPU cgroups, curl from the client.

Every test uses its own testbed names (prefix `it`), so it never meets a user's testbed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from marllb_cli.config import Config, load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.deploy.node.roles import apply_role
from marllb_cli.deploy.node.undo import remove_resources
from marllb_cli.errors import NamespaceExists
from marllb_cli.hosts import LocalNamespace, list_namespaces
from marllb_cli.probes import http_get
from marllb_cli.topology import plan
from tests.conftest import REPO
from tests.integration.helpers import NOTHING, leftovers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]


def small_config(name: str, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "local-small.yaml", [f"testbed.name={name}", *overrides])


def curl(namespace: str, url: str, timeout: float = 30) -> dict[str, str]:
    """GET `url` with the real curl from inside `namespace`; status, X-Server and total time."""
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-m",
            str(timeout),
            "-w",
            "\nstatus=%{http_code} time=%{time_total}\n",
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    out = {"server": ""}
    for line in result.stdout.splitlines():
        if line.lower().startswith("x-server:"):
            out["server"] = line.split(":", 1)[1].strip()
        if line.startswith("status="):
            status, time_total = line.split()
            out["status"] = status.split("=")[1]
            out["time"] = time_total.split("=")[1]
    return out


@pytest.fixture(scope="module")
def small():
    testbed = LocalTestbed(small_config("itsmall"))
    testbed.teardown()
    assert testbed.deploy() == "created"
    yield testbed
    testbed.teardown()
    assert leftovers("itsmall") == NOTHING


def test_every_server_serves_the_cpu_page_to_the_client(small):
    for server in small.topology.servers:
        reply = curl(small.topology.client.namespace, f"http://{server.ip}/dummy.php/?n=100000")
        assert reply["status"] == "200", (server.name, reply)
        assert reply["server"] == server.name


def test_static_files_and_wiki_stand_in_are_served(small):
    server = small.topology.servers[0]
    client = small.topology.client.namespace
    assert curl(client, f"http://{server.ip}/static/100k.bin")["status"] == "200"
    assert curl(client, f"http://{server.ip}/wiki/index.php/Main_Page")["status"] == "200"
    assert curl(client, f"http://{server.ip}/no-such-page")["status"] == "404"


def test_cgroups_encode_capacity_under_concurrent_load(small):
    """The same CPU-bound request on a 1-unit and a 2-unit server, under the same load at the same time.

    A closed loop of 2 clients per server for 3 s: with the same concurrency, mean latency is inversely
    proportional to the server's throughput (Little's law), so the latency ratio is the capacity ratio,
    estimated from ~60 and ~130 requests instead of a handful.
    """
    slow, fast = small.topology.servers[0], small.topology.servers[2]
    assert (slow.cpus, fast.cpus) == (1, 2)
    assert small.apache(slow).cgroup.cores() == pytest.approx(0.25)
    assert small.apache(fast).cgroup.cores() == pytest.approx(0.5)
    client = LocalNamespace(small.topology.client.namespace)
    latencies: dict[str, list[float]] = {slow.name: [], fast.name: []}
    deadline = time.monotonic() + 3.0

    def closed_loop(server):
        while time.monotonic() < deadline:
            start = time.monotonic()
            status, headers, _ = http_get(client, str(server.ip), 80, "/dummy.php/?n=2000000", timeout=10)
            assert (status, headers["x-server"]) == (200, server.name)
            latencies[server.name].append(time.monotonic() - start)

    threads = [threading.Thread(target=closed_loop, args=(s,)) for s in (slow, fast) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(latencies[slow.name]) >= 20
    ratio = statistics.mean(latencies[slow.name]) / statistics.mean(latencies[fast.name])
    assert 1.6 <= ratio <= 2.5, (ratio, {k: len(v) for k, v in latencies.items()})


def test_router_hashes_flows_over_every_lb(small):
    router = small.topology.router.namespace
    route = subprocess.run(
        ["ip", "netns", "exec", router, "ip", "route", "show", f"{small.topology.vip}/32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for lb in small.topology.lbs:
        assert f"nexthop via {lb.ip}" in route
    policy = subprocess.run(
        ["ip", "netns", "exec", router, "sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert policy == "1"


def test_servers_hold_the_vip_quietly_and_abort_on_overflow(small):
    server = small.topology.servers[1].namespace

    def read(*argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", server, *argv], capture_output=True, text=True, check=True).stdout

    assert f"inet {small.topology.vip}/32" in read("ip", "addr", "show", "lo")
    assert read("sysctl", "-n", "net.ipv4.conf.eth0.arp_ignore").strip() == "1"
    assert read("sysctl", "-n", "net.ipv4.conf.eth0.arp_announce").strip() == "2"
    assert read("sysctl", "-n", "net.ipv4.tcp_abort_on_overflow").strip() == "1"
    assert "tx-checksumming: off" in read("ethtool", "-k", "eth0")


def test_status_json_lists_every_node(small, cli):
    result = cli("status", REPO / "configs" / "local-small.yaml", "--set", "testbed.name=itsmall", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["state"] == "up"
    assert {(n["name"], n["role"]) for n in status["nodes"]} == {
        ("client", "client"),
        ("router", "router"),
        ("lb0", "lb"),
        ("lb1", "lb"),
        ("srv0", "server"),
        ("srv1", "server"),
        ("srv2", "server"),
        ("srv3", "server"),
    }
    servers = [n for n in status["nodes"] if n["role"] == "server"]
    assert all(n["up"] and n["http_status"] == 200 and n["busy_workers"] >= 1 for n in servers)


def test_deploy_twice_is_a_no_op(small):
    apache_pids = small.apache(small.topology.servers[0]).cgroup.pids()
    assert small.deploy() == "unchanged"
    assert small.apache(small.topology.servers[0]).cgroup.pids() == apache_pids


def test_teardown_leaves_the_other_testbed_running():
    first = LocalTestbed(small_config("ita", "testbed.lbs=1"))
    second = LocalTestbed(small_config("itb", "testbed.lbs=1"))
    try:
        first.deploy()
        second.deploy()
        first.teardown()
        assert leftovers("ita") == NOTHING
        assert second.status().state == "up"
        assert curl(second.topology.client.namespace, f"http://{second.topology.servers[0].ip}/")["status"] == "200"
    finally:
        first.teardown()
        second.teardown()
    assert leftovers("itb") == NOTHING


def test_half_built_testbed_is_rebuilt():
    testbed = LocalTestbed(small_config("itc", "testbed.lbs=1"))
    try:
        testbed.deploy()
        # A crash mid-deploy: one server's Apache gone and the manifest never marked complete.
        victim = testbed.apache(testbed.topology.servers[0])
        for pid in victim.cgroup.pids():
            os.kill(pid, 9)
        manifest = Manifest.load(testbed.manifest_path)
        manifest.complete = False
        manifest.save()
        assert testbed.status().state == "partial"
        assert testbed.deploy() == "rebuilt"
        assert testbed.status().state == "up"
    finally:
        testbed.teardown()
    assert leftovers("itc") == NOTHING


def test_interrupted_deploy_leaves_nothing_behind():
    testbed = LocalTestbed(small_config("itd"))

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "apache servers" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        testbed.deploy(interrupt)
    assert leftovers("itd") == NOTHING


def test_foreign_namespace_is_refused_and_left_alone():
    testbed = LocalTestbed(small_config("ite"))
    foreign = "ite-srv1"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(NamespaceExists, match="ite-srv1 exists but testbed ite did not create it"):
            testbed.deploy()
        assert foreign in list_namespaces()
        assert leftovers("ite")["namespaces"] == [foreign]
        assert not leftovers("ite")["processes"]
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
    assert leftovers("ite") == NOTHING


def test_a_gre_client_routes_the_vip_with_the_client_mtu_and_undo_removes_it(tmp_path):
    """`kind: ssh` with GRE: the client host's VIP route carries the client MTU (room for the LB's GRE
    header), recorded so that `node down` removes it. Run on a bare namespace standing in for the host."""
    config = small_config("itgre", "testbed.forwarding=gre")
    topology = plan(config.testbed)
    client = replace(topology.client, namespace="", gateway="10.99.1.1")
    ns = LocalNamespace("itgre-host")
    ns.create()
    try:
        ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"])
        ns.run(["ip", "addr", "add", "10.99.1.2/24", "dev", "eth0"])
        ns.run(["ip", "link", "set", "eth0", "up"])
        ns.run(["ip", "link", "set", "peer0", "up"])
        manifest = Manifest(tmp_path / "manifest.json", "itgre")
        apply_role(ns, topology, client, manifest, kernel_gre=True)
        route = ns.run(["ip", "route", "show", f"{topology.vip}/32"]).stdout
        assert "via 10.99.1.1" in route and "mtu 1476" in route, route
        assert remove_resources(manifest, lambda *_: None, host=ns) == []
        assert ns.run(["ip", "route", "show", f"{topology.vip}/32"]).stdout == ""
    finally:
        ns.remove()
