"""The YAML file that describes a testbed and an experiment: pydantic models, loading and one-line errors.

One file drives every command. `load_config(path, overrides)` is the only entry point: it reads the YAML,
applies `--set key=value` overrides, validates, and returns a frozen `Config`. Any problem becomes a
`ConfigError` whose text names the file, the line, the dotted field and the fix, e.g.::

    configs/bad.yaml:12: testbed.servers[1].cpus: Input should be greater than 0 (fix: ...)

A minimal file::

    testbed:
      name: small
      servers:
        - {name: small, count: 2, cpus: 1}
        - {name: big, count: 2, cpus: 2}
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from marllb_cli.errors import ConfigError
from marllb_cli.events import CapacityDrift, Event, check_targets

__all__ = [
    "ApacheSettings",
    "ClientSettings",
    "Config",
    "Experiment",
    "NetworkSettings",
    "ServerGroup",
    "Sim",
    "KvmSettings",
    "SshHostEntry",
    "SshSettings",
    "SimTraffic",
    "Testbed",
    "WorkDistribution",
    "load_config",
    "nested_model",
    "parse_override",
]

#: Host offsets inside the data subnet: router .1, LBs from .11, servers from .101 (stable when counts change).
ROUTER_HOST = 1
LB_HOST_BASE = 11
SERVER_HOST_BASE = 101
MAX_LBS = SERVER_HOST_BASE - LB_HOST_BASE
#: CFS refuses quotas below 1 ms.
MIN_QUOTA_US = 1000
NAME_PATTERN = r"^[a-z][a-z0-9]*$"


class _Strict(BaseModel):
    """Unknown keys are errors (typos must not be silently ignored); models are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ApacheSettings(_Strict):
    """Apache prefork settings of one server group (the papers: MaxRequestWorkers 32, ListenBacklog 128)."""

    max_request_workers: int = Field(32, ge=1, le=1024, description="Worker processes; requests beyond wait.")
    listen_backlog: int = Field(128, ge=1, le=65535, description="Accept queue beyond busy workers.")
    start_servers: int = Field(8, ge=1, le=1024, description="Workers forked at start.")
    status_port: int = Field(8080, ge=1, le=65535, description="Port of mod_status (busy workers).")

    @model_validator(mode="after")
    def _start_within_limit(self) -> ApacheSettings:
        if self.start_servers > self.max_request_workers:
            raise ValueError("start_servers cannot exceed max_request_workers")
        if self.status_port == 80:
            raise ValueError("status_port must differ from the HTTP port 80")
        return self


class MediaWikiSettings(_Strict):
    """The wiki of an `app: mediawiki` server group: its pages, and the sizes of its database and cache."""

    pages: int = Field(
        1000, ge=1, le=1_000_000, description="Generated pages Page_1..Page_N (the titles `trace gen wiki` asks for)."
    )
    dump: Path | None = Field(None, description="A MediaWiki XML dump to import instead of the generated pages.")
    memcached_mb: int = Field(64, ge=8, le=65536, description="memcached's memory (object and parser cache).")
    db_buffer_mb: int = Field(32, ge=8, le=65536, description="MariaDB's InnoDB buffer pool.")


