"""`marllb bench dataplane`: how fast the packet dataplane forwards, next to scapy and to the kernel.

Bench network (own namespaces `mlbbench-*`, removed at the end, also on failure):

    src ──┐
    fwd ──┼── bridge (in mlbbench-sw)      src sends TCP segments to the VIP, addressed to fwd's MAC;
    dst ──┘                                fwd forwards them to dst; dst's kernel counts what arrives

`fwd` is one-armed like an LB and runs, in turn: (a) marllb's fast path (`dataplane.fastpath`, l2dsr,
1 000 tracked flows), (b) the same MAC rewrite with scapy, (c) the kernel's IP forwarding (the local
physical limit). The sender is one Python process blasting pre-built frames on the other core, so on a
2-core machine a figure above the sender's rate cannot be measured: the report says when the sink saw
everything that was sent. Each point is bounded in time and count.

Reported per forwarder: offered and delivered packets/s, loss, and CPU time of the forwarding process
per delivered packet (user + system, from /proc; the kernel's forwarding runs in softirq and has none).
For the fast path, the highest paced rate with < 0.1 % loss is searched too.

Decision cost: ns per new-flow decision (`Selector.choose`) and per SYN through the flow table
(`FlowTable.server_for`, which adds the table insert and bookkeeping), for 7, 24 and 64 servers.
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2 import NetNS

from marllb_cli.dataplane.fastpath import DataplaneSpec, ServerSpec
from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.selection import METHODS, Selector, flow_key
from marllb_cli.deploy.node.roles import OFFLOADS_OFF
from marllb_cli.errors import NamespaceExists
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.services import Service, start_service

__all__ = ["ForwardingResult", "DecisionResult", "forwarding_benchmark", "decision_benchmark"]

PREFIX = "mlbbench"
VIP = "10.98.255.1"
HOSTS = {
    "src": ("10.98.0.2", "02:4d:bb:00:00:02"),
    "fwd": ("10.98.0.3", "02:4d:bb:00:00:03"),
    "dst": ("10.98.0.4", "02:4d:bb:00:00:04"),
}
CHANNEL = Path(f"/dev/shm/marllb-{PREFIX}")
N_FLOWS = 1_000
FRAME_PAYLOAD = 64  # bytes of TCP payload per segment: small packets, the per-packet worst case


@dataclass(frozen=True)
class ForwardingResult:
    forwarder: str
    offered_pps: float
    delivered_pps: float
    loss: float
    cpu_ns_per_packet: float | None
    sink_saw_everything: bool


@dataclass(frozen=True)
class DecisionResult:
    method: str
    servers: int
    choose_ns: float
    syn_ns: float


# -- decisions ---------------------------------------------------------------------------------------------
def decision_benchmark(server_counts: tuple[int, ...] = (7, 24, 64), repeat: int = 20_000) -> list[DecisionResult]:
    rng = random.Random(0)
    results = []
    for n in server_counts:
        for method in METHODS:
            weights = [rng.choice((1.0, 1.5, 2.0)) for _ in range(n)]
            selector = Selector(n, method=method, weights=weights, rng=random.Random(1))
            flows = [rng.randrange(20) for _ in range(n)]
            hashes = [rng.getrandbits(32) for _ in range(1024)]
            batches = max(1, repeat // len(hashes))
            choose_s = min(
                timeit.repeat(
                    lambda c=selector.choose, q=flows, hs=hashes: [c(h, q) for h in hs], number=batches, repeat=3
                )
            ) / (batches * len(hashes))
            keys = [flow_key(rng.getrandbits(32).to_bytes(4, "big"), b"\x0a\x62\xff\x01", p, 80) for p in range(repeat)]
            syn_s = min(_syn_seconds(selector, keys) for _ in range(3))
            results.append(DecisionResult(method, n, choose_s * 1e9, syn_s * 1e9))
    return results


def _syn_seconds(selector: Selector, keys: list[bytes]) -> float:
    """Seconds per SYN of a fresh flow through a fresh flow table (decision + insert + bookkeeping)."""
    table = FlowTable(selector, rng=random.Random(2))
    server_for = table.server_for
    start = time.perf_counter()
    for i, key in enumerate(keys):
        server_for(key, 0x02, i * 1e-4)
    return (time.perf_counter() - start) / len(keys)


# -- forwarding ------------------------------------------------------------------------------------------
def forwarding_benchmark(
    duration_s: float = 3.0, *, lossless_search: bool = True, progress: Callable[[str], None] = print
) -> list[ForwardingResult]:
    names = [f"{PREFIX}-{role}" for role in ("sw", "src", "fwd", "dst")]
    existing = [name for name in names if LocalNamespace(name).exists()] + [str(CHANNEL)] * CHANNEL.exists()
    if existing:
        raise NamespaceExists(
            f"{existing[0]} exists", hint="another benchmark is running; if not, remove it (ip netns del / rm)"
        )
    created: list[LocalNamespace] = []
    try:
        for name in names:
            created.append(LocalNamespace(name))
            created[-1].create()
        _build(names)
        frames = _frames()
        results = []
        with tempfile.TemporaryDirectory(prefix="marllb-bench-") as tmp:
            for forwarder in ("marllb", "scapy", "kernel"):
                progress(f"forwarding with {forwarder}")
                service = _start_forwarder(forwarder, Path(tmp))
                try:
                    _send(frames[:N_FLOWS], rate=5_000)  # the SYNs: every flow is tracked from here on
                    time.sleep(0.2)
                    results.append(_measure(forwarder, frames[N_FLOWS:], duration_s, service))
                    if forwarder == "marllb" and lossless_search:
                        results.append(_lossless(frames[N_FLOWS:], duration_s, service, results[-1], progress))
                finally:
                    if service is not None:
                        service.stop(grace_s=1.0)
                    LocalNamespace(f"{PREFIX}-fwd").sysctl("net.ipv4.ip_forward", 0)
        return results
    finally:
        for ns in reversed(created):
            ns.remove()
        CHANNEL.unlink(missing_ok=True)


def _build(names: list[str]) -> None:
    switch = names[0]
    with NetNS(switch) as sw:
        sw.link("add", ifname="br0", kind="bridge")
        bridge = sw.link_lookup(ifname="br0")[0]
        sw.link("set", index=bridge, state="up")
        for role in ("src", "fwd", "dst"):
            sw.link("add", ifname=role, kind="veth", peer={"ifname": "eth0", "net_ns_fd": f"{PREFIX}-{role}"})
            port = sw.link_lookup(ifname=role)[0]
            sw.link("set", index=port, master=bridge, state="up")
    for role, (ip, mac) in HOSTS.items():
        ns_name = f"{PREFIX}-{role}"
        with NetNS(ns_name) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=eth0, address=mac, state="up")
            ipr.addr("add", index=eth0, address=ip, prefixlen=24)
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            if role == "fwd":
                ipr.route("add", dst=f"{VIP}/32", gateway=HOSTS["dst"][0])
                ipr.neigh("add", dst=HOSTS["dst"][0], lladdr=HOSTS["dst"][1], ifindex=eth0, state=0x80)  # permanent
        ns = LocalNamespace(ns_name)
        ns.run(["ethtool", "-K", "eth0", *OFFLOADS_OFF], check=False)
        ns.sysctl("net.ipv4.conf.all.send_redirects", 0)
        ns.sysctl("net.ipv4.conf.eth0.send_redirects", 0)
    sw_ns = LocalNamespace(switch)
    if sw_ns.call(Path("/proc/sys/net/bridge").exists):
        sw_ns.sysctl("net.bridge.bridge-nf-call-iptables", 0)


def _frames() -> list[bytes]:
    """N_FLOWS SYNs, then one data segment per flow, repeated by the sender (crafted once, with scapy)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    head = Ether(src=HOSTS["src"][1], dst=HOSTS["fwd"][1])
    syns = [
        bytes(head / IP(src=HOSTS["src"][0], dst=VIP) / TCP(sport=10_000 + i, dport=80, flags="S"))
        for i in range(N_FLOWS)
    ]
    data = [
        bytes(
            head
            / IP(src=HOSTS["src"][0], dst=VIP)
            / TCP(sport=10_000 + i, dport=80, flags="A")
            / (b"x" * FRAME_PAYLOAD)
        )
        for i in range(N_FLOWS)
    ]
    return syns + data


