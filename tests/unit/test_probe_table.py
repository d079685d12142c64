"""The rest of the reliability review's probe table (`../shared/reviews/reliability-2026-11-30.md` §6): the rows
it found right (✓), kept right, and the ✗ rows not already in `test_bad_input.py` or `test_owned.py`. Each
param's id is the review's probe name, so the README's count of the table is a count of these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, minimal_testbed
from tests.unit.test_bad_input import one_line, parquet_trace

SIM = REPO / "configs" / "sim-moderate.yaml"


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("MARLLB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MARLLB_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path / "state"


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def with_group_name(name: str) -> str:
    config = minimal_testbed("unitpr")
    config["testbed"]["servers"][0]["name"] = name
    return dump(config)


# -- config files (C01–C11, C13 mirror) ---------------------------------------------------------------------
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(7)
)

BAD_CONFIGS = {
    "C02": (dump(minimal_testbed("x; rm -rf /")), "testbed.name"),
    "C03": (dump(minimal_testbed("../../etc")), "testbed.name"),
    "C04": (dump(minimal_testbed("abc\n")), "testbed.name"),
    "C05": (with_group_name("../../x; id"), "testbed.servers[0].name"),
    "C06": (dump({"testbed": {"name": "unitpr", "servers": [{"name": "s", "count": 1, "cpu": 1}]}}), "'cpus'"),
    "C07": ("testbed: [unclosed\n", "config.yaml"),
    "C08": ("", "config.yaml"),
    "C09": (b"\x00\xff\xfe\x89PNG\r\n", "config.yaml"),
    "C10": ("!!python/object/apply:os.system ['touch /tmp/marllb-c10-ran']\n", "config.yaml"),
    "C11": (ALIAS_BOMB, "config.yaml"),
    "C13-mirror": (
        dump(minimal_testbed("unitpr", kind="kvm", kvm={"mirror": "http://$(reboot)/debian"})),
        "testbed.kvm.mirror",
    ),
}


@pytest.mark.parametrize("probe", list(BAD_CONFIGS))
def test_a_bad_config_file_is_one_line(cli, tmp_path, probe):
    content, needle = BAD_CONFIGS[probe]
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(cli("status", path), 2, needle)
    assert not Path("/tmp/marllb-c10-ran").exists()


def test_C01_a_valid_config_is_absent(cli, write_config):
    result = cli("status", write_config(minimal_testbed("unitpr")), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "absent"


@pytest.mark.parametrize("probe", ["C15", "C16"])
def test_a_config_that_is_a_directory_or_missing_is_one_line(cli, tmp_path, probe):
    path = tmp_path if probe == "C15" else tmp_path / "missing.yaml"
    one_line(cli("status", path), 2, str(path.name))


# -- --set (S01–S10) ----------------------------------------------------------------------------------------
BAD_SETS = {
    "S01": ("testbed.name", "--set testbed.name"),
    "S02": ("testbed.name=", "testbed.name"),
    "S03": ("testbed.name=!!python/object/apply:os.system ['id']", "--set"),
    "S04": ("=x", "--set"),
    "S05": ("testbed.servers.7.cpus=1", "--set testbed.servers.7"),
    "S07": ("testbed.nosuchkey=1", "nosuchkey"),
    "S08": ("testbed.servers.0.cpus=[1", "testbed.servers.0.cpus=[1"),
    "S09": ("testbed.servers.0.count=-3", "testbed.servers.0.count"),
}


@pytest.mark.parametrize("probe", list(BAD_SETS))
def test_a_bad_set_is_one_line(cli, write_config, probe):
    item, needle = BAD_SETS[probe]
    one_line(cli("status", write_config(minimal_testbed("unitpr")), "--set", item), 2, needle)


def test_S10_set_cannot_name_another_config(cli, write_config):
    result = cli("status", write_config(minimal_testbed("unitpr")), "--set", "source=/etc/passwd", "--json")
    assert result.exit_code == 2 or json.loads(result.stdout)["testbed"] == "unitpr", result.output


# -- simulate (SIM04, SIM05, SIM09, SIM10) ------------------------------------------------------------------
def test_SIM04_a_huge_seed_is_accepted(cli, tmp_path):
    result = cli("simulate", SIM, "--seed", str(10**29), "--duration", "2", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "probe, args, needle",
    [
        ("SIM05", ["--method", "sed;id"], "sed;id"),
        ("SIM09", ["--set", "sim.traffic.kind=trace", "--set", "sim.traffic.trace=/nonexistent.tsv"], "nonexistent"),
        ("SIM10", ["--duration", "nan"], "--duration"),
    ],
)
def test_bad_simulate_arguments_are_refused_before_a_run_directory(cli, tmp_path, probe, args, needle):
    result = cli("simulate", SIM, *args, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert needle in result.output
    assert not (tmp_path / "runs").exists()


def test_SIM10_train_episode_length_must_be_finite(cli, tmp_path):
    result = cli("train", SIM, "--algo", "distr", "--episode-s", "nan", "--out", tmp_path / "t")
    assert result.exit_code == 2 and "--episode-s" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t").exists()


# -- traces (T rows) -----------------------------------------------------------------------------------------
GOOD_TRACES = {
    "T-header-only": ("time\tquery\n", 0),
    "T-truncated-path": ("time\tquery\n0.1\t/dummy.php/?n=10\n0.2\t/dummy.php/?n=1", 2),
    "T-1e308": ("time\tquery\n0.0\t/a\n1e308\t/b\n", 2),
    "T-35-digit-n": ("time\tquery\n0.1\t/dummy.php/?n=" + "9" * 35 + "\n", 1),
    "T-crlf": ("time\tquery\r\n0.1\t/a\r\n0.2\t/b\r\n", 2),
}


@pytest.mark.parametrize("probe", list(GOOD_TRACES))
def test_odd_but_valid_traces_are_read(cli, tmp_path, probe):
    text, requests = GOOD_TRACES[probe]
    trace = tmp_path / "t.tsv"
    trace.write_text(text)
    result = cli("trace", "stats", trace, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["requests"] == requests


BAD_TEXT_TRACES = {
    "T-truncated-line-tsv": ("time\tquery\n0.1\t/a\n0.2\n", "t.tsv:3"),
    "T-binary-tsv": (b"time\tquery\n\x00\x01\x02\xff\n", "t.tsv:2"),
    "T-1e400-tsv": ("time\tquery\n1e400\t/a\n", "t.tsv:2"),
    "T-negative-tsv": ("time\tquery\n0.1\t/a\n-1\t/b\n", "t.tsv:3"),
    "T-nan-tsv": ("time\tquery\nnan\t/a\n", "t.tsv:2"),
    "T-truncated-line-wikibench": ("1 1190146243.1 http://en.wikipedia.org/wiki/A -\n2 1190146243.2\n", "t.tsv:2"),
    "T-1e400-wikibench": ("1 1e400 http://en.wikipedia.org/wiki/A -\n", "t.tsv:1"),
    "T-nan-wikibench": ("1 nan http://en.wikipedia.org/wiki/A -\n", "t.tsv:1"),
}


@pytest.mark.parametrize("probe", list(BAD_TEXT_TRACES))
def test_a_bad_text_trace_line_is_located(cli, tmp_path, probe):
    content, needle = BAD_TEXT_TRACES[probe]
    trace = tmp_path / "t.tsv"
    trace.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(cli("trace", "stats", trace), 2, needle)


@pytest.mark.parametrize("probe", ["T-parquet-bad-class", "T-parquet-no-class", "T-parquet-truncated"])
def test_a_damaged_parquet_trace_is_one_line(cli, tmp_path, probe):
    trace = tmp_path / "bad.parquet"
    if probe == "T-parquet-bad-class":
        parquet_trace(trace, [0.0, 1.0], classes=["cpu", "nonsense"])
    elif probe == "T-parquet-no-class":
        pd.DataFrame({"t": [0.0], "path": ["/a"]}).to_parquet(trace, index=False)
    else:
        parquet_trace(trace, [0.0, 1.0])
        trace.write_bytes(trace.read_bytes()[:40])
    one_line(cli("trace", "stats", trace), 2, "bad.parquet")


def test_T_a_directory_or_an_unknown_format_is_one_line(cli, tmp_path):
    one_line(cli("trace", "stats", tmp_path), 2, tmp_path.name)
    trace = tmp_path / "t.tsv"
    trace.write_text("time\tquery\n0.1\t/a\n")
    one_line(cli("trace", "stats", trace, "--format", "bogus"), 2, "bogus")


def test_G06_a_trace_out_with_an_unknown_suffix_is_one_line(cli, tmp_path):
    out = tmp_path / "x.txt"
    one_line(cli("trace", "gen", "poisson", "--rate", "10", "--duration", "1", "--out", out), 2, "x.txt")
    assert not out.exists()


# -- run directories and report (R rows) ----------------------------------------------------------------------
@pytest.fixture
def run(cli, tmp_path):
    runs = tmp_path / "runs"
    result = cli("simulate", SIM, "--method", "sed", "--duration", "3", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    return next(runs.iterdir())


def test_R00_a_valid_run_is_reported(cli, run, tmp_path):
    result = cli("report", run, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "sed" in (tmp_path / "r" / "report.md").read_text()


def _damage(run: Path, probe: str) -> Path:
    if probe == "R-meta-invalid-json":
        (run / "meta.json").write_text("{not json")
    elif probe == "R-meta-list":
        (run / "meta.json").write_text("[1, 2]")
    elif probe == "R-missing-summary":
        (run / "summary.json").unlink()
    elif probe == "R-garbage-requests":
        (run / "requests.parquet").write_bytes(b"garbage" * 20)
    elif probe == "R-garbage-servers":
        (run / "servers.parquet").write_bytes(b"garbage" * 20)
    elif probe == "R-empty-dir":
        run = run.parent / "empty"
        run.mkdir()
    elif probe == "R-nonexistent":
        run = run.parent / "nonexistent"
    elif probe == "R-meta-symlink":
        (run / "meta.json").unlink()
        (run / "meta.json").symlink_to("/etc/shadow")
    return run


@pytest.mark.parametrize(
    "probe",
    [
        "R-meta-invalid-json",
        "R-meta-list",
        "R-missing-summary",
        "R-garbage-requests",
        "R-garbage-servers",
        "R-empty-dir",
        "R-nonexistent",
        "R-meta-symlink",
    ],
)
def test_a_damaged_run_named_alone_is_one_line(cli, run, tmp_path, probe):
    target = _damage(run, probe)
    result = cli("report", target, "--out", tmp_path / "r")
    one_line(result, 2, target.name)
    assert "root:" not in result.stderr  # the shadow file's content never reaches the message


def test_R_baseline_that_is_not_in_the_report_is_one_line(cli, run, tmp_path):
    one_line(cli("report", run, "--out", tmp_path / "r", "--baseline", "nope"), 2, "nope")


@pytest.mark.parametrize("probe", ["R-training-garbage", "R-training-wrong-columns"])
def test_a_damaged_learning_curve_is_one_line(cli, trained, tmp_path, probe):
    directory = trained("distr")
    if probe == "R-training-garbage":
        (directory / "curve.parquet").write_bytes(b"garbage" * 20)
    else:
        pd.DataFrame({"x": [1.0]}).to_parquet(directory / "curve.parquet", index=False)
    one_line(cli("report", directory, "--out", tmp_path / "r"), 2, "curve.parquet")


# -- policies and training (K, TR rows) ----------------------------------------------------------------------
def test_K_a_policy_for_other_servers_or_missing_is_one_line(cli, trained, tmp_path):
    directory = trained("distr")
    other = REPO / "configs" / "sim-large.yaml"
    runs = ["--duration", "2", "--runs-dir", tmp_path / "r"]
    one_line(cli("simulate", other, "--method", f"rl:{directory}", *runs), 2, "servers")
    one_line(cli("simulate", SIM, "--method", f"rl:{tmp_path / 'missing'}", *runs), 2, "missing")
    (directory / "policy.json").unlink()
    (directory / "policy.pt").unlink()
    (directory / "policy.pt").mkdir()
    one_line(cli("simulate", SIM, "--method", f"rl:{directory}", *runs), 2, "policy.pt")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "probe, args, needle",
    [
        ("TR-hyper-abc", ["--algo", "distr", "--hyper", "hidden=abc"], "hidden"),
        ("TR-algo-nope", ["--algo", "nope"], "nope"),
        ("TR-resume-keyless", ["--algo", "distr", "--resume"], "checkpoint"),
    ],
)
def test_bad_training_arguments_are_one_line(cli, tmp_path, probe, args, needle):
    out = tmp_path / "t"
    if probe == "TR-resume-keyless":
        import torch

        out.mkdir()
        torch.save({"nothing": 1}, out / "checkpoint.pt")
    result = cli("train", SIM, "--episodes", "1", "--episode-s", "2", "--out", out, *args)
    one_line(result, 2, needle)
