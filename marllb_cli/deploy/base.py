"""What a testbed is, whatever its kind, and what every kind shares.

    Testbed     deploy (idempotent) · teardown (what it recorded, and nothing else) · status · require_deployed
                · lbs() (its `LbControl`) · client() (where a run's replayer and sampler go: `ClientNode`)
    LbControl   start · stop · stats_json · steps_log of the LBs of a deployed testbed

The kinds implement them: `local` (namespaces on this machine), `ssh` (real hosts) and `kvm` (guests driven
over SSH, so it composes `ssh`). `deploy.testbed_for(config)` is the one place that picks a kind. The code
that runs where one node is (Apache, cgroups, roles, an LB's processes, the record of what was made)
lives beneath the kinds in `deploy.node`, so a kind only decides *where* it runs.

Shared here: the status models and the one rule for a testbed's overall state, the deploy skeleton over a
manifest (`deploy_recorded`, `redeploy`), the LB plan both LB controllers start from (`lb_plan`), and the
checks before creating anything (`require_root`, `require_tools`, `refuse_foreign_namespaces`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel

from marllb_cli.agents.factory import initial_control
from marllb_cli.agents.runner import AgentSpec, LearningSpec
from marllb_cli.config import Config
from marllb_cli.dataplane.fastpath import DataplaneSpec, ServerSpec
from marllb_cli.deploy.node.cgroups import CpuUsage
from marllb_cli.deploy.node.lbs import channel_path, steps_log
from marllb_cli.deploy.node.manifest import MANIFEST, Manifest, testbed_digest
from marllb_cli.deploy.node.owned import claim, owner_of
from marllb_cli.errors import MissingTool, NamespaceExists, TestbedError
from marllb_cli.locks import exclusive
from marllb_cli.progress import Progress, no_progress
from marllb_cli.topology import Node, Topology

if TYPE_CHECKING:
    from marllb_cli.client_node import ClientNode
    from marllb_cli.coordination.coordinator import CoordinatorSpec
    from marllb_cli.events import TimedEvent

__all__ = [
    "MANIFEST",
    "DeployOutcome",
    "Faults",
    "LbControl",
    "LbStart",
    "NodeStatus",
    "State",
    "Testbed",
    "TestbedStatus",
    "coordinator_node",
    "deploy_recorded",
    "exclusive_use",
    "lb_plan",
    "overall_state",
    "redeploy",
    "state_owner",
    "refuse_foreign_namespaces",
    "require_root",
    "require_tools",
]

DeployOutcome = Literal["created", "unchanged", "rebuilt"]
State = Literal["absent", "partial", "up", "degraded"]


class NodeStatus(BaseModel):
    """One node as `marllb status` reports it."""

    name: str
    role: Literal["client", "router", "lb", "server"]
    namespace: str
    ip: str
    cpus: float | None = None
    cores: float | None = None
    group: str | None = None
    up: bool = False
    http_status: int | None = None
    busy_workers: int | None = None
    error: str | None = None  # why the node could not be probed (kind ssh/kvm: SSH failed)

    @classmethod
    def of(cls, node: Node, *, up: bool = False) -> NodeStatus:
        """A node's entry before any probe."""
        return cls(
            name=node.name,
            role=node.role,
            namespace=node.namespace,
            ip=str(node.ip),
            cpus=node.cpus,
            cores=node.cores,
            group=node.group,
            up=up,
        )


class TestbedStatus(BaseModel):
    """The testbed as `marllb status --json` prints it."""

    __test__ = False

    testbed: str
    vip: str
    state: State
    nodes: list[NodeStatus]

    @classmethod
    def of(cls, topology: Topology, record: Manifest | None, nodes: list[NodeStatus]) -> TestbedStatus:
        return cls(testbed=topology.testbed, vip=str(topology.vip), state=overall_state(record, nodes), nodes=nodes)


def overall_state(record: Manifest | None, nodes: Iterable[NodeStatus]) -> State:
    """absent: nothing recorded; partial: a deploy that did not complete; up: complete and every node up;
    degraded: complete, but some node is down."""
    if record is None:
        return "absent"
    if not record.complete:
        return "partial"
    return "up" if all(node.up for node in nodes) else "degraded"


