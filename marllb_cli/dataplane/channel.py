"""Shared memory between one LB's dataplane and its agent: stats one way, method and weights the other.

One file in /dev/shm (mode 0600, created by the dataplane, which owns it), laid out as three fixed blocks
of native little-endian fields (`numpy` structured dtypes, C alignment), layout version 1:

    header   magic 'MLLB', version, n_servers, slots, stats_seq, control_seq, dataplane_pid, agent_pid,
             agent_heartbeat (CLOCK_MONOTONIC seconds of the agent's last step)
    control  written by the agent:      method (index into METHODS), weights[n]
    stats    written by the dataplane:  time, counters[len(COUNTERS)], flows/new_flows/packets[n],
             reservoirs (filled count, times[slots], values[slots]) for inter-arrivals (one), flow
             durations (per server) and flow completion times (per server)

Each of control and stats has one writer and is guarded by a sequence lock: the writer makes its sequence
number odd, copies the block, then makes it even; a reader copies the block between two reads of the
sequence number and retries when they differ or are odd, so it never acts on a torn frame. The dataplane
publishes a snapshot every few milliseconds (not per packet) and reads the control block as often; when
the agent dies the last weights simply stay in force (fail-static). Timestamps are CLOCK_MONOTONIC, which
every process on the machine shares, so the agent can age samples against its own clock.
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marllb_cli.dataplane.flows import FlowTable
from marllb_cli.dataplane.packets import VERDICT_NAMES
from marllb_cli.dataplane.selection import METHODS
from marllb_cli.features import RESERVOIR_SLOTS, Reservoir

__all__ = ["Channel", "COUNTERS", "LAYOUT_VERSION", "Stats", "TornRead"]

MAGIC = 0x424C4C4D  # b"MLLB" little-endian
LAYOUT_VERSION = 1
#: Bounds a header may state (a larger one is not a channel marllb wrote, and would map gigabytes).
MAX_SERVERS, MAX_SLOTS = 4096, 1 << 16
#: Counters the dataplane publishes: one per parse verdict, then what it did with the frames.
COUNTERS = (*VERDICT_NAMES, "forwarded", "send_errors", "untracked", "overflow", "closed", "timed_out", "open")

_HEADER = np.dtype(
    [
        ("magic", "<u4"),
        ("version", "<u4"),
        ("n_servers", "<u4"),
        ("slots", "<u4"),
        ("stats_seq", "<u8"),
        ("control_seq", "<u8"),
        ("dataplane_pid", "<u4"),
        ("agent_pid", "<u4"),
        ("agent_heartbeat", "<f8"),
    ],
    align=True,
)


def _reservoir_dtype(slots: int) -> np.dtype:
    return np.dtype([("filled", "<u4"), ("times", "<f8", (slots,)), ("values", "<f8", (slots,))], align=True)


def _control_dtype(n: int) -> np.dtype:
    return np.dtype([("method", "<u4"), ("weights", "<f8", (n,))], align=True)


def _stats_dtype(n: int, slots: int) -> np.dtype:
    reservoir = _reservoir_dtype(slots)
    return np.dtype(
        [
            ("time", "<f8"),
            ("counters", "<u8", (len(COUNTERS),)),
            ("flows", "<i8", (n,)),
            ("new_flows", "<u8", (n,)),
            ("packets", "<u8", (n,)),
            ("interarrivals", reservoir),
            ("durations", reservoir, (n,)),
            ("completions", reservoir, (n,)),
        ],
        align=True,
    )


class TornRead(RuntimeError):
    """The writer kept writing while we read, for longer than a reader should ever wait."""


@dataclass(frozen=True)
class Stats:
    """One consistent snapshot of an LB's dataplane statistics."""

    time: float
    counters: dict[str, int]
    flows: np.ndarray
    new_flows: np.ndarray
    packets: np.ndarray
    interarrivals: tuple[np.ndarray, np.ndarray]
    durations: list[tuple[np.ndarray, np.ndarray]]
    completions: list[tuple[np.ndarray, np.ndarray]]


