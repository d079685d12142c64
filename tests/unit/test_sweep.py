"""`marllb sweep`: its cells are the runs `marllb simulate` makes, a done cell is never run again (not even
after SIGKILL), a failed one is, and bad sweep files get one line and exit code 2. Real simulations on a real
process pool, run as a user runs them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

MARLLB = [sys.executable, "-m", "marllb_cli"]
CONFIG = REPO / "configs" / "sim-moderate.yaml"
TRACE = REPO / "traces" / "rate_200_steady_30s.tsv"


def marllb(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MARLLB, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def sweep_file(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": str(CONFIG), **fields}))
    return path


def done_runs(out: Path) -> dict[str, tuple[int, float]]:
    """Each done cell's directory → (inode, mtime): a cell run again gets a new directory."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime) for p in (out / "runs").glob("*") if (p / "cell.json").exists()
    }


def test_a_sweep_runs_each_cell_once_and_its_cells_are_what_simulate_makes(tmp_path):
    sweep = sweep_file(
        tmp_path, methods=["sed", "lsq"], seeds=[0, 1], duration_s=5, set={"sim.traffic.load": [0.6, 0.9]}
    )
    out = tmp_path / "out"
    first = marllb("sweep", sweep, "--out", out, "--workers", 2)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "8 cells, 0 already done, 8 run, 0 failed" in first.stdout
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 8 and set(index["set.sim.traffic.load"]) == {"0.6", "0.9"}
    assert sorted(index.groupby("method").size().tolist()) == [4, 4]

    # The cell (lsq, seed 1, load 0.9) is the run `marllb simulate` makes with the same arguments.
    direct = marllb(
        "simulate", CONFIG, "--method", "lsq", "--seed", 1, "--duration", 5,
        "--set", "sim.traffic.load=0.9", "--runs-dir", tmp_path / "direct",
    )  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    (run,) = (tmp_path / "direct").iterdir()
    expected = json.loads((run / "summary.json").read_text())
    (cell,) = index[(index["method"] == "lsq") & (index["seed"] == 1) & (index["set.sim.traffic.load"] == "0.9")].path
    got = json.loads((Path(cell) / "summary.json").read_text())
    assert got["requests"] == expected["requests"] and got["jct_mean_s"] == expected["jct_mean_s"]

    before = done_runs(out)
    again = marllb("sweep", sweep, "--out", out)
    assert again.returncode == 0 and "8 cells, 8 already done, 0 run" in again.stdout
    assert done_runs(out) == before

    # One more seed: only its four cells run. Then --force runs all twelve.
    sweep = sweep_file(
        tmp_path, methods=["sed", "lsq"], seeds=[0, 1, 2], duration_s=5, set={"sim.traffic.load": [0.6, 0.9]}
    )
    grown = marllb("sweep", sweep, "--out", out, "--workers", 2)
    assert grown.returncode == 0 and "12 cells, 8 already done, 4 run" in grown.stdout
    assert {name: stamp for name, stamp in done_runs(out).items() if name in before} == before

    report = marllb("report", out / "runs", "--out", tmp_path / "report", "--json", "--bootstrap", 100)
    assert report.returncode == 0, report.stderr[-2000:]
    data = json.loads(report.stdout)
    assert data["scenarios"] == ["simmod · sim · load 0.6", "simmod · sim · load 0.9"]
    assert {(r["scenario"], r["method"]): r["runs"] for r in data["rows"] if r["class"] == "all"} == {
        (f"simmod · sim · load {load}", method): 3 for load in ("0.6", "0.9") for method in ("sed", "lsq")
    }

    forced = marllb("sweep", sweep, "--out", out, "--workers", 2, "--force")
    assert forced.returncode == 0 and "12 cells, 0 already done, 12 run" in forced.stdout
    assert not set(done_runs(out).values()) & set(before.values())