class LbControl(Protocol):
    """The LB processes (one dataplane and one agent per LB) of a deployed testbed."""

    topology: Topology

    def start(
        self,
        method: str,
        *,
        period: float = 0.25,
        idle_timeout: float = 40.0,
        seed: int = 0,
        learning: LearningSpec | None = None,
        coordinator: CoordinatorSpec | None = None,
    ) -> int:
        """Start every LB with a resolved `method` (`agents.methods.resolve_method`), replacing running ones;
        return how many LBs were running before. With `learning`, the agents explore for a training episode
        (`marllb train --env testbed`), and with `coordinator` that process starts first, where its address is."""
        ...

    def stop(self) -> int:
        """Stop every LB process; return how many were running."""
        ...

    def stats_json(self) -> list[dict[str, Any]]:
        """`marllb lb stats --json`: one dict per LB (`node.lbs.LbSnapshot.as_json`)."""
        ...

    def steps_log(self, lb: Node) -> Path:
        """LB `lb`'s agent step log of the last start, on this machine and on its monotonic clock."""
        ...


class Faults(Protocol):
    """Timed events on a deployed testbed (`events.py` says what each means): applied by the run's event
    runner (`timed_events.EventRunner`), events on different nodes possibly at once, and everything they
    changed put back after the run."""

    def prepare(self, events: Sequence[TimedEvent]) -> None:
        """Get ready to apply `events` without delay, before the run's time 0 (over SSH: open the connections
        to their nodes). A failure here is reported by the event that meets it."""
        ...

    def apply(self, event: TimedEvent, *, lifetime_s: float = 3600.0) -> None:
        """Make the change now; a `TestbedError` when it could not be made. A process it starts (a hog) ends
        after `lifetime_s` at the latest: the rest of the run and a margin."""
        ...

    def restore(self) -> list[str]:
        """Undo every change made (capacities, hogs, stopped servers, the router's route, shaped links); a
        killed agent stays dead until the LBs start again. Returns what could not be undone."""
        ...

    def undo_leftovers(self) -> list[str]:
        """Undo what an earlier run's events left in force when its controller was killed; one line each."""
        ...


class Testbed(Protocol):
    """A testbed of some kind, described by `config`."""

    config: Config
    topology: Topology
    state_dir: Path

    def deploy(self, progress: Progress = no_progress) -> DeployOutcome:
        """Bring it up; nothing to do when it is up with this config, a clean rebuild otherwise."""
        ...

    def teardown(self, progress: Progress = no_progress, *, purge: bool = False) -> int:
        """Remove what it recorded and nothing else; return how many resources went. `purge`: also caches
        kept between deploys (kind kvm's image); refused by kinds that keep none."""
        ...

    def status(self, *, probe: bool = True) -> TestbedStatus: ...

    def require_deployed(self) -> None:
        """Raise a `TestbedError` with the fix unless a deploy completed."""
        ...

    def lbs(self) -> LbControl: ...

    def client(self) -> ClientNode: ...

    def server_usage(self) -> dict[str, CpuUsage]:
        """Each server's CPU counters now (`CpuCgroup.usage`), by server name: what `calibrate` samples and
        what a run's utilisation is measured from."""
        ...

    def faults(self) -> Faults:
        """What applies a run's timed events here; a `ConfigError` where this kind cannot apply them."""
        ...


def state_owner(config: Config) -> str:
    """Whom a testbed's state directories (here, and on each SSH host) belong to, in their marker."""
    return f"testbed {config.testbed.name}"


#: In a testbed's state directory: held (`locks.exclusive`) by the one command that measures on the testbed.
IN_USE = ".in-use"


@contextlib.contextmanager
def exclusive_use(testbed: Testbed) -> Iterator[None]:
    """Hold the deployed testbed for one measuring command (a replay, a live training, a calibration, a
    fidelity bench), or refuse (`TestbedError`, naming the holder's pid and command): two at once would
    each load the servers the other measures. Held in the state directory that every kind's deploy claims
    (`owned.claim`); a testbed never deployed has none and is not held: the command's own `require_deployed`
    says so, and no directory is made here that a later deploy would not own."""
    if owner_of(testbed.state_dir) != state_owner(testbed.config):
        yield
        return
    name = testbed.config.testbed.name
    with exclusive(
        testbed.state_dir / IN_USE,
        lambda holder: TestbedError(
            f"testbed {name} is in use by another marllb ({holder})",
            hint="wait for that command to end, or stop it first",
        ),
    ):
        yield


def redeploy(testbed: Testbed, manifest: Manifest | None, progress: Progress) -> DeployOutcome:
    """What a deploy over an earlier one does: nothing (`unchanged`) when that one completed with the same
    settings and is up; otherwise its teardown first (`rebuilt`); `created` when there was none."""
    if manifest is None:
        return "created"
    if manifest.complete and manifest.config_digest == testbed_digest(testbed.config.testbed):
        if testbed.status().state == "up":
            return "unchanged"
    testbed.teardown(progress)
    return "rebuilt"


