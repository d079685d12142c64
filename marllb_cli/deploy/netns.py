"""The local testbed's network, built with pyroute2 inside namespaces that the testbed owns.

Nothing is created in the machine's own namespace: the bridge lives in `<testbed>-sw`, and every veth has
both ends inside testbed namespaces, so deleting the namespaces removes every link. There is no route out.

Packet path (l2dsr): client → router (multipath route for the VIP over the LBs, hashed per flow on the
5-tuple: `fib_multipath_hash_policy=1`) → LB (its dataplane rewrites the destination MAC) → server (holds
the VIP on `lo`, never answers ARP for it) → reply straight to the router → client (direct server return).
"""

from __future__ import annotations

from pathlib import Path

from pyroute2 import NetNS

from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.deploy.node.roles import OFFLOADS_OFF, apply_role
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.progress import Progress
from marllb_cli.topology import Interface, Node, Topology

__all__ = ["build_network"]


def build_network(
    topology: Topology,
    manifest: Manifest,
    progress: Progress,
    *,
    roles: bool = True,
    guests: frozenset[str] = frozenset(),
) -> None:
    """Create namespaces, the bridge, veths, addresses, routes and sysctls of `topology`.

    `roles=False` builds bare machines on a wire (addresses and default routes only): the stand-in for real
    hosts that the `kind: ssh` tests then set up over SSH. Nodes named in `guests` are KVM guests: they get
    no namespace and no veth (their bridge port is the tap their qemu opens; `deploy.kvm`)."""
    machines = [node for node in topology.nodes if node.name not in guests]
    namespaces = [topology.switch_namespace, *(node.namespace for node in machines)]
    for done, name in enumerate(namespaces, 1):
        manifest.record("namespace", name)
        LocalNamespace(name).create()
        progress("namespaces", done, len(namespaces))

    with NetNS(topology.switch_namespace) as switch:
        switch.link("add", ifname=topology.bridge, kind="bridge")
        bridge = switch.link_lookup(ifname=topology.bridge)[0]
        switch.link("set", index=bridge, state="up")
        for node in (node for node in topology.data_nodes if node.name not in guests):
            # Switch-side port named after the node; the node side appears directly inside its namespace.
            switch.link("add", ifname=node.name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": node.namespace})
            port = switch.link_lookup(ifname=node.name)[0]
            switch.link("set", index=port, master=bridge, state="up")
    with NetNS(topology.router.namespace) as router:
        router.link("add", ifname="eth1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": topology.client.namespace})

    for done, node in enumerate(machines, 1):
        _configure_node(topology, node, roles)
        progress("addresses, routes, sysctls", done, len(machines))
    switch_ns = LocalNamespace(topology.switch_namespace)
    for port in (node.name for node in topology.data_nodes if node.name not in guests):
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


def _configure_node(topology: Topology, node: Node, role: bool) -> None:
    """Wire one node (interfaces, addresses, default route), then give it its role (`roles.apply_role`)."""
    ns = LocalNamespace(node.namespace)
    with NetNS(node.namespace) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for iface in node.interfaces:
            _bring_up(ipr, iface)
        gateway = topology.router.interfaces[1].ip.ip if node.role == "client" else topology.router.ip
        if node.role != "router":
            ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway))
    for iface in node.interfaces:
        _offloads_off(ns, iface.name)
    if role:
        apply_role(ns, topology, node)


def _bring_up(ipr: NetNS, iface: Interface) -> None:
    found = ipr.link_lookup(ifname=iface.name)
    if not found:
        raise TestbedError(f"interface {iface.name} missing after creation")
    index = found[0]
    ipr.link("set", index=index, address=iface.mac, mtu=iface.mtu, state="up")
    ipr.addr("add", index=index, address=str(iface.ip.ip), prefixlen=iface.ip.network.prefixlen)


def _offloads_off(ns: LocalNamespace, ifname: str) -> None:
    """Switch the offloads off and confirm that transmit checksumming really is off."""
    ns.run(["ethtool", "-K", ifname, *OFFLOADS_OFF], check=False)
    features = ns.run(["ethtool", "-k", ifname]).stdout
    if "tx-checksumming: off" not in features:
        raise TestbedError(f"{ns.name}: could not switch off transmit checksum offload on {ifname}")
