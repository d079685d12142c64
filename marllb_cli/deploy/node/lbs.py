"""One LB's processes, where the LB is: its dataplane and its agent, started from the specs the controller
planned (`deploy.base.lb_plan`), stopped, and read.

    start_lb      write the specs, record the channel file and start the dataplane, wait for its first stats
                  snapshot, start the agent, wait for its first heartbeat
    stop_lbs      stop the agents, then the dataplanes (SIGTERM, then SIGKILL), remove the channel files
    read_snapshot one consistent snapshot of an LB from its channel

The local testbed calls these for each LB namespace (`deploy.local.LocalLbs`); on a `kind: ssh` LB host
`marllb node lb-start`, `lb-stop` and `lb-stats` call them. Everything is recorded in the node's manifest,
so a teardown also removes LBs left running.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marllb_cli.agents.runner import AgentSpec
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.dataplane.channel import Channel, Stats
from marllb_cli.dataplane.fastpath import DataplaneSpec
from marllb_cli.deploy.node.manifest import Manifest, Resource
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.services import Service, start_service

__all__ = [
    "LbSnapshot",
    "SHM_DIR",
    "channel_path",
    "lb_resources",
    "read_snapshot",
    "start_lb",
    "steps_log",
    "stop_lbs",
]

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class LbSnapshot:
    """One LB as `marllb lb stats` shows it."""

    lb: str
    dataplane_running: bool
    agent_running: bool
    method: str | None
    weights: list[float] | None
    agent_heartbeat_age_s: float | None
    stats: Stats | None

    def as_json(self, servers: list[str]) -> dict[str, Any]:
        """What `lb stats --json` prints for this LB (and a `kind: ssh` LB host sends back)."""
        out: dict[str, Any] = {
            "lb": self.lb,
            "dataplane_running": self.dataplane_running,
            "agent_running": self.agent_running,
            "agent_heartbeat_age_s": self.agent_heartbeat_age_s,
            "method": self.method,
            "weights": self.weights,
        }
        if self.stats is not None:
            out["counters"] = self.stats.counters
            out["servers"] = [
                {
                    "name": name,
                    "flows": int(self.stats.flows[j]),
                    "new_flows": int(self.stats.new_flows[j]),
                    "packets": int(self.stats.packets[j]),
                }
                for j, name in enumerate(servers)
            ]
        return out


def read_snapshot(testbed: str, lb: str, manifest: Manifest) -> LbSnapshot:
    """One LB's processes and channel, read where the LB runs (its namespace's host, or the LB host)."""
    services = {r.name: Service.from_record(r.name, r.data) for r in lb_resources(manifest) if r.kind == "process"}
    dataplane, agent = services.get(f"{lb}-dataplane"), services.get(f"{lb}-agent")
    snapshot: dict[str, Any] = dict(
        lb=lb,
        dataplane_running=bool(dataplane and dataplane.running()),
        agent_running=bool(agent and agent.running()),
        method=None,
        weights=None,
        agent_heartbeat_age_s=None,
        stats=None,
    )
    path = channel_path(testbed, lb)
    if dataplane is not None and path.exists():
        with Channel.attach(path) as channel:
            _, snapshot["method"], snapshot["weights"] = channel.read_control()
            beat = float(channel.header["agent_heartbeat"])
            snapshot["agent_heartbeat_age_s"] = time.monotonic() - beat if beat else None
            snapshot["stats"] = channel.read_stats()
    return LbSnapshot(**snapshot)


def channel_path(testbed: str, lb: str) -> Path:
    """The shared-memory channel between an LB's dataplane and its agent, in the LB's private (0700)
    directory of /dev/shm: no other user can plant a file under the name the dataplane will create."""
    return SHM_DIR / f"marllb-{testbed}-{lb}" / "channel"


def private_directory(directory: Path, manifest: Manifest) -> None:
    """`directory` for this testbed's channels: made 0700 (recorded first, so teardown removes it), or, when
    it exists, accepted only if the manifest lists it and it is still a private directory of this user."""
    if directory.exists() or directory.is_symlink():
        info = os.lstat(directory)
        ours = str(directory) in {r.data.get("path") for r in manifest.of_kind("directory")}
        private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077
        if not (ours and private):
            raise TestbedError(
                f"{directory} exists but testbed {manifest.testbed} did not create it as a private directory",
                hint=f"if no marllb process uses it, remove it yourself: rm -r {directory}",
            )
        return
    manifest.record("directory", directory.name, path=str(directory))
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)  # whatever the umask


def steps_log(directory: Path, lb: str) -> Path:
    return directory / f"{lb}.steps.jsonl"


def start_lb(host: LocalHost, manifest: Manifest, dataplane: DataplaneSpec, agent: AgentSpec, directory: Path) -> None:
    """Start one LB's dataplane, wait for its first statistics, then its agent, and wait for its first step.

    Runs where the LB is: in its namespace (local testbed) or on the LB host itself (`marllb node lb-start`).
    The channel and every process are recorded in `manifest` before they exist."""
    name, channel = dataplane.lb, dataplane.channel
    private_directory(channel.parent, manifest)
    if channel.exists() and str(channel) not in {r.data.get("path") for r in manifest.of_kind("file")}:
        raise TestbedError(
            f"{channel} exists but testbed {manifest.testbed} did not create it",
            hint=f"if no marllb process uses it, remove it yourself: rm {channel}",
        )
    channel.unlink(missing_ok=True)
    agent.steps_log.unlink(missing_ok=True)  # each start logs afresh
    directory.mkdir(parents=True, exist_ok=True)
    dataplane_file, agent_file = directory / f"{name}.dataplane.json", directory / f"{name}.agent.json"
    dataplane_file.write_text(dataplane.model_dump_json(indent=1))
    agent_file.write_text(agent.model_dump_json(indent=1))

    manifest.record("file", f"{name}-channel", path=str(channel), lb=name)
    for role, module, spec_file, ready, what in (
        ("dataplane", "marllb_cli.dataplane.fastpath", dataplane_file, _published, "publish stats"),
        ("agent", "marllb_cli.agents.runner", agent_file, _stepped, "take its first step"),
    ):
        log = directory / f"{name}.{role}.log"
        mark = log.stat().st_size if log.exists() else 0  # where this start's lines begin
        service = start_service(host, f"{name}-{role}", module, [str(spec_file)], log)
        manifest.record("process", service.name, lb=name, **service.as_record())
        _wait(service, lambda s=service, is_ready=ready: is_ready(channel, s), what, since=mark)


def start_coordinator(host: LocalHost, manifest: Manifest, spec: CoordinatorSpec, lb: str, directory: Path) -> None:
    """Start a training episode's coordinator on LB `lb`'s node and wait until it listens; recorded as that
    LB's `-coordinator` process, so `stop_lbs` stops it with the LB's other processes."""
    directory.mkdir(parents=True, exist_ok=True)
    spec_file = directory / "coordinator.json"
    spec_file.write_text(spec.model_dump_json(indent=1))
    spec.trajectory.unlink(missing_ok=True)
    log = directory / "coordinator.log"
    mark = log.stat().st_size if log.exists() else 0
    service = start_service(host, f"{lb}-coordinator", "marllb_cli.coordination.coordinator", [str(spec_file)], log)
    manifest.record("process", service.name, lb=lb, **service.as_record())

    def listening() -> bool:
        with log.open("rb") as text:
            text.seek(mark)
            return b"listening on" in text.read()

    _wait(service, listening, "listen", since=mark)


def stop_lbs(manifest: Manifest) -> int:
    """Stop every LB process `manifest` lists and remove the channels; return how many were running."""
    resources = lb_resources(manifest)
    running = 0
    # An agent never outlives its dataplane's channel; the agents leave the coordinator before it stops.
    for role in ("agent", "coordinator", "dataplane", "channel"):
        for resource in resources:
            if not resource.name.endswith(f"-{role}"):
                continue
            if resource.kind == "process":
                service = Service.from_record(resource.name, resource.data)
                running += service.running()
                service.stop()
            else:
                Path(resource.data["path"]).unlink(missing_ok=True)
    manifest.forget(resources)
    return running


def lb_resources(manifest: Manifest) -> list[Resource]:
    """The LB processes and channel files among a manifest's resources."""
    return [r for r in manifest.resources if r.kind in ("process", "file") and "lb" in r.data]


