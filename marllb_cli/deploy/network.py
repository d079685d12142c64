"""The local testbed's network, built with pyroute2 inside namespaces that the testbed owns.

Nothing is created in the machine's own namespace: the bridge lives in `<testbed>-sw`, and every veth has
both ends inside testbed namespaces, so deleting the namespaces removes every link. There is no route out.

Packet path (l2dsr): client → router (multipath route for the VIP over the LBs, hashed per flow on the
5-tuple: `fib_multipath_hash_policy=1`) → LB (its dataplane rewrites the destination MAC) → server (holds
the VIP on `lo`, never answers ARP for it) → reply straight to the router → client (direct server return).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyroute2 import NetNS

from marllb_cli.deploy.manifest import Manifest
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.topology import Interface, Node, Topology

__all__ = ["build_network", "OFFLOADS_OFF", "Progress"]

#: A raw-socket LB re-sends frames the kernel handed it. With checksum offload the sender's veth leaves
#: TCP checksums unfinished (the server then drops the segment), and with TSO/GSO/GRO one frame can exceed
#: the MTU; so every veth of the testbed gets these features off.
OFFLOADS_OFF = ("tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off")

#: `progress(stage, done, total)`: how deploy and teardown report their steps (the CLI draws bars).
Progress = Callable[[str, int, int], None]


def build_network(topology: Topology, manifest: Manifest, progress: Progress) -> None:
    """Create namespaces, the bridge, veths, addresses, routes and sysctls of `topology`."""
    namespaces = topology.namespaces
    for done, name in enumerate(namespaces, 1):
        manifest.record("namespace", name)
        LocalNamespace(name).create()
        progress("namespaces", done, len(namespaces))

    with NetNS(topology.switch_namespace) as switch:
        switch.link("add", ifname=topology.bridge, kind="bridge")
        bridge = switch.link_lookup(ifname=topology.bridge)[0]
        switch.link("set", index=bridge, state="up")
        for node in topology.data_nodes:
            # Switch-side port named after the node; the node side appears directly inside its namespace.
            switch.link("add", ifname=node.name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": node.namespace})
            port = switch.link_lookup(ifname=node.name)[0]
            switch.link("set", index=port, master=bridge, state="up")
    with NetNS(topology.router.namespace) as router:
        router.link("add", ifname="eth1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": topology.client.namespace})

    nodes = topology.nodes
    for done, node in enumerate(nodes, 1):
        _configure_node(topology, node)
        progress("addresses, routes, sysctls", done, len(nodes))
    switch_ns = LocalNamespace(topology.switch_namespace)
    for port in (node.name for node in topology.data_nodes):
        _offloads_off(switch_ns, port)
    _plain_switch(switch_ns)


def _plain_switch(ns: LocalNamespace) -> None:
    """Make the bridge a plain layer-2 switch: where the kernel has br_netfilter, bridged IPv4 frames would
    otherwise be validated and filtered like routed ones (a cost per frame, and malformed frames would never
    reach the LBs, unlike on a real switch). The setting is per namespace; absent without br_netfilter."""
    if not ns.call(Path("/proc/sys/net/bridge").exists):
        return
    for table in ("iptables", "ip6tables", "arptables"):
        ns.sysctl(f"net.bridge.bridge-nf-call-{table}", 0)


def _configure_node(topology: Topology, node: Node) -> None:
    ns = LocalNamespace(node.namespace)
    with NetNS(node.namespace) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for iface in node.interfaces:
            _bring_up(ipr, iface)
        if node.role == "client":
            ipr.route("add", dst="0.0.0.0/0", gateway=str(topology.router.interfaces[1].ip.ip))
        elif node.role == "router":
            ipr.route("add", dst=f"{topology.vip}/32", multipath=[{"gateway": str(lb.ip)} for lb in topology.lbs])
        else:
            ipr.route("add", dst="0.0.0.0/0", gateway=str(topology.router.ip))
        if node.role == "server":
            ipr.addr("add", index=lo, address=str(topology.vip), prefixlen=32)
    for iface in node.interfaces:
        _offloads_off(ns, iface.name)
    for key, value in _sysctls(node):
        ns.sysctl(key, value)
    if node.role == "lb":
        _kernel_ignores_vip(ns, str(topology.vip))


def _kernel_ignores_vip(ns: LocalNamespace, vip: str) -> None:
    """The LB's own kernel must never answer or reset a VIP connection: drop VIP packets at prerouting.

    Priority -300 runs before connection tracking. The dataplane's packet socket still gets every frame,
    since packet taps see frames before netfilter does.
    """
    ruleset = (
        "table ip marllb {\n"
        "  chain vip {\n"
        "    type filter hook prerouting priority -300; policy accept;\n"
        f"    ip daddr {vip} counter drop\n"
        "  }\n"
        "}\n"
    )
    ns.run(["nft", "-f", "-"], input=ruleset)


def _bring_up(ipr: NetNS, iface: Interface) -> None:
    found = ipr.link_lookup(ifname=iface.name)
    if not found:
        raise TestbedError(f"interface {iface.name} missing after creation")
    index = found[0]
    ipr.link("set", index=index, address=iface.mac, mtu=iface.mtu, state="up")
    ipr.addr("add", index=index, address=str(iface.ip.ip), prefixlen=iface.ip.network.prefixlen)


def _sysctls(node: Node) -> list[tuple[str, int]]:
    """Per-role kernel settings (each namespace has its own copy of these)."""
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
            ("net.ipv4.conf.eth0.arp_ignore", 1),
            ("net.ipv4.conf.eth0.arp_announce", 2),
            # GRE packets arrive on the tunnel while the client is routed via eth0: loose reverse path.
            ("net.ipv4.conf.all.rp_filter", 0),
            # A full accept queue resets the connection (a failed request), as on the papers' servers.
            ("net.ipv4.tcp_abort_on_overflow", 1),
            ("net.core.somaxconn", 4096),
        ]
    if node.role == "lb":
        # The LB only relays VIP traffic through its dataplane; its kernel never routes it.
        return [("net.ipv4.ip_forward", 0)]
    return []


def _offloads_off(ns: LocalNamespace, ifname: str) -> None:
    """Switch the offloads off and confirm that transmit checksumming really is off."""
    ns.run(["ethtool", "-K", ifname, *OFFLOADS_OFF], check=False)
    features = ns.run(["ethtool", "-k", ifname]).stdout
    if "tx-checksumming: off" not in features:
        raise TestbedError(f"{ns.name}: could not switch off transmit checksum offload on {ifname}")
