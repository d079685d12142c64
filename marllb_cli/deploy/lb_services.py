"""Start, stop and read the LBs of a deployed local testbed: one dataplane and one agent process per LB.

    start   refuse unless the testbed is up → stop LBs already running → per LB: write the dataplane and
            agent specs, record the channel file and start the dataplane, wait for its first stats
            snapshot, start the agent, wait for its first heartbeat. Any failure stops everything started.
    stop    stop the agents, then the dataplanes (SIGTERM, then SIGKILL), remove the channel files
    stats   one consistent snapshot per LB from its channel

All of it is recorded in the testbed's manifest, so `marllb teardown` also removes LBs left running.
Specs, logs and step logs live under `<state dir>/<testbed>/lb/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from marllb_cli.agents.factory import make_agent, resolve_method
from marllb_cli.agents.runner import AgentSpec
from marllb_cli.dataplane.channel import Channel, Stats
from marllb_cli.dataplane.fastpath import DataplaneSpec, ServerSpec
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.deploy.manifest import Manifest, Resource
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalNamespace
from marllb_cli.services import Service, start_service
from marllb_cli.topology import Node

__all__ = ["LbServices", "LbSnapshot", "SHM_DIR"]

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


class LbServices:
    """The LB processes of one local testbed."""

    def __init__(self, testbed: LocalTestbed) -> None:
        self.testbed = testbed
        self.topology = testbed.topology
        self.dir = testbed.state_dir / "lb"

    def channel_path(self, lb: Node) -> Path:
        return SHM_DIR / f"marllb-{self.topology.testbed}-{lb.name}"

    def steps_log(self, lb: Node) -> Path:
        """The agent's per-step JSON lines of the current (or last) `start`."""
        return self.dir / f"{lb.name}.steps.jsonl"

    def require_deployed(self) -> None:
        """Raise a `TestbedError` with the fix unless the testbed is deployed."""
        self._manifest()

    # -- start -------------------------------------------------------------------------------------------
    def start(self, method: str, *, period: float = 0.25, idle_timeout: float = 40.0, seed: int = 0) -> int:
        """Start a dataplane and an agent on every LB; return how many LBs were already running (replaced)."""
        method = resolve_method(method)
        manifest = self._manifest()
        replaced = len({r.data.get("lb") for r in self._resources(manifest)})
        self.stop()
        manifest = self._manifest()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for index, lb in enumerate(self.topology.lbs):
                self._start_lb(manifest, lb, method, period, idle_timeout, seed + index)
        except BaseException:
            self.stop()
            raise
        return replaced

    def _start_lb(self, manifest: Manifest, lb: Node, method: str, period: float, idle: float, seed: int) -> None:
        servers = self.topology.servers
        cpus = [float(server.cpus or 1.0) for server in servers]
        # Built here only for its method and first weights; the agent process probes for real.
        agent = make_agent(method, cpus, probe=lambda: [None] * len(cpus), lb_index=lb.index)
        channel = self.channel_path(lb)
        if channel.exists() and str(channel) not in {r.data.get("path") for r in manifest.of_kind("file")}:
            raise TestbedError(
                f"{channel} exists but testbed {self.topology.testbed} did not create it",
                hint=f"if no marllb process uses it, remove it yourself: rm {channel}",
            )
        channel.unlink(missing_ok=True)
        dataplane = DataplaneSpec(
            lb=lb.name,
            vip=str(self.topology.vip),
            lb_ip=str(lb.ip),
            lb_mac=lb.mac,
            forwarding=self.topology.forwarding,  # type: ignore[arg-type]
            servers=[ServerSpec(name=s.name, ip=str(s.ip), mac=s.mac) for s in servers],
            method=agent.method,
            weights=[float(w) for w in agent.weights],
            channel=channel,
            idle_timeout=idle,
            seed=seed,
        )
        agent_spec = AgentSpec(
            lb=lb.name,
            channel=channel,
            method=method,
            cpus=cpus,
            servers=[str(s.ip) for s in servers],
            status_port=self.testbed.config.testbed.servers[0].apache.status_port,
            period=period,
            steps_log=self.steps_log(lb),
        )
        self.steps_log(lb).unlink(missing_ok=True)  # each start logs afresh
        dataplane_file = self.dir / f"{lb.name}.dataplane.json"
        agent_file = self.dir / f"{lb.name}.agent.json"
        dataplane_file.write_text(dataplane.model_dump_json(indent=1))
        agent_file.write_text(agent_spec.model_dump_json(indent=1))
        ns = LocalNamespace(lb.namespace)

        manifest.record("file", f"{lb.name}-channel", path=str(channel), lb=lb.name)
        service = start_service(
            ns,
            f"{lb.name}-dataplane",
            "marllb_cli.dataplane.fastpath",
            [str(dataplane_file)],
            self.dir / f"{lb.name}.dataplane.log",
        )
        manifest.record("process", service.name, lb=lb.name, **service.as_record())
        self._wait(service, lambda: _published(channel), "publish its first statistics")

        service = start_service(
            ns, f"{lb.name}-agent", "marllb_cli.agents.runner", [str(agent_file)], self.dir / f"{lb.name}.agent.log"
        )
        manifest.record("process", service.name, lb=lb.name, **service.as_record())
        self._wait(service, lambda: _heartbeat(channel) > 0, "take its first step")

    def _wait(self, service: Service, ready, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if not service.running():
                break
            time.sleep(0.05)
        reason = service.log_tail(1) or ("exited" if not service.running() else f"no sign after {timeout_s:.0f} s")
        raise TestbedError(f"{service.name} did not {what}: {reason}", hint=f"see {service.log}")

    # -- stop --------------------------------------------------------------------------------------------
    def stop(self) -> int:
        """Stop every LB process and remove the channels; return how many processes were running."""
        manifest = Manifest.load(self.testbed.manifest_path)
        if manifest is None:
            return 0
        resources = self._resources(manifest)
        running = 0
        for role in ("agent", "dataplane", "channel"):  # an agent never outlives its dataplane's channel
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

    # -- stats -------------------------------------------------------------------------------------------
    def snapshots(self) -> list[LbSnapshot]:
        manifest = self._manifest()
        services = {
            r.name: Service.from_record(r.name, r.data) for r in self._resources(manifest) if r.kind == "process"
        }
        out = []
        for lb in self.topology.lbs:
            dataplane, agent = services.get(f"{lb.name}-dataplane"), services.get(f"{lb.name}-agent")
            snapshot = dict(
                lb=lb.name,
                dataplane_running=bool(dataplane and dataplane.running()),
                agent_running=bool(agent and agent.running()),
                method=None,
                weights=None,
                agent_heartbeat_age_s=None,
                stats=None,
            )
            path = self.channel_path(lb)
            if dataplane is not None and path.exists():
                with Channel.attach(path) as channel:
                    _, snapshot["method"], snapshot["weights"] = channel.read_control()
                    beat = float(channel.header["agent_heartbeat"])
                    snapshot["agent_heartbeat_age_s"] = time.monotonic() - beat if beat else None
                    snapshot["stats"] = channel.read_stats()
            out.append(LbSnapshot(**snapshot))
        return out

    # -- helpers -----------------------------------------------------------------------------------------
    def _manifest(self) -> Manifest:
        manifest = Manifest.load(self.testbed.manifest_path)
        if manifest is None or not manifest.complete:
            raise TestbedError(
                f"testbed {self.topology.testbed} is not deployed",
                hint=f"run `marllb deploy` with this config first (state: {self.testbed.state_dir})",
            )
        return manifest

    @staticmethod
    def _resources(manifest: Manifest) -> list[Resource]:
        return [r for r in manifest.resources if r.kind in ("process", "file") and "lb" in r.data]


def _published(channel: Path) -> bool:
    try:
        with Channel.attach(channel) as reader:
            return reader.read_stats().time > 0
    except (FileNotFoundError, ValueError):
        return False


def _heartbeat(channel: Path) -> float:
    with Channel.attach(channel) as reader:
        return float(reader.header["agent_heartbeat"])
