"""MediaWiki servers (`app: mediawiki`): the papers' server stack — Apache + PHP + MediaWiki with a MariaDB
and a memcached of its own — set up on one server node, after its Apache has started.

    packages  mediawiki, php-mysql, php-memcached, mariadb-server-core, memcached, … (`PACKAGES`) from the distribution
              (`ensure_packages`: apt-get on a real host that lacks them; the KVM image has them built in)
    database  a private MariaDB instance: data directory and unix socket under the server's state directory,
              no TCP port, small buffers
    cache     a private memcached on a unix socket: MediaWiki's object, parser and message cache
    install   maintenance/install.php writes the server's own LocalSettings.php; our settings are appended
              (article path /wiki/index.php/<Title>, memcached, no jobs run during page views)
    pages     an XML dump imported with importDump.php: the user's (`mediawiki.dump`), or N generated pages
              whose titles are those `marllb trace gen wiki` asks for (`wikipages`)

MariaDB and memcached run in the server's CPU cgroup beside Apache: on the papers' testbed each server is
one VM running all three, so the database and the cache spend the same capacity the web server does.
Set-up commands (install, import) run outside it, so a quarter-core server does not take minutes to build.
Apache serves MediaWiki at /wiki straight from the distribution's tree with `MW_CONFIG_FILE` pointing at
the server's own LocalSettings.php, so servers that share a machine never share settings or data.
"""

from __future__ import annotations

import pwd
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from marllb_cli.config import Config, MediaWikiSettings
from marllb_cli.deploy.node.cgroups import CpuCgroup
from marllb_cli.deploy.node.manifest import Manifest
from marllb_cli.errors import ConfigError, MissingTool, TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.services import Service, start_process
from marllb_cli.wikipages import write_dump

__all__ = [
    "MEDIAWIKI_DIR",
    "PACKAGES",
    "MediaWikiStack",
    "apache_fragment",
    "check_dumps",
    "ensure_packages",
    "installed",
    "uploaded_dump",
]

MEDIAWIKI_DIR = Path("/usr/share/mediawiki")
#: What a MediaWiki server needs from the distribution (Debian 12 names).
PACKAGES = (
    "mediawiki",
    "php-mysql",
    "php-memcached",
    "php-intl",
    "mariadb-server-core",
    "mariadb-client-core",  # not needed to serve; `mariadb --socket …` to look into a server's database
    "memcached",
)
_BINARIES = {"mariadbd": "mariadb-server-core", "mariadb-install-db": "mariadb-server-core", "memcached": "memcached"}
#: The longest path a unix socket may have (sun_path is 108 bytes with the terminating NUL).
_SOCKET_PATH_MAX = 107


def apache_fragment(settings_file: Path) -> str:
    """The lines a MediaWiki server's apache2.conf adds: MediaWiki at /wiki, reading `settings_file`."""
    return (
        f"Alias /wiki {MEDIAWIKI_DIR}\n"
        f'<Directory "{MEDIAWIKI_DIR}">\n'
        "    Require all granted\n    AllowOverride None\n    Options FollowSymLinks\n</Directory>\n"
        f'SetEnv MW_CONFIG_FILE "{settings_file}"\n'
    )


def installed() -> bool:
    """Whether this machine has the MediaWiki stack (MediaWiki, MariaDB's server, memcached)."""
    return (MEDIAWIKI_DIR / "index.php").exists() and all(shutil.which(binary) for binary in _BINARIES)


def check_dumps(config: Config) -> None:
    """Fail before deploying when a server group names an XML dump that is not there."""
    for i, group in enumerate(config.testbed.servers):
        dump = group.mediawiki.dump
        if group.app == "mediawiki" and dump is not None and not dump.is_file():
            raise ConfigError(
                f"{config.source or 'config'}: testbed.servers[{i}].mediawiki.dump: {dump}: no such file",
                hint="give the path of a MediaWiki XML export, or leave dump unset for generated pages",
            )


def uploaded_dump(state: str, group: str) -> str:
    """Where `marllb deploy` puts a server group's dump on a real host (`state`: the node's state directory)."""
    return f"{state}/dumps/{group}.xml"


