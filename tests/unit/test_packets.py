"""The frame parser and the GRE encapsulation, on frames crafted and dissected by scapy."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import GRE, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from marllb_cli.dataplane.packets import (
    GreEncapsulator,
    Verdict,
    decapsulate,
    mac_bytes,
    parse,
    rewrite_macs,
)

VIP = "10.99.255.1"
VIP_BYTES = bytes([10, 99, 255, 1])
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def verdict_of(packet) -> tuple[int, bytes, int, int]:
    raw = bytes(packet)
    buffer = bytearray(raw) + bytearray(64)  # the loop's buffer is larger than the frame
    return parse(memoryview(buffer), len(raw), VIP_BYTES)


def test_a_tcp_segment_to_the_vip_yields_its_five_tuple_and_flags():
    packet = ETH / IP(src="10.99.1.2", dst=VIP) / TCP(sport=40000, dport=80, flags="S") / (b"x" * 10)
    verdict, key, flags, ip_length = verdict_of(packet)
    assert verdict == Verdict.OK
    assert key == bytes([10, 99, 1, 2]) + VIP_BYTES + (40000).to_bytes(2, "big") + (80).to_bytes(2, "big")
    assert flags == 0x02
    assert ip_length == 20 + 20 + 10


def test_ip_options_move_the_tcp_header():
    packet = ETH / IP(src="10.99.1.2", dst=VIP, options=[IPOption_RR()]) / TCP(sport=1234, dport=80, flags="FA")
    verdict, key, flags, _ = verdict_of(packet)
    assert verdict == Verdict.OK
    assert key[8:] == (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")
    assert flags == 0x11


def test_ethernet_padding_is_not_part_of_the_ip_packet():
    packet = ETH / IP(src="10.99.1.2", dst=VIP) / TCP(flags="A")
    raw = bytes(packet) + b"\x00" * 6  # what a NIC pads a short frame with
    verdict, _, _, ip_length = parse(memoryview(bytearray(raw)), len(raw), VIP_BYTES)
    assert (verdict, ip_length) == (Verdict.OK, 40)


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (ETH / ARP(pdst=VIP), Verdict.NOT_IPV4),
        (ETH / IPv6() / TCP(), Verdict.NOT_IPV4),
        (ETH / Dot1Q(vlan=5) / IP(dst=VIP) / TCP(), Verdict.NOT_IPV4),
        (ETH / IP(dst="10.99.0.101") / TCP(), Verdict.NOT_VIP),
        (ETH / IP(dst=VIP) / UDP(), Verdict.NOT_TCP),
        (ETH / IP(dst=VIP, flags="MF") / TCP(), Verdict.FRAGMENT),
        (ETH / IP(dst=VIP, frag=100) / TCP(), Verdict.FRAGMENT),
        (ETH / IP(dst=VIP, version=6) / TCP(), Verdict.BAD_IP_HEADER),
        (ETH / IP(dst=VIP, ihl=4) / TCP(), Verdict.BAD_IP_HEADER),
        (ETH / IP(dst=VIP, len=19) / TCP(), Verdict.BAD_IP_HEADER),
        (ETH / IP(dst=VIP, len=400) / TCP(), Verdict.TRUNCATED),
        (ETH / IP(dst=VIP, len=30) / TCP(), Verdict.TRUNCATED),
        (ETH / IP(dst=VIP) / TCP(dataofs=4), Verdict.BAD_TCP_HEADER),
        (ETH / IP(dst=VIP) / TCP(dataofs=15), Verdict.BAD_TCP_HEADER),
    ],
)
def test_hostile_frames_get_a_drop_verdict(packet, expected):
    assert verdict_of(packet)[0] == expected


def test_fragments_of_a_real_packet_are_dropped():
    big = IP(src="10.99.1.2", dst=VIP) / TCP(flags="A") / (b"y" * 3000)
    for piece in fragment(big, fragsize=1000):
        assert verdict_of(ETH / piece)[0] == Verdict.FRAGMENT


def test_no_prefix_of_a_valid_frame_crashes_or_passes_as_ok():
    raw = bytes(ETH / IP(src="10.99.1.2", dst=VIP) / TCP(flags="S") / (b"z" * 20))
    for cut in range(len(raw)):
        verdict = parse(memoryview(bytearray(raw[:cut])), cut, VIP_BYTES)[0]
        assert verdict != Verdict.OK, cut


def test_random_bytes_never_raise():
    rng = random.Random(7)
    template = bytes(ETH / IP(src="10.99.1.2", dst=VIP) / TCP(flags="S"))
    outcomes = set()
    for _ in range(20_000):
        raw = bytearray(template)
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = raw[: rng.randrange(len(raw) + 1)]
        outcomes.add(parse(memoryview(raw), len(raw), VIP_BYTES)[0])
    assert Verdict.OK in outcomes and len(outcomes) >= 5  # the fuzz reached many branches


def test_mac_rewrite_keeps_the_ip_packet():
    packet = ETH / IP(src="10.99.1.2", dst=VIP) / TCP(flags="S")
    frame = bytearray(bytes(packet))
    rewrite_macs(memoryview(frame), mac_bytes("02:4d:aa:04:00:01"), mac_bytes("02:4d:aa:03:00:00"))
    out = Ether(bytes(frame))
    assert (out.dst, out.src) == ("02:4d:aa:04:00:01", "02:4d:aa:03:00:00")
    assert bytes(out[IP]) == bytes(packet[IP])


def test_gre_encapsulation_dissects_with_scapy():
    inner = IP(src="10.99.1.2", dst=VIP, ttl=63) / TCP(sport=40001, dport=80, flags="PA") / (b"GET / HTTP/1.0\r\n\r\n")
    frame = bytearray(bytes(ETH / inner)) + bytearray(100)
    encapsulator = GreEncapsulator(
        mac_bytes("02:4d:aa:03:00:00"), mac_bytes("02:4d:aa:04:00:01"), "10.99.0.11", "10.99.0.101"
    )
    wire = encapsulator.encapsulate(memoryview(frame), len(inner))
    out = Ether(wire)
    assert (out.src, out.dst) == ("02:4d:aa:03:00:00", "02:4d:aa:04:00:01")
    outer = out[IP]
    assert (outer.proto, outer.src, outer.dst, outer.len) == (47, "10.99.0.11", "10.99.0.101", 20 + 4 + len(inner))
    # scapy recomputes the header checksum when told to; it must equal ours
    recomputed = IP(bytes(outer))
    del recomputed.chksum
    assert IP(bytes(recomputed)).chksum == outer.chksum
    assert out[GRE].proto == 0x0800
    assert bytes(out[GRE].payload) == bytes(inner)
    assert decapsulate(bytes(outer)).tobytes() == bytes(inner)


@pytest.mark.parametrize("size", [0, 1, 100, 1436])
def test_gre_checksum_is_right_for_every_length(size):
    inner = IP(src="10.99.1.2", dst=VIP) / TCP(flags="A") / (b"p" * size)
    encapsulator = GreEncapsulator(b"\x02" * 6, b"\x04" * 6, "10.99.0.12", "10.99.0.104")
    outer = Ether(encapsulator.encapsulate(memoryview(bytearray(bytes(ETH / inner))), len(inner)))[IP]
    reference = IP(bytes(outer))
    del reference.chksum
    assert IP(bytes(reference)).chksum == outer.chksum


@pytest.mark.parametrize(
    "packet",
    [
        IP(dst="10.99.0.101") / UDP() / (b"x" * 30),  # not GRE
        IP(dst="10.99.0.101") / GRE(key_present=1, key=5) / IP(dst=VIP) / TCP(),  # keyed GRE
        IP(dst="10.99.0.101") / GRE(proto=0x86DD) / IPv6() / TCP(),  # IPv6 inside
        IP(dst="10.99.0.101", proto=47) / b"\x00\x00",  # cut short
    ],
)
def test_decapsulate_refuses_what_we_do_not_terminate(packet):
    assert decapsulate(bytes(packet)) is None
