"""A `kind: ssh` testbed: existing hosts, set up over SSH by running `python -m marllb_cli.node` on each.

    deploy    per host, all hosts at once: connect (host key checked) → provision (marllb's wheel into
              `<workdir>/venv`, skipped when already there) → upload the resolved config → `node up`
              (its role, and Apache on servers; idempotent) → the host's facts (its data MAC)
    lb start  per LB host: the specs (`lb_services.lb_specs`, with the servers' MACs) → `node lb-start`
    status    per host `node status`
    teardown  per host `node down` (everything its record lists, LB processes included); the venv stays

A failing step names the host, the step and the command's last output line; the other hosts finish their
step, and every host's record says what it holds, so `marllb teardown` (or a new deploy) always knows
what to do. The controller keeps `<state dir>/<testbed>/ssh.json`: whether the deploy completed, the config
digest and the facts.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from marllb_cli.agents.factory import RL_PREFIX, resolve_method
from marllb_cli.client_node import SshClient
from marllb_cli.config import Config, ServerGroup, SshHostEntry
from marllb_cli.deploy import mediawiki
from marllb_cli.deploy.lb_services import lb_specs
from marllb_cli.deploy.local import DeployOutcome, NodeStatus, TestbedStatus
from marllb_cli.deploy.manifest import state_root, testbed_digest
from marllb_cli.deploy.network import Progress, no_progress
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.hosts.provision import Bundle, bundle, install_torch, provision, torch_bundle
from marllb_cli.hosts.ssh import SshHost, SshTarget
from marllb_cli.topology import Node, Topology, host_node_names, plan

__all__ = ["SshLbServices", "SshNode", "SshTestbed"]

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
        return f"{self.entry.workdir}/{self.testbed}"

    @property
    def python(self) -> str:
        return f"{self.entry.workdir}/venv/bin/python"

    def node_command(self, *args: str) -> list[str]:
        return [self.python, "-m", "marllb_cli.node", *args]


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
        self.state_path = self.state_dir / "ssh.json"
        self.topology: Topology = plan(testbed, self._saved().get("macs", {}))

    # -- public operations -----------------------------------------------------------------------------
    def deploy(self, progress: Progress = no_progress, *, wheels: Bundle | None = None) -> DeployOutcome:
        """Set every host up (in parallel); a no-op on hosts already set up with this config. `wheels`: the
        bundle to provision (default: built now from this checkout)."""
        mediawiki.check_dumps(self.config)
        previous = self._saved()
        wheels = wheels or bundle()
        config_text = self.config.resolved_yaml().encode()
        digest = testbed_digest(self.config.testbed)
        self._save({"complete": False, "digest": digest, "macs": previous.get("macs", {})})
        results = self.on_all_hosts(lambda host, ssh: self._deploy_host(host, ssh, wheels, config_text, progress))
        macs = {host.node: facts["mac"] for host, facts in results.items()}
        self._save({"complete": True, "digest": digest, "macs": macs})
        self.topology = plan(self.config.testbed, macs)
        if not previous:
            return "created"
        changed = any(facts.get("changed", True) for facts in results.values())
        return "rebuilt" if changed or previous.get("digest") != digest else "unchanged"

    def teardown(self, progress: Progress = no_progress) -> int:
        """Undo everything on every host; return how many resources the hosts removed."""
        if not self.state_path.exists():
            return 0
        done = [0]
        lock = threading.Lock()

        def down(host: SshNode, ssh: SshHost) -> int:
            removed = json.loads(ssh.run(host.node_command("down", "--state", host.state), timeout=120).stdout)
            with lock:
                done[0] += 1
                progress("teardown", done[0], len(self.hosts))
            return int(removed["removed"])

        removed = sum(self.on_all_hosts(down).values())
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return removed

    def status(self, *, probe: bool = True) -> TestbedStatus:
        """Each host's `node status` (servers probe their own Apache)."""
        saved = self._saved()
        nodes = {node.name: node for node in self.topology.nodes}
        statuses = {host.node: NodeStatus.of(nodes[host.node]) for host in self.hosts}
        if saved:

            def ask(host: SshNode, ssh: SshHost) -> dict[str, Any]:
                args = ("status", "--config", f"{host.state}/config.yaml", "--node", host.node, "--state", host.state)
                return json.loads(ssh.run(host.node_command(*args)).stdout)

            for host, report in self.on_all_hosts(ask, tolerate_errors=True).items():
                if isinstance(report, dict):
                    statuses[host.node].up = bool(report["up"])
                    statuses[host.node].http_status = report["http_status"]
                else:  # the host could not be asked: say why instead of a bare "down"
                    statuses[host.node].error = report.one_line()
        if not saved:
            state = "absent"
        elif not saved.get("complete"):
            state = "partial"
        else:
            state = "up" if all(status.up for status in statuses.values()) else "degraded"
        ordered = [statuses[node.name] for node in self.topology.nodes if node.name in statuses]
        return TestbedStatus(testbed=self.topology.testbed, vip=str(self.topology.vip), state=state, nodes=ordered)

    def require_deployed(self) -> None:
        if not self._saved().get("complete"):
            raise TestbedError(
                f"testbed {self.topology.testbed} is not deployed", hint="run `marllb deploy` with this config first"
            )

    # -- steps -----------------------------------------------------------------------------------------
    def _deploy_host(
        self, host: SshNode, ssh: SshHost, wheels: Bundle, config_text: bytes, progress: Progress
    ) -> dict[str, Any]:
        progress(host.label, 1, len(DEPLOY_STEPS))
        _step(host, "provision", lambda: provision(ssh, host.entry.workdir, host.entry.python, wheels))
        progress(host.label, 2, len(DEPLOY_STEPS))
        _step(host, "upload config", lambda: ssh.run(["mkdir", "-p", host.state]))
        _step(host, "upload config", lambda: ssh.put_bytes(config_text, f"{host.state}/config.yaml"))
        group = self._group(host)
        if group is not None and group.app == "mediawiki" and group.mediawiki.dump is not None:
            dump, remote = group.mediawiki.dump, mediawiki.uploaded_dump(host.state, group.name)
            _step(host, "upload dump", lambda: ssh.run(["mkdir", "-p", str(PurePosixPath(remote).parent)]))
            _step(host, "upload dump", lambda: ssh.put(dump, remote))
        progress(host.label, 3, len(DEPLOY_STEPS))
        args = ("up", "--config", f"{host.state}/config.yaml", "--node", host.node, "--state", host.state)
        # A MediaWiki server installs packages, a database and its pages: minutes, more under emulation.
        timeout = 3600 if group is not None and group.app == "mediawiki" else 300
        out = _step(host, "set up", lambda: ssh.run(host.node_command(*args), timeout=timeout))
        progress(host.label, 4, len(DEPLOY_STEPS))
        return json.loads(out.stdout.strip().splitlines()[-1])

    def client_node(self) -> SshClient:
        """The client host, where `replay-trace` runs its replayer and sampler."""
        host = next(host for host in self.hosts if host.entry.role == "client")
        return SshClient(self.connect(host), host.python, host.state)

    def _group(self, host: SshNode) -> ServerGroup | None:
        """The server group of a server host (None for other roles)."""
        node = self.topology.node(host.node)
        return next((group for group in self.config.testbed.servers if group.name == node.group), None)

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
        if errors and not tolerate_errors:
            raise TestbedError("; ".join(errors))
        return results

    # -- helpers ---------------------------------------------------------------------------------------
    def _saved(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)


