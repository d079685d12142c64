"""The packet dataplane for real: curl through the VIP, via our AF_PACKET LBs, to Apache, replies direct.

One l2dsr testbed (configs/local-small.yaml: 2 LBs, servers of 1, 1, 2, 2 units) serves the module; GRE
has its own, smaller one (a 1-unit and a 2-unit server) at the end.
Testbed names start with `itd` so they never meet a user's testbed.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from scapy.layers.inet import GRE, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from marllb_cli.config import load_config
from marllb_cli.dataplane.channel import Channel
from marllb_cli.deploy.local import LocalLbs, LocalTestbed
from marllb_cli.hosts import LocalNamespace
from tests.conftest import REPO, minimal_testbed
from tests.integration.helpers import deployed

IDLE_S = 5.0  # the LBs' idle timeout in this module: long enough for held-open connections, short to wait for
NO_FLOWS = [0, 0, 0, 0]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]


def _minimal_testbed(tmp_path_factory, name: str, **overrides) -> LocalTestbed:
    import yaml

    path = tmp_path_factory.mktemp(name) / "config.yaml"
    path.write_text(yaml.safe_dump(minimal_testbed(name, **overrides)))
    return LocalTestbed(load_config(path))


@pytest.fixture(scope="module")
def lbs(tmp_path_factory):
    """A deployed l2dsr testbed with SED LBs running; torn down (and checked clean) after the module."""
    with deployed(LocalTestbed(load_config(REPO / "configs" / "local-small.yaml", ["testbed.name=itlb"]))) as testbed:
        services = testbed.lbs()
        services.start("sed", idle_timeout=IDLE_S)
        yield services


def sh(namespace: str, script: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "sh", "-c", script], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def vip_url(services: LocalLbs, path: str) -> str:
    return f"http://{services.topology.vip}{path}"


def curl_lines(services: LocalLbs, script: str) -> list[tuple[str, str]]:
    """(status, X-Server) per request from a curl script run in the client namespace."""
    out = sh(services.topology.client.namespace, script)
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


WRITE_OUT = "%{http_code} %header{x-server}\\n"


def sequential(services: LocalLbs, path: str, count: int) -> list[tuple[str, str]]:
    """`count` curls of `path` through the VIP, one after the other, each its own connection."""
    url = vip_url(services, path)
    return curl_lines(
        services, f"for i in $(seq {count}); do curl -s -m 10 -o /dev/null -w '{WRITE_OUT}' '{url}'; done"
    )


def channel_stats(services: LocalLbs):
    stats = []
    for lb in services.topology.lbs:
        with Channel.attach(services.channel_path(lb)) as channel:
            stats.append(channel.read_stats())
    return stats


def total_flows(services: LocalLbs) -> list[int]:
    return [int(sum(column)) for column in zip(*(s.flows for s in channel_stats(services)), strict=True)]


def eth0_counter(namespace: str, counter: str) -> int:
    return int(sh(namespace, f"cat /sys/class/net/eth0/statistics/{counter}"))


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# -- requests through the VIP ----------------------------------------------------------------------------
def test_sequential_and_concurrent_requests_all_succeed_on_every_server(lbs):
    url = vip_url(lbs, "/dummy.php/?n=10000")
    one_by_one = sequential(lbs, "/dummy.php/?n=10000", 300)
    urls = " ".join(f"-o /dev/null '{url}&i={i}'" for i in range(200))
    concurrent = curl_lines(
        lbs, f"curl -s -m 30 --parallel --parallel-immediate --parallel-max 200 -w '{WRITE_OUT}' {urls}"
    )
    assert len(one_by_one) == 300 and len(concurrent) == 200
    assert Counter(status for status, _ in one_by_one + concurrent) == {"200": 500}
    assert {server for _, server in concurrent} == {"srv0", "srv1", "srv2", "srv3"}
    wait_until(lambda: total_flows(lbs) == NO_FLOWS, 5, "q_j back to 0 after all requests ended")
    counters = [s.counters for s in channel_stats(lbs)]
    assert sum(c["closed"] for c in counters) >= 500
    assert all(c["send_errors"] == 0 for c in counters)


def test_replies_never_pass_through_an_lb(lbs):
    lb_namespaces = [lb.namespace for lb in lbs.topology.lbs]
    before = sum(eth0_counter(ns, "rx_bytes") for ns in lb_namespaces)
    lines = sequential(lbs, "/static/1m.bin", 20)
    received = sum(eth0_counter(ns, "rx_bytes") for ns in lb_namespaces) - before
    assert [status for status, _ in lines] == ["200"] * 20
    # 20 MiB went to the client; the LBs saw only the client's requests and ACKs (≈ 2 % of that).
    assert received < 0.1 * 20 * (1 << 20), received


def test_sed_splits_concurrent_long_flows_by_weight(lbs):
    """Weights (1, 1, 2, 2): held-open connections end up 1:2 over the slow and fast pair, then q_j return to 0."""
    vip = str(lbs.topology.vip)

    def open_connections() -> list[socket.socket]:
        return [socket.create_connection((vip, 80), timeout=5) for _ in range(90)]

    sockets = LocalNamespace(lbs.topology.client.namespace).call(open_connections)
    try:
        wait_until(lambda: sum(total_flows(lbs)) == 90, 3, "90 open flows")
        flows = total_flows(lbs)
        slow, fast = flows[0] + flows[1], flows[2] + flows[3]
        assert fast / (slow + fast) == pytest.approx(2 / 3, rel=0.15)
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: total_flows(lbs) == NO_FLOWS, 10, "q_j back to 0 after FIN")


def test_flows_that_never_end_time_out_and_q_returns_to_zero(lbs):
    """SYNs from an address that never answers: no FIN, no RST ever comes; the idle timeout ends them."""
    router = lbs.topology.router
    head = Ether(dst=router.interfaces[1].mac) / IP(src="10.99.1.77", dst=str(lbs.topology.vip))
    frames = [bytes(head / TCP(sport=20_000 + i, dport=80, flags="S")) for i in range(40)]
    _send_frames(lbs.topology.client.namespace, frames)
    wait_until(lambda: sum(total_flows(lbs)) == 40, 5, "40 half-open flows tracked")
    before = sum(s.counters["timed_out"] for s in channel_stats(lbs))
    wait_until(lambda: total_flows(lbs) == NO_FLOWS, IDLE_S + 5, "q_j back to 0 after the idle timeout")
    assert sum(s.counters["timed_out"] for s in channel_stats(lbs)) - before == 40


def test_a_long_download_keeps_its_server_while_weights_change(lbs):
    """Weights flip every 250 ms (written by the test as an agent would); the flow's server never changes."""
    services = lbs
    client = LocalNamespace(services.topology.client.namespace)
    vip = str(services.topology.vip)
    done: dict[str, str] = {}

    def slow_get() -> str:
        """GET 1 MiB reading 64 KiB per 200 ms through a small receive buffer: a flow of ≈ 3 s."""
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sock.settimeout(10)
            sock.connect((vip, 80))
            sock.sendall(b"GET /static/1m.bin HTTP/1.0\r\nHost: vip\r\n\r\n")
            response = b""
            while chunk := sock.recv(64 << 10):
                response += chunk
                time.sleep(0.2 * len(chunk) / (64 << 10))
        head, _, body = response.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        server = next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-server:"))
        return f"{lines[0].split()[1]} {len(body)} {server}"

    def download() -> None:
        done["out"] = client.call(slow_get)

    thread = threading.Thread(target=download)
    thread.start()
    channels = [Channel.attach(services.channel_path(lb)) for lb in services.topology.lbs]
    holders = set()
    try:
        flips = 0
        while thread.is_alive():
            weights = [1.0, 1.0, 1.0, 100.0] if flips % 2 else [100.0, 1.0, 1.0, 1.0]
            for channel in channels:
                channel.write_control("sed", weights)
            time.sleep(0.25)
            flips += 1
            flows = total_flows(services)
            holders.update(j for j, q in enumerate(flows) if q)
        thread.join()
    finally:
        for channel in channels:
            channel.write_control("sed", [1.0, 1.0, 2.0, 2.0])
            channel.close()
    status, size, server = done["out"].split()
    assert (status, size) == ("200", str(1 << 20))
    assert flips >= 8  # ≥ 2 s of flipping while the download ran
    assert len(holders) == 1 and f"srv{holders.pop()}" == server


