"""The LB's packet loop: AF_PACKET in, parse, flow table, forward (L2 DSR or GRE), publish stats.

One process per LB, started inside the LB's namespace (`python -m marllb_cli.dataplane.fastpath SPEC.json`).
The kernel of the LB never handles VIP traffic itself (ip_forward=0 and an nftables drop at prerouting,
set at deploy); this loop sees the frames first, on a packet socket that

- ignores the frames it sends itself (`PACKET_IGNORE_OUTGOING`), and
- with `bpf`, has the kernel pass it only IPv4 frames to the VIP (a 6-instruction classic BPF filter),
  so ARP and other traffic never wake Python.

The socket is non-blocking: under load every iteration is one `recv_into` and one `send`, with no poll;
only when the queue is empty does the loop wait in `select`, at most one housekeeping interval. Every
`publish_interval` it applies new control from the agent (method, weights) and publishes a stats snapshot;
every second it expires idle flows.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from marllb_cli.dataplane.channel import COUNTERS, Channel, TornRead
from marllb_cli.dataplane.flows import IDLE_TIMEOUT_S, LINGER_S, FlowTable
from marllb_cli.dataplane.packets import GreEncapsulator, Verdict, mac_bytes, parse
from marllb_cli.dataplane.selection import Selector

__all__ = ["DataplaneSpec", "ServerSpec", "Dataplane", "attach_vip_filter", "main"]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
RECEIVE_BUFFER = 8 << 20
EXPIRE_INTERVAL_S = 1.0
#: How long the packet loop waits for a consistent control block (a live agent writes it in microseconds).
CONTROL_PATIENCE_S = 0.005

log = logging.getLogger("marllb.dataplane")


class ServerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    ip: str
    mac: str


class DataplaneSpec(BaseModel):
    """Everything one LB's dataplane needs; `marllb lb start` writes it as JSON next to the process's log."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lb: str
    interface: str = "eth0"
    vip: str
    lb_ip: str
    lb_mac: str
    forwarding: Literal["l2dsr", "gre"]
    servers: list[ServerSpec]
    method: str
    weights: list[float]
    channel: Path
    idle_timeout: float = IDLE_TIMEOUT_S
    linger: float = LINGER_S
    publish_interval: float = 0.02
    bpf: bool = True
    seed: int = 0
    reservoir_keep: float = 1.0  # `experiment.reservoir_keep`


def attach_vip_filter(sock: socket.socket, vip: str) -> None:
    """Let the kernel deliver only IPv4 frames addressed to `vip` to this packet socket."""
    vip_value = int(ipaddress.IPv4Address(vip))
    program = [
        (0x28, 0, 0, 12),  # ldh [12]            ethertype
        (0x15, 0, 3, 0x0800),  # jeq #IPv4, else drop
        (0x20, 0, 0, 30),  # ld  [30]            IPv4 destination
        (0x15, 0, 1, vip_value),  # jeq #VIP, else drop
        (0x06, 0, 0, 0x40000),  # ret #262144         accept the whole frame
        (0x06, 0, 0, 0),  # ret #0              drop
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(program), ctypes.addressof(code)))


