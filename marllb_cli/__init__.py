"""marllb: experiment runner for multi-agent reinforcement-learning load balancing in data centers."""

__version__ = "0.1.0"
