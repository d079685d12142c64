"""How long operations report their steps: `progress(stage, done, total)`. The library calls it; only the
CLI draws (rich bars), so a library caller that draws nothing passes `no_progress`."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "no_progress"]

#: `progress(stage, done, total)`: how deploy and teardown report their steps (the CLI draws bars).
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The `Progress` of callers that draw nothing."""
