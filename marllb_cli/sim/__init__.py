"""The simulator: an event-driven model of LBs and Apache-like servers, for training and fast comparison."""
