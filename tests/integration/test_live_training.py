"""`marllb train --env testbed` on a real local testbed: real episodes through real LBs, per-LB learners
(distr) and QMIX through its coordinator over TCP, an agent killed mid-episode, and --resume after SIGKILL.

Testbed name `itlive` (configs/local-small.yaml renamed); the shipped window of the papers' trace at a
quarter speed (about 50 requests/s, no calibration needed), a random window of it per episode.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.node.manifest import MANIFEST, Manifest
from marllb_cli.features import N_FEATURES, N_NEURIPS_FEATURES
from tests.conftest import REPO
from tests.integration.helpers import deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itlive"
CONFIG = REPO / "configs" / "local-small.yaml"
TRACE = REPO / "traces" / "rate_200_steady_30s.tsv"
EPISODE_S, PERIOD_S = 10, 0.25


def train(out: Path, algo: str, episodes: int, *more: object) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "marllb_cli", "train", str(CONFIG), "--set", f"testbed.name={NAME}"]
    argv += ["--env", "testbed", "--algo", algo, "--episodes", str(episodes), "--episode-s", str(EPISODE_S)]
    argv += ["--speed", "0.25", "--trace", str(TRACE), "--out", str(out), *map(str, more)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen[str], timeout: float = 300) -> None:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, (stdout + stderr)[-3000:]


def curve_rows(out: Path) -> int:
    try:
        return len(pd.read_parquet(out / "curve.parquet"))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def testbed():
    with deployed(LocalTestbed(load_config(CONFIG, [f"testbed.name={NAME}"]))) as testbed:
        yield testbed


def test_distr_learns_from_real_episodes_and_resumes_after_sigkill(testbed, tmp_path):
    out = tmp_path / "distr"
    process = train(out, "distr", 3)
    wait_for(lambda: curve_rows(out) == 2, timeout=200)
    after_two = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    wait_for(lambda: len(list((out / "episodes").iterdir())) == 3)  # episode 2 is running
    time.sleep(4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert curve_rows(out) == 2  # the running episode is lost, nothing else
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == after_two
    before = pd.read_parquet(out / "curve.parquet")

    finished(train(out, "distr", 3, "--resume"))
    curve = pd.read_parquet(out / "curve.parquet")
    assert curve["episode"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(curve.iloc[:2], before)  # the completed episodes are kept as they were

    expected = round(0.95 * EPISODE_S / PERIOD_S)
    assert (curve["transitions"] == expected).all() and (curve["lbs_stored"] == 2).all()
    assert abs(expected - EPISODE_S / PERIOD_S) <= 0.1 * EPISODE_S / PERIOD_S
    assert (curve["window_steps_min"] >= 0.9 * EPISODE_S / PERIOD_S).all()
    assert curve["critic_loss"].isna().tolist() == [True, False, False]  # updates after the 2 warm-up episodes
    assert (curve["failed"] == 0).all() and (curve["jct_mean_s"] > 0).all()
    assert (curve["step_interval_p99_s"] < 0.35).all()

    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    for learner in saved["learners"]:  # one per LB, each with its 3 episodes of real transitions
        episodes = learner["episodes"]
        assert len(episodes) == 3
        x = episodes[0]["x"].numpy()
        assert x.shape[0] == expected + 1
        features = x[:, : 4 * N_FEATURES].reshape(-1, 4, N_FEATURES)
        assert (np.abs(features).sum(axis=(0, 1)) > 0).all()  # every observation feature was seen
    run = out / curve["run"].iloc[-1]
    agents = pd.read_parquet(run / "agents" / "lb0.parquet")
    assert {"obs", "action"} <= set(agents.columns) and len(agents["obs"].iloc[0]) == 4


@pytest.mark.parametrize("algo", ["distr", "qmix"])
def test_learners_train_on_neurips_observation_from_the_dataplanes_statistics(testbed, tmp_path, algo):
    """NeurIPS'22's observation live: each agent observes 16 features per server (CIKM'22's six, then the
    statistics of completion times and of the LB's inter-arrival times, from its dataplane); distr's learners
    store them from the step logs, QMIX's coordinator receives them over TCP, and both update on them."""
    out = tmp_path / algo
    finished(train(out, algo, 2, "--hyper", "neurips_obs=true", "--hyper", "warmup_episodes=1"))
    curve = pd.read_parquet(out / "curve.parquet")
    # One warm-up episode: the first episode's transitions are stored, then every episode updates.
    assert curve["critic_loss"].notna().all() and (curve["lbs_stored"] == 2).all()
    run = out / curve["run"].iloc[-1]
    if algo == "qmix":  # what the coordinator gathered at each tick: [LBs, servers, features]
        rows = [json.loads(line) for line in (run / "coordinator.jsonl").read_text().splitlines()]
        obs = np.asarray([row["obs"] for row in rows], dtype=np.float64).reshape(-1, 4, N_NEURIPS_FEATURES)
    else:
        agents = pd.read_parquet(run / "agents" / "lb0.parquet")
        obs = np.stack([np.stack(o) for o in agents["obs"]]).astype(np.float64)
    assert obs.shape[1:] == (4, N_NEURIPS_FEATURES)
    assert (np.abs(obs[:, :, N_FEATURES:]).sum(axis=(0, 1)) > 0).all()  # every added statistic was seen
    if algo == "distr":
        for learner in torch.load(out / "checkpoint.pt", weights_only=True)["learners"]:
            x = learner["episodes"][0]["x"].numpy()
            features = x[:, : 4 * N_NEURIPS_FEATURES].reshape(-1, 4, N_NEURIPS_FEATURES)
            assert (np.abs(features).sum(axis=(0, 1)) > 0).all()


def stepping_agent(testbed, lb: str) -> int | None:
    """The pid of `lb`'s agent once it has entered its step loop (its log says so), else None."""
    manifest = Manifest.load(testbed.state_dir / MANIFEST)
    pids = [r.data["pid"] for r in manifest.of_kind("process") if r.name == f"{lb}-agent"] if manifest else []
    log = testbed.state_dir / "lb" / f"{lb}.agent.log"
    if not pids or not log.exists():
        return None
    return pids[0] if f" ms, pid {pids[0]}" in log.read_text(errors="replace") else None


def test_qmix_steps_through_its_coordinator_and_survives_a_dead_agent(testbed, tmp_path):
    out = tmp_path / "qmix"
    process = train(out, "qmix", 3)
    wait_for(lambda: stepping_agent(testbed, "lb1") is not None, timeout=200)
    first = stepping_agent(testbed, "lb1")  # episode 0's agent (an episode lasts 10 s)
    assert first is not None
    wait_for(lambda: curve_rows(out) == 1, timeout=200)
    # Episode 1's agent, once it steps. Killed while it was still starting (a loaded machine takes more than
    # the 5 s this test used to wait), it failed the episode's start instead of dying mid-episode.
    wait_for(lambda: stepping_agent(testbed, "lb1") not in (None, first), timeout=200)
    time.sleep(2)
    os.kill(stepping_agent(testbed, "lb1"), signal.SIGKILL)
    finished(process)

    curve = pd.read_parquet(out / "curve.parquet")
    assert curve["episode"].tolist() == [0, 1, 2]
    assert (curve["step_interval_p99_s"] < 0.35).all() and (curve["coordinator_bytes_per_step"] > 0).all()
    assert curve["coordinator_misses"].tolist()[0] == 0 and curve["coordinator_misses"].iloc[1] >= 8
    assert curve["lbs_stored"].tolist() == [2, 2, 2]  # the coordinator kept the whole joint episode
    assert curve["critic_loss"].isna().tolist() == [True, False, False]

    killed = out / curve["run"].iloc[1]
    meta = json.loads((killed / "meta.json").read_text())
    assert [lb["dead"] for lb in meta["lbs"]] == [[], ["agent died"]]
    requests = pd.read_parquet(killed / "requests.parquet")
    assert len(requests) > 400 and (requests["error"] == "").mean() > 0.99  # lb1 forwarded on its last weights
    lb0 = pd.read_parquet(killed / "agents" / "lb0.parquet")
    lb1 = pd.read_parquet(killed / "agents" / "lb1.parquet")
    inside = lambda frame: frame[(frame["t_s"] >= 0) & (frame["t_s"] <= EPISODE_S)]  # noqa: E731
    assert len(inside(lb0)) >= 0.9 * EPISODE_S / PERIOD_S  # the other LB kept stepping
    assert (~inside(lb0)["missed"]).mean() > 0.9
    assert len(inside(lb1)) < 0.8 * EPISODE_S / PERIOD_S  # the dead one stopped

    # The report of the training: real JCT per episode, the step-interval CDF, the communication table.
    report = subprocess.run(
        [sys.executable, "-m", "marllb_cli", "report", str(out), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "step_intervals.png").stat().st_size > 10_000
    (row,) = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "| qmix | 3 |" in line]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert 200 < float(cells[3]) < 300 and float(cells[4]) < 350  # step interval p50, p99 (ms)
    assert float(cells[7]) > 0  # bytes per step on the network
