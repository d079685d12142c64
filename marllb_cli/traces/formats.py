"""Trace file formats.

- **MARLLB TSV** (the papers' artefact): header `time<TAB>query`, then `<seconds><TAB><path>` per request,
  e.g. `0.115  /dummy.php/?n=5478122`.
- **WikiBench**: `<id> <timestamp> <url> <save-flag>` per request. Timestamps are Unix seconds (with a
  fraction), Unix milliseconds, or ISO 8601, depending on the dump; lines are not ordered by time. We keep
  GET requests (save flag `-`) for one wiki host, of pages (`/wiki/...`, `/w/index.php?title=...`) and
  static files, strip the host, and sort by time.
- **Parquet** (ours): columns `t`, `path`, `class` and optionally `work`.

Malformed lines raise `TraceFormatError` naming file and line, or are skipped and counted with `skip_bad`.
Every format meets the same rules (`REQUEST_PATH`, finite times ≥ 0): a path is what the replayer puts on the
request line, so a space, a CR or an LF in it would make a second request.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd

from marllb_cli.errors import ConfigError, TraceFormatError

__all__ = [
    "REQUEST_PATH",
    "TRACE_CLASSES",
    "TRACE_COLUMNS",
    "classify",
    "read_marllb_tsv",
    "read_trace",
    "read_wikibench",
    "trace_stats",
    "trace_window",
    "write_parquet",
]

TRACE_COLUMNS = ("t", "path", "class", "work")
TRACE_CLASSES = ("cpu", "static", "wiki")
_CPU_PAGE = re.compile(r"^/dummy\.php(/|\?|$)")
#: A request path as it may go on the wire: absolute, printable ASCII without spaces, at most 8 KiB.
REQUEST_PATH = re.compile(r"/[\x21-\x7e]{0,8191}")
_STATIC_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".css", ".js", ".bin", ".txt", ".pdf", ".ogg")


def classify(path: str) -> tuple[str, float]:
    """(class, work) of a request path: the for-loop page is cpu with work = n, wiki pages are wiki."""
    if _CPU_PAGE.match(path):
        n = parse_qs(urlsplit(path).query).get("n", [""])[0]
        return "cpu", float(n) if n.isdigit() else math.nan
    if path.startswith("/wiki/") or path.startswith("/w/index.php"):
        return "wiki", math.nan
    return "static", math.nan


def _frame(times: list[float], paths: list[str], *, shift: bool) -> pd.DataFrame:
    """A trace frame from unsorted (time, path) lists: sorted by time, classified, and with `shift` (absolute
    timestamps) moved so the first request is at 0; relative times are kept as they are."""
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    t = np.asarray(times, dtype=np.float64)[order]
    sorted_paths = [paths[i] for i in order]
    classes, work = zip(*(classify(p) for p in sorted_paths), strict=True) if sorted_paths else ((), ())
    return pd.DataFrame(
        {
            "t": t - (t[0] if shift and len(t) else 0.0),
            "path": sorted_paths,
            "class": pd.Categorical(classes, categories=TRACE_CLASSES),
            "work": np.asarray(work, dtype=np.float64),
        }
    )


def _bad(path: Path, line_number: int, problem: str, skip_bad: bool, skipped: list[int]) -> None:
    if not skip_bad:
        raise TraceFormatError(f"{path}:{line_number}: {problem}", hint="fix the line, or pass --skip-bad to skip it")
    skipped.append(line_number)


def read_marllb_tsv(path: str | Path, *, skip_bad: bool = False) -> tuple[pd.DataFrame, int]:
    """Read the papers' TSV trace; return (trace, number of skipped bad lines)."""
    path = Path(path)
    times: list[float] = []
    paths: list[str] = []
    skipped: list[int] = []
    with _open(path) as lines:
        header = next(lines, "").rstrip("\n")
        if header.split("\t") != ["time", "query"]:
            raise TraceFormatError(f"{path}:1: expected the header 'time<TAB>query', found {header[:40]!r}")
        for number, line in enumerate(lines, start=2):
            fields = line.rstrip("\n").split("\t")
            if fields == [""]:
                continue
            try:
                if len(fields) != 2 or not fields[1].startswith("/"):
                    raise ValueError("expected '<seconds><TAB>/path'")
                _check_path(fields[1])
                t = float(fields[0])
                if not math.isfinite(t) or t < 0:
                    raise ValueError(f"bad time {fields[0]!r}")
            except ValueError as exc:
                _bad(path, number, str(exc).removeprefix("could not convert string to float: "), skip_bad, skipped)
                continue
            times.append(t)
            paths.append(fields[1])
    return _frame(times, paths, shift=False), len(skipped)