def test_a_sweep_killed_mid_way_loses_only_its_running_cells(tmp_path):
    """SIGKILL once k cells are done (k drawn from 1–5, `MARLLB_SWEEP_KILL_SEED` replays a draw): no worker
    outlives the sweep (no cell lands after the kill), and the next run does only the cells that were not done."""
    seed = int(os.environ.get("MARLLB_SWEEP_KILL_SEED", time.time_ns() % 10_000))
    kill_after = random.Random(seed).randint(1, 5)
    print(f"MARLLB_SWEEP_KILL_SEED={seed}: SIGKILL after {kill_after} cells")
    sweep = sweep_file(tmp_path, methods=["sed", "lsq", "wcmp", "ecmp"], seeds=[0, 1], duration_s=600)
    out = tmp_path / "out"
    process = subprocess.Popen([*MARLLB, "sweep", str(sweep), "--out", str(out), "--workers", "1"], cwd=REPO)
    deadline = time.monotonic() + 240
    while len(done_runs(out)) < kill_after and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = done_runs(out)
    assert kill_after <= len(finished) < 8, "the sweep ended before the kill: make its cells longer"
    time.sleep(3.0)
    assert done_runs(out) == finished  # the running cell's worker died with the sweep

    resumed = marllb("sweep", sweep, "--out", out, "--workers", 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"8 cells, {len(finished)} already done, {8 - len(finished)} run, 0 failed" in resumed.stdout
    after = done_runs(out)
    assert len(after) == 8 and {name: after[name] for name in finished} == finished
    assert len(pd.read_parquet(out / "index.parquet")) == 8
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())


