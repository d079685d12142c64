"""The run directory: everything one experiment run (testbed replay or simulation) leaves behind.

    runs/<run-id>/
      config.yaml          the resolved config (every default filled in)
      meta.json            kind, method, seeds, trace, git sha, package versions, host, start/end, complete
      requests.parquet     one row per request sent (`REQUEST_COLUMNS`)
      servers.parquet      busy Apache workers per server over time (t_s, server, group, busy)
      agents/lb<i>.parquet one row per agent step (weights, q_j, features, reward candidates)
      summary.json         counts and JCT statistics, overall and per class (`summarize`)

`meta.json` is written first with `complete: false` and rewritten at the end, so a run that crashed or was
interrupted says so. `marllb report` reads only these files. JSON is written to a temporary file and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marllb_cli import __version__
from marllb_cli.errors import RunDirError, Terminated

__all__ = [
    "REQUEST_COLUMNS",
    "Run",
    "RunDir",
    "create_run_dir",
    "elapsed",
    "empty_requests",
    "environment",
    "load_run",
    "recover_killed",
    "requests_from_replay",
    "now_iso",
    "save_results",
    "summarize",
    "write_json",
]

#: requests.parquet: times are seconds since the run's intended time 0; NaN where a stage was not reached.
REQUEST_COLUMNS = {
    "intended_s": "float64",  # when the request was due
    "send_lag_s": "float64",  # how late it actually left
    "connect_s": "float64",  # connection established
    "first_byte_s": "float64",  # first response byte
    "done_s": "float64",  # response complete
    "jct_s": "float64",  # done_s - intended_s, for completed requests
    "status": "int64",  # HTTP status, 0 when there was no response
    "bytes": "int64",  # response body bytes received
    "server": "string",  # X-Server of the response ("" unknown)
    "lb": "string",  # LB that forwarded it ("" when the client cannot tell: DSR responses bypass LBs)
    "class": "string",  # cpu | static | wiki
    "path": "string",
    "error": "string",  # "" or timeout, econnreset, econnrefused, interrupted, rejected, ...
}
_VERSIONED = ("numpy", "pandas", "pyarrow", "torch", "pettingzoo", "pydantic", "uvloop")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def create_run_dir(runs_dir: Path, *, method: str, testbed: str, seed: int) -> Path:
    """A new, unique `runs_dir/<UTC time>-<testbed>-<method>-s<seed>[-n]` directory with `agents/` inside."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = f"{stamp}-{testbed}-{re.sub(r'[^A-Za-z0-9]+', '-', method).strip('-')}-s{seed}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        path = runs_dir / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        (path / "agents").mkdir()
        return path
    raise RunDirError(f"{runs_dir}: cannot find a free run directory name for {base}")


class RunDir:
    """One run directory's life, for `replay-trace` and `simulate` alike.

    On enter: a new directory (`create_run_dir`), the resolved `config.yaml`, and `meta.json` with
    `complete: false`, the start time and the environment. The run adds to `meta` as it goes and says how
    it ended with `finish`. On exit, always: the final `meta.json`, with `ended`; an exception that escapes
    the block marks the run incomplete with its reason (`interrupted` for Ctrl-C) and goes on."""

    def __init__(self, runs_dir: Path, *, config: Any, method: str, testbed: str, seed: int, meta: dict) -> None:
        self.runs_dir, self.config = runs_dir, config
        self.name = (method, testbed, seed)
        self.meta: dict[str, Any] = {**meta, "method": method, "seed": seed}

    def __enter__(self) -> RunDir:
        method, testbed, seed = self.name
        self.path = create_run_dir(self.runs_dir, method=method, testbed=testbed, seed=seed)
        (self.path / "config.yaml").write_text(self.config.resolved_yaml())
        self.meta.update(started=now_iso(), complete=False, failure=None, **environment())
        write_json(self.path / "meta.json", self.meta)
        return self

    def finish(self, *, complete: bool, failure: str | None = None, **more: Any) -> None:
        """How the run ended, and what else `meta.json` should say (written on exit)."""
        self.meta.update(complete=complete, failure=failure, **more)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.meta["complete"] = False
            if self.meta.get("failure") is None:
                self.meta["failure"] = (
                    f"terminated ({exc.args[0]})"
                    if isinstance(exc, Terminated)
                    else "interrupted"
                    if isinstance(exc, KeyboardInterrupt)
                    else f"{type(exc).__name__}: {exc}"
                )
        self.meta["ended"] = now_iso()
        write_json(self.path / "meta.json", self.meta)


