"""How marllb reaches a node: `LocalNamespace` (a network namespace on this machine), `LocalHost` (this
machine itself, where `marllb node` runs on a real host) and `SshHost` (a host reached over SSH)."""

from marllb_cli.hosts.local import LocalHost, LocalNamespace, host_for, list_namespaces

__all__ = ["LocalHost", "LocalNamespace", "host_for", "list_namespaces"]
