"""The comparison point for the dataplane benchmark: the same MAC-rewrite forwarding, written with scapy.

Not used by marllb itself; it shows what per-packet dissection costs (`marllb bench dataplane`).
"""

from __future__ import annotations

import argparse
import sys

from scapy.config import conf
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from marllb_cli.services import until_signalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-scapy-forwarder")
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--vip", required=True)
    parser.add_argument("--my-mac", required=True)
    parser.add_argument("--to-mac", required=True)
    args = parser.parse_args(argv)
    should_run = until_signalled()
    sock = conf.L2socket(iface=args.iface)
    while should_run():
        packet = sock.recv()
        # Our own transmissions come back on this socket too: forward only frames addressed to us.
        if packet is None or packet[Ether].dst != args.my_mac or IP not in packet or packet[IP].dst != args.vip:
            continue
        packet[Ether].src, packet[Ether].dst = args.my_mac, args.to_mac
        sock.send(packet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
