"""The LB dataplane. For now: server selection for new flows, shared by the packet path and the simulator."""

from marllb_cli.dataplane.selection import METHODS, AliasTable, Selector, flow_hash, flow_key, maglev_table

__all__ = ["METHODS", "AliasTable", "Selector", "flow_hash", "flow_key", "maglev_table"]
