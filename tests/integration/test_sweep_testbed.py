"""`marllb sweep` on the deployed testbed (`replay`): each cell is a real replay through the LBs, run one at a
time after the simulator cells, done once renamed into runs/, never run twice; a testbed that is not
deployed is one line before any cell runs. Testbed name `itsw` (local-small renamed through the sweep's
own `set`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def sweep_file(tmp_path, name: str, duration_s: float = 4):
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
                    "duration_s": duration_s,
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


def test_sigterm_during_a_testbed_cell_stops_the_sweep_and_keeps_that_cells_requests(tmp_path):
    """The replay inside a cell catches SIGTERM to keep its requests; the sweep must still stop there (it went
    on to the next cell, recording the interrupted one as failed), exit 143, and leave no cell done."""
    out = tmp_path / "out"
    with deployed(LocalTestbed(load_config(REPO / "configs" / "local-small.yaml", ["testbed.name=itst"]))):
        sweep = subprocess.Popen([*MARLLB, "sweep", sweep_file(tmp_path, "itst", duration_s=20), "--out", out],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not list(out.glob(".partial/*/*/requests.csv")) and time.monotonic() < deadline:
                time.sleep(0.2)  # the first cell's replayer is writing rows: mid-cell
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(1)
            sweep.send_signal(signal.SIGTERM)
            _, err = sweep.communicate(timeout=60)
        finally:
            sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not list((out / "runs").glob("*")), "a cell counted as done"
    kept = list((out / "failed").glob("*-run"))
    assert len(kept) == 1, kept  # the one interrupted cell's run, and no second cell started
    assert (kept[0] / "requests.parquet").is_file()
