"""Provisioning: turn a topology into running nodes, and remove them again. Public surface below."""

from __future__ import annotations

from typing import TYPE_CHECKING

from marllb_cli.config import Config
from marllb_cli.deploy.local import LocalTestbed, NodeStatus, TestbedStatus

if TYPE_CHECKING:
    from marllb_cli.deploy.kvm import KvmTestbed
    from marllb_cli.deploy.lb_services import LbServices
    from marllb_cli.deploy.ssh import SshLbServices, SshTestbed

__all__ = ["LocalTestbed", "NodeStatus", "TestbedStatus", "testbed_for", "lb_services_for"]


def testbed_for(config: Config, *, accept_new_host_keys: bool = False) -> LocalTestbed | SshTestbed | KvmTestbed:
    """The testbed a config describes: namespaces on this machine, or hosts over SSH."""
    if config.testbed.kind == "ssh":
        from marllb_cli.deploy.ssh import SshTestbed

        return SshTestbed(config, accept_new_host_keys=accept_new_host_keys)
    if config.testbed.kind == "kvm":
        from marllb_cli.deploy.kvm import KvmTestbed

        return KvmTestbed(config)
    return LocalTestbed(config)


def lb_services_for(config: Config) -> LbServices | SshLbServices:
    """The LB processes of the testbed a config describes."""
    if config.testbed.kind == "ssh":
        from marllb_cli.deploy.ssh import SshLbServices, SshTestbed

        return SshLbServices(SshTestbed(config))
    if config.testbed.kind == "kvm":
        from marllb_cli.deploy.kvm import KvmTestbed

        return KvmTestbed(config).lb_services()
    from marllb_cli.deploy.lb_services import LbServices

    return LbServices(LocalTestbed(config))
