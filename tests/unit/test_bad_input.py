"""The reliability review's probe table (`../shared/reviews/reliability-2026-11-30.md` §6), each ✗ row that
needs no root: bad input is one line on stderr and exit 2 (bad input) or 1 (a damaged record), never a
traceback and never silently accepted; an unexpected failure is one line with the path of a log.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest

from marllb_cli.errors import ConfigError
from tests.conftest import REPO, minimal_testbed

SIM = REPO / "configs" / "sim-moderate.yaml"


def one_line(result, code: int, *needles: str) -> None:
    """Exit `code`, exactly one line on stderr holding every needle, and no traceback anywhere."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("MARLLB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MARLLB_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path / "state"


# -- config (C14, SIM02, SIM03, SIM06, SIM11) ----------------------------------------------------------------
def test_a_key_given_twice_is_refused_with_both_lines(cli, write_config):
    config = write_config("testbed:\n  name: unitdup\n  name: other\n  servers: [{name: s, count: 1, cpus: 1}]\n")
    one_line(cli("status", config), 2, "config.yaml:3", "testbed.name: given twice (first on line 2)")


@pytest.mark.parametrize(
    "override, field",
    [
        ("sim.traffic.duration_s=.inf", "sim.traffic.duration_s"),
        ("sim.traffic.rate=1e12", "sim.traffic.rate"),
        ("sim.traffic.work.mean_s=.inf", "sim.traffic.work.mean_s"),
        ("testbed.cpu_unit=.nan", "testbed.cpu_unit"),
    ],
)
def test_infinite_nan_and_huge_config_values_are_refused(cli, tmp_path, override, field):
    one_line(cli("simulate", SIM, "--set", override, "--runs-dir", tmp_path / "runs"), 2, field)
    assert not (tmp_path / "runs").exists()


def test_a_simulation_too_large_to_hold_is_refused_before_its_run_directory(cli, tmp_path):
    result = cli("simulate", SIM, "--duration", "inf", "--runs-dir", tmp_path / "runs")
    one_line(result, 2, "sim.traffic", "requests")
    result = cli("simulate", SIM, "--set", "sim.traffic.rate=900000", "--runs-dir", tmp_path / "runs")
    one_line(result, 2, "more than one simulation holds")
    assert not (tmp_path / "runs").exists()


# -- traces (SIM07, SIM08, T parquet rows, T path with a space) --------------------------------------------
def parquet_trace(path, t, paths=None, classes=None):
    n = len(t)
    pd.DataFrame(
        {
            "t": t,
            "path": paths if paths is not None else ["/dummy.php/?n=1000"] * n,
            "class": classes or ["cpu"] * n,
            "work": [1000.0] * n,
        }
    ).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize(
    "times, needle",
    [([0.0, math.nan, 1.0], "t = nan"), ([0.0, -1.0], "t = -1.0"), ([0.0, math.inf], "t = inf"), (["a", "b"], "t")],
)
def test_a_parquet_trace_with_bad_times_is_refused_by_every_command(cli, tmp_path, times, needle):
    trace = parquet_trace(tmp_path / "bad.parquet", times)
    one_line(cli("trace", "stats", trace), 2, "bad.parquet", needle)
    sim = ["--set", "sim.traffic.kind=trace", "--set", f"sim.traffic.trace={trace}"]
    one_line(cli("simulate", SIM, *sim, "--runs-dir", tmp_path / "runs"), 2, "bad.parquet")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "bad_path", ["/x HTTP/1.1\r\nHost: evil\r\n\r\nGET /y", "/a b", None, "relative", "/" + "x" * 9000]
)
def test_a_parquet_path_that_would_not_be_one_request_line_is_refused(cli, tmp_path, bad_path):
    trace = parquet_trace(tmp_path / "bad.parquet", [0.0, 1.0], paths=["/ok", bad_path], classes=["static"] * 2)
    one_line(cli("trace", "stats", trace), 2, "row 1: bad path")