class ServerGroup(_Strict):
    """A group of identical Apache servers; `cpus` is the capacity in CPU units (see `Testbed.cpu_unit`)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=12, description="Group name, used in reports.")
    count: int = Field(ge=1, le=150, description="Number of servers in the group.")
    cpus: float = Field(gt=0, le=256, description="Capacity of each server in CPU units.")
    app: Literal["php", "mediawiki"] = Field(
        "php",
        description="php: the for-loop page and a stand-in wiki; mediawiki: MediaWiki + MariaDB + memcached.",
    )
    speed: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Simulator only: work units per core-second (heterogeneity beyond cores); 1 on testbeds.",
    )
    apache: ApacheSettings = Field(default_factory=ApacheSettings, description="Apache prefork settings.")
    mediawiki: MediaWikiSettings = Field(
        default_factory=MediaWikiSettings, description="The wiki of `app: mediawiki` servers."
    )


class NetworkSettings(_Strict):
    """Address plan. Local testbeds live in their own namespaces, so two testbeds may use the same ranges."""

    data_subnet: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.99.0.0/24"),
        description="Router, LBs and servers (router .1, LBs .11+, servers .101+).",
    )
    client_subnet: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.99.1.0/24"), description="Client and the router's client-side leg."
    )

    @model_validator(mode="after")
    def _disjoint(self) -> NetworkSettings:
        if self.data_subnet.overlaps(self.client_subnet):
            raise ValueError(f"data_subnet {self.data_subnet} overlaps client_subnet {self.client_subnet}")
        if self.client_subnet.num_addresses < 4:
            raise ValueError("client_subnet needs room for two hosts (a /30 or larger)")
        return self


class ClientSettings(_Strict):
    """The traffic source: one namespace behind the edge router."""

    mtu: int | None = Field(
        None, ge=576, le=9000, description="Client MTU; default 1500, or 1476 in gre mode (room for GRE)."
    )


#: Directories that no marllb directory may be: teardown deletes inside `workdir` and `image_cache`.
SYSTEM_DIRECTORIES = frozenset(
    "/ /bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root /run /sbin /srv "
    "/sys /tmp /usr /var /usr/bin /usr/lib /usr/local /usr/sbin /usr/share /var/lib /var/cache /var/log "
    "/var/tmp /var/run /run/user".split()
)


def own_directory(value: str) -> str:
    """`value` if it can be a directory of marllb's own: absolute, no `..`, not a system directory."""
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError(f"{value} must be an absolute path")
    if ".." in path.parts:
        raise ValueError(f"{value} must not contain '..'")
    if str(path) in SYSTEM_DIRECTORIES:
        raise ValueError(f"{value} is a system directory; use a directory of marllb's own, e.g. /var/lib/marllb")
    return value


class SshHostEntry(_Strict):
    """One existing host of a `kind: ssh` testbed, reached over SSH with a key. Hosts of a role are numbered
    in the order listed: the first `lb` host is lb0, the first `server` host srv0 (in server-group order)."""

    role: Literal["client", "router", "lb", "server"] = Field(description="What the host does in the testbed.")
    address: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$",
        description="Host name or address that SSH connects to (letters, digits, '.', ':', '-', '_').",
    )
    port: int = Field(22, ge=1, le=65535, description="SSH port.")
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_.-]*$", max_length=32, description="SSH user (needs root).")
    key_file: Path | None = Field(None, description="Private key; unset: the user's default keys (~/.ssh/id_*).")
    data_iface: str = Field(
        "eth0", pattern=r"^[A-Za-z0-9_.:-]{1,15}$", description="Interface on the data segment (LBs, servers)."
    )
    data_ip: ipaddress.IPv4Interface = Field(description="The host's address on its testbed segment, with prefix.")
    gateway: ipaddress.IPv4Address | None = Field(
        None, description="client: the router address the VIP is routed to (unset: the client's own routes)."
    )
    workdir: str = Field(
        "/var/lib/marllb",
        pattern=r"^/[A-Za-z0-9_./-]*$",
        description="Where marllb lives on the host: its venv and each testbed's state.",
    )
    python: str = Field("python3", pattern=r"^[A-Za-z0-9_./-]+$", description="Python ≥ 3.11 on the host.")

    _own_workdir = field_validator("workdir")(own_directory)


class SshSettings(_Strict):
    """How marllb logs in to `kind: ssh` hosts."""

    known_hosts: Path = Field(
        Path("~/.ssh/known_hosts"),
        description="Host keys are checked against this file; unknown ones refused without --accept-new-host-keys.",
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300, description="SSH connect and authentication timeout.")


