"""A `kind: ssh` testbed: existing hosts, set up over SSH by running `python -m marllb_cli.deploy.node.cli` on each.

    deploy    per host, all hosts at once: connect (host key checked) → provision (marllb's wheel into
              `<workdir>/venv`, skipped when already there) → upload the resolved config → `node up`
              (its role, and Apache on servers; idempotent) → the host's facts (its data MAC)
    lb start  per LB host: the specs (`base.lb_plan`, with the servers' MACs) → `node lb-start` (`SshLbs`)
    status    per host `node status`
    teardown  per host `node down` (everything its record lists, LB processes included); the venv stays
    client    the client host, where a run's replayer and sampler go (`SshClient`)

A failing step names the host, the step and the command's last output line; the other hosts finish their
step, and every host's record says what it holds, so `marllb teardown` (or a new deploy) always knows
what to do. The controller keeps a manifest of its own, `<state dir>/<testbed>/ssh.json` (no resources:
whether the deploy completed, the config digest, and the hosts' facts).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from marllb_cli.agents.methods import RL_PREFIX, policy_dir
from marllb_cli.agents.runner import LearningSpec
from marllb_cli.agents.weights_file import STATIC_PREFIX, static_file
from marllb_cli.client_node import ClientProcess
from marllb_cli.config import Config, ServerGroup, SshHostEntry
from marllb_cli.coordination.coordinator import CoordinatorSpec
from marllb_cli.deploy.base import (
    DeployOutcome,
    LbStart,
    NodeStatus,
    TestbedStatus,
    coordinator_node,
    lb_plan,
    state_owner,
)
from marllb_cli.deploy.node import mediawiki
from marllb_cli.deploy.node.cgroups import CpuUsage
from marllb_cli.deploy.node.manifest import Manifest, require_complete, state_root, testbed_digest
from marllb_cli.deploy.node.owned import claim, remove_owned
from marllb_cli.errors import ConfigError, TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.hosts.provision import Bundle, bundle, install_torch, provision, torch_bundle
from marllb_cli.hosts.ssh import SshHost, SshProcess, SshTarget
from marllb_cli.progress import Progress, no_progress
from marllb_cli.steps import json_lines
from marllb_cli.topology import Node, Topology, host_node_names, plan

__all__ = ["SshClient", "SshLbs", "SshNode", "SshTestbed"]

T = TypeVar("T")
DEPLOY_STEPS = ("connect", "provision", "upload config", "set up")


@dataclass(frozen=True)
class SshNode:
    """One inventory entry with its node name and where its state lives on the host."""

    node: str
    entry: SshHostEntry
    testbed: str

    @property
    def label(self) -> str:
        return f"{self.node} ({self.entry.address})"

    @property
    def state(self) -> str:
        """This testbed's state on the host: under `testbeds/`, so no testbed name meets the venv or wheels."""
        return f"{self.entry.workdir}/testbeds/{self.testbed}"

    @property
    def python(self) -> str:
        return f"{self.entry.workdir}/venv/bin/python"

    def node_command(self, *args: str) -> list[str]:
        return [self.python, "-m", "marllb_cli.deploy.node.cli", *args]

    def args(self, command: str, *, config: bool = False) -> list[str]:
        """`node_command` of a `marllb node` command on this host's state (and, with `config`, its node)."""
        extra = ("--config", f"{self.state}/config.yaml", "--node", self.node) if config else ()
        return self.node_command(command, *extra, "--state", self.state)


