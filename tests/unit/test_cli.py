"""CLI wiring: version, help for every command, status of a testbed that is not deployed."""

from __future__ import annotations

import json

import pytest

from marllb_cli import __version__
from tests.conftest import minimal_testbed


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize("command", ["deploy", "status", "teardown"])
def test_every_command_has_help(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "CONFIG" in result.stdout


def _commands(typer_app, prefix=()):
    """(command words, callback) of every command, sub-apps' included."""
    for info in typer_app.registered_commands:
        yield (*prefix, info.name or info.callback.__name__), info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, (*prefix, group.name))


def test_every_commands_help_wraps_its_paragraphs_at_the_terminal_width():
    """Typer keeps a docstring's own line breaks after its first paragraph: at 80 columns every source line of
    `sweep --help` became a line and a ragged stub. On a wide terminal each paragraph must be one line."""
    import inspect

    from typer.testing import CliRunner

    from marllb_cli.cli import app

    commands = list(_commands(app))
    assert len(commands) >= 20  # every command and sub-command, not a few
    checked = 0
    for words, callback in commands:
        result = CliRunner().invoke(app, [*words, "--help"], terminal_width=1000, env={"COLUMNS": "1000"})
        assert result.exit_code == 0, (words, result.output)
        lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
        for paragraph in inspect.cleandoc(callback.__doc__ or "").split("\n\n")[1:]:
            assert " ".join(paragraph.split()) in lines, (words, paragraph)
            checked += 1
    assert checked >= 8  # the paragraphs after the first, over all commands today


def test_status_json_of_an_absent_testbed_lists_the_plan(cli, write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MARLLB_STATE_DIR", str(tmp_path / "state"))
    result = cli("status", write_config(minimal_testbed("nothere")), "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["testbed"] == "nothere"
    assert status["vip"] == "10.99.255.1"
    assert status["state"] == "absent"
    assert [(n["name"], n["role"]) for n in status["nodes"]] == [
        ("client", "client"),
        ("router", "router"),
        ("lb0", "lb"),
        ("lb1", "lb"),
        ("srv0", "server"),
        ("srv1", "server"),
    ]
    assert [n["cpus"] for n in status["nodes"][-2:]] == [1, 2]
    assert all(set(n) >= {"name", "role", "namespace", "ip", "cpus"} for n in status["nodes"])
    assert not any(n["up"] for n in status["nodes"])


def test_lb_commands_reject_bad_input_in_one_line(cli, write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MARLLB_STATE_DIR", str(tmp_path / "state"))
    config = write_config(minimal_testbed("unitlb"))
    result = cli("lb", "start", config, "--method", "fastest")
    assert result.exit_code == 2
    assert "--method 'fastest': unknown" in result.stderr and "sed" in result.stderr
    result = cli("lb", "start", config, "--method", f"rl:{tmp_path / 'untrained'}")
    assert result.exit_code == 2 and "policy.pt" in result.stderr and "marllb train" in result.stderr
    result = cli("lb", "stats", config)
    assert result.exit_code == 1
    assert "testbed unitlb is not deployed" in result.stderr and "Traceback" not in result.stderr
    result = cli("lb", "stop", config)
    assert result.exit_code == 0 and "no LB process was running" in result.stdout


def test_a_missing_mediawiki_dump_is_one_line_naming_the_field(cli, write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MARLLB_STATE_DIR", str(tmp_path / "state"))
    wiki = {"app": "mediawiki", "mediawiki": {"dump": str(tmp_path / "nope.xml")}}
    config = minimal_testbed("unitmw", servers=[{"name": "wiki", "count": 1, "cpus": 1, **wiki}])
    result = cli("deploy", write_config(config))
    assert result.exit_code == 2
    assert "testbed.servers[0].mediawiki.dump" in result.stderr and "nope.xml: no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "state" / "unitmw").exists()


def test_long_work_reports_progress_lines_where_stderr_is_not_a_terminal(capsys, monkeypatch):
    """Rich draws a progress bar only on a terminal: a sweep run in the background with its output in a log
    showed nothing until it ended, hours later. There it prints a plain line, at most every `every_s`."""
    from marllb_cli.cli_support import LogLines, detail_progress

    clock = iter(range(0, 1000, 4))  # 4 s between updates
    monkeypatch.setattr("marllb_cli.cli_support.time.monotonic", lambda: float(next(clock)))
    with detail_progress("sweep [grid].yaml") as bar:
        task = bar.add_task("cells", total=5, detail="")
        for done in range(1, 6):
            bar.update(task, completed=done, detail=f"cell {done} \\[sed]")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sweep [grid].yaml: ")]
    assert LogLines.every_s == 10.0
    assert [line.split(" (")[0] for line in lines] == [
        "sweep [grid].yaml: 1/5 cell 1 [sed]",
        "sweep [grid].yaml: 4/5 cell 4 [sed]",
    ]


def test_work_with_phases_reports_them_where_stdout_is_not_a_terminal(capsys, monkeypatch):
    """`bench fidelity` (20 minutes), `simulate` and the other spinners said nothing in a log until they ended;
    there each status goes to stderr as a line, at most every 10 s, and stdout stays for the results."""
    from marllb_cli.cli_support import work_status

    clock = iter(range(0, 1000, 6))  # 6 s between updates
    monkeypatch.setattr("marllb_cli.cli_support.time.monotonic", lambda: float(next(clock)))
    with work_status("fidelity") as status:
        for phase in ("calibrating", "load 0.7: sed", "load 0.7: lsq", "load 0.9: sed"):
            status(phase)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["fidelity: calibrating", "fidelity: load 0.7: lsq"]
