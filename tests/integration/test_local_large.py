"""configs/local-large.yaml: CIKM'22's large set-up (6 LBs, 12 × 4-CPU + 12 × 8-CPU servers) deploys on this
machine, every server's CPU quota is its share of 1.5 cores, a replay through all six LBs answers every
request, and teardown leaves nothing. Testbed name `itlg`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from tests.conftest import REPO
from tests.integration.helpers import deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
CONFIG = REPO / "configs" / "local-large.yaml"


def test_the_large_set_up_deploys_serves_through_six_lbs_and_leaves_nothing(tmp_path):
    marllb = [sys.executable, "-m", "marllb_cli"]
    trace = tmp_path / "trace.parquet"
    made = subprocess.run([*marllb, "trace", "gen", "poisson", "--rate", "40", "--duration", "6", "--out", trace,
                           "--seed", "3"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert made.returncode == 0, made.stderr
    with deployed(LocalTestbed(load_config(CONFIG, ["testbed.name=itlg"]))) as testbed:
        servers = testbed.topology.servers
        assert len(testbed.topology.lbs) == 6 and len(servers) == 24
        cores = {server.cpus: testbed.apache(server).cgroup.cores() for server in servers}
        assert cores == {4: pytest.approx(4 * 0.0104), 8: pytest.approx(8 * 0.0104)}
        assert sum(testbed.apache(server).cgroup.cores() for server in servers) == pytest.approx(1.4976)
        result = subprocess.run(
            [*marllb, "replay-trace", CONFIG, "--set", "testbed.name=itlg", "--trace", trace, "--speed", "1",
             "-m", "sed", "--runs-dir", tmp_path / "runs"],
            capture_output=True, text=True, cwd=REPO, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        run = next((tmp_path / "runs").iterdir())
        requests = pd.read_parquet(run / "requests.parquet")
        assert len(requests) > 150 and (requests["status"] == 200).all()
        logs = sorted((run / "agents").glob("lb*.parquet"))
        assert len(logs) == 6  # every LB's agent stepped, and every LB carried flows (the router hashes over six)
        assert all(pd.read_parquet(log)["new_flows"].map(sum).sum() > 0 for log in logs)
        assert json.loads((run / "meta.json").read_text())["complete"] is True
        big = requests["server"].isin({f"srv{i}" for i in range(12, 24)})
        assert big.mean() > 0.6  # SED's (q + 1) / w: the 8-CPU servers first