class SshTestbed:
    """The hosts of a `kind: ssh` config, driven over SSH."""

    __test__ = False

    def __init__(
        self,
        config: Config,
        *,
        accept_new_host_keys: bool = False,
        hosts: list[SshNode] | None = None,
        via: LocalHost | None = None,
    ) -> None:
        """`hosts` and `via` are for KVM guests: the guests to drive (default: the config's `hosts`), and the
        namespace whose sockets reach their sshd (default: this machine's own network)."""
        self.config = config
        self.accept_new_host_keys = accept_new_host_keys
        self.via = via
        testbed = config.testbed
        self.hosts = hosts or [
            SshNode(name, entry, testbed.name)
            for name, entry in zip(host_node_names(testbed), testbed.hosts, strict=True)
        ]
        self.state_dir: Path = state_root() / testbed.name
        self.record_path = self.state_dir / "ssh.json"
        saved = Manifest.load(self.record_path)
        self.topology: Topology = plan(testbed, saved.facts.get("macs", {}) if saved else {})

    # -- public operations -----------------------------------------------------------------------------
    def deploy(self, progress: Progress = no_progress, *, wheels: Bundle | None = None) -> DeployOutcome:
        """Set every host up (in parallel); a no-op on hosts already set up with this config. `wheels`: the
        bundle to provision (default: built now from this checkout)."""
        mediawiki.check_dumps(self.config)
        previous = Manifest.load(self.record_path)
        wheels = wheels or bundle()
        config_text = self.config.resolved_yaml().encode()
        claim(self.state_dir, state_owner(self.config))
        record = Manifest(self.record_path, self.config.testbed.name, config_digest=testbed_digest(self.config.testbed))
        record.facts = {"macs": previous.facts.get("macs", {})} if previous else {}
        record.save()
        results = self.on_all_hosts(lambda host, ssh: self._deploy_host(host, ssh, wheels, config_text, progress))
        record.facts = {"macs": {host.node: facts["mac"] for host, facts in results.items()}}
        record.complete = True
        record.save()
        self.topology = plan(self.config.testbed, record.facts["macs"])
        if previous is None:
            return "created"
        changed = any(facts.get("changed", True) for facts in results.values())
        return "rebuilt" if changed or previous.config_digest != record.config_digest else "unchanged"

    def teardown(self, progress: Progress = no_progress, *, purge: bool = False) -> int:
        """Undo everything on every host; return how many resources the hosts removed.

        Without the controller's record (it lives in /run: gone after a controller reboot) the hosts are
        asked all the same, since each keeps its own record on disk; a host that cannot be reached then is
        skipped (an SSH testbed that never was deployed needs no teardown), with a warning line."""
        if purge:
            raise ConfigError("--purge removes a kvm testbed's image cache; this testbed is kind ssh")
        recorded = self.record_path.exists()
        done = [0]
        lock = threading.Lock()

        def down(host: SshNode, ssh: SshHost) -> int:
            removed = json.loads(ssh.run(host.args("down"), timeout=120).stdout)
            with lock:
                done[0] += 1
                progress("teardown", done[0], len(self.hosts))
            return int(removed["removed"])

        results = self.on_all_hosts(down, tolerate_errors=not recorded)
        unreachable = [host.label for host, value in results.items() if not isinstance(value, int)]
        if unreachable:
            progress(f"not reached (no record here): {', '.join(unreachable)}", 0, 1)
        remove_owned(self.state_dir)
        return sum(value for value in results.values() if isinstance(value, int))

    def status(self, *, probe: bool = True) -> TestbedStatus:
        """Each host's `node status` (servers probe their own Apache)."""
        record = Manifest.load(self.record_path)
        nodes = {node.name: node for node in self.topology.nodes}
        statuses = {host.node: NodeStatus.of(nodes[host.node]) for host in self.hosts}
        if record is not None:

            def ask(host: SshNode, ssh: SshHost) -> dict[str, Any]:
                return json.loads(ssh.run(host.args("status", config=True)).stdout)

            for host, report in self.on_all_hosts(ask, tolerate_errors=True).items():
                if isinstance(report, dict):
                    statuses[host.node].up = bool(report["up"])
                    statuses[host.node].http_status = report["http_status"]
                    if report.get("missing"):  # set up once, but no longer (the host rebooted?)
                        statuses[host.node].error = f"not in effect: {', '.join(report['missing'])}"
                else:  # the host could not be asked: say why instead of a bare "down"
                    statuses[host.node].error = report.one_line()
        ordered = [statuses[node.name] for node in self.topology.nodes if node.name in statuses]
        return TestbedStatus.of(self.topology, record, ordered)

    def require_deployed(self) -> None:
        require_complete(
            self.record_path, f"testbed {self.topology.testbed}", hint="run `marllb deploy` with this config first"
        )

    def lbs(self) -> SshLbs:
        return SshLbs(self)

    def faults(self):  # -> SshFaults
        from marllb_cli.deploy.ssh_faults import SshFaults

        return SshFaults(self)

    def server_usage(self) -> dict[str, CpuUsage]:
        """Each server host's `node usage`, asked of all at once."""
        servers = [host for host in self.hosts if host.entry.role == "server"]

        def ask(host: SshNode, ssh: SshHost) -> CpuUsage:
            return CpuUsage(**json.loads(ssh.run(host.args("usage", config=True)).stdout))

        return {host.node: usage for host, usage in self.on_all_hosts(ask, hosts=servers).items()}

    def client(self) -> SshClient:
        """The client host, where `replay-trace` runs its replayer and sampler."""
        host = next(host for host in self.hosts if host.entry.role == "client")
        ssh = self.connect(host)
        # A controller that vanished without closing its session may have left a replayer sending.
        _step(host, "stop-clients", lambda: ssh.run(host.args("stop-clients")))
        return SshClient(ssh, host.python, host.state)

    # -- steps -----------------------------------------------------------------------------------------
    def _deploy_host(
        self, host: SshNode, ssh: SshHost, wheels: Bundle, config_text: bytes, progress: Progress
    ) -> dict[str, Any]:
        progress(host.label, 1, len(DEPLOY_STEPS))
        _step(host, "provision", lambda: provision(ssh, host.entry.workdir, host.entry.python, wheels))
        progress(host.label, 2, len(DEPLOY_STEPS))
        owner = state_owner(self.config)
        _step(host, "claim state", lambda: ssh.run(host.node_command("claim", "--state", host.state, "--owner", owner)))
        _step(host, "upload config", lambda: ssh.put_bytes(config_text, f"{host.state}/config.yaml"))
        group = self._group(host)
        if group is not None and group.app == "mediawiki" and group.mediawiki.dump is not None:
            dump, remote = group.mediawiki.dump, mediawiki.uploaded_dump(host.state, group.name)
            _step(host, "upload dump", lambda: ssh.run(["mkdir", "-p", str(PurePosixPath(remote).parent)]))
            _step(host, "upload dump", lambda: ssh.put(dump, remote))
        progress(host.label, 3, len(DEPLOY_STEPS))
        # A MediaWiki server installs packages, a database and its pages: minutes, more under emulation.
        timeout = 3600 if group is not None and group.app == "mediawiki" else 300
        out = _step(host, "set up", lambda: ssh.run(host.args("up", config=True), timeout=timeout))
        progress(host.label, 4, len(DEPLOY_STEPS))
        return json.loads(out.stdout.strip().splitlines()[-1])

    def _group(self, host: SshNode) -> ServerGroup | None:
        """The server group of a server host (None for other roles)."""
        return self.config.testbed.group(self.topology.node(host.node).group)

    def connect(self, host: SshNode) -> SshHost:
        entry = host.entry
        target = SshTarget(
            host=entry.address,
            port=entry.port,
            user=entry.user,
            key_file=Path(entry.key_file).expanduser() if entry.key_file else None,
            known_hosts=self.config.testbed.ssh.known_hosts,
        )
        return _step(
            host,
            "connect",
            lambda: SshHost(
                target,
                accept_new_host_keys=self.accept_new_host_keys,
                timeout=self.config.testbed.ssh.connect_timeout_s,
                sock=self.via.connect(entry.address, entry.port, timeout=10.0) if self.via else None,
            ),
        )

    def on_all_hosts(
        self,
        work: Callable[[SshNode, SshHost], T],
        *,
        hosts: list[SshNode] | None = None,
        tolerate_errors: bool = False,
    ) -> dict[SshNode, T]:
        """Run `work(host, ssh)` on every host at once; raise one error naming every host that failed."""
        hosts = hosts if hosts is not None else self.hosts

        def one(host: SshNode) -> T:
            with self.connect(host) as ssh:
                return work(host, ssh)

        results: dict[SshNode, Any] = {}
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            futures = {host: pool.submit(one, host) for host in hosts}
            for host, future in futures.items():
                try:
                    results[host] = future.result()
                except TestbedError as exc:
                    errors.append(exc.one_line())
                    results[host] = exc
                except (ValueError, KeyError, TypeError) as exc:  # an answer that is not what `marllb node` says
                    error = TestbedError(f"{host.label}: unexpected answer ({type(exc).__name__}: {exc})")
                    errors.append(error.one_line())
                    results[host] = error
        if errors and not tolerate_errors:
            raise TestbedError("; ".join(errors))
        return results


