"""What makes a host the client, router, an LB or a server of a testbed, written once for both kinds:
a namespace of the local testbed (`LocalNamespace`) and a real host running `marllb node up` (`LocalHost`).

    client   a /32 route to the VIP via the router (`kind: ssh`, where the client's own routes are the user's)
    router   the VIP routed over every LB, hashed per flow on the 5-tuple (ECMP), forwarding on
    lb       its kernel never routes nor answers VIP packets (the dataplane relays them); no GRO on the data
             interface, so the dataplane never sees a frame larger than the MTU
    server   holds the VIP on `lo` without answering ARP for it; a full accept queue resets (a failed request);
             with `forwarding: gre` on a kernel that has `ip_gre` (a real host, a KVM guest), a GRE tunnel
             `mlbgre` that takes packets from the LBs only (nftables drops other sources); the local testbed
             terminates GRE in user space instead

On a real host every change is recorded in the node's manifest *before* it is made, with what was there
before (a sysctl's old value, a feature's old state), so `marllb node down` puts the host back as it found
it. In a local namespace nothing needs recording: deleting the namespace undoes it all.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost, sysctl_path
from marllb_cli.topology import Node, Topology

__all__ = [
    "missing_changes",
    "GRE_DEVICE",
    "OFFLOADS_OFF",
    "apply_role",
    "nft_table",
    "role_sysctls",
    "route_replace",
    "undo_network",
]

#: A raw-socket LB re-sends frames the kernel handed it. With checksum offload the sender's veth leaves
#: TCP checksums unfinished (the server then drops the segment), and with TSO/GSO/GRO one frame can exceed
#: the MTU; so every veth of the local testbed gets these features off (real NICs finish checksums on the
#: wire, so on a real host only the LB's GRO goes off).
OFFLOADS_OFF = ("tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off")


def nft_table(testbed: str) -> str:
    """The LB's nftables table: one per testbed, so testbeds sharing a host never touch each other's."""
    return "marllb_" + "".join(c if c.isalnum() else "_" for c in testbed)


def role_sysctls(node: Node) -> list[tuple[str, int]]:
    """Per-role kernel settings (each namespace has its own copy of these)."""
    iface = node.interfaces[0].name
    if node.role == "router":
        return [
            ("net.ipv4.ip_forward", 1),
            # Hash on the 5-tuple, so each flow sticks to one LB and flows spread over all LBs (ECMP).
            ("net.ipv4.fib_multipath_hash_policy", 1),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.conf.all.send_redirects", 0),
        ]
    if node.role == "server":
        return [
            # Hold the VIP on lo without answering ARP for it: only LBs may attract VIP traffic.
            ("net.ipv4.conf.all.arp_ignore", 1),
            ("net.ipv4.conf.all.arp_announce", 2),
            (f"net/ipv4/conf/{iface}/arp_ignore", 1),  # slashed: an interface name may hold a dot (VLAN)
            (f"net/ipv4/conf/{iface}/arp_announce", 2),
            # GRE packets arrive on the tunnel while the client is routed via the data interface.
            ("net.ipv4.conf.all.rp_filter", 0),
            (f"net/ipv4/conf/{iface}/rp_filter", 0),
            # A full accept queue resets the connection (a failed request), as on the papers' servers.
            ("net.ipv4.tcp_abort_on_overflow", 1),
            ("net.core.somaxconn", 4096),
        ]
    if node.role == "lb":
        # The LB only relays VIP traffic through its dataplane; its kernel never routes it.
        return [("net.ipv4.ip_forward", 0)]
    return []


GRE_DEVICE = "mlbgre"


def apply_role(
    host: LocalHost, topology: Topology, node: Node, manifest: Manifest | None = None, *, kernel_gre: bool = False
) -> None:
    """Make `host` play `node`'s part; record every change in `manifest` first (None: nothing to undo).
    `kernel_gre`: the testbed forwards with GRE and the kernels terminate it (real hosts, KVM guests)."""
    vip = str(topology.vip)
    if node.role == "router":
        gateways = [str(lb.ip) for lb in topology.lbs]
        _record(manifest, "route", f"{vip}/32", dst=f"{vip}/32")
        host.call(route_replace, f"{vip}/32", gateways)
    elif node.role == "client" and node.gateway:
        _record(manifest, "route", f"{vip}/32", dst=f"{vip}/32")
        # With GRE, an LB adds 24 bytes to every packet: the route's MTU (the client's, 1476 by default)
        # makes TCP to the VIP use segments that still fit the data segment once encapsulated.
        mtu = node.interfaces[0].mtu if kernel_gre else None
        host.call(route_replace, f"{vip}/32", [node.gateway], mtu)
    elif node.role == "server":
        _record(manifest, "address", f"{vip}/32", iface="lo", address=vip, prefixlen=32)
        host.call(_address_add, "lo", vip, 32)
        if kernel_gre:
            host.run(["modprobe", "ip_gre"])
            _record(manifest, "link", GRE_DEVICE, ifname=GRE_DEVICE)
            host.call(_gre_add, GRE_DEVICE, str(node.ip))
            table = nft_table(topology.testbed)
            _record(manifest, "nft", table, table=table)
            _gre_only_from_lbs(host, table, [str(lb.ip) for lb in topology.lbs], vip)
    sysctls = role_sysctls(node)
    if node.role == "server" and kernel_gre:  # decapsulated packets arrive on the tunnel: no reverse-path check
        sysctls.append((f"net.ipv4.conf.{GRE_DEVICE}.rp_filter", 0))
    for key, value in sysctls:
        if manifest is not None:
            _record(manifest, "sysctl", key, key=key, value=host.call(_sysctl_read, key))
        host.sysctl(key, value)
    if node.role == "lb":
        table = nft_table(topology.testbed)
        _record(manifest, "nft", table, table=table)
        _kernel_ignores_vip(host, table, vip)
        if manifest is not None:
            iface = node.interfaces[0].name
            was_on = "generic-receive-offload: on" in host.run(["ethtool", "-k", iface]).stdout
            _record(manifest, "offloads", iface, iface=iface, restore=["gro", "on"] if was_on else [])
            host.run(["ethtool", "-K", iface, "gro", "off"], check=False)


def undo_network(host: LocalHost, kind: str, data: dict) -> None:
    """Undo one change `apply_role` recorded (absent already is fine)."""
    if kind == "route":
        host.call(_route_del, data["dst"])
    elif kind == "address":
        host.call(_address_del, data["iface"], data["address"], data["prefixlen"])
    elif kind == "sysctl":
        host.sysctl(data["key"], data["value"])
    elif kind == "nft":
        host.run(["nft", "delete", "table", "ip", data["table"]], check=False)
    elif kind == "link":
        host.call(_link_del, data["ifname"])
    elif kind == "offloads" and data["restore"]:
        host.run(["ethtool", "-K", data["iface"], *data["restore"]], check=False)


def missing_changes(host: LocalHost, node: Node, manifest: Manifest) -> list[str]:
    """What of the role `apply_role` gave this host is no longer in effect (a reboot forgets routes,
    addresses, nftables and sysctls, while the record on disk still says `complete`): one line each."""
    expected = dict(role_sysctls(node))
    missing = []
    for resource in manifest.resources:
        data = resource.data
        if resource.kind == "route" and not host.run(["ip", "-4", "route", "show", data["dst"]], check=False).stdout:
            missing.append(f"route {data['dst']}")
        elif resource.kind == "address":
            shown = host.run(["ip", "-4", "addr", "show", "dev", data["iface"]], check=False).stdout
            if f" {data['address']}/" not in shown:
                missing.append(f"address {data['address']} on {data['iface']}")
        elif resource.kind == "nft" and host.run(["nft", "list", "table", "ip", data["table"]], check=False).returncode:
            missing.append(f"nftables table {data['table']}")
        elif resource.kind == "sysctl" and data["key"] in expected:
            if host.call(_sysctl_read, data["key"]).split() != [str(expected[data["key"]])]:
                missing.append(f"sysctl {data['key']}")
    return missing


def _record(manifest: Manifest | None, kind: str, name: str, **data: object) -> None:
    if manifest is not None:
        manifest.record(kind, name, **data)  # type: ignore[arg-type]


def _kernel_ignores_vip(host: LocalHost, table: str, vip: str) -> None:
    """The LB's own kernel must never answer or reset a VIP connection: drop VIP packets at prerouting.

    Priority -300 runs before connection tracking. The dataplane's packet socket still gets every frame,
    since packet taps see frames before netfilter does.
    """
    ruleset = (
        f"table ip {table} {{\n"
        "  chain vip {\n"
        "    type filter hook prerouting priority -300; policy accept;\n"
        f"    ip daddr {vip} counter drop\n"
        "  }\n"
        "}\n"
    )
    host.run(["nft", "-f", "-"], input=ruleset)


def _gre_only_from_lbs(host: LocalHost, table: str, lbs: list[str], vip: str) -> None:
    """A server's tunnel takes any remote and its reverse-path check is off, so without this any host on the
    data network could inject packets into it. Accept GRE only from the testbed's LBs, and from the tunnel
    only packets for the VIP; count what is dropped (`nft list table ip <table>`)."""
    ruleset = (
        f"table ip {table} {{\n"
        "  chain gre {\n"
        "    type filter hook prerouting priority -300; policy accept;\n"
        f"    ip protocol 47 ip saddr != {{ {', '.join(lbs)} }} counter drop\n"  # 47: GRE (no /etc/protocols needed)
        f'    iifname "{GRE_DEVICE}" ip daddr != {vip} counter drop\n'
        "  }\n"
        "}\n"
    )
    host.run(["nft", "-f", "-"], input=ruleset)


# -- pyroute2, run through `host.call` so that they act in the node's namespace ------------------------------
def route_replace(dst: str, gateways: list[str], mtu: int | None = None) -> None:
    with IPRoute() as ipr:
        if len(gateways) == 1:
            metrics = {"metrics": {"mtu": mtu}} if mtu else {}
            ipr.route("replace", dst=dst, gateway=gateways[0], **metrics)
        else:
            ipr.route("replace", dst=dst, multipath=[{"gateway": gateway} for gateway in gateways])


def _route_del(dst: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=dst)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone
                raise


def _address_add(iface: str, address: str, prefixlen: int) -> None:
    with IPRoute() as ipr:
        index = _link(ipr, iface)
        if not ipr.get_addr(index=index, address=address):
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def _address_del(iface: str, address: str, prefixlen: int) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=iface)
        if found and ipr.get_addr(index=found[0], address=address):
            ipr.addr("del", index=found[0], address=address, prefixlen=prefixlen)


def _gre_add(ifname: str, local: str) -> None:
    """A keyless GRE tunnel bound to our address and open to any remote: every LB can send through it."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=ifname):
            ipr.link("add", ifname=ifname, kind="gre", gre_local=local)
        ipr.link("set", index=_link(ipr, ifname), state="up")


def _link_del(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


def _link(ipr: IPRoute, iface: str) -> int:
    found = ipr.link_lookup(ifname=iface)
    if not found:
        raise TestbedError(f"interface {iface} does not exist")
    return found[0]


def _sysctl_read(key: str) -> str:
    return sysctl_path(key).read_text().strip()