def test_hostile_frames_leave_the_dataplane_alive_and_forward_nothing_foreign(lbs):
    """100 000 frames straight onto the LBs' segment: malformed, fragments, options, non-VIP, odd flags."""
    topo = lbs.topology
    vip, server = str(topo.vip), str(topo.servers[0].ip)
    rng = random.Random(5)
    kinds = []
    for lb in topo.lbs:
        eth = Ether(src=topo.router.mac, dst=lb.mac)
        kinds += [
            eth / IP(src="10.99.1.2", dst=server) / TCP(dport=80, flags="S"),  # not for the VIP
            eth / IP(src="10.99.1.2", dst=vip) / UDP(dport=80),
            eth / IP(src="10.99.1.2", dst=vip, flags="MF") / TCP(flags="S"),
            eth / IP(src="10.99.1.2", dst=vip, frag=50) / TCP(flags="S"),
            eth / IP(src="10.99.1.2", dst=vip, ihl=4) / TCP(flags="S"),
            eth / IP(src="10.99.1.2", dst=vip, len=2000) / TCP(flags="S"),
            eth / IP(src="10.99.1.2", dst=vip) / TCP(dataofs=15, flags="S"),
            eth / ARP(pdst=vip),
            eth / IP(src="10.99.1.2", dst=server) / GRE() / IP(dst=vip) / TCP(),
        ]
    frames = [bytes(k) for k in kinds]
    frames += [bytes(frames[0][: rng.randrange(14, 40)]) for _ in range(20)]  # truncated
    for lb in topo.lbs:  # odd TCP flags to the VIP from a host that never answers: forwarded, untracked
        eth = Ether(src=topo.router.mac, dst=lb.mac)
        frames += [
            bytes(eth / IP(src="10.99.1.78", dst=vip) / TCP(sport=rng.randrange(1024, 65535), flags=flags))
            for flags in ("FPU", "A", "R", "", "SF")
        ]
    burst = [frames[rng.randrange(len(frames))] for _ in range(100_000)]
    # and a bounded SYN flood: 5 000 new flows from a host that never completes a handshake
    flood = [
        bytes(Ether(src=topo.router.mac, dst=topo.lbs[i % 2].mac) / IP(src="10.99.1.79", dst=vip) / TCP(sport=1024 + i))
        for i in range(5_000)
    ]
    burst[::20] = flood

    server_rx = {s.namespace: eth0_counter(s.namespace, "rx_packets") for s in topo.servers}
    before = channel_stats(lbs)
    _send_frames(topo.router.namespace, burst, pace_every=2_000)
    time.sleep(1.0)
    after = channel_stats(lbs)
    delta = {
        k: sum(a.counters[k] - b.counters[k] for a, b in zip(after, before, strict=True)) for k in after[0].counters
    }
    assert all(s.dataplane_running for s in lbs.snapshots())
    for verdict in ("truncated", "bad_ip_header", "fragment", "not_tcp", "bad_tcp_header"):
        assert delta[verdict] > 1_000, verdict  # every kind reached the dataplane and was dropped there
    # Forwarded: only VIP TCP frames from the two never-answering hosts (.78 odd flags, .79 SYNs).
    valid = sum(1 for frame in burst if frame[26:30] in (bytes([10, 99, 1, 78]), bytes([10, 99, 1, 79])))
    assert 0.9 * valid < delta["forwarded"] <= valid
    assert delta["send_errors"] == 0
    received = sum(eth0_counter(ns, "rx_packets") - n for ns, n in server_rx.items())
    assert received < valid + 1_000  # servers saw nothing like the 100 000 foreign/malformed frames
    assert sum(total_flows(lbs)) > 0  # the flood's flows are tracked ...
    wait_until(lambda: total_flows(lbs) == NO_FLOWS, IDLE_S + 5, "flood flows end by idle timeout")  # ... and time out
    assert [status for status, _ in sequential(lbs, "/", 20)] == ["200"] * 20


