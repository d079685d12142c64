"""Shared test helpers: config files written on the fly, and the CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
#: The cpus of configs/sim-moderate.yaml's servers, in order: 4 small, 3 large.
SIM_MODERATE_CPUS = (2, 2, 2, 2, 4, 4, 4)


def weight_levels(steps, cpus) -> set[float]:
    """The levels an agent's step log chose: each weight over its server's cpus (a residual policy's weight is
    level × cpus), rounded off float noise."""
    return {round(w / c, 9) for ws in steps["weights"] for w, c in zip(ws, cpus, strict=True)}


SHARED_TRACES = REPO.parent / "shared" / "traces" / "marllb"


def minimal_testbed(name: str = "unit", **overrides: object) -> dict:
    """The smallest valid config as a dict: 2 LBs, a 1-unit and a 2-unit server group."""
    testbed = {
        "name": name,
        "servers": [{"name": "slow", "count": 1, "cpus": 1}, {"name": "fast", "count": 1, "cpus": 2}],
    }
    testbed.update(overrides)
    return {"testbed": testbed}


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config (dict or raw text) to a file and return its path."""

    def write(content: dict | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli():
    """Invoke the marllb CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from marllb_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def trained(cli, tmp_path):
    """Train a tiny policy through the CLI (1 episode of 2 s, hidden 8, more `--hyper NAME=VALUE` items
    after the config) for `config`'s LBs and servers (default sim-moderate); returns its directory."""

    def train(
        algo: str, name: str | None = None, config: Path = REPO / "configs" / "sim-moderate.yaml", *hyper: str
    ) -> Path:
        out = tmp_path / (name or f"train-{algo}")
        result = cli(
            "train",
            config,
            "--algo",
            algo,
            "--episodes",
            "1",
            "--episode-s",
            "2",
            "--out",
            out,
            "--hyper",
            "hidden=8",
            *[arg for item in hyper for arg in ("--hyper", item)],
        )
        assert result.exit_code == 0, result.output
        return out

    return train