def _samples(record: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The filled slots of a 0-d reservoir record."""
    filled = int(record["filled"])
    return record["times"][:filled].copy(), record["values"][:filled].copy()


def _store(record: np.ndarray, reservoir: Reservoir) -> None:
    """Copy a reservoir into a 0-d reservoir record (a view into the staging block)."""
    times, values = reservoir.samples()
    record["filled"] = reservoir.filled
    record["times"][: len(times)] = times
    record["values"][: len(values)] = values


class Channel:
    """A mapped channel file; `create` (dataplane) or `attach` (agent, `marllb lb stats`)."""

    def __init__(self, path: Path, buffer: mmap.mmap) -> None:
        self.path = path
        self._mmap = buffer
        self.header = np.ndarray((), _HEADER, buffer=buffer, offset=0)
        if int(self.header["magic"]) != MAGIC or int(self.header["version"]) != LAYOUT_VERSION:
            raise ValueError(f"{path}: not a marllb channel of layout version {LAYOUT_VERSION}")
        self.n = int(self.header["n_servers"])
        self.slots = int(self.header["slots"])
        if not (1 <= self.n <= MAX_SERVERS and 1 <= self.slots <= MAX_SLOTS) or len(buffer) != self.size(
            self.n, self.slots
        ):
            raise ValueError(f"{path}: not a marllb channel (its header does not match its size)")
        control, stats = _control_dtype(self.n), _stats_dtype(self.n, self.slots)
        self._control = np.ndarray((), control, buffer=buffer, offset=_HEADER.itemsize)
        self._stats = np.ndarray((), stats, buffer=buffer, offset=_HEADER.itemsize + control.itemsize)
        self._staging = np.zeros((), stats)

    @staticmethod
    def size(n: int, slots: int = RESERVOIR_SLOTS) -> int:
        return _HEADER.itemsize + _control_dtype(n).itemsize + _stats_dtype(n, slots).itemsize

    @classmethod
    def create(
        cls, path: Path, n: int, method: str, weights: Sequence[float], *, slots: int = RESERVOIR_SLOTS
    ) -> Channel:
        """Create the file (it must not exist), write the header and the initial method and weights."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, cls.size(n, slots))
            buffer = mmap.mmap(fd, cls.size(n, slots))
        finally:
            os.close(fd)
        header = np.ndarray((), _HEADER, buffer=buffer, offset=0)
        header["n_servers"], header["slots"], header["version"] = n, slots, LAYOUT_VERSION
        header["dataplane_pid"] = os.getpid()
        header["magic"] = MAGIC  # last: an attaching reader checks it
        channel = cls(path, buffer)
        channel.write_control(method, weights)
        return channel

    @classmethod
    def attach(cls, path: Path) -> Channel:
        """Map an existing channel: never through a symlink, and only a regular file of this user that no
        one else can read or write (the name is predictable; whoever could plant the file would steer the
        LB)."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise ValueError(f"{path}: not a marllb channel (not a private file of this user)")
            buffer = mmap.mmap(fd, info.st_size)
        finally:
            os.close(fd)
        if len(buffer) < _HEADER.itemsize:
            raise ValueError(f"{path}: too short to be a marllb channel")
        return cls(path, buffer)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        # Views into the mmap must go before it can close.
        del self.header, self._control, self._stats
        self._mmap.close()

    # -- control: agent → dataplane --------------------------------------------------------------------
    def write_control(self, method: str, weights: Sequence[float]) -> None:
        if len(weights) != self.n:
            raise ValueError(f"expected {self.n} weights, got {len(weights)}")
        seq = int(self.header["control_seq"])
        self.header["control_seq"] = seq + 1
        self._control["method"] = METHODS.index(method)
        self._control["weights"] = weights
        self.header["control_seq"] = seq + 2

    @property
    def control_seq(self) -> int:
        return int(self.header["control_seq"])

    def read_control(self, *, patience_s: float = 1.0) -> tuple[int, str, list[float]]:
        """(sequence number, method, weights), consistent; `TornRead` if no consistent copy came within
        `patience_s` (the writer is mid-write, or died there)."""
        record = self._read(self._control, "control_seq", patience_s=patience_s)
        seq, value = record
        return seq, METHODS[int(value["method"])], [float(w) for w in value["weights"]]

    def heartbeat(self) -> None:
        """The agent's proof of life (one aligned 8-byte store: never torn)."""
        self.header["agent_pid"] = os.getpid()
        self.header["agent_heartbeat"] = time.monotonic()

    # -- stats: dataplane → agent ----------------------------------------------------------------------
    def publish(self, now: float, counters: Sequence[int], table: FlowTable) -> None:
        """Copy the flow table's statistics and `counters` into the stats block."""
        staged = self._staging
        staged["time"] = now
        staged["counters"] = counters
        staged["flows"] = table.flows
        staged["new_flows"] = table.new_flows
        staged["packets"] = table.packets
        _store(staged["interarrivals"], table.interarrivals)
        for j in range(self.n):
            _store(staged["durations"][j, ...], table.durations[j])
            _store(staged["completions"][j, ...], table.completions[j])
        seq = int(self.header["stats_seq"])
        self.header["stats_seq"] = seq + 1
        self._stats[...] = staged
        self.header["stats_seq"] = seq + 2

    def read_stats(self, *, patience_s: float = 1.0) -> Stats:
        """The latest consistent statistics; `TornRead` if none came within `patience_s`."""
        _, record = self._read(self._stats, "stats_seq", patience_s=patience_s)
        return Stats(
            time=float(record["time"]),
            counters=dict(zip(COUNTERS, (int(c) for c in record["counters"]), strict=True)),
            flows=record["flows"].copy(),
            new_flows=record["new_flows"].copy(),
            packets=record["packets"].copy(),
            interarrivals=_samples(record["interarrivals"]),
            durations=[_samples(record["durations"][j, ...]) for j in range(self.n)],
            completions=[_samples(record["completions"][j, ...]) for j in range(self.n)],
        )

    def _read(self, block: np.ndarray, seq_field: str, *, patience_s: float = 1.0) -> tuple[int, np.ndarray]:
        deadline = time.monotonic() + patience_s
        while True:
            before = int(self.header[seq_field])
            if before % 2 == 0:
                copy = block.copy()
                if int(self.header[seq_field]) == before:
                    return before, copy
            if time.monotonic() > deadline:
                raise TornRead(f"{self.path}: {seq_field} kept changing for {patience_s} s")
            time.sleep(0)