def _send_frames(namespace: str, frames: list[bytes], *, pace_every: int = 0) -> None:
    """Send raw frames out of eth0 of `namespace` (bounded: the caller's list, once)."""

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind(("eth0", 0))
            for i, frame in enumerate(frames):
                try:
                    sock.send(frame)
                except OSError:
                    pass
                if pace_every and i % pace_every == pace_every - 1:
                    time.sleep(0.005)

    LocalNamespace(namespace).call(send)


# -- agents, fail-static and stop --------------------------------------------------------------------------
def test_a_killed_agent_leaves_the_last_weights_in_force(lbs):
    channel = Channel.attach(lbs.channel_path(lbs.topology.lbs[0]))
    try:
        agent = next(s for s in lbs.snapshots() if s.lb == "lb0")
        assert agent.agent_running and agent.weights == [1.0, 1.0, 2.0, 2.0]
        from marllb_cli.deploy.node.manifest import Manifest
        from marllb_cli.services import Service

        manifest = Manifest.load(lbs.testbed.manifest_path)
        record = next(r for r in manifest.resources if r.name == "lb0-agent")
        Service.from_record(record.name, record.data).stop(grace_s=0)  # SIGTERM, as a crash would end it
        channel.write_control("sed", [0.0, 1.0, 2.0, 2.0])  # the last word before the agent died
        time.sleep(1.0)
        snapshot = next(s for s in lbs.snapshots() if s.lb == "lb0")
        assert snapshot.dataplane_running and not snapshot.agent_running
        assert snapshot.weights == [0.0, 1.0, 2.0, 2.0]
        before = channel.read_stats().new_flows
        assert {status for status, _ in sequential(lbs, "/", 30)} == {"200"}
        new = channel.read_stats().new_flows - before
        assert new[0] == 0 and new[1:].sum() > 0  # lb0 still drains srv0, as its dead agent last said
    finally:
        channel.close()


