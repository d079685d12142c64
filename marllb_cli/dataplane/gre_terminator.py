"""Server-side GRE termination in user space, for kernels without `ip_gre` (such as the local machine's).

Where the kernel has `ip_gre`, a server terminates the LBs' tunnels with a GRE interface. Without it, this
process does the same job inside the server's namespace:

    raw IPv4 socket for protocol 47  →  strip outer IPv4 + 4-byte GRE header  →  write the inner packet
    to a TUN device (`marllb-gre`, no packet-info header)  →  the kernel receives it as if from a wire,
    delivers it to the VIP (held on `lo`) and the server answers the client directly (DSR)

Since a raw socket for the protocol exists, the kernel sends no "protocol unreachable" for GRE. Reverse-path
filtering must be off on the TUN device, because the client is routed via eth0, not via the tunnel. Only
packets to the VIP are injected; anything else is counted and dropped. The TUN device belongs to this
process and disappears with it.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import select
import socket
import struct
import sys
from pathlib import Path

from pyroute2 import IPRoute

from marllb_cli.dataplane.packets import IPPROTO_GRE, decapsulate
from marllb_cli.services import until_signalled

__all__ = ["TUN_NAME", "open_tun", "main"]

TUN_NAME = "marllb-gre"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

log = logging.getLogger("marllb.gre")


def open_tun(name: str) -> int:
    """Create TUN device `name` in this namespace, bring it up with reverse-path filtering off; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    for key in ("all", name):
        Path(f"/proc/sys/net/ipv4/conf/{key}/rp_filter").write_text("0\n")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, state="up")
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-gre", description="terminate GRE to the VIP in user space")
    parser.add_argument("--vip", required=True)
    parser.add_argument("--tun", default=TUN_NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gre %(levelname)s %(message)s")
    vip = ipaddress.IPv4Address(args.vip).packed
    tun = open_tun(args.tun)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    should_run = until_signalled()
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    injected = refused = 0
    log.info("terminating GRE for %s on %s, pid %d", args.vip, args.tun, os.getpid())
    while should_run():
        ready, _, _ = select.select([raw], [], [], 0.5)
        if not ready:
            continue
        length = raw.recv_into(buffer)
        inner = decapsulate(view[:length])
        if inner is None or inner[16:20] != vip:
            refused += 1
            continue
        os.write(tun, inner)
        injected += 1
    log.info("stopped: %d packets injected, %d refused", injected, refused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