def read_wikibench(
    path: str | Path, *, host: str = "en.wikipedia.org", skip_bad: bool = False
) -> tuple[pd.DataFrame, int]:
    """Read a WikiBench trace, keeping page and static GETs of `host`; return (trace, skipped bad lines)."""
    path = Path(path)
    times: list[float] = []
    paths: list[str] = []
    skipped: list[int] = []
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 4:
                    raise ValueError(f"expected 4 fields '<id> <timestamp> <url> <save-flag>', found {len(fields)}")
                t = _timestamp(fields[1])
                url = urlsplit(fields[2])
            except ValueError as exc:
                _bad(path, number, str(exc), skip_bad, skipped)
                continue
            if fields[3] != "-" or url.hostname != host:
                continue  # a save (write), or another wiki
            request = url.path + (f"?{url.query}" if url.query else "")
            if not REQUEST_PATH.fullmatch(request):
                _bad(path, number, f"bad path {request[:40]!r}", skip_bad, skipped)
                continue
            if classify(request)[0] == "static" and not url.path.lower().endswith(_STATIC_SUFFIXES):
                continue  # neither a page nor a static file (API calls, special scripts)
            times.append(t)
            paths.append(request)
    return _frame(times, paths, shift=True), len(skipped)


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read our Parquet trace, checking its columns and classes."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise TraceFormatError(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from None
    missing = {"t", "path", "class"} - set(frame.columns)
    if missing:
        raise TraceFormatError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; expected t, path, class[, work]"
        )
    unknown = set(frame["class"].astype(str)) - set(TRACE_CLASSES)
    if unknown:
        raise TraceFormatError(f"{path}: unknown class(es) {sorted(unknown)}; expected one of {list(TRACE_CLASSES)}")
    if "work" not in frame.columns:
        frame["work"] = np.nan
    frame["t"] = _column(path, frame, "t", allow_nan=False)
    frame["work"] = _column(path, frame, "work", allow_nan=True)
    paths = frame["path"]
    bad = [i for i, p in enumerate(paths) if not (isinstance(p, str) and REQUEST_PATH.fullmatch(p))]
    if bad:
        shown = paths.iloc[bad[0]]
        shown = shown.item() if isinstance(shown, np.generic) else shown
        raise TraceFormatError(
            f"{path}: row {bad[0]}: bad path {repr(shown)[:80]} ({len(bad)} such rows)",
            hint="a path is '/' and printable ASCII without spaces, CR or LF, at most 8 KiB",
        )
    frame = frame.sort_values("t", kind="stable").reset_index(drop=True)
    frame["class"] = pd.Categorical(frame["class"].astype(str), categories=TRACE_CLASSES)
    return frame[list(TRACE_COLUMNS)]


