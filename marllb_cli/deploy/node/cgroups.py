"""CPU cgroups that encode a server's capacity as a CFS quota, on cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_*`).

A server of `cores` cores gets `quota = cores × period` per period. Values are read back after writing
(the kernel rounds or refuses some), so a capacity that did not take effect is an error, not a surprise.

What a group used is read exactly: v2's `cpu.stat`, or on v1 the cpuacct controller's `cpuacct.usage` (ns). When
v1 mounts cpuacct apart from cpu, the group gets a twin directory there holding the same processes. Without any
cpuacct, the processes' own times are summed, in clock ticks: with eight Apache workers in a group that is ±10 ms
per worker, ±15 % of a one-second calibration phase of a quarter core.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from marllb_cli.errors import MissingTool, TestbedError
from marllb_cli.processes import kill_pids

__all__ = ["CpuCgroup", "CpuUsage", "accounting_root", "cgroup_root"]

CGROUP_FS = Path("/sys/fs/cgroup")
ACCOUNTING_FILE = "cpuacct.usage"


def cgroup_root() -> tuple[Path, int]:
    """The directory under which CPU cgroups are made, and the cgroup version (1 or 2)."""
    controllers = CGROUP_FS / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP_FS, 2
    for v1 in (CGROUP_FS / "cpu", CGROUP_FS / "cpu,cpuacct"):
        if (v1 / "cpu.cfs_quota_us").exists():
            return v1, 1
    raise MissingTool(
        "no CPU cgroup controller found under /sys/fs/cgroup (neither v2 'cpu' nor v1 'cpu')",
        hint="mount the cgroup cpu controller; server capacities cannot be enforced without it",
    )


def accounting_root() -> Path | None:
    """On cgroup v1, the root of the cpuacct hierarchy when it is mounted apart from cpu (then a group needs a
    twin directory there); None on v2, when cpuacct shares cpu's mount, or when there is no cpuacct."""
    root, version = cgroup_root()
    if version == 2 or (root / ACCOUNTING_FILE).exists():
        return None
    separate = CGROUP_FS / "cpuacct"
    return separate if (separate / ACCOUNTING_FILE).exists() else None


@dataclass(frozen=True)
class CpuUsage:
    """A cgroup's CPU counters at one moment: what its processes used, and how often CFS held it back."""

    cpu_s: float
    periods: int
    throttled_periods: int
    throttled_s: float

    def since(self, earlier: CpuUsage) -> CpuUsage:
        """What the counters rose by since `earlier`."""
        return CpuUsage(
            cpu_s=self.cpu_s - earlier.cpu_s,
            periods=self.periods - earlier.periods,
            throttled_periods=self.throttled_periods - earlier.throttled_periods,
            throttled_s=self.throttled_s - earlier.throttled_s,
        )

    def as_json(self) -> dict[str, float | int]:
        return {
            "cpu_s": self.cpu_s,
            "periods": self.periods,
            "throttled_periods": self.throttled_periods,
            "throttled_s": self.throttled_s,
        }