def test_a_parquet_path_column_of_numbers_is_refused(cli, tmp_path):
    trace = parquet_trace(tmp_path / "bad.parquet", [0.0, 1.0], paths=[5.0, 6.0], classes=["static"] * 2)
    one_line(cli("trace", "stats", trace), 2, "row 0: bad path 5.0")


def test_a_tsv_path_with_a_space_is_a_bad_line(cli, tmp_path):
    trace = tmp_path / "space.tsv"
    trace.write_text("time\tquery\n0.1\t/dummy.php/?n=5\n0.2\t/a b\n")
    one_line(cli("trace", "stats", trace), 2, "space.tsv:3", "bad path")
    result = cli("trace", "stats", trace, "--skip-bad", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["requests"] == 1


def test_replay_speed_and_duration_must_be_finite():
    from marllb_cli.experiment import build_schedule

    trace = pd.DataFrame({"t": [0.0, 1.0], "path": ["/a", "/b"], "class": ["static", "static"]})
    for speed in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ConfigError, match="--speed"):
            build_schedule(trace, speed=speed, duration_s=None)
    with pytest.raises(ConfigError, match="--duration"):
        build_schedule(trace, speed=1.0, duration_s=math.nan)


# -- trace generation (G01–G09) ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["poisson", "--rate", "nan", "--duration", "1"], "--rate"),
        (["poisson", "--rate", "inf", "--duration", "1"], "--rate"),
        (["poisson", "--rate", "1e15", "--duration", "1"], "--rate"),
        (["poisson", "--rate", "1000", "--duration", "1e6"], "requests: at most"),
        (["poisson", "--rate", "10", "--duration", "1", "--mix", "cpu=nan"], "--mix"),
        (["wiki", "--rate", "10", "--duration", "1", "--zipf", "nan"], "--zipf"),
        (["wiki", "--rate", "10", "--duration", "1", "--pages", "100000000000"], "--pages"),
        (["wiki", "--rate", "10", "--duration", "1", "--day", "nan"], "--day"),
    ],
)
def test_trace_generation_refuses_values_that_make_no_trace(cli, tmp_path, args, needle):
    out = tmp_path / "t.parquet"
    one_line(cli("trace", "gen", *args, "--out", out), 2, needle)
    assert not out.exists()


def test_a_trace_written_into_a_missing_directory_is_one_line(cli, tmp_path):
    result = cli("trace", "gen", "poisson", "--rate", "10", "--duration", "1", "--out", tmp_path / "no" / "t.parquet")
    assert result.exit_code in (1, 2)
    one_line(result, result.exit_code, "t.parquet")


# -- run directories and report (R rows) ---------------------------------------------------------------------
@pytest.fixture
def runs(cli, tmp_path):
    """A directory with two complete simulated runs (sed, lsq)."""
    runs = tmp_path / "runs"
    for method in ("sed", "lsq"):
        result = cli("simulate", SIM, "--method", method, "--duration", "5", "--runs-dir", runs)
        assert result.exit_code == 0, result.output
    return runs


def one_run(runs, method="sed"):
    return next(path for path in sorted(runs.iterdir()) if f"-{method}-" in path.name)


def test_a_damaged_run_is_refused_when_named_and_skipped_in_a_folder(cli, runs, tmp_path):
    damaged = one_run(runs, "lsq")
    (damaged / "meta.json").write_bytes(b'{"method": "\xff\xfe"}')
    one_line(cli("report", damaged, "--out", tmp_path / "r1"), 2, "meta.json", "unreadable")
    result = cli("report", runs, "--out", tmp_path / "r2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {row["method"] for row in report["rows"]} == {"sed"}
    assert any("skipped" in warning and damaged.name in warning for warning in report["warnings"])


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda frame: frame.drop(columns=["class"]), "no class"),
        (lambda frame: frame.assign(jct_s=["x"] * len(frame)), "wrong type"),
    ],
)
def test_a_requests_table_with_missing_or_mistyped_columns_is_refused(cli, runs, tmp_path, damage, needle):
    run = one_run(runs)
    damage(pd.read_parquet(run / "requests.parquet")).to_parquet(run / "requests.parquet", index=False)
    one_line(cli("report", run, "--out", tmp_path / "r"), 2, "requests.parquet", needle)