class SshLbServices:
    """The LB processes of a `kind: ssh` testbed, started and stopped on the LB hosts."""

    def __init__(self, testbed: SshTestbed) -> None:
        self.testbed = testbed
        self.topology = testbed.topology
        self.lb_hosts = [host for host in testbed.hosts if host.entry.role == "lb"]

    def require_deployed(self) -> None:
        self.testbed.require_deployed()

    def start(self, method: str, *, period: float = 0.25, idle_timeout: float = 40.0, seed: int = 0) -> int:
        """Start a dataplane and an agent on every LB host (replacing running ones); return 0."""
        method = resolve_method(method)
        self.require_deployed()
        learned = method.startswith(RL_PREFIX)
        torch = torch_bundle() if learned else None
        lbs = {lb.name: lb for lb in self.topology.lbs}

        def start_one(host: SshNode, ssh: SshHost) -> None:
            lb = lbs[host.node]
            directory = Path(host.state) / "lb"
            remote_method = method
            if torch is not None:  # the policy and, the first time, PyTorch go to the LB host
                policy = f"{host.state}/policy"
                _step(host, "install torch", lambda: install_torch(ssh, host.entry.workdir, torch))
                _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", policy]))
                local_policy = Path(method.removeprefix(RL_PREFIX)) / "policy.pt"
                _step(host, "lb start", lambda: ssh.put(local_policy, f"{policy}/policy.pt"))
                remote_method = RL_PREFIX + policy
            dataplane, agent = lb_specs(
                self.testbed.config,
                self.topology,
                lb,
                method,
                period=period,
                idle_timeout=idle_timeout,
                seed=seed + lb.index,
                directory=directory,
            )
            agent = agent.model_copy(update={"method": remote_method})
            _step(host, "lb start", lambda: ssh.run(["mkdir", "-p", str(directory)]))
            files = {"dataplane": dataplane.model_dump_json(), "agent": agent.model_dump_json()}
            for role, text in files.items():
                _step(host, "lb start", lambda r=role, t=text: ssh.put_bytes(t.encode(), f"{host.state}/{r}.json"))
            args = ("lb-start", "--state", host.state, "--dataplane", f"{host.state}/dataplane.json")
            command = host.node_command(*args, "--agent", f"{host.state}/agent.json")
            _step(host, "lb start", lambda: ssh.run(command, timeout=300))

        try:
            self.testbed.on_all_hosts(start_one, hosts=self.lb_hosts)
        except TestbedError:
            self.stop()
            raise
        return 0

    def stop(self) -> int:
        """Stop every LB host's processes and fetch their agents' step logs; return how many were running."""

        def stop_one(host: SshNode, ssh: SshHost) -> int:
            stopped = int(json.loads(ssh.run(host.node_command("lb-stop", "--state", host.state)).stdout)["stopped"])
            self._fetch_steps(host, ssh)
            return stopped

        return sum(self.testbed.on_all_hosts(stop_one, hosts=self.lb_hosts).values())

    def stats_json(self) -> list[dict[str, Any]]:
        """`lb stats`: each LB host's `node lb-stats`, in LB order."""
        self.require_deployed()

        def ask(host: SshNode, ssh: SshHost) -> dict[str, Any]:
            args = ("lb-stats", "--config", f"{host.state}/config.yaml", "--node", host.node, "--state", host.state)
            return json.loads(_step(host, "lb stats", lambda: ssh.run(host.node_command(*args))).stdout)

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
        lines = []
        for line in content.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            row["t"] = row["t"] + offset
            lines.append(json.dumps(row))
        local.write_text("".join(f"{line}\n" for line in lines))


def _step(host: SshNode, step: str, action: Callable[[], T]) -> T:
    """Run one step of one host; a failure names the host and the step."""
    try:
        return action()
    except TestbedError as exc:
        raise TestbedError(f"{host.label}: {step}: {exc.message}", hint=exc.hint) from None
