"""Errors that marllb raises, and the exit code each family maps to.

The hierarchy::

    MarllbError                 anything marllb reports to the user as one line (exit 1)
    ├── ConfigError             the YAML file or a command-line value is wrong (exit 2)
    ├── TraceFormatError        a trace file is malformed; names file and line (exit 2)
    ├── RunDirError             a path given as a run directory is not one, or is unreadable (exit 2)
    └── TestbedError            building, probing or removing a testbed failed (exit 1)
        ├── NamespaceExists     a namespace we would create exists and is not ours
        └── MissingTool         a program the testbed needs is not installed

    KeyboardInterrupt
    └── Terminated              SIGTERM or SIGHUP, raised where the command is (exit 128 + signal)

Usage::

    try:
        config = load_config(path)
    except MarllbError as exc:
        print(exc.one_line())
        raise SystemExit(exc.exit_code)
"""

from __future__ import annotations

__all__ = [
    "MarllbError",
    "ConfigError",
    "TraceFormatError",
    "RunDirError",
    "TestbedError",
    "NamespaceExists",
    "MissingTool",
    "Terminated",
]


class MarllbError(Exception):
    """A failure the user can act on; `hint` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint on one line, as the CLI prints them."""
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message


class ConfigError(MarllbError):
    """Bad input: a config file, field or command-line value. Exit code 2, like a usage error."""

    exit_code = 2


class TraceFormatError(MarllbError):
    """A trace file cannot be read: bad header, malformed line, wrong columns. Exit code 2 (bad input)."""

    exit_code = 2


class RunDirError(MarllbError):
    """A run directory is missing, incomplete in its files, or unreadable. Exit code 2 (bad input)."""

    exit_code = 2


class TestbedError(MarllbError):
    """A testbed operation failed at run time."""

    __test__ = False  # not a pytest test class despite the name


class NamespaceExists(TestbedError):
    """A network namespace with one of our names exists but this testbed did not create it."""


class MissingTool(TestbedError):
    """A program or kernel facility the testbed needs is missing on this machine."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a `timeout`, CI, a closed terminal), raised in the main thread by the CLI's handler
    so that a command cleans up exactly as after Ctrl-C; `signum` gives the exit code, 128 + signum."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
