"""What every command module shares: consoles, typed option aliases, and the one error boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from marllb_cli.config import Config, load_config
from marllb_cli.errors import MarllbError

__all__ = [
    "ConfigArg",
    "JsonOption",
    "SetOption",
    "console",
    "detail_progress",
    "err_console",
    "load",
    "reports_errors",
]

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ConfigArg = Annotated[
    Path,
    typer.Argument(
        metavar="CONFIG", help="YAML file describing the testbed and experiment, e.g. configs/local-small.yaml."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config field: dotted.key=value (repeatable), e.g. testbed.name=tb2.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def load(config: Path, overrides: list[str] | None) -> Config:
    """The config of a command: the file plus its `--set` overrides."""
    return load_config(config, overrides or ())


def reports_errors(command: F) -> F:
    """The one boundary where library errors become a one-line message and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MarllbError as exc:
            err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", soft_wrap=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def detail_progress(label: str) -> Progress:
    """A progress bar for long work with live figures: `label`, bar, done/total, the task's `detail` field."""
    return Progress(
        TextColumn(label.replace("[", r"\[").replace("{", "{{").replace("}", "}}")),  # a literal label
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err_console,
    )