def _wait(service: Service, ready: Callable[[], bool], what: str, *, since: int = 0, timeout_s: float = 120.0) -> None:
    """Until `ready()`; a process that exits ends the wait at once, so the long default only matters to one
    that hangs — and an agent importing PyTorch on an emulated KVM guest takes tens of seconds.

    The error says whether the process ended (and how, where we started it) or hung, and quotes only what it
    logged after byte `since` of its log: the log is shared by every start of the service, and a previous
    run's last line read as this one's reason hid how this one died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not service.running():
            break
        time.sleep(0.05)
    if service.running():
        how = f"still running, no sign after {timeout_s:.0f} s"
    else:
        how = service.exit_status() or "exited"
    said = service.log_tail(1, since=since)
    reason = f"{how}; its last words: {said}" if said else f"{how} before writing to its log"
    raise TestbedError(f"{service.name} did not {what}: {reason}", hint=f"see {service.log}")


def _published(channel: Path, dataplane: Service) -> bool:
    """The channel exists, was made by the dataplane just started (not a file someone planted), and holds
    its first statistics."""
    try:
        with Channel.attach(channel) as reader:
            if int(reader.header["dataplane_pid"]) != dataplane.pid:
                return False
            return reader.read_stats().time > 0
    except (FileNotFoundError, ValueError, TypeError, OSError):
        return False


def _stepped(channel: Path, agent: Service) -> bool:
    """The agent took its first step (its heartbeat is set)."""
    return _heartbeat(channel) > 0


def _heartbeat(channel: Path) -> float:
    with Channel.attach(channel) as reader:
        return float(reader.header["agent_heartbeat"])