def _start_forwarder(kind: str, tmp: Path) -> Service | None:
    fwd = LocalNamespace(f"{PREFIX}-fwd")
    if kind == "kernel":
        fwd.sysctl("net.ipv4.ip_forward", 1)
        return None
    if kind == "marllb":
        spec = DataplaneSpec(
            lb="bench",
            vip=VIP,
            lb_ip=HOSTS["fwd"][0],
            lb_mac=HOSTS["fwd"][1],
            forwarding="l2dsr",
            servers=[ServerSpec(name="dst", ip=HOSTS["dst"][0], mac=HOSTS["dst"][1])],
            method="sed",
            weights=[1.0],
            channel=CHANNEL,
            idle_timeout=300.0,
        )
        spec_file = tmp / "spec.json"
        spec_file.write_text(spec.model_dump_json())
        service = start_service(fwd, "bench-marllb", "marllb_cli.dataplane.fastpath", [str(spec_file)], tmp / "m.log")
        ready = lambda: spec.channel.exists()  # noqa: E731
    else:
        args = ["--vip", VIP, "--my-mac", HOSTS["fwd"][1], "--to-mac", HOSTS["dst"][1]]
        service = start_service(fwd, "bench-scapy", "marllb_cli.bench.scapy_forwarder", args, tmp / "s.log")
        ready = lambda: (time.sleep(2.0), True)[1]  # noqa: E731 - scapy has no readiness signal; it starts in ~1 s
    deadline = time.monotonic() + 15
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    return service


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sink_packets() -> int:
    return int(LocalNamespace(f"{PREFIX}-dst").run(["cat", "/sys/class/net/eth0/statistics/rx_packets"]).stdout)


