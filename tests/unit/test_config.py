"""Config loading: valid files resolve defaults; every kind of bad input is one line, naming file and field, exit 2."""

from __future__ import annotations

import ipaddress

import pytest

from marllb_cli.config import load_config
from marllb_cli.errors import ConfigError
from tests.conftest import REPO, minimal_testbed

SSH_HOST = {"role": "client", "address": "10.96.0.2", "data_ip": "10.99.1.2/24"}


def test_minimal_config_fills_defaults(write_config):
    config = load_config(write_config(minimal_testbed("abc")))
    testbed = config.testbed
    assert testbed.kind == "local"
    assert testbed.lbs == 2
    assert testbed.forwarding == "l2dsr"
    assert testbed.vip == ipaddress.IPv4Address("10.99.255.1")
    assert testbed.servers[0].apache.max_request_workers == 32
    assert testbed.servers[0].apache.listen_backlog == 128
    assert config.experiment.agent_period_ms == 250
    assert testbed.n_servers == 2


@pytest.mark.parametrize("name", ["local-small.yaml", "local-moderate.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    cores = sum(g.count * g.cpus * config.testbed.cpu_unit for g in config.testbed.servers)
    # Servers must leave room on a 2-core machine for the client, router and LB dataplanes.
    assert 1.0 <= cores <= 1.6


def test_moderate_config_matches_the_paper_testbed():
    testbed = load_config(REPO / "configs" / "local-moderate.yaml").testbed
    assert [(g.count, g.cpus) for g in testbed.servers] == [(4, 2), (3, 4)]
    assert testbed.lbs == 2


def test_overrides_apply_before_validation(write_config):
    config = load_config(write_config(minimal_testbed("abc")), ["testbed.name=other", "testbed.servers.1.cpus=4"])
    assert config.testbed.name == "other"
    assert config.testbed.servers[1].cpus == 4


def test_resolved_yaml_round_trips(write_config, tmp_path):
    config = load_config(write_config(minimal_testbed("abc", lbs=3)))
    again = load_config(write_config(config.resolved_yaml(), name="resolved.yaml"))
    assert again.model_dump() == config.model_dump()


# (case id, file content, text the one-line error must contain)
BAD = [
    ("unknown-key", minimal_testbed(colour="red"), "testbed.colour: unknown key 'colour'"),
    (
        "misspelt-key",
        {"testbed": {"name": "a", "servers": [{"name": "s", "count": 1, "cpu": 1}]}},
        "did you mean 'cpus'",
    ),
    ("wrong-type", minimal_testbed(lbs="two"), "testbed.lbs"),
    ("negative-cpus", {"testbed": {"name": "a", "servers": [{"name": "s", "count": 1, "cpus": -1}]}}, "cpus"),
    ("zero-count", {"testbed": {"name": "a", "servers": [{"name": "s", "count": 0, "cpus": 1}]}}, "count"),
    (
        "duplicate-group-names",
        {
            "testbed": {
                "name": "a",
                "servers": [{"name": "s", "count": 1, "cpus": 1}, {"name": "s", "count": 1, "cpus": 2}],
            }
        },
        "duplicate server group name 's'",
    ),
    ("vip-in-server-subnet", minimal_testbed(vip="10.99.0.50"), "lies inside network.data_subnet"),
    ("vip-in-client-subnet", minimal_testbed(vip="10.99.1.9"), "lies inside network.client_subnet"),
    ("bad-ip", minimal_testbed(vip="10.99.300.1"), "testbed.vip"),
    ("overlapping-subnets", minimal_testbed(network={"client_subnet": "10.99.0.128/25"}), "overlaps"),
    ("bad-forwarding", minimal_testbed(forwarding="nat"), "testbed.forwarding"),
    ("unsupported-kind", minimal_testbed(kind="cloud"), "testbed.kind"),
    ("ssh-without-hosts", minimal_testbed(kind="ssh"), "kind ssh needs 1 host(s) with role client"),
    ("hosts-on-local", minimal_testbed(hosts=[SSH_HOST]), "hosts are for kind: ssh"),
    ("kvm-mgmt-overlap", minimal_testbed(kind="kvm", kvm={"mgmt_subnet": "10.99.0.0/25"}), "kvm.mgmt_subnet"),
    ("kvm-bad-accel", minimal_testbed(kind="kvm", kvm={"accel": "xen"}), "testbed.kvm.accel"),
    (
        "shell-in-an-ssh-field",
        minimal_testbed(kind="ssh", hosts=[{**SSH_HOST, "data_iface": "eth0; rm -rf /"}]),
        "testbed.hosts[0].data_iface",
    ),
    ("bad-name", minimal_testbed(name="Bad_Name"), "testbed.name"),
    ("missing-servers", {"testbed": {"name": "a"}}, "testbed.servers: required field is missing"),
    ("missing-testbed", {"experiment": {"seed": 1}}, "testbed: required field is missing"),
    ("quota-below-minimum", minimal_testbed(cpu_unit=0.01), "below the kernel's 1000 µs minimum"),
    ("subnet-too-small", minimal_testbed(network={"data_subnet": "10.99.0.0/26"}), "no room for 2 servers"),
    (
        "start-above-max",
        minimal_testbed(servers=[{"name": "s", "count": 1, "cpus": 1, "apache": {"start_servers": 64}}]),
        "start_servers",
    ),
    ("bad-yaml-syntax", "testbed:\n  name: [a\n  lbs: 2\n", "YAML syntax error"),
    ("not-a-mapping", "- just\n- a list\n", "expected a mapping"),
    ("empty-file", "", "expected a mapping"),
]


@pytest.mark.parametrize(("content", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_config_is_one_line_and_exit_2(write_config, cli, content, expected):
    path = write_config(content)
    result = cli("status", path)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    assert expected in message
    assert "Traceback" not in result.output


def test_error_names_the_line_of_the_bad_field(write_config):
    path = write_config("testbed:\n  name: a\n  servers:\n    - name: s\n      count: 1\n      cpus: -2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == 2
    assert caught.value.one_line().startswith(f"{path}:6: testbed.servers[0].cpus:")


def test_missing_file_is_exit_2(cli, tmp_path):
    result = cli("deploy", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in result.stderr


def test_bad_override_is_exit_2(write_config, cli):
    result = cli("status", write_config(minimal_testbed()), "--set", "testbed.lbs")
    assert result.exit_code == 2
    assert "expected KEY=VALUE" in result.stderr


def test_a_bad_value_from_set_is_located_at_the_set_not_at_a_line_of_the_file(write_config):
    """Reliability review (S05/S06): a value given with --set was reported at `file:1`, a line that never
    held it."""
    config = write_config(minimal_testbed("unitset"))
    with pytest.raises(ConfigError) as error:
        load_config(config, ["testbed.cpu_unit=.nan"])
    assert error.value.message == f"{config}: --set testbed.cpu_unit: Input should be a finite number"
    with pytest.raises(ConfigError, match=r": --set testbed\.servers\.1: testbed\.servers\[1\]\.cpus: "):
        load_config(config, ["testbed.servers.1={name: x, count: 1, cpus: -1}"])
    with pytest.raises(ConfigError, match=r"config\.yaml:\d+: testbed\.servers\[0\]\.cpus: "):
        load_config(write_config(minimal_testbed("unitset", servers=[{"name": "s", "count": 1, "cpus": -1}])))