def test_a_method_that_is_not_a_name_is_refused_and_markup_in_one_is_escaped(cli, runs, tmp_path):
    run = one_run(runs)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "method": ["sed"]}))
    one_line(cli("report", run, "--out", tmp_path / "r1"), 2, "method is not a name")
    (run / "summary.json").write_text(json.dumps({**summary, "method": "sed | <script>x</script>\nrow"}))
    result = cli("report", run, "--out", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    lines = [line for line in (tmp_path / "r2" / "report.md").read_text().splitlines() if "script" in line]
    assert len(lines) == 3  # the ranking, the weight dynamics and the list of runs, each still one table row
    assert all("<script>" not in line and "sed \\| &lt;script&gt;x&lt;/script&gt; row" in line for line in lines)


def test_report_out_on_an_existing_file_is_one_line(cli, runs, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line(cli("report", runs, "--out", tmp_path / "afile"), 2, "--out", "not a directory")


def test_a_run_killed_before_its_summary_leaves_the_others_reportable(cli, runs, tmp_path):
    killed = runs / "20260101T000000-simmod-sim-ecmp-s0"
    killed.mkdir()
    (killed / "meta.json").write_text(json.dumps({"method": "ecmp", "complete": False}))
    result = cli("report", runs, "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {row["method"] for row in report["rows"]} == {"sed", "lsq"}
    assert any("no summary.json" in warning for warning in report["warnings"])


# -- policies and checkpoints (K, TR rows) -------------------------------------------------------------------
class Payload:
    """What a hostile policy file would run on load, if it were ever unpickled with full pickle."""

    def __reduce__(self):
        return (open, ("/tmp/marllb-payload-ran", "w"))


@pytest.fixture
def policy_dir(trained):
    return trained("distr")


def rewrite_policy(directory, content) -> None:
    """Replace policy.pt (and drop the JSON header, so the file itself is read)."""
    import torch

    (directory / "policy.json").unlink(missing_ok=True)
    if isinstance(content, bytes):
        (directory / "policy.pt").write_bytes(content)
    else:
        torch.save(content, directory / "policy.pt")


@pytest.mark.parametrize(
    "content, needle",
    [
        (Payload(), "refused: it holds Python objects"),
        (b"\x00garbage" * 10, "not a marllb policy"),
        ([1, 2, 3], "not a marllb policy"),
        ({"n_servers": 7}, "not a marllb policy"),
        ({"kind": "sac", "n_servers": 7, "hyper": {"levels": [1.0], "hidden": 2**40}}, "hidden size"),
    ],
)
def test_a_damaged_or_hostile_policy_is_one_line_and_never_run(cli, policy_dir, tmp_path, content, needle):
    import os

    marker = "/tmp/marllb-payload-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    rewrite_policy(policy_dir, content)
    result = cli("simulate", SIM, "--method", f"rl:{policy_dir}", "--duration", "2", "--runs-dir", tmp_path / "r")
    one_line(result, 2, "policy.pt", needle)
    assert "weights_only=False" not in result.stderr
    assert not os.path.exists(marker)
    assert not (tmp_path / "r").exists()


def test_a_damaged_checkpoint_stops_resume_in_one_line(cli, policy_dir):
    (policy_dir / "checkpoint.pt").write_bytes(pickle.dumps({"x": 1}) + b"garbage")
    result = cli(
        "train", SIM, "--algo", "distr", "--episodes", "2", "--episode-s", "2", "--out", policy_dir, "--resume"
    )
    one_line(result, 2, "checkpoint.pt", "not a marllb training checkpoint")


@pytest.mark.parametrize("item", ["hidden=10000000000", "lr_actor=nan", "levels=1,inf", "batch_episodes=-1"])
def test_hyperparameters_out_of_range_are_one_line(cli, tmp_path, item):
    result = cli("train", SIM, "--algo", "distr", "--episodes", "1", "--hyper", item, "--out", tmp_path / "t")
    one_line(result, 2, "--hyper", item.split("=")[0])


# -- records of a testbed (ST01–ST05) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        '{"testbed": "unitst", "resources": [',
        "[1, 2]",
        '{"resources": []}',
        '{"testbed": "x", "resources": [{"a": 1}]}',
    ],
)
def test_a_damaged_manifest_is_one_line_with_the_way_out(cli, write_config, state, content):
    config = write_config(minimal_testbed("unitst"))
    (state / "unitst").mkdir(parents=True)
    (state / "unitst" / "manifest.json").write_text(content)
    for command in ("status", "teardown"):
        one_line(cli(command, config), 1, "manifest.json: damaged record", "mv ")


def test_a_damaged_ssh_record_is_one_line(cli, state):
    config = REPO / "configs" / "ssh-example.yaml"
    (state / "sshex").mkdir(parents=True)
    (state / "sshex" / "ssh.json").write_text('{"complete": tr')
    one_line(cli("status", config, "--set", "testbed.name=sshex"), 1, "ssh.json: damaged record")


# -- the last resort -----------------------------------------------------------------------------------------
def test_an_unexpected_failure_is_one_line_with_the_log_of_its_details(cli, tmp_path, monkeypatch):
    import marllb_cli.traces

    def broken(*args, **kwargs):
        raise RuntimeError("something marllb did not expect\nsecond line")

    monkeypatch.setattr(marllb_cli.traces, "trace_stats", broken)
    trace = tmp_path / "t.tsv"
    trace.write_text("time\tquery\n0.1\t/a\n")
    result = cli("trace", "stats", trace)
    one_line(result, 1, "unexpected RuntimeError: something marllb did not expect", "details: ")
    log = result.stderr.split("details: ")[1].strip().rstrip(")")
    text = open(log).read()
    assert "Traceback" in text and "second line" in text and log.startswith(str(tmp_path / "logs"))


def test_non_finite_weights_never_reach_the_alias_table():
    from marllb_cli.dataplane.selection import Selector

    selector = Selector(3)
    for weights in ([math.nan, 1, 1], [math.inf, 1, 1], [-1, 1, 1]):
        with pytest.raises(ValueError):
            selector.set_weights(np.asarray(weights, dtype=np.float64))


# -- train --env testbed (issue: training on the live testbed) --------------------------------------------
LOCAL = REPO / "configs" / "local-small.yaml"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--env", "lab"), "--env 'lab': unknown"),
        (("--load", "0.9:0.5"), "--load '0.9:0.5'"),
        (("--load", "abc"), "--load 'abc'"),
        (("--trace", "x.tsv"), "--trace: only with --env testbed"),
        (("--env", "testbed", "--set", "experiment.coordinator.deadline_ms=250"), "experiment.coordinator.deadline_ms"),
        (("--env", "testbed", "--set", "experiment.coordinator.lb=2"), "experiment.coordinator.lb: 2"),
        (("--env", "testbed", "--algo", "ssac"), "--algo ssac: one LB"),
    ],
)
def test_bad_live_training_options_are_one_line(cli, tmp_path, args, needle):
    algo = () if "--algo" in args else ("--algo", "qmix")
    result = cli("train", LOCAL, *algo, *args, "--out", tmp_path / "out")
    one_line(result, 2, needle)
    assert not (tmp_path / "out").exists()


def test_live_training_on_a_testbed_that_is_not_deployed_says_so(cli, tmp_path):
    result = cli("train", LOCAL, "--algo", "distr", "--env", "testbed", "--set", "testbed.name=unitnone")
    one_line(result, 1, "testbed unitnone is not deployed", "marllb deploy")


def test_calibrate_reads_its_trace_before_measuring(cli, tmp_path):
    """A bad --trace is refused at once, not after a minute of measuring (here: before the testbed is even
    looked at, so the error is the trace's and not 'not deployed')."""
    bad = tmp_path / "bad.tsv"
    bad.write_text("time\tquery\n0.1\t/dummy.php/?n=1\nnot-a-time\t/x\n")
    one_line(cli("calibrate", LOCAL, "--trace", bad, "--set", "testbed.name=unitnone"), 2, str(bad))