def environment() -> dict[str, Any]:
    """Where and with what a run ran: git sha of the source tree, package versions, host."""
    versions = {"marllb": __version__, "python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git_sha": _git_sha(),
        "versions": versions,
        "host": {"name": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()},
    }


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def empty_requests(n: int) -> pd.DataFrame:
    """A requests frame of `n` rows with every column of `REQUEST_COLUMNS` at its 'not reached' value."""
    data: dict[str, Any] = {}
    for column, dtype in REQUEST_COLUMNS.items():
        if dtype == "float64":
            data[column] = np.full(n, np.nan)
        elif dtype == "int64":
            data[column] = np.zeros(n, dtype=np.int64)
        else:
            data[column] = pd.array([""] * n, dtype="string")
    return pd.DataFrame(data)


def requests_from_replay(csv_path: Path, schedule: pd.DataFrame) -> pd.DataFrame:
    """The replayer's rows (`marllb_cli.replay`), joined with the schedule's intended time, class and path;
    in schedule order."""
    try:
        rows = pd.read_csv(csv_path, keep_default_na=False, dtype={"server": str, "error": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return empty_requests(0)  # the replayer never started (the LBs failed first, say)
    rows = rows.sort_values("index").drop_duplicates("index")
    requests = empty_requests(len(rows))
    index = rows["index"].to_numpy(np.int64)
    requests["intended_s"] = schedule["intended_s"].to_numpy()[index]
    requests["class"] = pd.array(schedule["class"].to_numpy()[index], dtype="string")
    requests["path"] = pd.array(schedule["path"].to_numpy()[index], dtype="string")
    for column in ("send_lag_s", "connect_s", "first_byte_s", "done_s"):
        requests[column] = pd.to_numeric(rows[column], errors="coerce").to_numpy(np.float64)
    requests["status"] = rows["status"].to_numpy(np.int64)
    requests["bytes"] = rows["bytes"].to_numpy(np.int64)
    requests["server"] = pd.array(rows["server"].astype(str).to_numpy(), dtype="string")
    requests["error"] = pd.array(rows["error"].astype(str).to_numpy(), dtype="string")
    requests["jct_s"] = requests["done_s"] - requests["intended_s"]
    return requests


def elapsed(requests: pd.DataFrame) -> float:
    """How long a run that stopped early lasted: its last intended send or completion (0 when empty)."""
    ends = requests[["intended_s", "done_s"]].max(axis=1)
    return float(ends.max()) if len(requests) else 0.0


def recover_killed(path: Path) -> bool:
    """Finish the files of a testbed run whose controller was killed (SIGKILL, a crash) before it wrote its
    results: requests.parquet and summary.json from the replayer's own rows (every request it sent, in-flight
    ones as `interrupted`), and `failure` in meta.json. Busy workers and agent steps are not recovered.
    Returns whether it did; a run that is not such a run is left as it is."""
    meta_path, csv_path, schedule_path = path / "meta.json", path / "requests.csv", path / "schedule.parquet"
    if (path / "summary.json").exists() or not (csv_path.is_file() and schedule_path.is_file()):
        return False
    try:
        meta = _read_json(meta_path)
        requests = requests_from_replay(csv_path, pd.read_parquet(schedule_path))
    except (RunDirError, OSError, ValueError, KeyError):
        return False
    if meta.get("complete") or meta.get("kind") != "testbed":
        return False
    servers = pd.DataFrame({"t_s": [], "server": [], "group": [], "busy": []})
    duration = elapsed(requests)
    save_results(
        path, method=str(meta.get("method", "?")), requests=requests, servers=servers, agents={}, duration_s=duration
    )
    meta.update(
        failure=meta.get("failure") or "killed: marllb stopped before writing the results",
        recovered="requests.parquet and summary.json from the replayer's rows; no busy workers or agent steps",
        replayed_requests=len(requests),
    )
    write_json(meta_path, meta)
    csv_path.unlink()
    return True


def _completed(requests: pd.DataFrame) -> pd.Series:
    return (requests["error"] == "") & (requests["status"] >= 200) & (requests["status"] < 400)


def _jct_stats(jct: pd.Series) -> dict[str, float | None]:
    if jct.empty:
        return {"jct_mean_s": None, "jct_std_s": None, "jct_p50_s": None, "jct_p90_s": None, "jct_p99_s": None}
    q = jct.quantile([0.5, 0.9, 0.99])
    return {
        "jct_mean_s": float(jct.mean()),
        "jct_std_s": float(jct.std(ddof=0)),
        "jct_p50_s": float(q[0.5]),
        "jct_p90_s": float(q[0.9]),
        "jct_p99_s": float(q[0.99]),
    }


def summarize(requests: pd.DataFrame, *, method: str, duration_s: float) -> dict[str, Any]:
    """Counts and JCT statistics of a run, overall and per class. JCT is over completed requests only."""
    ok = _completed(requests)

    def block(frame: pd.DataFrame, done: pd.Series) -> dict[str, Any]:
        return {
            "requests": int(len(frame)),
            "completed": int(done.sum()),
            "errors": int(len(frame) - done.sum()),
            "error_rate": float(1 - done.mean()) if len(frame) else 0.0,
            **_jct_stats(frame.loc[done, "jct_s"]),
        }

    lags = requests["send_lag_s"].dropna()
    errors = requests.loc[requests["error"] != "", "error"].value_counts()
    return {
        "method": method,
        **block(requests, ok),
        "throughput_per_s": float(ok.sum() / duration_s) if duration_s > 0 else None,
        "duration_s": float(duration_s),
        "send_lag_p99_s": float(lags.quantile(0.99)) if len(lags) else None,
        "error_kinds": {str(k): int(v) for k, v in errors.items()},
        "by_class": {
            str(name): block(frame, ok[frame.index])
            for name, frame in requests.groupby("class", sort=True, observed=True)
        },
    }


def save_results(
    run: Path,
    *,
    method: str,
    requests: pd.DataFrame,
    servers: pd.DataFrame,
    agents: dict[str, pd.DataFrame],
    duration_s: float,
) -> dict[str, Any]:
    """Write requests.parquet, servers.parquet, agents/<lb>.parquet and summary.json; return the summary."""
    requests.to_parquet(run / "requests.parquet", index=False)
    servers.astype({"server": "string", "group": "string"}).to_parquet(run / "servers.parquet", index=False)
    for lb, frame in agents.items():
        frame.to_parquet(run / "agents" / f"{lb}.parquet", index=False)
    summary = summarize(requests, method=method, duration_s=duration_s)
    write_json(run / "summary.json", summary)
    return summary


class Run:
    """A run directory, read back (for `marllb report`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict[str, Any] = _read_json(path / "meta.json")
        self.summary: dict[str, Any] = _read_json(path / "summary.json")
        method = self.summary.get("method") or self.meta.get("method", "?")
        if not isinstance(method, str):
            raise RunDirError(f"{path / 'summary.json'}: method is not a name ({method!r})", hint=_REWRITE)
        self.method: str = method
        self.complete: bool = bool(self.meta.get("complete"))
        self._requests: pd.DataFrame | None = None
        self._servers: pd.DataFrame | None = None
        self._agents: pd.DataFrame | None = None

    def requests(self) -> pd.DataFrame:
        """requests.parquet with every column of `REQUEST_COLUMNS` in its type, or a `RunDirError`; read once
        (`report` checks every run of a folder before it aggregates them)."""
        if self._requests is None:
            self._requests = self._read_requests()
        return self._requests

    def _read_requests(self) -> pd.DataFrame:
        path = self.path / "requests.parquet"
        frame = _read_parquet(path)
        missing = [column for column in REQUEST_COLUMNS if column not in frame.columns]
        if missing:
            raise RunDirError(f"{path}: not a requests table (no {', '.join(missing)})", hint=_REWRITE)
        try:
            return frame.astype(REQUEST_COLUMNS)
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"{path}: a column has the wrong type ({exc})", hint=_REWRITE) from None

    def servers(self) -> pd.DataFrame:
        """servers.parquet (empty without one), read once: the report's table and its figures both use it."""
        if self._servers is None:
            path = self.path / "servers.parquet"
            empty = pd.DataFrame(columns=["t_s", "server", "group", "busy"])
            self._servers = _read_parquet(path) if path.exists() else empty
        return self._servers

    def events(self) -> pd.DataFrame:
        """events.parquet: the run's timed events, intended and applied (empty without one)."""
        from marllb_cli.events import EVENT_COLUMNS, events_frame

        path = self.path / "events.parquet"
        return _read_parquet(path).astype(EVENT_COLUMNS) if path.exists() else events_frame([])

    def agents(self) -> pd.DataFrame:
        """Every LB's agent steps (agents/lb*.parquet), read once: the report's weight dynamics and its
        figure both use them."""
        if self._agents is None:
            frames = [_read_parquet(p) for p in sorted((self.path / "agents").glob("lb*.parquet"))]
            self._agents = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return self._agents


def load_run(path: Path) -> Run:
    """A run directory, or a `RunDirError` naming what is missing."""
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory", hint="pass directories written by replay-trace or simulate")
    for name in ("meta.json", "summary.json", "requests.parquet"):
        if not (path / name).is_file():
            raise RunDirError(
                f"{path}: not a run directory (no {name})", hint="pass directories written by replay-trace or simulate"
            )
    return Run(path)


_REWRITE = "it was not written by marllb, or was changed since: run it again"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bad UTF-8 alike
        raise RunDirError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable Parquet ({exc.__class__.__name__})") from None
