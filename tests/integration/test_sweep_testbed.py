"""`marllb sweep` on the deployed testbed (`replay`): each cell is a real replay through the LBs, run one at a
time after the simulator cells, done once renamed into runs/, never run twice; a testbed that is not
deployed is one line before any cell runs. Testbed name `itsw` (local-small renamed through the sweep's
own `set`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from tests.conftest import REPO
from tests.integration.helpers import deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
MARLLB = [sys.executable, "-m", "marllb_cli"]


def sweep_file(tmp_path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "config": str(REPO / "configs" / "local-small.yaml"),
                "methods": ["ecmp", "sed"],
                "seeds": [0],
                "set": {"testbed.name": [name]},
                "replay": {
                    "trace": str(REPO / "traces" / "rate_200_steady_30s.tsv"),
                    "speeds": [0.25],
                    "duration_s": 4,
                },
            }
        )  # fmt: skip
    )
    return path


def test_a_testbed_sweep_replays_each_cell_once(tmp_path):
    out = tmp_path / "out"
    with deployed(LocalTestbed(load_config(REPO / "configs" / "local-small.yaml", ["testbed.name=itsw"]))):
        first = subprocess.run([*MARLLB, "sweep", sweep_file(tmp_path, "itsw"), "--out", out], capture_output=True,
                               text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert first.returncode == 0, first.stderr[-2000:]
        assert "2 cells, 0 already done, 2 run, 0 failed" in first.stdout
        again = subprocess.run([*MARLLB, "sweep", sweep_file(tmp_path, "itsw"), "--out", out], capture_output=True,
                               text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert again.returncode == 0 and "2 cells, 2 already done, 0 run" in again.stdout
    index = pd.read_parquet(out / "index.parquet")
    assert sorted(index["method"]) == ["ecmp", "sed"] and set(index["set.speed"]) == {"0.25"}
    assert (index["requests"] > 50).all() and (index["error_rate"] < 0.05).all()
    assert all(os.path.isfile(os.path.join(path, "requests.parquet")) for path in index["path"])
    gone = subprocess.run([*MARLLB, "sweep", sweep_file(tmp_path, "itnone"), "--out", tmp_path / "gone"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert gone.returncode != 0 and "not deployed" in gone.stderr and "Traceback" not in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1
