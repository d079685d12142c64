"""Provisioning: turn a topology into running nodes, and remove them again. Public surface below."""

from marllb_cli.deploy.local import LocalTestbed, NodeStatus, TestbedStatus

__all__ = ["LocalTestbed", "NodeStatus", "TestbedStatus"]
