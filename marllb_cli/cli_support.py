"""What every command module shares: consoles, typed option aliases, and the one error boundary."""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from marllb_cli.config import Config, load_config
from marllb_cli.errors import MarllbError, Terminated
from marllb_cli.events import Event, check_targets, parse_event_option
from marllb_cli.processes import become_subreaper

__all__ = [
    "ConfigArg",
    "EventOption",
    "JsonOption",
    "SetOption",
    "console",
    "detail_progress",
    "err_console",
    "load",
    "load_events",
    "print_table",
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
EventOption = Annotated[
    list[str] | None,
    typer.Option(
        "--event",
        "-e",
        metavar="KEY=VALUE,...",
        help="A timed event besides the config's experiment.events (repeatable), e.g. "
        "at=30,server=srv2,capacity=0.5; at=20,lb=lb1,state=down; at=10,agent=lb0,state=down.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def load(config: Path, overrides: list[str] | None) -> Config:
    """The config of a command: the file plus its `--set` overrides."""
    return load_config(config, overrides or ())


def print_table(table: Any) -> None:
    """A rich table on stdout: fitted to the window in a terminal; at its natural width otherwise (a pipe, a
    log, CI), where clipping a column to 80 characters would lose the numbers it holds."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Console(width=10_000).measure(table).maximum
    Console(width=max(console.width, natural)).print(table)


def load_events(config: Config, options: list[str] | None) -> list[Event]:
    """The `--event` options as events of this config's testbed (a `ConfigError` naming the option)."""
    from marllb_cli.errors import ConfigError

    events = [parse_event_option(text) for text in options or ()]
    servers = [f"srv{i}" for i in range(config.testbed.n_servers)]
    lbs = [f"lb{i}" for i in range(config.testbed.lbs)]
    try:
        check_targets([*config.experiment.events, *events], servers, lbs)
    except ValueError as exc:
        raise ConfigError(f"--event: {exc}", hint="name a server srv0.. or an LB lb0.. of this config") from None
    return events


_COMMAND_PID: int | None = None
#: The SIGTERM or SIGHUP that interrupted the running command, if one did. Python code called from a library
#: (a pydantic serializer) may get the `Terminated` raised inside it wrapped in the library's own error:
#: `reports_errors` then still reports the signal, not an "unexpected" failure.
_RECEIVED: int | None = None


def _terminate(signum: int, frame: Any) -> None:
    global _RECEIVED
    if os.getpid() != _COMMAND_PID:  # a forked child (pyroute2's netns helpers): die as it would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _RECEIVED = signum
    raise Terminated(signum)


def _default_signals_in_child() -> None:
    """A process forked from a command (pyroute2 forks helpers that live inside namespaces) must never run
    the command's clean-up: with the command's handlers, a SIGTERM or Ctrl-C sent to it would unwind a copy
    of the command's stack in the child, and that copy would tear down the testbed its parent is building."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_signals_in_child)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP interrupt it like Ctrl-C (main thread only)."""
    global _COMMAND_PID, _RECEIVED
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _COMMAND_PID, _RECEIVED = os.getpid(), None
    become_subreaper()  # a command reaps what it orphans (Apache's daemon), so teardown can remove cgroups
    previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def crash_log(exc: BaseException, command: str) -> Path:
    """Write the traceback of an unexpected failure to a log file; return its path.

    `$MARLLB_LOG_DIR`, else `~/.cache/marllb/logs`, else the temporary directory."""
    text = "".join(traceback.format_exception(exc))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    candidates = [os.environ.get("MARLLB_LOG_DIR"), Path.home() / ".cache" / "marllb" / "logs", tempfile.gettempdir()]
    for directory in filter(None, candidates):
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"marllb-{stamp}-{command}-", suffix=".log", dir=directory)
            with os.fdopen(fd, "w") as log:
                log.write(f"marllb {command}: {' '.join(sys.argv)}\n{text}")
            return Path(name)
        except OSError:
            continue
    return Path("/dev/null")


def _terminated(signum: int) -> typer.Exit:
    """Say that SIGTERM or SIGHUP stopped the command; the exit it ends with, 128 + signal."""
    err_console.print(f"[yellow]terminated[/] ({signal.Signals(signum).name})")
    return typer.Exit(128 + signum)


def reports_errors(command: F) -> F:
    """The one boundary where failures become a one-line message and an exit code, never a traceback:
    a `MarllbError` its own line (exit 1 or 2), Ctrl-C 130, SIGTERM/SIGHUP 128 + signal, and anything
    unexpected one line with the path of a log holding the details (exit 1; `MARLLB_DEBUG=1` re-raises)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with signals_interrupt():
                return command(*args, **kwargs)
        except MarllbError as exc:
            err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", soft_wrap=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except Terminated as exc:
            raise _terminated(exc.signum) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if _RECEIVED is not None:  # the signal, wrapped by the library it interrupted (see `_RECEIVED`)
                raise _terminated(_RECEIVED) from None
            if os.environ.get("MARLLB_DEBUG"):
                raise
            log = crash_log(exc, command.__name__.removesuffix("_command"))
            message = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            err_console.print(
                f"[bold red]error:[/] {escape(message)} (details: {log})", soft_wrap=True, highlight=False
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def work_status(label: str) -> Iterator[Callable[[str], None]]:
    """A spinner with a line of status for work that has phases but no count (a benchmark, a simulation);
    yields the function that sets the status. Where stdout is not a terminal rich draws nothing, so the
    status goes to stderr as `LogLines` instead (a 20-minute `bench fidelity` in a log said nothing until
    its tables)."""
    if console.is_terminal:
        with console.status(label) as status:
            yield status.update
        return
    yield LogLines(label)


class LogLines:
    """`label: text` lines on stderr, at most one every `every_s`: what a progress display prints where it
    cannot draw (a log file, a pipe, a CI job). `text` is rich markup, as a status or a bar's column is."""

    every_s = 10.0

    def __init__(self, label: str) -> None:
        self.label = label
        self.logged_at = -float("inf")

    def __call__(self, text: str) -> None:
        if time.monotonic() - self.logged_at >= self.every_s:
            self.logged_at = time.monotonic()
            err_console.print(f"{escape(self.label)}: {text}", highlight=False, soft_wrap=True)


def detail_progress(label: str) -> Progress:
    """A progress bar for long work with live figures: `label`, bar, done/total, the task's `detail` field.
    Where stderr is not a terminal (a log file, a pipe, a CI job) it prints a plain line instead, at most
    every `LogLines.every_s`."""
    return LoggedProgress(
        label,
        TextColumn(label.replace("[", r"\[").replace("{", "{{").replace("}", "}}")),  # a literal label
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err_console,
    )


class LoggedProgress(Progress):
    """A rich progress bar that also reports to a stderr that is not a terminal. Rich draws nothing there
    until the work ends, so a sweep or a training run in the background (`nohup … > log`) showed nothing for
    hours; this prints `label: done/total detail (elapsed)` as `LogLines`."""

    def __init__(self, label: str, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.lines = LogLines(label)

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        done = f"{task.completed:g}" + ("" if task.total is None else f"/{task.total:g}")
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0))
        self.lines(f"{done} {task.fields.get('detail', '')} ({elapsed})")
