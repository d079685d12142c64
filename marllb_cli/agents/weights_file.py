"""Static SED weights in a file: what `marllb static-opt` writes and `--method static:FILE` runs, in the
simulator and on the testbed alike.

A file holds one weight per server, in the config's server order, with the servers' names and CPUs it was
found for (a file for other servers is refused) and how it was found (the search's seeds, metric and
result), so a run that used it can say where its weights came from. JSON, so an operator can read it and
write one by hand.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marllb_cli.errors import ConfigError

__all__ = ["STATIC_PREFIX", "read_weights", "static_file", "write_weights"]

#: `static:FILE` names a weights file.
STATIC_PREFIX = "static:"


def static_file(method: str) -> Path | None:
    """The file of a `static:FILE` method, None for any other."""
    return Path(method.removeprefix(STATIC_PREFIX)) if method.startswith(STATIC_PREFIX) else None


def write_weights(
    path: Path, weights: Sequence[float], servers: Sequence[str], cpus: Sequence[float], **search: Any
) -> None:
    """Write the file atomically (a kill leaves the previous one or none)."""
    body = {"weights": [float(w) for w in weights], "servers": list(servers), "cpus": [float(c) for c in cpus]}
    if search:
        body["search"] = search
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


def read_weights(path: Path, n_servers: int | None = None) -> dict[str, Any]:
    """The file at `path` (`weights`, and `servers`, `cpus` and `search` when `marllb static-opt` wrote it),
    checked: positive finite weights, one per server (`n_servers` when given). Anything else is a one-line
    `ConfigError` naming the file and the fix."""
    hint = "write it with `marllb static-opt CONFIG --out FILE`, or give one positive weight per server"
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--method static:{path}: no such file", hint=hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a weights file ({type(exc).__name__})", hint=hint) from None
    weights = body.get("weights") if isinstance(body, dict) else None
    if not isinstance(weights, list) or not weights:
        raise ConfigError(f"{path}: field 'weights' must be a list of numbers", hint=hint)
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"{path}: field 'weights' holds a value that is not a positive number", hint=hint)
    if n_servers is not None and len(weights) != n_servers:
        raise ConfigError(
            f"{path}: field 'weights' has {len(weights)} weights for {n_servers} servers",
            hint="use a file found for this config's servers",
        )
    return body