def deploy_recorded(
    testbed: Testbed,
    progress: Progress,
    build: Callable[[Manifest], None],
    *,
    on_failure: Callable[[], None] = lambda: None,
) -> DeployOutcome:
    """The deploy of a testbed kept in a manifest: `redeploy` → a new manifest → `build(manifest)`, which
    records each resource before creating it → complete. If `build` fails, `on_failure()` (keep what
    explains it), then the teardown of whatever the manifest lists, then the error goes on."""
    path = testbed.state_dir / MANIFEST
    outcome = redeploy(testbed, Manifest.load(path), progress)
    if outcome == "unchanged":
        return outcome
    claim(testbed.state_dir, state_owner(testbed.config))
    manifest = Manifest(path, testbed.config.testbed.name, config_digest=testbed_digest(testbed.config.testbed))
    manifest.save()
    try:
        build(manifest)
    except BaseException:
        on_failure()
        testbed.teardown()
        raise
    manifest.complete = True
    manifest.save()
    return outcome


@dataclass(frozen=True)
class LbStart:
    """What `LbControl.start` was asked for: a resolved method, the agent period (s), the flow idle timeout
    (s), and the seed of LB 0 (LB i gets seed + i)."""

    method: str
    period: float = 0.25
    idle_timeout: float = 40.0
    seed: int = 0
    learning: LearningSpec | None = None


def coordinator_node(topology: Topology, coordinator: CoordinatorSpec) -> Node:
    """The LB whose address a training episode's coordinator listens on, and where it therefore runs."""
    return next(lb for lb in topology.lbs if str(lb.ip) == coordinator.host)


def lb_plan(
    config: Config, topology: Topology, lb: Node, start: LbStart, directory: Path
) -> tuple[DataplaneSpec, AgentSpec]:
    """What LB `lb`'s dataplane and agent run with; `directory` is where they keep files on the LB.

    The dataplane starts on the policy's first selection and weights, before the agent's first step."""
    method = start.method
    servers = topology.servers
    cpus = [float(server.cpus or 1.0) for server in servers]
    selection, weights = initial_control(method, cpus, len(topology.lbs))
    channel = channel_path(topology.testbed, lb.name)
    dataplane = DataplaneSpec(
        lb=lb.name,
        interface=lb.interfaces[0].name,
        vip=str(topology.vip),
        lb_ip=str(lb.ip),
        lb_mac=lb.mac,
        forwarding=topology.forwarding,  # type: ignore[arg-type]
        servers=[ServerSpec(name=s.name, ip=str(s.ip), mac=s.mac) for s in servers],
        method=selection,
        weights=[float(w) for w in weights],
        channel=channel,
        idle_timeout=start.idle_timeout,
        seed=start.seed + lb.index,
        reservoir_keep=config.experiment.reservoir_keep,
    )
    agent = AgentSpec(
        lb=lb.name,
        lb_index=lb.index,
        n_lbs=len(topology.lbs),
        channel=channel,
        method=method,
        cpus=cpus,
        servers=[str(s.ip) for s in servers],
        status_port=config.testbed.servers[0].apache.status_port,
        period=start.period,
        steps_log=steps_log(directory, lb.name),
        learning=start.learning and start.learning.model_copy(update={"seed": start.learning.seed * 1_000 + lb.index}),
    )
    return dataplane, agent


def require_root(what: str) -> None:
    """Fail before creating anything when this process cannot create namespaces and cgroups."""
    if os.geteuid() != 0:
        raise MissingTool(f"{what} needs root (network namespaces, cgroups)", hint="run marllb with sudo")


def require_tools(tools: Sequence[tuple[str, str]], hint: str = "run `make system-deps` (apt-get install {})") -> None:
    """Each (command, package) on PATH, or a `MissingTool` naming the package to install."""
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} is not installed", hint=hint.format(package))


def refuse_foreign_namespaces(topology: Topology, names: Iterable[str], ours: set[str]) -> None:
    """Never adopt or remove a namespace that this testbed did not create (`ours`: those its manifest lists)."""
    from marllb_cli.hosts.local import LocalNamespace

    for name in names:
        if name not in ours and LocalNamespace(name).exists():
            raise NamespaceExists(
                f"namespace {name} exists but testbed {topology.testbed} did not create it",
                hint=f"choose another testbed.name, or remove it yourself (ip netns del {name})",
            )
