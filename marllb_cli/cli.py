"""The `marllb` command line. Commands only wire: parse arguments, call one library function, render.

Exit codes: 0 success; 1 run-time failure (`TestbedError` ...); 2 bad input (config file, field or value),
the same code Click uses for usage errors; 130 interrupted.
"""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from marllb_cli import __version__
from marllb_cli.cli_support import console
from marllb_cli.commands.bench import bench_app
from marllb_cli.commands.calibrate import calibrate_command
from marllb_cli.commands.lb import lb_app
from marllb_cli.commands.replay import replay_trace_command
from marllb_cli.commands.report import report_command
from marllb_cli.commands.simulate import simulate_command
from marllb_cli.commands.static_opt import static_opt_command
from marllb_cli.commands.sweep import sweep_command
from marllb_cli.commands.testbed import deploy, status, teardown
from marllb_cli.commands.trace import trace_app
from marllb_cli.commands.train import train_command

app = typer.Typer(
    name="marllb",
    help="Experiment runner for multi-agent RL load balancing: deploy a testbed, replay traces, train, report.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(trace_app, name="trace")
app.add_typer(lb_app, name="lb")
app.add_typer(bench_app, name="bench")
app.command("replay-trace")(replay_trace_command)
app.command("report")(report_command)
app.command("simulate")(simulate_command)
app.command("static-opt")(static_opt_command)
app.command("sweep")(sweep_command)
app.command("train")(train_command)
app.command("deploy")(deploy)
app.command("status")(status)
app.command("teardown")(teardown)
app.command("calibrate")(calibrate_command)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Join the lines of every paragraph of every command's docstring, so that `--help` wraps them at the
    terminal's width. Typer joins them in a command's first paragraph only and keeps the docstring's own line
    breaks in the rest: at 80 columns each source line became a full line and a ragged stub. A paragraph that
    starts with click's `\\b` keeps its lines."""
    for info in typer_app.registered_commands:
        if info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.callback.__doc__ = "\n\n".join(
                text if text.startswith("\b") else " ".join(line.strip() for line in text.splitlines())
                for text in paragraphs
            )
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def _version(value: bool) -> None:
    if value:
        console.print(f"marllb {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """marllb: MARL load balancing experiments on a local, SSH or KVM testbed, or in simulation."""
