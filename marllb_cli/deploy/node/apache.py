"""One Apache instance per server namespace: generated config, start inside the CPU cgroup, readiness probe.

Each instance has its own ServerRoot under the testbed's state directory (config, pid file, mutexes, logs),
so instances never share files with each other or with the machine's own Apache. The document root is a
copy of `testbed/www` plus generated static files, shared read-only by all servers of the testbed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from marllb_cli.config import ServerGroup, Testbed
from marllb_cli.deploy.node.cgroups import CpuCgroup
from marllb_cli.deploy.node.mediawiki import MediaWikiStack, apache_fragment
from marllb_cli.errors import MissingTool, TestbedError
from marllb_cli.hosts.local import LocalHost, host_for
from marllb_cli.probes import http_get
from marllb_cli.processes import kill_pids
from marllb_cli.topology import Node

__all__ = [
    "ApacheInstance",
    "stop_apache",
    "apache_binary",
    "install_docroot",
    "testbed_files",
    "STATIC_SIZES",
]

APACHE_MODULES = Path("/usr/lib/apache2/modules")
#: Static files (the papers' IO-bound class), name → size in bytes.
STATIC_SIZES = {"1k": 1 << 10, "10k": 10 << 10, "100k": 100 << 10, "1m": 1 << 20}


def testbed_files() -> Path:
    """The `testbed/` tree: packaged as `marllb_cli/_testbed` in a wheel, or the checkout's own folder."""
    packaged = Path(str(resources.files("marllb_cli"))) / "_testbed"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "testbed"
    if checkout.is_dir():
        return checkout
    raise MissingTool("the testbed/ files (Apache template, PHP apps) are not installed with marllb")


def apache_binary() -> Path:
    for candidate in ("/usr/sbin/apache2", "/usr/sbin/httpd"):
        if Path(candidate).exists():
            return Path(candidate)
    raise MissingTool("apache2 is not installed", hint="run `make system-deps` (apt-get install apache2)")


def php_module() -> Path:
    found = sorted(glob.glob(str(APACHE_MODULES / "libphp*.so")))
    if not found:
        raise MissingTool(
            "mod_php is not installed", hint="run `make system-deps` (apt-get install libapache2-mod-php)"
        )
    return Path(found[-1])


def install_docroot(www: Path) -> None:
    """Copy the PHP apps into `www` and write the static files; readable by the unprivileged Apache user."""
    for parent in www.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise TestbedError(
                f"{www}: Apache's unprivileged user cannot reach it ({parent} is not searchable by others)",
                hint=f"choose a state directory or workdir whose parents are (chmod o+x {parent})",
            )
    if www.exists():
        shutil.rmtree(www)
    shutil.copytree(testbed_files() / "www", www)
    static = www / "static"
    static.mkdir()
    pattern = bytes(range(256))
    for name, size in STATIC_SIZES.items():
        (static / f"{name}.bin").write_bytes((pattern * (size // len(pattern) + 1))[:size])
    for path in [www, *www.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@dataclass(frozen=True)
class ApacheInstance:
    """Apache for one server node; `root` is its private ServerRoot."""

    node: Node
    group: ServerGroup
    root: Path
    www: Path
    cgroup: CpuCgroup
    #: The testbed's virtual IP: a MediaWiki server's canonical URL.
    vip: str

    @property
    def conf(self) -> Path:
        return self.root / "apache2.conf"

    @property
    def mediawiki(self) -> MediaWikiStack:
        """The MediaWiki stack of an `app: mediawiki` server (its files live under the instance's root)."""
        return MediaWikiStack(
            server=self.node.name,
            root=self.root / "mediawiki",
            settings=self.group.mediawiki,
            cgroup=self.cgroup,
            url=f"http://{self.vip}",
            max_connections=self.group.apache.max_request_workers + 16,
        )

    @property
    def namespace(self) -> LocalHost:
        """Where the instance runs: the server's namespace, or this host (`kind: ssh`)."""
        return host_for(self.node.namespace)

    def render(self, testbed: Testbed) -> str:
        """The instance's apache2.conf."""
        template = Template((testbed_files() / "apache" / "httpd.conf.tmpl").read_text())
        apache = self.group.apache
        return template.substitute(
            server=self.node.name,
            testbed=testbed.name,
            root=self.root,
            www=self.www,
            user="www-data",
            group="www-data",
            modules=APACHE_MODULES,
            php_module=php_module(),
            status_port=apache.status_port,
            listen_backlog=apache.listen_backlog,
            start_servers=apache.start_servers,
            max_request_workers=apache.max_request_workers,
            work_scale=repr(testbed.work_scale),
            echo_every=testbed.cpu_page_echo_every,
            app=apache_fragment(self.mediawiki.settings_file) if self.group.app == "mediawiki" else "",
        )

    def start(self, testbed: Testbed, *, timeout_s: float = 20.0) -> None:
        """Write the config, start Apache inside the namespace and cgroup, and wait until it serves."""
        for sub in ("run", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render(testbed))
        with open(self.root / "logs" / "start.log", "wb") as start_log:
            launcher = self.namespace.popen(
                [str(apache_binary()), "-f", str(self.conf), "-k", "start"],
                preexec_fn=self.cgroup.add_self,
                stdout=subprocess.DEVNULL,
                stderr=start_log,
            )
            try:
                code = launcher.wait(timeout=timeout_s)
            except BaseException:  # timeout, Ctrl-C, SIGTERM: a launcher left unreaped stays a zombie in the
                launcher.kill()  # cgroup, and the cgroup cannot be removed until it is reaped
                launcher.wait()
                raise
        if code != 0:
            raise TestbedError(f"{self.node.name}: apache2 failed to start: {self._last_error()}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.05)
        raise TestbedError(f"{self.node.name}: apache2 did not answer within {timeout_s:.0f} s: {self._last_error()}")

    @property
    def pidfile(self) -> Path:
        return self.root / "run" / "apache2.pid"

    def ready(self) -> bool:
        """True when the instance answers GET / with 200 on its own address."""
        try:
            status, _, _ = http_get(self.namespace, str(self.node.ip), 80, "/", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def _last_error(self) -> str:
        for log in (self.root / "logs" / "start.log", self.root / "logs" / "error.log"):
            if log.exists():
                lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                if lines:
                    return lines[-1]
        return "no log output"


def stop_apache(cgroup: CpuCgroup, pidfile: Path, *, grace_s: float = 5.0) -> None:
    """Stop one instance the way Apache expects: SIGTERM to the master, which stops and reaps its workers.

    Signalling every worker at once would orphan them (zombies until init reaps them); whatever is still
    in the instance's cgroup after `grace_s` is killed. The pid is used only if it is in our cgroup.
    """
    try:
        master = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        master = None
    if master is not None and master in cgroup.pids():
        os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
    kill_pids(cgroup.pids)