class SshLbs:
    """The LB processes of a `kind: ssh` testbed, started and stopped on the LB hosts."""

    def __init__(self, testbed: SshTestbed) -> None:
        self.testbed = testbed
        self.topology = testbed.topology
        self.lb_hosts = [host for host in testbed.hosts if host.entry.role == "lb"]
        #: A training episode's coordinator: (its host, its trajectory there, where `stop` puts it here).
        self._trajectory: tuple[SshNode, str, Path] | None = None

    def require_deployed(self) -> None:
        self.testbed.require_deployed()

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
        """Start a dataplane and an agent on every LB host (replacing running ones); return 0.

        A training episode (`learning`): the acting policy goes to each LB that samples from it, and with a
        `coordinator`, the testbed's secret (0600) goes to every LB host and the coordinator starts on its
        LB's host, before that LB (`node lb-start --coordinator`); `stop` fetches its trajectory back to the
        path the spec names on this machine."""
        self.require_deployed()
        policy_source = policy_dir(method)
        # A learned policy, and a training episode's actors (each LB's, or the coordinator's), need PyTorch.
        torch = torch_bundle() if policy_source is not None or learning is not None else None
        lbs = {lb.name: lb for lb in self.topology.lbs}
        hosting = coordinator_node(self.topology, coordinator).name if coordinator is not None else None
        self._trajectory = None

        def start_one(host: SshNode, ssh: SshHost) -> None:
            lb = lbs[host.node]
            directory = Path(host.state) / "lb"
            remote_method = method
            episode = self._remote_learning(host, ssh, learning, torch)
            start = LbStart(method, period, idle_timeout, seed, episode)
            extra: tuple[str, ...] = ()
            if coordinator is not None and host.node == hosting:
                extra = ("--coordinator", self._remote_coordinator(host, ssh, coordinator, torch))
            if torch is not None and policy_source is not None:  # the policy and, once, PyTorch go to the LB
                policy = f"{host.state}/policy"
                _step(host, "install torch", lambda: install_torch(ssh, host.entry.workdir, torch))
                _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", policy]))
                _step(host, "lb start", lambda: ssh.put(policy_source / "policy.pt", f"{policy}/policy.pt"))
                remote_method = RL_PREFIX + policy
            if (weights := static_file(method)) is not None:  # fixed weights: the file goes to the LB
                remote_weights = f"{host.state}/static-weights.json"
                _step(host, "lb start", lambda: ssh.put(weights, remote_weights))
                remote_method = STATIC_PREFIX + remote_weights
            dataplane, agent = lb_plan(self.testbed.config, self.topology, lb, start, directory)
            agent = agent.model_copy(update={"method": remote_method})
            _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", str(directory)]))
            files = {"dataplane": dataplane.model_dump_json(), "agent": agent.model_dump_json()}
            for role, text in files.items():
                _step(host, "lb start", lambda r=role, t=text: ssh.put_bytes(t.encode(), f"{host.state}/{r}.json"))
            specs = ("--dataplane", f"{host.state}/dataplane.json", "--agent", f"{host.state}/agent.json", *extra)
            command = [*host.args("lb-start"), *specs]
            _step(host, "lb start", lambda: ssh.run(command, timeout=300))

        try:
            self.testbed.on_all_hosts(start_one, hosts=self.lb_hosts)
        except TestbedError:
            self.stop()
            raise
        return 0

    def _remote_learning(
        self, host: SshNode, ssh: SshHost, learning: LearningSpec | None, torch: Bundle | None
    ) -> LearningSpec | None:
        """`learning` with its files on the LB host: the acting policy (for an agent that samples from its
        own actor, with PyTorch installed once) and the secret its coordinator checks."""
        if learning is None:
            return None
        update: dict[str, Any] = {}
        if learning.policy is not None and torch is not None:
            remote = f"{host.state}/policy/acting.pt"
            _step(host, "install torch", lambda: install_torch(ssh, host.entry.workdir, torch))
            _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", f"{host.state}/policy"]))
            _step(host, "lb start", lambda: ssh.put(learning.policy, remote))  # type: ignore[arg-type]
            update["policy"] = Path(remote)
        if learning.coordinator is not None:
            secret = f"{host.state}/{learning.coordinator.secret.name}"
            data = learning.coordinator.secret.read_bytes()
            _step(host, "lb start", lambda: ssh.put_bytes(data, secret, mode=0o600))
            update["coordinator"] = learning.coordinator.model_copy(update={"secret": Path(secret)})
        return learning.model_copy(update=update)

    def _remote_coordinator(self, host: SshNode, ssh: SshHost, spec: CoordinatorSpec, torch: Bundle | None) -> str:
        """The coordinator's spec and policy on its LB host (the secret is there already); returns the spec's
        path there. Remembers where its trajectory is, for `stop` to fetch."""
        if torch is not None:
            _step(host, "install torch", lambda: install_torch(ssh, host.entry.workdir, torch))
        remote = Path(host.state) / "coordinator"
        _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", str(remote)]))
        policy = None
        if spec.policy is not None:
            policy = remote / "acting.pt"
            _step(host, "lb start", lambda: ssh.put(spec.policy, str(policy)))  # type: ignore[arg-type]
        trajectory = remote / "trajectory.jsonl"
        moved = spec.model_copy(
            update={"policy": policy, "secret": Path(host.state) / spec.secret.name, "trajectory": trajectory}
        )
        _step(host, "lb start", lambda: ssh.put_bytes(moved.model_dump_json().encode(), f"{remote}.json"))
        self._trajectory = (host, str(trajectory), spec.trajectory)
        return f"{remote}.json"

    def stop(self) -> int:
        """Stop every LB host's processes and fetch their agents' step logs (and a coordinator's trajectory);
        return how many were running."""

        def stop_one(host: SshNode, ssh: SshHost) -> int:
            stopped = int(json.loads(ssh.run(host.args("lb-stop")).stdout)["stopped"])
            self._fetch_steps(host, ssh)
            trajectory = self._trajectory
            if trajectory is not None and trajectory[0] is host:
                content = ssh.get_bytes(trajectory[1])
                trajectory[2].parent.mkdir(parents=True, exist_ok=True)
                trajectory[2].write_bytes(content or b"")
            return stopped

        return sum(self.testbed.on_all_hosts(stop_one, hosts=self.lb_hosts).values())

    def stats_json(self) -> list[dict[str, Any]]:
        """`lb stats`: each LB host's `node lb-stats`, in LB order."""
        self.require_deployed()

        def ask(host: SshNode, ssh: SshHost) -> dict[str, Any]:
            return json.loads(_step(host, "lb stats", lambda: ssh.run(host.args("lb-stats", config=True))).stdout)

        reports = self.testbed.on_all_hosts(ask, hosts=self.lb_hosts)
        return [reports[host] for host in self.lb_hosts]

    def steps_log(self, lb: Node) -> Path:
        """Where `stop` put LB `lb`'s step log, its times moved onto this machine's monotonic clock."""
        return self.testbed.state_dir / "lb" / f"{lb.name}.steps.jsonl"

    def _fetch_steps(self, host: SshNode, ssh: SshHost) -> None:
        """Copy the agent's step log here. Its times are the LB host's CLOCK_MONOTONIC: shift them by the
        offset between the two clocks (`SshHost.monotonic_offset`)."""
        local = self.testbed.state_dir / "lb" / f"{host.node}.steps.jsonl"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.unlink(missing_ok=True)
        content = ssh.get_bytes(f"{host.state}/lb/{host.node}.steps.jsonl")
        if content is None:
            return
        offset = ssh.monotonic_offset(host.python)
        rows = json_lines(content.decode(errors="replace"))  # without a line cut by the kill
        local.write_text("".join(json.dumps({**row, "t": row["t"] + offset}) + "\n" for row in rows))


