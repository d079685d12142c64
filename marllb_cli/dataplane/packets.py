"""Ethernet/IPv4/TCP parsing and rewriting on raw frames, with `struct` on memoryviews (no per-packet scapy).

`parse` is the fast path's only way to read a frame. It never raises on hostile input: every frame gets a
verdict, and only `OK` frames are forwarded. A frame is `OK` when it is an untagged IPv4 frame, not a
fragment, with a consistent header length and total length inside the frame, carrying a TCP header whose
data offset fits the IP payload, and addressed to the VIP. IP options are allowed (the header length says
where TCP begins). Checksums are left to the server's kernel, which verifies them anyway.

Forwarding:
- `l2dsr`: the frame keeps its IP packet; only the Ethernet addresses change (`rewrite_macs`, in place).
- `gre`: the IP packet is wrapped in an outer IPv4 header (protocol 47) plus a 4-byte GRE header
  (RFC 2784, no checksum, no key, protocol type 0x0800) to the server (`GreEncapsulator`).
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = [
    "Verdict",
    "VERDICT_NAMES",
    "parse",
    "rewrite_macs",
    "GreEncapsulator",
    "decapsulate",
    "mac_bytes",
    "ETH_HEADER",
    "GRE_HEADER_LEN",
    "TCP_FIN",
    "TCP_SYN",
    "TCP_RST",
    "TCP_ACK",
]

ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
IPPROTO_TCP = 6
IPPROTO_GRE = 47
GRE_HEADER_LEN = 4
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class Verdict:
    """Why a frame was accepted or dropped; the fast path keeps one counter per verdict."""

    OK = 0
    TRUNCATED = 1  # shorter than the headers or the lengths it claims
    NOT_IPV4 = 2  # another ethertype (ARP, IPv6, VLAN-tagged, …)
    BAD_IP_HEADER = 3  # version ≠ 4, header length < 20, total length < header length
    FRAGMENT = 4  # MF flag or a non-zero fragment offset
    NOT_TCP = 5
    BAD_TCP_HEADER = 6  # data offset < 5 or beyond the IP payload
    NOT_VIP = 7  # destination is not the VIP


VERDICT_NAMES = ("ok", "truncated", "not_ipv4", "bad_ip_header", "fragment", "not_tcp", "bad_tcp_header", "not_vip")

_ETHERTYPE = struct.Struct("!H")
_IP_FIXED = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total len, id, flags/frag, ttl, proto, csum, src, dst
_TCP_FLAGS = struct.Struct("!HH8xBB")  # sport, dport, (seq, ack), data offset, flags


def parse(frame: memoryview, length: int, vip: bytes) -> tuple[int, bytes, int, int]:
    """(verdict, flow key, TCP flags, IP packet length) of the first `length` bytes of `frame`.

    The flow key is the 12 bytes src IP, dst IP, src port, dst port (the protocol is always TCP), so it is
    the full 5-tuple. For a non-OK verdict the other fields are empty/zero.
    """
    if length < ETH_HEADER + 20:
        return Verdict.TRUNCATED if length < ETH_HEADER or _is_ipv4(frame) else Verdict.NOT_IPV4, b"", 0, 0
    if not _is_ipv4(frame):
        return Verdict.NOT_IPV4, b"", 0, 0
    ver_ihl, _, total, _, frag, _, proto, _, _, dst = _IP_FIXED.unpack_from(frame, ETH_HEADER)
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20 or total < ihl:
        return Verdict.BAD_IP_HEADER, b"", 0, 0
    if ETH_HEADER + total > length:
        return Verdict.TRUNCATED, b"", 0, 0
    if frag & 0x3FFF:
        return Verdict.FRAGMENT, b"", 0, 0
    if proto != IPPROTO_TCP:
        return Verdict.NOT_TCP, b"", 0, 0
    if dst != vip:
        return Verdict.NOT_VIP, b"", 0, 0
    l4 = ETH_HEADER + ihl
    if total < ihl + 20:
        return Verdict.TRUNCATED, b"", 0, 0
    _, _, offset, flags = _TCP_FLAGS.unpack_from(frame, l4)
    if offset >> 4 < 5 or ihl + (offset >> 4) * 4 > total:
        return Verdict.BAD_TCP_HEADER, b"", 0, 0
    key = bytes(frame[ETH_HEADER + 12 : ETH_HEADER + 20]) + bytes(frame[l4 : l4 + 4])
    return Verdict.OK, key, flags, total


def _is_ipv4(frame: memoryview) -> bool:
    return len(frame) >= ETH_HEADER and _ETHERTYPE.unpack_from(frame, 12)[0] == ETHERTYPE_IPV4


def rewrite_macs(frame: memoryview, dst_mac: bytes, src_mac: bytes) -> None:
    """Set the frame's destination and source MAC in place (L2 direct server return)."""
    frame[0:6] = dst_mac
    frame[6:12] = src_mac


def mac_bytes(mac: str) -> bytes:
    """'02:4d:…' → 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


class GreEncapsulator:
    """Builds GRE/IPv4 frames from one LB to one server; the outer header is a template, patched per packet.

    Only the total length and the header checksum change between packets, so the checksum is the
    template's one's-complement sum (taken with length 0) plus the length, folded — no per-packet loop.
    """

    TTL = 64

    def __init__(self, src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str) -> None:
        self._eth = dst_mac + src_mac + _ETHERTYPE.pack(ETHERTYPE_IPV4)
        self._src = ipaddress.IPv4Address(src_ip).packed
        self._dst = ipaddress.IPv4Address(dst_ip).packed
        template = _IP_FIXED.pack(0x45, 0, 0, 0, 0x4000, self.TTL, IPPROTO_GRE, 0, self._src, self._dst)
        self._partial_sum = sum(struct.unpack("!10H", template))
        self._gre = struct.pack("!HH", 0, ETHERTYPE_IPV4)

    def encapsulate(self, frame: memoryview, ip_length: int) -> bytes:
        """The GRE frame carrying the IP packet that starts at byte 14 of `frame` and is `ip_length` long."""
        total = 20 + GRE_HEADER_LEN + ip_length
        checksum = self._partial_sum + total
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        outer = _IP_FIXED.pack(
            0x45, 0, total, 0, 0x4000, self.TTL, IPPROTO_GRE, ~checksum & 0xFFFF, self._src, self._dst
        )
        return b"".join((self._eth, outer, self._gre, frame[ETH_HEADER : ETH_HEADER + ip_length]))


def decapsulate(packet: bytes | memoryview) -> memoryview | None:
    """The inner IPv4 packet of a GRE/IPv4 packet as a raw IP socket delivers it (outer IP header first).

    None for anything we do not terminate: not GRE, GRE with checksum/key/sequence bits or a version, an
    inner protocol other than IPv4, or lengths that do not add up.
    """
    view = memoryview(packet)
    if len(view) < 20 + GRE_HEADER_LEN or view[0] >> 4 != 4 or view[9] != IPPROTO_GRE:
        return None
    ihl = (view[0] & 0x0F) * 4
    if ihl < 20 or len(view) < ihl + GRE_HEADER_LEN + 20:
        return None
    flags_version, proto = struct.unpack_from("!HH", view, ihl)
    if flags_version != 0 or proto != ETHERTYPE_IPV4:
        return None
    inner = view[ihl + GRE_HEADER_LEN :]
    if inner[0] >> 4 != 4:
        return None
    inner_total = struct.unpack_from("!H", inner, 2)[0]
    if inner_total < 20 or inner_total > len(inner):
        return None
    return inner[:inner_total]