def ensure_packages(host: LocalHost) -> None:
    """Install the MediaWiki stack from the distribution where it is missing (a real host); nothing to do
    when it is there (the KVM image, a prepared host)."""
    if installed():
        return
    if shutil.which("apt-get") is None:
        raise MissingTool(
            f"{host.name}: MediaWiki servers need {', '.join(PACKAGES)}",
            hint="install them with the distribution's package manager",
        )
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    host.run([*env, "apt-get", "update", "-qq"], timeout=600)
    host.run([*env, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=1800)


@dataclass(frozen=True)
class MediaWikiStack:
    """The MediaWiki stack of one server: everything lives under `root` (the server's state + /mediawiki)."""

    server: str
    root: Path
    settings: MediaWikiSettings
    cgroup: CpuCgroup
    #: The wiki's canonical URL (the VIP): links in rendered pages point there.
    url: str
    max_connections: int

    @property
    def settings_file(self) -> Path:
        return self.root / "LocalSettings.php"

    @property
    def db_socket(self) -> Path:
        return self.root / "db-run" / "mysqld.sock"

    @property
    def cache_socket(self) -> Path:
        return self.root / "cache-run" / "memcached.sock"

    def start(self, host: LocalHost, manifest: Manifest, *, timeout_s: float = 300.0) -> None:
        """Database, cache, MediaWiki install and pages; every process and directory is recorded in
        `manifest` as it is made, so teardown (or a failed start) removes them."""
        if len(str(self.db_socket)) > _SOCKET_PATH_MAX:
            raise TestbedError(
                f"{self.server}: the socket path {self.db_socket} is longer than {_SOCKET_PATH_MAX} bytes",
                hint="use a shorter state directory (MARLLB_STATE_DIR) or workdir",
            )
        manifest.record("directory", f"mediawiki-{self.server}", path=str(self.root))
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.root.chmod(0o755)
        self._start_database(host, manifest, timeout_s)
        self._start_cache(host, manifest, timeout_s)
        self._install(host, timeout_s)
        self._import_pages(host, timeout_s)

    # -- steps -----------------------------------------------------------------------------------------
    def _start_database(self, host: LocalHost, manifest: Manifest, timeout_s: float) -> None:
        user = _service_user("mysql")
        datadir, run = self.root / "db", self.db_socket.parent
        for directory in (datadir, run):
            directory.mkdir()
            shutil.chown(directory, user, _primary_group(user))
        options = [
            "--no-defaults",
            f"--datadir={datadir}",
            f"--user={user}",
            f"--innodb-buffer-pool-size={self.settings.db_buffer_mb}M",
            "--innodb-log-file-size=8M",
        ]
        # --force: do not insist that the host name resolves (guests and namespaces often have no DNS); the
        # accounts are socket-only and the server has no TCP port, so host names play no part.
        install = ["mariadb-install-db", *options, "--auth-root-authentication-method=socket", "--skip-test-db"]
        result = host.run([*install, "--force"], timeout=timeout_s, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).splitlines()
            errors = [line for line in output if "ERROR" in line] or output[-1:] or ["no output"]
            raise TestbedError(f"{self.server}: mariadb-install-db failed: {errors[0].strip()}")
        argv = [
            "mariadbd",
            *options,
            f"--socket={self.db_socket}",
            f"--pid-file={run / 'mysqld.pid'}",
            f"--log-error={run / 'error.log'}",
            "--skip-networking",
            "--skip-log-bin",
            "--performance-schema=OFF",
            f"--max-connections={self.max_connections}",
        ]
        service = self._start_process(host, manifest, "mariadb", argv)
        self._wait_for_socket(service, self.db_socket, b"", timeout_s, Path(run / "error.log"))

    def _start_cache(self, host: LocalHost, manifest: Manifest, timeout_s: float) -> None:
        user = _service_user("memcache")
        run = self.cache_socket.parent
        run.mkdir()
        # The socket is 0777 for its owner's sake, but sits in a directory only memcached and Apache's group
        # (www-data) may enter: no other local user can read or poison the wiki's object and session cache.
        shutil.chown(run, user, "www-data")
        run.chmod(0o750)
        memory = str(self.settings.memcached_mb)
        argv = ["memcached", "-u", user, "-s", str(self.cache_socket), "-a", "0777", "-m", memory]
        service = self._start_process(host, manifest, "memcached", argv)
        self._wait_for_socket(service, self.cache_socket, b"version\r\n", timeout_s, None)

    def _install(self, host: LocalHost, timeout_s: float) -> None:
        """install.php creates the database and its user, then writes LocalSettings.php; ours is appended."""
        staging = self.root / "install"
        staging.mkdir()
        db_password = secrets.token_urlsafe(18)
        host.run(
            [
                "php",
                str(MEDIAWIKI_DIR / "maintenance" / "install.php"),
                "--dbtype=mysql",
                f"--dbserver=localhost:{self.db_socket}",
                "--dbname=wiki",
                "--dbuser=wiki",
                f"--dbpass={db_password}",
                "--installdbuser=root",
                f"--server={self.url}",
                "--scriptpath=/wiki",
                f"--confpath={staging}",
                "--lang=en",
                f"--pass={secrets.token_urlsafe(18)}",
                "marllb",
                "Admin",
            ],
            timeout=timeout_s,
        )
        generated = (staging / "LocalSettings.php").read_text()
        shutil.rmtree(staging)
        cache = self.root / "cache"
        cache.mkdir()
        self.settings_file.write_text(generated + self._our_settings(cache))
        # Holds the database password: readable by root and the web server's group only.
        self.settings_file.chmod(0o640)
        shutil.chown(self.settings_file, "root", "www-data")

    def _our_settings(self, cache: Path) -> str:
        return f"""
# marllb: set for server {self.server}
$wgArticlePath = "/wiki/index.php/$1";
$wgUsePathInfo = true;
$wgMainCacheType = 'memcached-pecl';
$wgParserCacheType = 'memcached-pecl';
$wgMessageCacheType = 'memcached-pecl';
$wgSessionCacheType = 'memcached-pecl';
$wgMemCachedServers = [ '{self.cache_socket}' ];
$wgCacheDirectory = '{cache}';
$wgJobRunRate = 0;
$wgEnableEmail = false;
$wgUseImageMagick = false;
"""

    def _import_pages(self, host: LocalHost, timeout_s: float) -> None:
        dump = self.settings.dump
        if dump is None:
            dump = self.root / "pages.xml"
            write_dump(dump, self.settings.pages)
        env = ["env", f"MW_CONFIG_FILE={self.settings_file}"]
        maintenance = MEDIAWIKI_DIR / "maintenance"
        # --no-updates: no link tables, which page views do not read and which make imports ≈ 5× slower.
        host.run([*env, "php", str(maintenance / "importDump.php"), "--no-updates", str(dump)], timeout=timeout_s * 4)
        host.run([*env, "php", str(maintenance / "rebuildLocalisationCache.php"), "--lang=en"], timeout=timeout_s)
        for path in [self.root / "cache", *(self.root / "cache").rglob("*")]:
            shutil.chown(path, "www-data", "www-data")
        if self.settings.dump is None:
            dump.unlink()

    # -- helpers ---------------------------------------------------------------------------------------
    def _start_process(self, host: LocalHost, manifest: Manifest, what: str, argv: list[str]) -> Service:
        service = start_process(
            host, f"{what}-{self.server}", argv, self.root / f"{what}.log", preexec_fn=self.cgroup.add_self
        )
        manifest.record("process", service.name, node=self.server, **service.as_record())
        return service

    def _wait_for_socket(
        self, service: Service, path: Path, greeting: bytes, timeout_s: float, error_log: Path | None
    ) -> None:
        """Until a unix socket accepts a connection and answers (`greeting` is sent first, if any)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not service.running():
                log = error_log if error_log and error_log.exists() else Path(service.log)
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                raise TestbedError(f"{service.name} exited: {lines[-1] if lines else 'no log output'}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2.0)
                    sock.connect(str(path))
                    if greeting:
                        sock.sendall(greeting)
                    if sock.recv(64):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TestbedError(f"{service.name} did not answer on {path} within {timeout_s:.0f} s")


def _service_user(preferred: str) -> str:
    """The distribution's user for a service when it exists (mysql, memcache), else `nobody`."""
    try:
        pwd.getpwnam(preferred)
        return preferred
    except KeyError:
        return "nobody"


def _primary_group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid
