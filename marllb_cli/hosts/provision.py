"""Install marllb on a `kind: ssh` host: a wheel built from this checkout plus the few libraries a node needs,
into a venv at `<workdir>/venv` — never into the host's own Python.

    bundle     (on the controller, cached) the marllb wheel (`pip wheel --no-deps` of the checkout) and the
               node's dependency wheels (`pip download`, once per Python version: `NODE_REQUIREMENTS`)
    provision  (per host, idempotent) check the host's Python matches the bundle's, upload the wheels, make
               the venv and `pip install --no-index` from them; skipped when the venv already holds this
               bundle (`.bundle` marker: the digest of every wheel)

A node never needs pandas or matplotlib: it runs the dataplane, agents, Apache and its set-up. PyTorch only
matters to an LB that runs a learned policy: `install_torch` adds the controller's own version to an LB's
venv the first time `lb start --method rl:DIR` needs it (the KVM image has it built in).
The hosts need no index: everything comes from the controller, which needs one only to fill its cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import marllb_cli
from marllb_cli.errors import MissingTool, TestbedError
from marllb_cli.processes import run_checked

__all__ = ["Bundle", "NODE_REQUIREMENTS", "bundle", "cache_dir", "install_torch", "provision", "torch_bundle"]

#: What `python -m marllb_cli.deploy.node.cli` imports (see the module docstring), as in pyproject's dependencies.
NODE_REQUIREMENTS = ("numpy>=1.26", "pydantic>=2.6", "pyroute2>=0.9", "pyyaml>=6", "typer>=0.12", "rich>=13")
PYTHON_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Bundle:
    """The wheels a node installs; `digest` names this exact set (the venv marker)."""

    wheels: tuple[Path, ...]
    digest: str

    @property
    def marllb_wheel(self) -> Path:
        return next(wheel for wheel in self.wheels if wheel.name.startswith("marllb-"))


def cache_dir() -> Path:
    """Where the controller keeps built and downloaded wheels: `$XDG_CACHE_HOME/marllb` or ~/.cache/marllb."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marllb"


def bundle(cache: Path | None = None) -> Bundle:
    """Build this checkout's wheel and make sure the dependency wheels are cached; no index needed once cached."""
    cache = cache or cache_dir()
    checkout = Path(marllb_cli.__file__).resolve().parents[1]
    if not (checkout / "pyproject.toml").is_file():
        raise MissingTool(
            "provisioning builds marllb from its source checkout, and this marllb is not one",
            hint="install marllb from a git checkout (`make install`) on the machine that runs deploy",
        )
    built = cache / "build"
    built.mkdir(parents=True, exist_ok=True)
    for old in built.glob("marllb-*.whl"):
        old.unlink()
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    _pip(["wheel", "--no-deps", *isolation, "--wheel-dir", str(built), str(checkout)], "build the marllb wheel")
    deps = cache / f"node-deps-py{PYTHON_TAG}"
    if not (deps / ".complete").exists():
        deps.mkdir(parents=True, exist_ok=True)
        _pip(
            ["download", "--only-binary=:all:", "--dest", str(deps), *NODE_REQUIREMENTS],
            "download the node's dependency wheels (needs a package index, once)",
        )
        (deps / ".complete").touch()
    wheels = (*sorted(built.glob("marllb-*.whl")), *sorted(deps.glob("*.whl")))
    digest = hashlib.sha256()
    for wheel in wheels:
        digest.update(wheel.name.encode() + hashlib.sha256(wheel.read_bytes()).digest())
    return Bundle(wheels, digest.hexdigest()[:16])


def torch_bundle(cache: Path | None = None) -> Bundle:
    """The wheels of this controller's PyTorch (same version, with its dependencies), cached once: what an
    LB host needs to run a learned policy (`lb start --method rl:DIR`)."""
    cache = cache or cache_dir()
    version = importlib.metadata.version("torch")
    wheels_dir = cache / f"torch-{version}-py{PYTHON_TAG}"
    if not (wheels_dir / ".complete").exists():
        wheels_dir.mkdir(parents=True, exist_ok=True)
        _pip(
            ["download", "--only-binary=:all:", "--dest", str(wheels_dir), f"torch=={version}"],
            f"download torch {version} for the LB hosts (needs a package index, once)",
        )
        (wheels_dir / ".complete").touch()
    wheels = tuple(sorted(wheels_dir.glob("*.whl")))
    return Bundle(wheels, f"torch-{version}")


def install_torch(host: Target, workdir: str, torch: Bundle) -> bool:
    """PyTorch into the node venv of `host` (made by `provision`); False when it is there already."""
    venv, upload = f"{workdir}/venv", f"{workdir}/torch-wheels"
    if host.run([f"{venv}/bin/python", "-c", "import torch"], check=False, timeout=120).returncode == 0:
        return False
    host.run(["rm", "-rf", upload])
    host.run(["mkdir", "-p", upload])
    for wheel in torch.wheels:
        host.put(wheel, f"{upload}/{wheel.name}")
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check"]
    torch_wheel = next(wheel for wheel in torch.wheels if wheel.name.startswith("torch-"))
    host.run([*pip, "--find-links", upload, f"{upload}/{torch_wheel.name}"], timeout=1800)
    host.run(["rm", "-rf", upload])
    return True


class Target(Protocol):
    """Where provisioning installs: a host over SSH (`SshHost`), or an image's root tree (`kvm.image.Chroot`)."""

    name: str

    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]: ...

    def put(self, local: Path, remote: str) -> None: ...

    def put_bytes(self, data: bytes, remote: str) -> None: ...


def provision(host: Target, workdir: str, python: str, wheels: Bundle) -> bool:
    """Install `wheels` into `<workdir>/venv` on `host`; False when it was already there (nothing done)."""
    venv, upload = f"{workdir}/venv", f"{workdir}/wheels"
    marker = host.run(["cat", f"{venv}/.bundle"], check=False).stdout.strip()
    if marker == wheels.digest:
        return False
    version = host.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=False)
    if version.returncode != 0 or version.stdout.strip() != PYTHON_TAG:
        found = version.stdout.strip() or (version.stderr.strip().splitlines() or ["not found"])[-1]
        raise TestbedError(
            f"{host.name}: {python} is Python {found}, the bundle is built for {PYTHON_TAG}",
            hint=f"install Python {PYTHON_TAG} there, or run deploy from a controller with the host's version",
        )
    host.run(["rm", "-rf", upload])
    host.run(["mkdir", "-p", upload])
    for wheel in wheels.wheels:
        host.put(wheel, f"{upload}/{wheel.name}")
    host.run([python, "-m", "venv", "--clear", venv], timeout=600)
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check"]
    # marllb without its controller-side dependencies (torch, pandas, ...), then what a node imports.
    host.run([*pip, "--no-deps", f"{upload}/{wheels.marllb_wheel.name}"], timeout=600)
    host.run([*pip, "--find-links", upload, *NODE_REQUIREMENTS], timeout=600)
    host.run(["rm", "-rf", upload])
    host.put_bytes(wheels.digest.encode(), f"{venv}/.bundle")
    return True


def _pip(args: list[str], what: str) -> None:
    run_checked([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], f"pip: {what}", timeout=900)
