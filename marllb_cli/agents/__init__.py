"""Per-LB agents: every period they read the LB's observation and set the dataplane's weights."""

from marllb_cli.agents.base import Agent
from marllb_cli.agents.heuristics import ActiveWcmp, StaticWeights, heuristic
from marllb_cli.agents.methods import HEURISTICS

__all__ = ["Agent", "HEURISTICS", "ActiveWcmp", "StaticWeights", "heuristic"]
