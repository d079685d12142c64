"""The topology plan: names, addresses, MACs and capacities derived from a config, without root."""

from __future__ import annotations

import ipaddress

from marllb_cli.config import load_config
from marllb_cli.topology import plan
from tests.conftest import REPO, minimal_testbed


def test_small_testbed_plan():
    topology = plan(load_config(REPO / "configs" / "local-small.yaml").testbed)
    assert [n.name for n in topology.nodes] == ["client", "router", "lb0", "lb1", "srv0", "srv1", "srv2", "srv3"]
    assert topology.namespaces[0] == "small-sw"
    assert all(ns.startswith("small-") for ns in topology.namespaces)
    assert [str(lb.ip) for lb in topology.lbs] == ["10.99.0.11", "10.99.0.12"]
    assert [str(s.ip) for s in topology.servers] == ["10.99.0.101", "10.99.0.102", "10.99.0.103", "10.99.0.104"]
    assert [s.group for s in topology.servers] == ["slow", "slow", "fast", "fast"]
    assert [s.cores for s in topology.servers] == [0.25, 0.25, 0.5, 0.5]
    assert str(topology.router.ip) == "10.99.0.1"
    assert str(topology.router.interfaces[1].ip) == "10.99.1.1/24"
    assert str(topology.client.ip) == "10.99.1.2"
    assert topology.node("srv2").index == 2


def test_moderate_capacities_are_proportional_to_cpus():
    topology = plan(load_config(REPO / "configs" / "local-moderate.yaml").testbed)
    cores = [s.cores for s in topology.servers]
    assert len(cores) == 7
    assert cores[4] / cores[0] == 2.0
    assert abs(sum(cores) - 1.5) < 1e-9


def test_macs_unique_locally_administered_and_testbed_specific(write_config):
    a = plan(load_config(write_config(minimal_testbed("aaa", lbs=4))).testbed)
    b = plan(load_config(write_config(minimal_testbed("bbb", lbs=4), name="b.yaml")).testbed)
    macs = [iface.mac for node in a.nodes for iface in node.interfaces]
    assert len(set(macs)) == len(macs)
    assert all(int(mac.split(":")[0], 16) & 0b10 for mac in macs)  # locally administered bit
    assert set(macs).isdisjoint(iface.mac for node in b.nodes for iface in node.interfaces)


def test_addresses_stay_on_their_subnets_and_are_unique(write_config):
    config = load_config(write_config(minimal_testbed("abc", lbs=5, network={"data_subnet": "172.20.0.0/16"})))
    topology = plan(config.testbed)
    data = ipaddress.IPv4Network("172.20.0.0/16")
    ips = [node.ip for node in topology.data_nodes]
    assert all(ip in data for ip in ips)
    assert len(set(ips)) == len(ips)
    assert topology.vip not in data


def test_gre_mode_lowers_client_mtu_by_the_encapsulation(write_config):
    topology = plan(load_config(write_config(minimal_testbed("abc", forwarding="gre"))).testbed)
    assert topology.client.interfaces[0].mtu == 1476
    assert (
        plan(load_config(write_config(minimal_testbed("abc"), name="b.yaml")).testbed).client.interfaces[0].mtu == 1500
    )


def test_sysctl_keys_of_an_interface_with_a_dot_reach_its_own_directory():
    """Reliability review §1.2: `eth0.100` (a VLAN) made `net.ipv4.conf.eth0.100.arp_ignore`, a path that
    does not exist; interface keys are slashed, as sysctl(8) also accepts."""
    from pathlib import Path

    from marllb_cli.deploy.node.roles import role_sysctls
    from marllb_cli.hosts.local import sysctl_path
    from marllb_cli.topology import Interface, Node

    vlan = Node(
        name="srv0",
        role="server",
        index=0,
        namespace="",
        interfaces=(
            Interface(
                name="eth0.100", ip=ipaddress.IPv4Interface("10.1.0.101/24"), mac="02:00:00:00:00:01", segment="data"
            ),
        ),
    )
    paths = {str(sysctl_path(key)) for key, _ in role_sysctls(vlan)}
    assert "/proc/sys/net/ipv4/conf/eth0.100/arp_ignore" in paths
    assert "/proc/sys/net/ipv4/conf/all/arp_ignore" in paths
    assert sysctl_path("net.ipv4.ip_forward") == Path("/proc/sys/net/ipv4/ip_forward")