def _send(frames: list[bytes], *, rate: float | None = None, duration_s: float | None = None) -> tuple[int, float]:
    """Send `frames` round-robin from src: all once (no duration) or for `duration_s`; paced at `rate` if given."""

    def blast() -> tuple[int, float]:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind(("eth0", 0))
            send = sock.send
            sent, batch, n = 0, 100, len(frames)
            start = time.perf_counter()
            stop_at = start + (duration_s or 3600.0)
            limit = n if duration_s is None else 50_000_000
            while sent < limit:
                for i in range(sent, sent + batch):
                    try:
                        send(frames[i % n])
                    except OSError:  # ENOBUFS: the queue is full; the frame is lost, as on a wire
                        pass
                sent += batch
                now = time.perf_counter()
                if now >= stop_at:
                    break
                if rate:
                    ahead = sent / rate - (now - start)
                    if ahead > 0:
                        time.sleep(ahead)
            return sent, time.perf_counter() - start

    return LocalNamespace(f"{PREFIX}-src").call(blast)


def _measure(
    name: str, frames: list[bytes], duration_s: float, service: Service | None, rate: float | None = None
) -> ForwardingResult:
    before_rx = _sink_packets()
    before_cpu = _cpu_seconds(service.pid) if service else 0.0
    sent, elapsed = _send(frames, rate=rate, duration_s=duration_s)
    time.sleep(0.3)  # let the forwarder drain its socket queue
    delivered = _sink_packets() - before_rx
    cpu = _cpu_seconds(service.pid) - before_cpu if service else None
    return ForwardingResult(
        forwarder=name if rate is None else f"{name} (paced {rate / 1000:.0f} k/s)",
        offered_pps=sent / elapsed,
        delivered_pps=delivered / elapsed,
        loss=max(0.0, 1 - delivered / sent),
        cpu_ns_per_packet=(cpu / delivered * 1e9) if cpu is not None and delivered else None,
        sink_saw_everything=delivered >= sent * 0.999,
    )


def _lossless(frames, duration_s, service, saturated: ForwardingResult, progress) -> ForwardingResult:
    """The highest paced rate (in 5 % steps down from the saturated delivery rate) with < 0.1 % loss."""
    rate = saturated.delivered_pps
    result = saturated
    for _ in range(12):
        progress(f"marllb paced at {rate / 1000:.0f} k/s")
        result = _measure("marllb", frames, duration_s, service, rate=rate)
        if result.loss < 0.001:
            return result
        rate *= 0.95
    return result


def report_json(forwarding: list[ForwardingResult], decisions: list[DecisionResult]) -> str:
    return json.dumps(
        {"forwarding": [asdict(r) for r in forwarding], "decisions": [asdict(d) for d in decisions]}, indent=2
    )
