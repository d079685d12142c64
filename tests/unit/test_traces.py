"""Trace readers on the papers' real traces and hand-written WikiBench lines; the Poisson generator's statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marllb_cli.errors import ConfigError, TraceFormatError
from marllb_cli.traces import classify, poisson, read_trace, wiki, write_parquet
from marllb_cli.traces.generate import parse_mix
from tests.conftest import SHARED_TRACES

# (file, requests, last send time in s, steady rate in req/s) from the shared traces' README.
REAL = [
    ("poisson_for_loop_rate_150.tsv", 78_011, 534.9, 149.6),
    ("poisson_for_loop_rate_200.tsv", 77_998, 398.3, 200.9),
    ("poisson_for_loop_rate_400.tsv", 78_033, 200.0, 400.0),
]


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="the shared traces are not beside this checkout")
@pytest.mark.parametrize(("name", "requests", "duration", "rate"), REAL, ids=[r[0] for r in REAL])
def test_real_marllb_traces(name, requests, duration, rate):
    trace, skipped = read_trace(SHARED_TRACES / name)
    assert skipped == 0
    assert len(trace) == requests
    assert trace["t"].iloc[-1] == pytest.approx(duration, abs=0.1)
    assert trace["t"].is_monotonic_increasing
    assert (trace["class"] == "cpu").all()
    steady = trace.iloc[2000:]
    assert (len(steady) - 1) / (steady["t"].iloc[-1] - steady["t"].iloc[0]) == pytest.approx(rate, rel=0.01)
    assert trace["work"].mean() == pytest.approx(3.67e6, rel=0.01)
    assert trace["work"].median() == pytest.approx(2.55e6, rel=0.01)


def test_classify():
    assert classify("/dummy.php/?n=5478122") == ("cpu", 5478122.0)
    assert classify("/dummy.php?n=7")[0] == "cpu"
    assert classify("/wiki/Main_Page") == ("wiki", classify("/wiki/Main_Page")[1])
    assert math.isnan(classify("/wiki/Main_Page")[1])
    assert classify("/w/index.php?title=X")[0] == "wiki"
    assert classify("/static/10k.bin")[0] == "static"


WIKIBENCH = """\
7 1190146243.450 http://en.wikipedia.org/wiki/Main_Page -
3 1190146243.124 http://upload.wikimedia.org/wikipedia/commons/a/ab/X.png -
5 1190146243.200 http://en.wikipedia.org/skins-1.5/common/wikibits.js -
4 1190146243.150 http://en.wikipedia.org/wiki/Saved_Page save
6 1190146243.300 http://de.wikipedia.org/wiki/Hauptseite -
8 1190146243.100 http://en.wikipedia.org/w/index.php?title=Foo&action=raw -
9 1190146244.100 http://en.wikipedia.org/w/api.php?action=query -
"""


def test_wikibench_sorts_filters_and_strips_the_host(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKIBENCH)
    trace, skipped = read_trace(path)
    assert skipped == 0
    # Kept: the index.php page (t .100), the .js file (t .200), the page (t .450); sorted by time, from 0.
    assert trace["path"].tolist() == [
        "/w/index.php?title=Foo&action=raw",
        "/skins-1.5/common/wikibits.js",
        "/wiki/Main_Page",
    ]
    assert trace["t"].tolist() == pytest.approx([0.0, 0.1, 0.35], abs=1e-6)  # float64 Unix seconds: ~0.2 µs
    assert trace["class"].tolist() == ["wiki", "static", "wiki"]


def test_wikibench_millisecond_and_iso_timestamps(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(
        "1 1190146243500 http://en.wikipedia.org/wiki/A -\n"
        "2 2007-09-18T20:10:43.000+00:00 http://en.wikipedia.org/wiki/B -\n"
    )
    trace, _ = read_trace(path)
    assert trace["path"].tolist() == ["/wiki/B", "/wiki/A"]
    assert trace["t"].tolist() == pytest.approx([0.0, 0.5], abs=1e-6)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("time\tquery\n0.1\t/dummy.php/?n=1\nzero\t/dummy.php/?n=2\n0.3\t/dummy.php/?n=3\n0.4\n")
    with pytest.raises(TraceFormatError) as caught:
        read_trace(path)
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith(f"{path}:3: ")
    trace, skipped = read_trace(path, skip_bad=True)
    assert (len(trace), skipped) == (2, 2)


def test_bad_header_and_missing_file(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("when\twhat\n")
    (tmp_path / "y").write_text("time\tquery\n")
    with pytest.raises(TraceFormatError, match="expected the header"):
        read_trace(path, fmt="marllb")
    with pytest.raises(TraceFormatError, match="no such trace file"):
        read_trace(tmp_path / "nope.tsv")


def test_parquet_round_trip(tmp_path):
    trace = poisson(rate=50, duration=10, mix={"cpu": 0.5, "static": 0.5}, seed=1)
    write_parquet(trace, tmp_path / "t.parquet")
    again, _ = read_trace(tmp_path / "t.parquet")
    assert again["path"].tolist() == trace["path"].tolist()
    assert again["t"].tolist() == trace["t"].tolist()
    assert again["class"].tolist() == trace["class"].tolist()


def test_poisson_statistics_on_50k_requests():
    trace = poisson(rate=500, duration=100, work_mean=3.67e6, seed=3)
    assert len(trace) == pytest.approx(50_000, rel=0.02)
    gaps = np.diff(trace["t"].to_numpy())
    assert 1 / gaps.mean() == pytest.approx(500, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    work = trace["work"].to_numpy()
    assert work.mean() == pytest.approx(3.67e6, rel=0.02)
    assert work.std() / work.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


def test_poisson_is_reproducible_and_mixes_classes():
    a = poisson(rate=100, duration=50, mix=parse_mix("cpu=0.75,static=0.25"), seed=9)
    b = poisson(rate=100, duration=50, mix=parse_mix("cpu=0.75,static=0.25"), seed=9)
    assert a.equals(b)
    assert (a["class"] == "static").mean() == pytest.approx(0.25, abs=0.03)
    assert a.loc[a["class"] == "static", "work"].isna().all()
    # The arrival stream does not depend on the mix: common random numbers across scenarios.
    assert poisson(rate=100, duration=50, seed=9)["t"].tolist() == a["t"].tolist()


@pytest.mark.parametrize("text", ["cpu", "gpu=1", "cpu=x", "cpu=0,static=0"])
def test_bad_mix_is_refused(text):
    with pytest.raises(ConfigError):
        parse_mix(text)


def test_wiki_trace_is_diurnal_zipf_and_mixed():
    trace = wiki(rate=100, duration=1000, day_s=1000, amplitude=0.4, pages=1000, zipf=1.0, static_share=0.35, seed=2)
    assert len(trace) == pytest.approx(100_000, rel=0.02)  # the mean rate over a whole day
    counts, _ = np.histogram(trace["t"], bins=10, range=(0, 1000))
    # Trough at t = 0, peak at half a day: (1 + a)/(1 − a) = 2.33 between the outer and middle bins.
    middle, edges = counts[4:6].mean(), (counts[0] + counts[9]) / 2
    assert middle / edges == pytest.approx(1.4 / 0.6, rel=0.1)
    assert (trace["class"] == "static").mean() == pytest.approx(0.35, abs=0.01)
    pages = trace.loc[trace["class"] == "wiki", "path"].value_counts()
    # Zipf(1) over 1000 pages: page 1 has share 1/H(1000) = 0.1336, twice page 2's.
    share = pages / pages.sum()
    assert share["/wiki/index.php/Page_1"] == pytest.approx(1 / np.sum(1 / np.arange(1, 1001)), rel=0.05)
    assert pages["/wiki/index.php/Page_1"] / pages["/wiki/index.php/Page_2"] == pytest.approx(2.0, rel=0.1)
    static = trace.loc[trace["class"] == "static", "path"].value_counts(normalize=True)
    assert static["/static/1k.bin"] > static["/static/10k.bin"] > static["/static/100k.bin"]
    assert wiki(rate=10, duration=100, seed=5).equals(wiki(rate=10, duration=100, seed=5))
    assert all(classify(p)[0] == c for p, c in zip(trace["path"][:500], trace["class"][:500], strict=True))


@pytest.mark.parametrize("bad", [{"rate": 0}, {"amplitude": 1.0}, {"static_share": 1.5}, {"pages": 0}])
def test_wiki_refuses_bad_parameters(bad):
    with pytest.raises(ConfigError):
        wiki(**{"rate": 10, "duration": 10, **bad})