def test_a_second_sweep_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two sweeps into one OUT: the second would clear `.partial/` and delete the first's running cells. It is
    refused with one line naming the first's pid (exit 2), the first's running cell is untouched, and once the
    first is killed (SIGKILL: nothing left to release) a sweep into the folder runs."""
    out = tmp_path / "out"
    slow = sweep_file(tmp_path, methods=["sed"], seeds=[0], duration_s=600)
    first = subprocess.Popen([*MARLLB, "sweep", str(slow), "--out", str(out), "--workers", "1"], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not any((out / ".partial").glob("*/*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = sorted((out / ".partial").glob("*"))
        assert running, "the first sweep never started its cell"

        quick = tmp_path / "quick"
        quick.mkdir()
        second = marllb("sweep", sweep_file(quick, methods=["lsq"], seeds=[0], duration_s=5), "--out", out)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "--out" in lines[0], lines
        assert f"another sweep runs into this folder (pid {first.pid}: marllb sweep {slow}" in lines[0], lines
        assert sorted((out / ".partial").glob("*")) == running and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    after = marllb("sweep", quick / "sweep.yaml", "--out", out)
    assert after.returncode == 0, after.stderr[-2000:]
    assert "1 cells, 0 already done, 1 run, 0 failed" in after.stdout


def test_a_failed_cell_is_logged_the_others_finish_and_it_is_tried_again(tmp_path):
    """Two traces, one of them malformed: its cell fails alone (exit 1, its log named), the next sweep tries it
    again (and only it), and once the file is mended it is a new cell (its content is part of the key)."""
    good, bad = tmp_path / "good.tsv", tmp_path / "bad.tsv"
    good.write_bytes((REPO / "traces" / "rate_200_steady_30s.tsv").read_bytes())
    bad.write_text("this is not a trace\n")
    traces = {"sim.traffic.kind": ["trace"], "sim.traffic.trace": [str(good), str(bad)]}
    sweep = sweep_file(tmp_path, methods=["sed"], duration_s=2, set=traces)
    out = tmp_path / "out"
    first = marllb("sweep", sweep, "--out", out)
    assert first.returncode == 1, first.stderr[-2000:]
    assert "2 cells, 0 already done, 1 run, 1 failed" in first.stdout
    (log,) = (out / "failed").iterdir()
    assert f"see {log}" in first.stdout.replace("\n", "") and "bad.tsv" in log.read_text()
    assert len(pd.read_parquet(out / "index.parquet")) == 1

    status = marllb("sweep", sweep, "--out", out, "--status", "--json")
    assert status.returncode == 0, status.stderr
    cells = json.loads(status.stdout)["cells"]
    states = {Path(cell["axes"]["sim.traffic.trace"]).name: cell["state"] for cell in cells}
    assert states == {"good.tsv": "done", "bad.tsv": "failed"}

    again = marllb("sweep", sweep, "--out", out)
    assert again.returncode == 1 and "2 cells, 1 already done, 0 run, 1 failed" in again.stdout

    bad.write_bytes(good.read_bytes())
    mended = marllb("sweep", sweep, "--out", out)
    assert mended.returncode == 0 and "2 cells, 1 already done, 1 run, 0 failed" in mended.stdout
    assert len(pd.read_parquet(out / "index.parquet")) == 2


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"methods": ["sed"], "seeds": [0], "sets": {}}, "sets: Extra inputs are not permitted"),
        ({"methods": []}, "methods: none, and no trainings"),
        ({"methods": ["sed"], "trainings": [{"name": "q", "algo": "dqn"}]}, "trainings.0: algo 'dqn': not available"),
        ({"methods": ["sed"], "trainings": [{"name": "q", "algo": "qmix", "hyper": {"hidden": "x"}}]}, "trainings.0"),
        ({"methods": ["sed"], "trainings": [{"name": "sed", "algo": "qmix"}]}, "two share a name"),
        ({"methods": ["sed"], "replay": {"trace": str(TRACE), "duration_s": 5}}, "give loads or speeds"),
        ({"methods": ["sed"], "replay": {"trace": str(TRACE), "speeds": [1], "loads": [1], "duration_s": 5}}, "one of"),
        ({"methods": ["oracle-srt"], "replay": {"trace": str(TRACE), "speeds": [1], "duration_s": 5}}, "methods: "),
        ({"methods": ["sed"], "replay": {"trace": "none.tsv", "speeds": [1], "duration_s": 5}}, "no such file"),
        (
            {
                "methods": ["sed"],
                "trainings": [{"name": "q", "algo": "qmix"}],
                "replay": {"trace": str(TRACE), "speeds": [1], "duration_s": 5},
            },
            "not with replay",
        ),
        ({"methods": ["nope"]}, "methods: "),
        ({"methods": ["sed"], "set": {"sim.traffic.load": [-1]}}, "sim.traffic.load=-1"),
        ({"methods": ["sed"], "seeds": [0, 0]}, "two cells are the same run"),
    ],
)
def test_a_bad_sweep_file_gets_one_line_naming_the_file_and_field(tmp_path, fields, expected):
    sweep = sweep_file(tmp_path, **fields)
    result = marllb("sweep", sweep, "--out", tmp_path / "out", timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and str(sweep) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_a_training_is_a_cell_its_policy_runs_like_a_method_and_report_pools_its_seeds(tmp_path):
    """Two training seeds of a tiny distr, each run on both evaluation seeds beside sed: 2 + 2 + 4 cells. The
    runs of the policies report the training's name as their method, so `report` gives one row of 4 runs;
    a rerun runs nothing; an evaluation cell is the policy run by `simulate` with the same arguments."""
    hyper = {"hidden": 8, "updates_per_episode": 1, "batch_episodes": 1, "warmup_episodes": 1}
    training = {"name": "tiny", "algo": "distr", "seeds": [0, 1], "episodes": 2, "episode_s": 2, "hyper": hyper}
    sweep = sweep_file(tmp_path, methods=["sed"], seeds=[3, 4], duration_s=4, trainings=[training])
    out = tmp_path / "out"
    first = marllb("sweep", sweep, "--out", out, "--workers", 2)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "8 cells, 0 already done, 8 run, 0 failed" in first.stdout
    index = pd.read_parquet(out / "index.parquet")
    assert index.groupby("kind").size().to_dict() == {"run": 6, "training": 2}
    runs = index[index["kind"] == "run"]
    assert sorted(runs["method"].value_counts().to_dict().items()) == [("sed", 2), ("tiny", 4)]
    assert sorted(runs.loc[runs["method"] == "tiny", "training_seed"].tolist()) == [0, 0, 1, 1]
    trainings = sorted((out / "trainings").glob("*/policy.pt"))
    assert len(trainings) == 2
    report = marllb("report", out / "runs", "--out", tmp_path / "report", "--json")
    assert report.returncode == 0, report.stderr
    rows = {r["method"]: r for r in json.loads(report.stdout)["rows"] if r["class"] == "all"}
    assert rows["tiny"]["runs"] == 4 and rows["sed"]["runs"] == 2
    again = marllb("sweep", sweep, "--out", out)
    assert again.returncode == 0 and "8 cells, 8 already done, 0 run" in again.stdout
    cell = next(p for p in (out / "runs").iterdir() if (p / "cell.json").exists() and "-tiny-t1-s4" in p.name)
    meta = json.loads((cell / "meta.json").read_text())
    assert meta["method"] == "tiny" and meta["training_seed"] == 1 and meta["policy"].startswith("rl:")
    direct = marllb(
        "simulate", CONFIG, "-m", meta["policy"], "--seed", 4, "--duration", 4, "--runs-dir", tmp_path / "d"
    )
    assert direct.returncode == 0, direct.stderr
    mine = pd.read_parquet(cell / "requests.parquet")["jct_s"]
    theirs = pd.read_parquet(next((tmp_path / "d").iterdir()) / "requests.parquet")["jct_s"]
    assert mine.equals(theirs)


def test_a_sweep_over_several_configs_runs_each_as_its_own_scenario(tmp_path):
    configs = [str(CONFIG), str(REPO / "configs" / "sim-moderate-io50.yaml")]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": configs, "methods": ["sed"], "seeds": [0], "duration_s": 3}))
    out = tmp_path / "out"
    result = marllb("sweep", path, "--out", out, "--workers", 1)
    assert result.returncode == 0 and "2 cells, 0 already done, 2 run" in result.stdout, result.stderr
    index = pd.read_parquet(out / "index.parquet")
    assert sorted(index["set.config"]) == ["sim-moderate", "sim-moderate-io50"]
    names = {json.loads((Path(p) / "meta.json").read_text())["testbed"] for p in index["path"]}
    assert names == {"simmod", "simio50"}
    path.write_text(yaml.safe_dump({"config": [str(CONFIG), str(tmp_path / "none.yaml")], "methods": ["sed"]}))
    bad = marllb("sweep", path, "--out", out, timeout=60)
    assert bad.returncode == 2 and "none.yaml" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_missing_sweep_file_is_one_line(tmp_path):
    result = marllb("sweep", tmp_path / "none.yaml", timeout=60)
    assert result.returncode == 2 and "no such file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_ray_backend_gives_the_cells_the_local_pool_gives(tmp_path):
    """3 methods × 5 seeds on a real Ray (started by the sweep with 2 CPUs, stopped after it): every cell's
    summary equals the local pool's, and no Ray process is left."""
    pytest.importorskip("ray")
    sweep = sweep_file(tmp_path, methods=["sed", "lsq", "wcmp"], seeds=[0, 1, 2, 3, 4], duration_s=10)
    summaries = {}
    for backend in ("local", "ray"):
        out = tmp_path / backend
        result = marllb("sweep", sweep, "--out", out, "--workers", 2, "--backend", backend)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "15 cells, 0 already done, 15 run, 0 failed" in result.stdout
        summaries[backend] = {
            path.name: json.loads((path / "summary.json").read_text()) for path in (out / "runs").iterdir()
        }
    assert summaries["local"].keys() == summaries["ray"].keys() and len(summaries["ray"]) == 15
    for name, summary in summaries["local"].items():
        assert summaries["ray"][name] == summary, name
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split()
    assert left == [], "the sweep's Ray instance outlived it"

    wrong = marllb("sweep", sweep, "--out", tmp_path / "x", "--address", "127.0.0.1:1", timeout=60)
    assert wrong.returncode == 2 and "only with --backend ray" in wrong.stderr


def test_bench_sweep_times_every_backend_on_long_and_short_cells():
    result = marllb("bench", "sweep", "--cells", 4, "--cell-s", 5, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    backends = [("local", 1), ("local", 2)] + ([("ray", 2)] if "ray is not installed" not in result.stderr else [])
    assert [(r["backend"], r["workers"], r["cell_s"]) for r in rows] == [
        (backend, workers, cell_s) for cell_s in (5.0, 1.0) for backend, workers in backends
    ]
    for row in rows:
        assert row["cells"] == 4 and row["wall_s"] > 0
        assert row["cells_per_minute"] == pytest.approx(60 * 4 / row["wall_s"])