@dataclass(frozen=True)
class CpuCgroup:
    """One CPU cgroup at `path` (an absolute directory in the cgroup filesystem)."""

    path: Path
    version: int

    @classmethod
    def at(cls, relative: str) -> CpuCgroup:
        """The cgroup `relative` (e.g. `marllb-small/srv0`) under this machine's CPU controller."""
        root, version = cgroup_root()
        return cls(root / relative, version)

    @property
    def accounting(self) -> Path | None:
        """The group's twin in a separate v1 cpuacct hierarchy (same relative path), if there is one."""
        twin_root = accounting_root() if self.version == 1 else None
        if twin_root is None:
            return None
        root, _ = cgroup_root()
        return twin_root / self.path.relative_to(root) if self.path.is_relative_to(root) else None

    def create(self) -> None:
        """Make the directory (and parents); on v2 enable the cpu controller for the children of each parent;
        on v1 with a separate cpuacct, its twin there too."""
        root, _ = cgroup_root()
        if (twin := self.accounting) is not None:
            twin.mkdir(parents=True, exist_ok=True)
        if self.version == 2:
            for parent in reversed(self.path.relative_to(root).parents):
                directory = root / parent
                directory.mkdir(exist_ok=True)
                control = directory / "cgroup.subtree_control"
                if "cpu" not in control.read_text().split():
                    control.write_text("+cpu")
        self.path.mkdir(parents=True, exist_ok=True)

    def set_cores(self, cores: float, period_us: int) -> None:
        """Limit the group to `cores` CPUs: quota = cores × period, checked by reading it back."""
        quota = int(round(cores * period_us))
        if self.version == 2:
            (self.path / "cpu.max").write_text(f"{quota} {period_us}")
            got = (self.path / "cpu.max").read_text().split()
            ok = got == [str(quota), str(period_us)]
        else:
            # Shrinking the period below the current quota is refused, so write in a safe order.
            (self.path / "cpu.cfs_quota_us").write_text("-1")
            (self.path / "cpu.cfs_period_us").write_text(str(period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            got = [(self.path / f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
            ok = got == [str(quota), str(period_us)]
        if not ok:
            raise TestbedError(f"cgroup {self.path}: wrote quota {quota}/{period_us} µs, kernel reports {got}")

    def cores(self) -> float:
        """The limit in force, in cores (inf when unlimited)."""
        if self.version == 2:
            quota, period = (self.path / "cpu.max").read_text().split()
        else:
            quota = (self.path / "cpu.cfs_quota_us").read_text().strip()
            period = (self.path / "cpu.cfs_period_us").read_text().strip()
        return float("inf") if quota in ("max", "-1") else int(quota) / int(period)

    def usage(self) -> CpuUsage:
        """CPU seconds used so far and the CFS throttling counters. On v2 `cpu.stat` holds them all; v1's cpu
        controller counts only throttling, so the CPU time is cpuacct's, or failing that summed over the group's
        processes (user and system time, with that of children they reaped: Apache's master reaps its
        workers)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if " " in line)
        if self.version == 2:
            return CpuUsage(
                cpu_s=int(stat["usage_usec"]) / 1e6,
                periods=int(stat.get("nr_periods", 0)),
                throttled_periods=int(stat.get("nr_throttled", 0)),
                throttled_s=int(stat.get("throttled_usec", 0)) / 1e6,
            )
        return CpuUsage(
            cpu_s=self._accounted_s(),
            periods=int(stat.get("nr_periods", 0)),
            throttled_periods=int(stat.get("nr_throttled", 0)),
            throttled_s=int(stat.get("throttled_time", 0)) / 1e9,
        )

    def _accounted_s(self) -> float:
        """v1: the group's CPU seconds by cpuacct (ns, exited processes included), else by its processes' ticks
        (a group made before it had a cpuacct twin)."""
        twin = self.accounting
        for exact in (self.path / ACCOUNTING_FILE, twin / ACCOUNTING_FILE if twin else None):
            if exact is not None and exact.exists():
                return int(exact.read_text()) / 1e9
        return sum(_process_cpu_s(pid) for pid in self.pids())

    def add_self(self) -> None:
        """Move the calling process into the group (used between fork and exec, so children inherit it)."""
        for directory in (self.path, self.accounting):
            if directory is not None and directory.is_dir():
                (directory / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return _pids_in(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self, *, grace_s: float = 10.0) -> None:
        """Stop every process in the group (they are ours: we put them there), then remove the directory and
        its cpuacct twin."""
        twin = self.accounting
        if self.exists():
            kill_pids(self.pids, grace_s=min(grace_s, 3.0))
        deadline = time.monotonic() + grace_s
        for directory in (self.path, twin):
            if directory is not None:
                _remove_directory(directory, deadline)


def _remove_directory(directory: Path, deadline: float) -> None:
    """rmdir a cgroup whose processes were stopped, waiting for the kernel to let the last of them go.

    A process can join after they were stopped: a deploy stopped by a signal while an Apache was starting
    kills its launcher, but the daemon the launcher had just forked runs on and starts its workers in the
    group (a chaos test caught 9 live Apache processes in a group 4 s into such a teardown). Whatever is
    still in the group when rmdir says busy is ours too, and is stopped the same way."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise TestbedError(f"cannot remove cgroup {directory}: {exc.strerror}") from None
            if _pids_in(directory):  # a late joiner (see above)
                kill_pids(lambda: _pids_in(directory), grace_s=1.0)
            _reap_exited_children()  # a zombie child of ours still holds the group (cgroup v1)
            time.sleep(0.05)


def _pids_in(directory: Path) -> list[int]:
    """The processes in cgroup `directory` (none once it is gone)."""
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except (FileNotFoundError, OSError):
        return []


_TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 when it has just exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state); utime is field 14
    return sum(int(value) for value in fields[11:15]) / _TICKS


def _reap_exited_children() -> None:
    """Reap every child of this process that has exited (only ever called while tearing down)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
