"""Config → concrete testbed: node names, namespaces, interfaces, addresses, MACs and CPU capacities.

Pure: nothing here touches the kernel, so the plan is unit-tested without root. The local testbed is::

    client ──(veth)── router ══ switch (bridge br0) ══ lb0 … lb{m-1}, srv0 … srv{n-1}
     eth0          eth1    eth0

Naming and addressing scheme (stable when counts change):
- namespaces: `<testbed>-client`, `<testbed>-router`, `<testbed>-lb<i>`, `<testbed>-srv<j>`, and the
  switch `<testbed>-sw` that holds the bridge; every node's data interface is `eth0`.
- data subnet: router host .1, LB i host .(11+i), server j host .(101+j); client subnet: router .1, client .2.
- MACs: `02:4d:<testbed hash>:<role code>:<index high>:<index low>` (locally administered, unique per testbed).
- server j belongs to the groups in config order; its capacity is `cpus × cpu_unit` cores.
"""

from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass
from typing import Literal

from marllb_cli.config import LB_HOST_BASE, ROUTER_HOST, SERVER_HOST_BASE, Testbed

__all__ = ["Interface", "Node", "Role", "Topology", "host_node_names", "plan"]

Role = Literal["client", "router", "lb", "server"]
_ROLE_CODE = {"client": 1, "router": 2, "lb": 3, "server": 4}
_ROUTER_CLIENT_LEG_CODE = 5
#: GRE adds a 20-byte outer IPv4 header and a 4-byte GRE header.
GRE_OVERHEAD = 24


@dataclass(frozen=True)
class Interface:
    """One interface of a node: its name inside the node, address and MAC, and the segment it sits on."""

    name: str
    ip: ipaddress.IPv4Interface
    mac: str
    segment: Literal["data", "client"]
    mtu: int = 1500


@dataclass(frozen=True)
class Node:
    """A host of the testbed; `ip` is its address on its main segment (data, or client for the client)."""

    name: str
    role: Role
    index: int
    namespace: str
    interfaces: tuple[Interface, ...]
    group: str | None = None
    cpus: float | None = None
    cores: float | None = None
    gateway: str | None = None  # kind ssh, client: where it routes the VIP (the router's address)

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.interfaces[0].ip.ip

    @property
    def mac(self) -> str:
        return self.interfaces[0].mac