def test_lb_stop_leaves_nothing_running(lbs):
    lb_namespaces = [LocalNamespace(lb.namespace) for lb in lbs.topology.lbs]
    assert all(ns.pids() for ns in lb_namespaces)
    lbs.stop()
    assert not any(ns.pids() for ns in lb_namespaces)
    assert not any(lbs.channel_path(lb).exists() for lb in lbs.topology.lbs)
    lbs.start("sed", idle_timeout=IDLE_S)  # later tests find it running again


def test_awcmp_weights_follow_probed_busy_workers(lbs):
    lbs.start("awcmp", period=0.1)
    try:
        steps_log = lbs.dir / "lb0.steps.jsonl"
        time.sleep(1.0)
        rows = [json.loads(line) for line in steps_log.read_text().splitlines()]
        probed = [row for row in rows if row["method"] == "wcmp" and None not in row.get("busy_workers", [None])]
        assert len(probed) >= 5
        cpus = [server.cpus for server in lbs.topology.servers]
        for row in probed:
            # mod_status counts the worker answering the probe itself, so busy >= 1
            assert all(busy >= 1 for busy in row["busy_workers"])
            expected = [c / (b + 1) for c, b in zip(cpus, row["busy_workers"], strict=True)]
            assert row["weights"] == pytest.approx(expected, rel=1e-5)
        assert [s.method for s in lbs.snapshots()] == ["wcmp", "wcmp"]
    finally:
        lbs.start("sed", idle_timeout=IDLE_S)


# -- GRE ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gre_lbs(tmp_path_factory):
    with deployed(_minimal_testbed(tmp_path_factory, "itgre", forwarding="gre")) as testbed:
        services = testbed.lbs()
        services.start("lsq")
        yield services


def test_gre_frames_dissect_and_curl_works_end_to_end(gre_lbs):
    topo = gre_lbs.topology
    captured: list[bytes] = []
    server = topo.servers[0]
    ready = threading.Event()

    def capture() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)) as sock:
            sock.bind(("eth0", 0))
            sock.settimeout(0.2)
            ready.set()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and len(captured) < 20:
                try:
                    frame = sock.recv(65536)
                except TimeoutError:
                    continue
                if frame[23] == 47:
                    captured.append(frame)

    thread = threading.Thread(target=lambda: LocalNamespace(server.namespace).call(capture))
    thread.start()
    ready.wait(5)
    lines = sequential(gre_lbs, "/static/100k.bin", 10)
    thread.join()
    assert [status for status, _ in lines] == ["200"] * 10
    assert {server for _, server in lines} == {"srv0"}  # lsq: idle servers tie, the lowest index wins
    assert captured, "no GRE frame reached srv0"
    for raw in captured:
        frame = Ether(raw)
        outer = frame[IP]
        assert outer.proto == 47 and outer.dst == str(server.ip)
        assert str(outer.src) in {str(lb.ip) for lb in topo.lbs}
        inner = frame[GRE].payload
        assert isinstance(inner, IP) and inner.dst == str(topo.vip) and inner.haslayer(TCP)
        assert inner[TCP].dport == 80 and inner.len == len(bytes(inner))
