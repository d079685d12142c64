"""`marllb trace gen|stats` through the CLI: numbers in, numbers out, bad input is exit 2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED_TRACES


def test_generate_then_stats(cli, tmp_path):
    out = tmp_path / "p.parquet"
    result = cli(
        "trace",
        "gen",
        "poisson",
        "--rate",
        "200",
        "--duration",
        "50",
        "--mix",
        "cpu=0.5,static=0.5",
        "--seed",
        "4",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(cli("trace", "stats", out, "--json").stdout)
    assert stats["requests"] == pytest.approx(10_000, rel=0.03)
    assert stats["rate_per_s"] == pytest.approx(200, rel=0.03)
    assert len(stats["rate_over_time"]) == 10
    assert stats["classes"]["cpu"] == pytest.approx(0.5, abs=0.02)
    assert stats["work"]["requests"] == pytest.approx(5_000, rel=0.05)
    assert stats["work"]["mean"] == pytest.approx(3.67e6, rel=0.05)


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="the shared traces are not beside this checkout")
def test_stats_of_a_real_trace(cli):
    result = cli("trace", "stats", SHARED_TRACES / "poisson_for_loop_rate_400.tsv", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["requests"] == 78_033
    assert stats["rate_over_time"][-1]["rate_per_s"] == pytest.approx(400, rel=0.05)


@pytest.mark.parametrize(
    "args",
    [
        ("trace", "stats", "/nonexistent/trace.tsv"),
        ("trace", "gen", "poisson", "--rate", "10", "--duration", "5", "--mix", "gpu=1", "--out", "x.parquet"),
        ("trace", "gen", "poisson", "--rate", "-1", "--duration", "5", "--out", "x.parquet"),
        ("trace", "gen", "poisson", "--rate", "10", "--duration", "5", "--out", "x.csv"),
    ],
)
def test_bad_trace_input_is_exit_2(cli, args):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