class KvmSettings(_Strict):
    """How `kind: kvm` builds and boots its guests (the LBs and servers; client and router are namespaces)."""

    memory_mb: int = Field(512, ge=256, le=65536, description="Memory of each guest.")
    mgmt_subnet: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.99.254.0/24"), description="Guests' SSH network, inside the testbed only."
    )
    image_cache: Path = Field(Path("/var/cache/marllb"), description="Where the Debian base image is built once.")
    mirror: str = Field(
        "http://deb.debian.org/debian",
        pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$",
        description="Debian archive for debootstrap (http or https; a host name and a plain path).",
    )
    boot_timeout_s: float = Field(600.0, gt=0, le=3600, description="How long to wait for every guest's sshd.")
    _own_cache = field_validator("image_cache")(lambda value: Path(own_directory(str(value))))
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto",
        description="kvm: hardware virtualisation; tcg: qemu's emulation (slow, works anywhere); auto: kvm when "
        "/dev/kvm is usable and the CPU shows vmx or svm.",
    )


class Testbed(_Strict):
    """Where the experiment runs: the nodes, their capacities and the network between them."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=10,
        description="Prefix of every namespace, cgroup and state directory of this testbed.",
    )
    kind: Literal["local", "ssh", "kvm"] = Field(
        "local",
        description="local: network namespaces on this machine; ssh: existing hosts (`hosts`); kvm: LBs and "
        "servers as KVM guests on this machine (`kvm`).",
    )
    vip: ipaddress.IPv4Address = Field(
        ipaddress.IPv4Address("10.99.255.1"), description="Virtual IP that clients connect to."
    )
    forwarding: Literal["l2dsr", "gre"] = Field("l2dsr", description="How LBs hand packets to servers.")
    lbs: int = Field(2, ge=1, le=MAX_LBS, description="Number of load balancers.")
    servers: list[ServerGroup] = Field(min_length=1, description="Server groups.")
    client: ClientSettings = Field(default_factory=ClientSettings, description="The traffic source.")
    network: NetworkSettings = Field(default_factory=NetworkSettings, description="Address plan.")
    cpu_unit: float = Field(
        0.25,
        gt=0,
        le=64,
        description="Cores per CPU unit on a local testbed (scales capacities to this machine).",
    )
    cpu_period_us: int = Field(
        10_000, ge=1_000, le=1_000_000, description="CFS period of the server cgroups, microseconds."
    )
    work_scale: float = Field(
        1.0, gt=0, le=1000, description="Multiplier on the for-loop iterations of /dummy.php (?n=...)."
    )
    cpu_page_echo_every: int = Field(
        0,
        ge=0,
        le=1_000_000_000,
        description="/dummy.php answers once, at the end (0), or echoes its counter every so many iterations while "
        "it computes, as the papers' artefact did (4000): the body then grows with the work and the client ACKs "
        "before the request is over, so an LB's flow-duration samples follow running requests.",
    )
    hosts: list[SshHostEntry] = Field(default_factory=list, description="kind ssh: the hosts, by role.")
    ssh: SshSettings = Field(default_factory=SshSettings, description="kind ssh: logging in.")
    kvm: KvmSettings = Field(default_factory=KvmSettings, description="kind kvm: guests and their image.")

    @field_validator("servers")
    @classmethod
    def _unique_group_names(cls, groups: list[ServerGroup]) -> list[ServerGroup]:
        seen: set[str] = set()
        for group in groups:
            if group.name in seen:
                raise ValueError(f"duplicate server group name {group.name!r}; give each group its own name")
            seen.add(group.name)
        return groups

    @model_validator(mode="after")
    def _hosts_match_the_roles(self) -> Testbed:
        if self.kind != "ssh":
            if self.hosts:
                raise ValueError("hosts are for kind: ssh; remove them or set kind: ssh")
            return self
        wanted = {"client": 1, "router": 1, "lb": self.lbs, "server": self.n_servers}
        for role, count in wanted.items():
            have = sum(host.role == role for host in self.hosts)
            if have != count:
                raise ValueError(f"kind ssh needs {count} host(s) with role {role} (lbs, servers), found {have}")
        return self

    @model_validator(mode="after")
    def _addresses_and_quotas(self) -> Testbed:
        data, client = self.network.data_subnet, self.network.client_subnet
        if self.kind == "kvm" and (self.kvm.mgmt_subnet.overlaps(data) or self.kvm.mgmt_subnet.overlaps(client)):
            raise ValueError(f"kvm.mgmt_subnet {self.kvm.mgmt_subnet} overlaps a network subnet; choose another")
        for subnet, label in ((data, "data_subnet"), (client, "client_subnet")):
            if self.vip in subnet:
                raise ValueError(f"vip {self.vip} lies inside network.{label} {subnet}; choose an address outside it")
        needed = SERVER_HOST_BASE + self.n_servers
        if data.num_addresses - 2 < needed:
            raise ValueError(
                f"network.data_subnet {data} has no room for {self.n_servers} servers "
                f"(servers start at host .{SERVER_HOST_BASE}); use a /24 or larger"
            )
        for group in self.servers:
            quota = group.cpus * self.cpu_unit * self.cpu_period_us
            if quota < MIN_QUOTA_US:
                raise ValueError(
                    f"server group {group.name!r}: cpus × cpu_unit × cpu_period_us = {quota:.0f} µs, "
                    f"below the kernel's {MIN_QUOTA_US} µs minimum; raise cpu_unit or cpu_period_us"
                )
        return self

    @property
    def n_servers(self) -> int:
        """Total servers over all groups."""
        return sum(group.count for group in self.servers)

    def group(self, name: str | None) -> ServerGroup | None:
        """The server group called `name` (a topology node's `group`); None for a node of no group."""
        return next((group for group in self.servers if group.name == name), None)


class CoordinatorSettings(_Strict):
    """Where the coordinator of a QMIX or Centr-LB training episode on the testbed listens, and how long it
    waits for the agents' observations each step."""

    lb: int = Field(0, ge=0, le=255, description="Index of the LB on whose address (and node) it runs.")
    port: int = Field(7460, ge=1024, le=65535, description="TCP port on that LB's data address.")
    deadline_ms: int = Field(
        100, ge=1, le=60_000, description="An agent's observation must arrive within this after a tick."
    )


def _event_shape(value: Any) -> str:
    """A drift (it has a `drift` key) or a timed event, so a bad item is described by its own model."""
    return "drift" if isinstance(value, dict) and "drift" in value else "event"


#: One item of `experiment.events`.
EventItem = Annotated[
    Annotated[Event, Tag("event")] | Annotated[CapacityDrift, Tag("drift")], Discriminator(_event_shape)
]


class Experiment(_Strict):
    """How a run behaves, independent of where it runs."""

    agent_period_ms: int = Field(250, ge=10, le=60_000, description="Agent step: features in, weights out.")
    seed: int = Field(0, ge=0, description="Seed of every random draw of a run.")
    reservoir_keep: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Probability that an LB keeps a flow-duration (and completion, inter-arrival) sample in its "
        "reservoir (CIKM'22 Algorithm 2's p; its Fig. 5 uses 0.05): lower keeps an older, thinner history.",
    )
    coordinator: CoordinatorSettings = Field(
        default_factory=CoordinatorSettings, description="The QMIX/Centr-LB coordinator of testbed training."
    )
    events: list[EventItem] = Field(
        default_factory=list,
        description="Timed events (a server slows or stops, an LB or agent dies, a link is shaped) and random "
        "processes (capacity drift), applied at their times on the testbed and in the simulator.",
    )


