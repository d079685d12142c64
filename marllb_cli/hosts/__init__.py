"""How marllb reaches a node: `LocalNamespace` (a network namespace on this machine) for now."""

from marllb_cli.hosts.local import LocalNamespace, list_namespaces

__all__ = ["LocalNamespace", "list_namespaces"]
