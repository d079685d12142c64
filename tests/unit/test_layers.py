"""The layers of `docs/architecture.md`, kept by a test: an `ast` pass over every module's imports.

It fails on an import circle anywhere in marllb_cli (module-level and lazy imports alike), on the lower
layers reaching up into the testbeds, and on one testbed kind importing another except kvm → ssh (KVM
guests are driven over SSH). And `marllb --help` / `marllb status` of an absent testbed must not load
the heavy libraries a command imports only where it needs them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "marllb_cli"
REPO = PACKAGE.parent

#: Lower layers that must never import the testbeds or the hosts (they run in agent processes, in the
#: simulator, in the dataplane).
GROUND = ("agents", "dataplane", "sim", "features", "rewards", "steps", "probes")
UPPER = ("deploy", "hosts")
KINDS = {"marllb_cli.deploy.local", "marllb_cli.deploy.ssh", "marllb_cli.deploy.kvm"}
HEAVY = ("torch", "numba", "pyroute2", "paramiko", "matplotlib", "ray")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every marllb_cli module `path` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("marllb_cli")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """module → the marllb_cli modules it imports (names that are not modules, like classes, dropped)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in modules} - {name} for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_layer(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == f"marllb_cli.{layer}" or module.startswith(f"marllb_cli.{layer}.") for layer in layers)


def test_the_checker_finds_a_circle_and_a_layer_leak():
    circle = {"marllb_cli.a": {"marllb_cli.b"}, "marllb_cli.b": {"marllb_cli.c"}, "marllb_cli.c": {"marllb_cli.a"}}
    assert cycles(circle) == [["marllb_cli.a", "marllb_cli.b", "marllb_cli.c"]]
    assert cycles({"marllb_cli.a": {"marllb_cli.b"}, "marllb_cli.b": set()}) == []
    assert in_layer("marllb_cli.sim.run", GROUND) and in_layer("marllb_cli.deploy", UPPER)
    assert not in_layer("marllb_cli.simulator", GROUND)


def test_no_import_circle_anywhere(graph):
    assert cycles(graph) == []


def test_agents_dataplane_and_sim_never_reach_up_into_the_testbeds(graph):
    leaks = sorted(
        f"{module} → {target}"
        for module, targets in graph.items()
        if in_layer(module, GROUND)
        for target in targets
        if in_layer(target, UPPER)
    )
    assert leaks == []


def test_testbed_kinds_import_each_other_only_kvm_to_ssh(graph):
    def kind_of(module: str) -> str | None:
        return next((kind for kind in KINDS if module == kind or module.startswith(kind + ".")), None)

    crossings = sorted(
        f"{module} → {target}"
        for module, targets in graph.items()
        if kind_of(module)
        for target in targets
        if kind_of(target) not in (None, kind_of(module))
    )
    assert crossings == ["marllb_cli.deploy.kvm → marllb_cli.deploy.ssh"]


def reads_testbed_kind(path: Path) -> bool:
    """Whether the module reads `<something>.testbed.kind` (config.py: `self.kind` inside `Testbed`)."""
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "kind"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "testbed"
        for node in ast.walk(tree)
    )


def test_only_config_topology_and_the_kind_switch_read_testbed_kind():
    readers = {module_name(path) for path in PACKAGE.rglob("*.py") if reads_testbed_kind(path)}
    assert "marllb_cli.deploy" in readers  # the check sees the one switch
    assert readers <= {"marllb_cli.config", "marllb_cli.topology", "marllb_cli.deploy"}, readers


def loaded_heavy(args: list[str], tmp_path: Path) -> dict:
    """Which of `HEAVY` a `marllb ARGS` process has imported when it ends, and its exit code."""
    script = (
        "import json, sys\n"
        "from marllb_cli.cli import app\n"
        f"sys.argv = ['marllb', *{args!r}]\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\n"
        f"heavy = sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {**os.environ, "MARLLB_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    return json.loads(result.stderr.strip().splitlines()[-1])


def test_help_loads_no_heavy_library(tmp_path):
    assert loaded_heavy(["--help"], tmp_path) == {"code": 0, "heavy": []}


def test_status_of_an_absent_testbed_loads_no_heavy_library(tmp_path):
    config = REPO / "configs" / "local-small.yaml"
    assert loaded_heavy(["status", str(config), "--set", "testbed.name=unitlayers"], tmp_path) == {
        "code": 0,
        "heavy": [],
    }
