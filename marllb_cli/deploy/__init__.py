"""Testbeds: turn a topology into running nodes, and remove them again.

`testbed_for(config)` is the only place that knows the kinds; everything else speaks to the `Testbed`
and `LbControl` protocols of `deploy.base`. The chosen kind is imported when it is asked for, so a local
`marllb status` never imports paramiko, and an absent testbed's status never imports pyroute2.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from marllb_cli.config import Config

if TYPE_CHECKING:
    from marllb_cli.deploy.base import Testbed

__all__ = ["KINDS", "testbed_for"]

#: testbed.kind → the module and class that implement it.
KINDS = {
    "local": ("marllb_cli.deploy.local", "LocalTestbed"),
    "ssh": ("marllb_cli.deploy.ssh", "SshTestbed"),
    "kvm": ("marllb_cli.deploy.kvm", "KvmTestbed"),
}


def testbed_for(config: Config, *, accept_new_host_keys: bool = False) -> Testbed:
    """The testbed a config describes: namespaces on this machine, hosts over SSH, or KVM guests.
    `accept_new_host_keys` (kind ssh): trust and record host keys not yet known."""
    module, name = KINDS[config.testbed.kind]
    kind = getattr(import_module(module), name)
    if config.testbed.kind == "ssh":
        return kind(config, accept_new_host_keys=accept_new_host_keys)
    return kind(config)