class WorkDistribution(_Strict):
    """CPU work of one simulated request, in core-seconds at speed 1."""

    distribution: Literal["exponential", "lognormal", "pareto", "deterministic"] = Field(
        "exponential", description="Shape of the work distribution."
    )
    mean_s: float = Field(0.1, gt=0, le=3600, description="Mean work (core-seconds at speed 1).")
    sigma: float = Field(1.0, gt=0, le=5, description="lognormal: σ of the underlying normal.")
    shape: float = Field(1.5, gt=1, le=100, description="pareto: tail index α (> 1 for a finite mean).")


class SimTraffic(_Strict):
    """The simulator's requests: a Poisson generator, or a trace file."""

    kind: Literal["poisson", "trace"] = Field("poisson", description="poisson: generated; trace: read `trace`.")
    load: float = Field(
        0.9, gt=0, le=2, description="poisson: offered CPU load, a share of Σ cpus × speed (sets the rate)."
    )
    rate: float | None = Field(None, gt=0, le=1e6, description="poisson: requests/s; overrides `load` when set.")
    duration_s: float = Field(300.0, gt=0, le=1e7, description="Simulated seconds of arrivals.")
    work: WorkDistribution = Field(default_factory=WorkDistribution, description="poisson: CPU work per request.")
    io_share: float = Field(
        0.0, ge=0, lt=1, description="Share of each request's service time spent in IO (holds a worker, no CPU)."
    )
    trace: Path | None = Field(None, description="trace: a trace file (papers' TSV, WikiBench or Parquet).")
    trace_speed: float = Field(1.0, gt=0, le=1e4, description="trace: time compression, as replay-trace --speed.")
    trace_start_s: float = Field(
        0.0, ge=0, le=1e9, description="trace: skip the trace's first seconds, as replay-trace --start."
    )
    iteration_s: float = Field(
        7e-9, gt=0, le=1e-3, description="trace: core-seconds per for-loop iteration of a CPU request (× work_scale)."
    )
    cpu_overhead_s: float = Field(
        0.0, ge=0, le=10, description="trace: core-seconds of a CPU request besides its loop (`marllb calibrate`)."
    )
    static_work_s: float = Field(0.001, gt=0, le=3600, description="trace: core-seconds of a static-file request.")
    wiki_work_s: float = Field(0.05, gt=0, le=3600, description="trace: core-seconds of a wiki page request.")