class SshClient:
    """The client host of a `kind: ssh` testbed, over its own SSH connection; `python` is its marllb venv."""

    def __init__(self, ssh: SshHost, python: str, state: str) -> None:
        self.ssh, self.python, self.state = ssh, python, state
        self.offset = ssh.monotonic_offset(python)
        self._staged: list[str] = []

    def staging(self, run: Path) -> str:
        remote = f"{self.state}/runs/{run.name}"
        self.ssh.run(["mkdir", "-p", remote])
        self._staged.append(remote)
        return remote

    def close(self) -> None:
        """Remove the staged files from the host (their results are in the run directory by now)."""
        try:
            for remote in self._staged:
                self.ssh.run(["rm", "-rf", remote], check=False)
        except TestbedError:
            pass  # the host went away; `marllb teardown` removes the state directory with the rest
        self.ssh.close()

    def upload(self, local: Path, remote: str) -> None:
        self.ssh.put(local, remote)

    def download(self, remote: str, local: Path) -> bool:
        content = self.ssh.get_bytes(remote)
        if content is None:
            return False
        local.write_bytes(content)
        return True

    def start(self, module: str, args: Sequence[str], log: str) -> ClientProcess:
        return SshProcess(self.ssh, [self.python, "-m", module, *args], log)


def _step(host: SshNode, step: str, action: Callable[[], T]) -> T:
    """Run one step of one host; a failure names the host and the step."""
    try:
        return action()
    except TestbedError as exc:
        raise TestbedError(f"{host.label}: {step}: {exc.message}", hint=exc.hint) from None