class Dataplane:
    """The packet loop of one LB; `run()` until `stop()` or a signal."""

    def __init__(self, spec: DataplaneSpec) -> None:
        self.spec = spec
        self.selector = Selector(
            len(spec.servers), method=spec.method, weights=spec.weights, rng=random.Random(spec.seed)
        )
        self.table = FlowTable(
            self.selector,
            idle_timeout=spec.idle_timeout,
            linger=spec.linger,
            keep_probability=spec.reservoir_keep,
            rng=random.Random(spec.seed + 1),
        )
        self.counters = [0] * len(COUNTERS)
        self.channel = Channel.create(spec.channel, len(spec.servers), spec.method, spec.weights)
        self._control_seq = self.channel.control_seq
        self._torn_seq: int | None = None  # an odd control sequence seen stuck: skipped until it changes
        self._running = True
        lb_mac = mac_bytes(spec.lb_mac)
        self._server_macs = [mac_bytes(server.mac) for server in spec.servers]
        self._lb_mac = lb_mac
        self._encapsulators = [
            GreEncapsulator(lb_mac, mac_bytes(server.mac), spec.lb_ip, server.ip) for server in spec.servers
        ]
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if spec.bpf:
            attach_vip_filter(self.sock, spec.vip)
        self.sock.bind((spec.interface, ETH_P_ALL))
        self.sock.setblocking(False)

    def stop(self, *_: object) -> None:
        self._running = False

    def run(self) -> None:
        spec = self.spec
        sock, table, counters = self.sock, self.table, self.counters
        recv_into, send = sock.recv_into, sock.send
        server_for = table.server_for
        buffer = bytearray(1 << 16)
        frame = memoryview(buffer)
        vip = ipaddress.IPv4Address(spec.vip).packed
        gre = spec.forwarding == "gre"
        macs, lb_mac, encapsulators = self._server_macs, self._lb_mac, self._encapsulators
        monotonic = time.monotonic
        ok, forwarded, send_errors = Verdict.OK, COUNTERS.index("forwarded"), COUNTERS.index("send_errors")
        next_publish = next_expire = 0.0
        while self._running:
            try:
                length = recv_into(buffer)
            except BlockingIOError:
                select.select([sock], [], [], spec.publish_interval)
                length = 0
            except InterruptedError:
                continue
            now = monotonic()
            if length:
                verdict, key, flags, ip_length = parse(frame, length, vip)
                counters[verdict] += 1
                if verdict == ok:
                    server = server_for(key, flags, now)
                    try:
                        if gre:
                            send(encapsulators[server].encapsulate(frame, ip_length))
                        else:
                            frame[0:6] = macs[server]
                            frame[6:12] = lb_mac
                            send(frame[: 14 + ip_length])
                        counters[forwarded] += 1
                    except OSError:
                        counters[send_errors] += 1
            if now >= next_publish:
                if now >= next_expire:
                    table.expire(now)
                    next_expire = now + EXPIRE_INTERVAL_S
                self._apply_control()
                self._publish(now)
                next_publish = now + spec.publish_interval
        self._publish(monotonic())

    def _apply_control(self) -> None:
        """Take new method and weights from the agent, if it wrote any; bad values keep the old ones.

        Fail-static: an agent killed between its two sequence stores leaves the sequence odd for good. The
        packet loop then never waits on it: the weights in force stay, and the stuck sequence is logged once."""
        seq_now = self.channel.control_seq
        if seq_now == self._control_seq or seq_now == self._torn_seq:
            return
        try:
            seq, method, weights = self.channel.read_control(patience_s=CONTROL_PATIENCE_S)
        except TornRead:
            self._torn_seq = seq_now
            log.warning("control %d is half written (agent died mid-write?): keeping the weights in force", seq_now)
            return
        try:
            self.selector.set_weights(weights)
            self.selector.set_method(method)
        except ValueError as exc:
            log.warning("ignored control %d: %s", seq, exc)
        self._control_seq = seq

    def _publish(self, now: float) -> None:
        table, counters = self.table, self.counters
        counters[COUNTERS.index("untracked")] = table.untracked
        counters[COUNTERS.index("overflow")] = table.overflow
        counters[COUNTERS.index("closed")] = table.closed
        counters[COUNTERS.index("timed_out")] = table.timed_out
        counters[COUNTERS.index("open")] = len(table)
        self.channel.publish(now, counters, table)

    def close(self) -> None:
        self.sock.close()
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-dataplane", description="one LB's packet dataplane")
    parser.add_argument("spec", type=Path, help="DataplaneSpec JSON written by `marllb lb start`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dataplane %(levelname)s %(message)s")
    spec = DataplaneSpec.model_validate_json(args.spec.read_text())
    dataplane = Dataplane(spec)
    signal.signal(signal.SIGTERM, dataplane.stop)
    signal.signal(signal.SIGINT, dataplane.stop)
    log.info(
        "%s: %s on %s, %d servers, %s, pid %d",
        spec.lb,
        spec.forwarding,
        spec.interface,
        len(spec.servers),
        spec.method,
        os.getpid(),
    )
    try:
        dataplane.run()
    finally:
        dataplane.close()
    log.info("%s: stopped", spec.lb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