class Sim(_Strict):
    """The event-driven simulator (`marllb simulate`): traffic and LB details; servers come from `testbed`."""

    traffic: SimTraffic = Field(default_factory=SimTraffic, description="The requests.")
    idle_timeout_s: float = Field(40.0, gt=0, le=1e9, description="An LB ends a flow with no packet for this long.")
    io_speed: float | None = Field(
        None,
        gt=0,
        description="IO-seconds each server's IO device serves per second, one IO phase at a time (FIFO); the "
        "same on every server whatever its cpus (NeurIPS'22: equal IO speed). Unset: IO phases never queue.",
    )
    cores_per_unit: float | None = Field(
        None,
        gt=0,
        le=64,
        description="Model the testbed's servers: a server is a CFS quota of cpus × cores_per_unit cores (set it "
        "to testbed.cpu_unit; `marllb calibrate --sim-out` does), work is core-seconds, and one job alone gets up to "
        "min(1 core, the quota). Unset: a server is `cpus` cores and one job at most one of them.",
    )
    engine: Literal["auto", "compiled", "python"] = Field(
        "auto",
        description="The event loop: compiled (numba, the `fast` extra; any method but oracle-srt) or python (the "
        "reference the compiled one is tested against). auto: compiled where it can run, else python.",
    )