@dataclass(frozen=True)
class Topology:
    """The whole plan of one testbed."""

    testbed: str
    vip: ipaddress.IPv4Address
    forwarding: str
    switch_namespace: str
    bridge: str
    client: Node
    router: Node
    lbs: tuple[Node, ...]
    servers: tuple[Node, ...]

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node, in bring-up order."""
        return (self.client, self.router, *self.lbs, *self.servers)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the testbed, switch first."""
        return (self.switch_namespace, *(node.namespace for node in self.nodes))

    @property
    def data_nodes(self) -> tuple[Node, ...]:
        """Nodes attached to the bridge: router, LBs and servers."""
        return (self.router, *self.lbs, *self.servers)

    def node(self, name: str) -> Node:
        """The node called `name` (`client`, `router`, `lb0`, `srv3`, ...)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def mac_address(testbed: str, role_code: int, index: int) -> str:
    """Deterministic, locally administered MAC for one interface of one testbed."""
    tb = zlib.crc32(testbed.encode()) & 0xFF
    return f"02:4d:{tb:02x}:{role_code:02x}:{index >> 8:02x}:{index & 0xFF:02x}"


def plan(testbed: Testbed, macs: dict[str, str] | None = None) -> Topology:
    """Turn a validated `Testbed` into names, addresses, MACs and capacities.

    `kind: ssh` nodes are the listed hosts, in their own namespaces (none named); their MACs are not in the
    config but learnt at deploy (`macs`: node name → MAC of its data interface)."""
    if testbed.kind == "ssh":
        return _plan_hosts(testbed, macs or {})
    name = testbed.name
    data = testbed.network.data_subnet
    client_net = testbed.network.client_subnet

    def data_iface(host: int, role: Role, index: int) -> Interface:
        ip = ipaddress.IPv4Interface((data.network_address + host, data.prefixlen))
        return Interface("eth0", ip, mac_address(name, _ROLE_CODE[role], index), "data")

    client_hosts = list(client_net.hosts())
    client_mtu = testbed.client.mtu or (1500 - GRE_OVERHEAD if testbed.forwarding == "gre" else 1500)
    client = Node(
        "client",
        "client",
        0,
        f"{name}-client",
        (
            Interface(
                "eth0",
                ipaddress.IPv4Interface((client_hosts[1], client_net.prefixlen)),
                mac_address(name, _ROLE_CODE["client"], 0),
                "client",
                client_mtu,
            ),
        ),
    )
    router = Node(
        "router",
        "router",
        0,
        f"{name}-router",
        (
            data_iface(ROUTER_HOST, "router", 0),
            Interface(
                "eth1",
                ipaddress.IPv4Interface((client_hosts[0], client_net.prefixlen)),
                mac_address(name, _ROUTER_CLIENT_LEG_CODE, 0),
                "client",
                client_mtu,
            ),
        ),
    )
    lbs = tuple(
        Node(f"lb{i}", "lb", i, f"{name}-lb{i}", (data_iface(LB_HOST_BASE + i, "lb", i),)) for i in range(testbed.lbs)
    )
    servers: list[Node] = []
    for group in testbed.servers:
        for _ in range(group.count):
            j = len(servers)
            servers.append(
                Node(
                    f"srv{j}",
                    "server",
                    j,
                    f"{name}-srv{j}",
                    (data_iface(SERVER_HOST_BASE + j, "server", j),),
                    group=group.name,
                    cpus=group.cpus,
                    cores=group.cpus * testbed.cpu_unit,
                )
            )
    return Topology(
        testbed=name,
        vip=testbed.vip,
        forwarding=testbed.forwarding,
        switch_namespace=f"{name}-sw",
        bridge="br0",
        client=client,
        router=router,
        lbs=lbs,
        servers=tuple(servers),
    )


def host_node_names(testbed: Testbed) -> list[str]:
    """The node name of each of a `kind: ssh` testbed's hosts, in the order listed (lb0, srv0, ...)."""
    seen = {"client": 0, "router": 0, "lb": 0, "server": 0}
    names = []
    for host in testbed.hosts:
        index = seen[host.role]
        seen[host.role] += 1
        names.append({"client": "client", "router": "router", "lb": f"lb{index}", "server": f"srv{index}"}[host.role])
    return names


def _plan_hosts(testbed: Testbed, macs: dict[str, str]) -> Topology:
    nodes: dict[str, list[Node]] = {"client": [], "router": [], "lb": [], "server": []}
    groups = [group for group in testbed.servers for _ in range(group.count)]
    for host, name in zip(testbed.hosts, host_node_names(testbed), strict=True):
        index = len(nodes[host.role])
        group = groups[index] if host.role == "server" else None
        iface = Interface(
            host.data_iface, host.data_ip, macs.get(name, ""), "client" if host.role == "client" else "data"
        )
        nodes[host.role].append(
            Node(
                name,
                host.role,
                index,
                "",
                (iface,),
                group=group.name if group else None,
                cpus=group.cpus if group else None,
                cores=group.cpus * testbed.cpu_unit if group else None,
                gateway=str(host.gateway) if host.gateway else None,
            )
        )
    return Topology(
        testbed=testbed.name,
        vip=testbed.vip,
        forwarding=testbed.forwarding,
        switch_namespace="",
        bridge="",
        client=nodes["client"][0],
        router=nodes["router"][0],
        lbs=tuple(nodes["lb"]),
        servers=tuple(nodes["server"]),
    )