def _column(path: Path, frame: pd.DataFrame, name: str, *, allow_nan: bool) -> np.ndarray:
    """A numeric column whose values are finite and ≥ 0 (NaN too where `allow_nan`: no work given)."""
    try:
        values = pd.to_numeric(frame[name], errors="raise").to_numpy(np.float64)
    except (ValueError, TypeError):
        raise TraceFormatError(f"{path}: column {name} is not numeric") from None
    ok = (np.isfinite(values) & (values >= 0)) | (np.isnan(values) if allow_nan else False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise TraceFormatError(
            f"{path}: row {row}: {name} = {float(values[row])!r} ({int((~ok).sum())} such rows)",
            hint=f"{name} must be finite and ≥ 0",
        )
    return values


def _check_path(request: str) -> None:
    if not REQUEST_PATH.fullmatch(request):
        raise ValueError(f"bad path {request[:40]!r} (printable ASCII without spaces, at most 8 KiB)")


def write_parquet(trace: pd.DataFrame, path: str | Path) -> None:
    """Write a trace in our Parquet format."""
    try:
        trace[list(TRACE_COLUMNS)].to_parquet(path, index=False)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write it ({exc})", hint="write into an existing directory") from None


def read_trace(
    path: str | Path, *, fmt: str = "auto", skip_bad: bool = False, host: str = "en.wikipedia.org"
) -> tuple[pd.DataFrame, int]:
    """Read any supported trace; `fmt` is auto, marllb, wikibench or parquet. Returns (trace, skipped lines)."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"{path}: no such trace file")
    if fmt == "auto":
        fmt = _detect(path)
    if fmt == "parquet":
        return read_parquet(path), 0
    if fmt == "marllb":
        return read_marllb_tsv(path, skip_bad=skip_bad)
    if fmt == "wikibench":
        return read_wikibench(path, host=host, skip_bad=skip_bad)
    raise TraceFormatError(f"{path}: unknown trace format {fmt!r}; use auto, marllb, wikibench or parquet")


def _detect(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PAR1"):
        return "parquet"
    return "marllb" if head.startswith(b"time\tquery") else "wikibench"


def _open(path: Path):
    try:
        return path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror})") from None


def _timestamp(text: str) -> float:
    """Seconds since the epoch from Unix seconds, Unix milliseconds (> 1e11) or ISO 8601."""
    try:
        value = float(text)
    except ValueError:
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            raise ValueError(f"bad timestamp {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"bad timestamp {text!r}")
    return value / 1000.0 if value > 1e11 else value


def trace_stats(trace: pd.DataFrame, *, bins: int = 10) -> dict:
    """Count, duration, rate (overall and per time bin), work percentiles and class shares of a trace."""
    n = len(trace)
    duration = float(trace["t"].iloc[-1]) if n else 0.0
    edges = np.linspace(0.0, duration, bins + 1) if duration > 0 else np.array([0.0, 1.0])
    counts, _ = np.histogram(trace["t"], bins=edges)
    width = edges[1] - edges[0]
    work = trace["work"].dropna()
    quantiles = work.quantile([0.5, 0.9, 0.99])  # NaN for a trace without CPU work
    return {
        "requests": n,
        "duration_s": duration,
        "rate_per_s": n / duration if duration > 0 else float("nan"),
        "rate_over_time": [
            {"from_s": float(start), "rate_per_s": float(count / width)}
            for start, count in zip(edges[:-1], counts, strict=True)
        ],
        "work": {
            "requests": int(len(work)),
            "mean": float(work.mean()),
            "p50": float(quantiles[0.5]),
            "p90": float(quantiles[0.9]),
            "p99": float(quantiles[0.99]),
        },
        "classes": {c: float((trace["class"] == c).mean()) if n else 0.0 for c in TRACE_CLASSES},
    }


def trace_window(trace: pd.DataFrame, start_s: float, length_s: float | None) -> pd.DataFrame:
    """The requests of trace time [start_s, start_s + length_s), their times moved so the window starts at 0."""
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ConfigError(f"--start {start_s:g}: must be a finite number of seconds ≥ 0")
    t = trace["t"].to_numpy(np.float64)
    if start_s > 0 and (len(t) == 0 or start_s >= t.max()):
        raise ConfigError(f"--start {start_s:g}: the trace ends before that ({t.max() if len(t) else 0:g} s)")
    keep = t >= start_s
    if length_s is not None:
        keep &= t < start_s + length_s
    window = trace.loc[keep].reset_index(drop=True)
    return window.assign(t=window["t"] - start_s)