class Config(_Strict):
    """One marllb YAML file."""

    testbed: Testbed
    experiment: Experiment = Field(default_factory=Experiment)
    sim: Sim = Field(default_factory=Sim)
    source: Path | None = Field(None, exclude=True, description="The file this config was loaded from.")

    @model_validator(mode="after")
    def _events_name_real_parts(self) -> Config:
        servers = [f"srv{i}" for i in range(self.testbed.n_servers)]
        try:
            check_targets(self.experiment.events, servers, [f"lb{i}" for i in range(self.testbed.lbs)])
        except ValueError as exc:
            raise ValueError(f"experiment.{exc}") from None
        return self

    def resolved_yaml(self) -> str:
        """The fully resolved config (defaults filled in), as written into run directories."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `dotted.key=value` from `--set`; the value is read as YAML (`2`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE", hint="e.g. --set testbed.name=tb2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate one config file; raise `ConfigError` with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", hint="pass the path of a YAML config, e.g. configs/local-small.yaml"
        ) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}", hint="check indentation and quoting") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'testbed' section at the top level")
    _refuse_duplicate_keys(root, path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, path)
    try:
        return Config.model_validate({**raw, "source": path})
    except ValidationError as exc:
        set_keys = [parse_override(item)[0] for item in overrides]
        raise ConfigError(_describe(exc, path, root, set_keys)) from None


def _refuse_duplicate_keys(root: yaml.Node | None, path: Path) -> None:
    """YAML keeps the last of two equal keys silently; a config that says a field twice is a mistake.
    Each node is visited once, so an alias bomb costs no more here than in the loader."""
    visited: set[int] = set()
    pending: list[tuple[yaml.Node | None, str]] = [(root, "")]
    while pending:
        node, where = pending.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                dotted = f"{where}.{name}" if where else str(name)
                if name is not None and name in seen:
                    raise ConfigError(
                        f"{path}:{key.start_mark.line + 1}: {dotted}: given twice (first on line {seen[name]})",
                        hint="keep one of them",
                    )
                if name is not None:
                    seen[name] = key.start_mark.line + 1
                pending.append((value, dotted))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{where}[{index}]") for index, item in enumerate(node.value))


def _set_dotted(raw: dict[str, Any], key: str, value: Any, path: Path) -> None:
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{path}: --set {key}: {part!r} does not name a section")
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{path}: --set {key}: {last!r} does not name a field")


def _describe(exc: ValidationError, path: Path, root: yaml.Node | None, set_keys: Sequence[str] = ()) -> str:
    """First validation error as `file:line: field: problem` (or `file: --set KEY: problem` when the value came
    from the command line, not the file), plus how many more there are."""
    # A misspelt key also makes its real name "missing": report the unknown key first, it is the cause.
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    loc = _untagged(tuple(error["loc"]))
    field = _dotted(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}" + _suggest(exc, loc)
    elif error["type"] == "missing":
        message = "required field is missing"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    for key in reversed(set_keys):  # the last --set of a field wins, so it is the one to name
        given = _dotted_key(key)
        if field == given:
            return f"{path}: --set {key}: {message}{more}"
        if field.startswith((f"{given}.", f"{given}[")):
            return f"{path}: --set {key}: {field}: {message}{more}"
    line = _line_of(root, loc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {field or '(top level)'}: {message}{more}"


def _untagged(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The location without the union tag pydantic inserts after a list index (`events[0].event.at` is
    `events[0].at` in the file)."""
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (part in ("event", "drift") and i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "events")
    )


def _dotted_key(key: str) -> str:
    """A `--set` key as `_dotted` spells a field: `testbed.hosts.0.workdir` → `testbed.hosts[0].workdir`."""
    return _dotted(tuple(int(part) if part.isdigit() else part for part in key.split(".")))


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest(exc: ValidationError, loc: tuple[Any, ...]) -> str:
    """`; did you mean 'cpus'?` for a misspelt key, using the model's known field names."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = nested_model(field.annotation)
        if model is None:
            return ""
    known = [name for name in model.model_fields if name != "source"]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config model inside a field's annotation (`Testbed`, `list[ServerGroup]`), or None for a leaf."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML key or item at `loc`, or of its deepest parent that exists; None if unknown."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((key, value) for key, value in node.value if str(key.value) == str(part)), None)
            if match is None:
                break
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
