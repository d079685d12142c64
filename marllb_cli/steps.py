"""An agent step as a record: one row of the step log that a testbed agent appends every period and that the
simulator keeps in memory, and the `agents/<lb>.parquet` frame of a run directory made from such rows.

Both sides write rows with `step_record`, so a testbed run and a simulated one have the same columns.
pandas is imported only to build frames: the agent process that writes rows never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marllb_cli.features import FEATURE_NAMES
from marllb_cli.rewards import all_rewards

if TYPE_CHECKING:
    import pandas as pd

    from marllb_cli.agents.base import Agent

__all__ = ["json_lines", "read_steps_log", "step_record", "steps_frame"]

_FLOWS, _FD_MEAN, _FD_DECAYED_MEAN = (FEATURE_NAMES.index(name) for name in ("flows", "fd_mean", "fd_decayed_mean"))


def step_record(
    now: float, step: int, lb: str, agent: Agent, obs: np.ndarray, weights: Sequence[float], new_flows: Sequence[int]
) -> dict[str, Any]:
    """One agent step as logged on the testbed and in simulation (`agents/lb<i>.parquet` rows)."""
    row = {
        "t": now,
        "step": step,
        "lb": lb,
        "method": agent.method,
        "weights": [round(float(w), 6) for w in weights],
        "flows": obs[:, _FLOWS].astype(int).tolist(),
        "fd_mean": obs[:, _FD_MEAN].tolist(),
        "fd_decayed_mean": obs[:, _FD_DECAYED_MEAN].tolist(),
        "new_flows": [int(x) for x in new_flows],
        "rewards": all_rewards(obs),
    }
    busy = getattr(agent, "last_busy", None)
    if busy is not None:
        row["busy_workers"] = busy
    return row


def steps_frame(rows: list[dict[str, Any]], t0: float) -> pd.DataFrame:
    """Step records as a frame: `t_s` relative to the run's time 0, rewards flattened to `reward_<name>`."""
    import pandas as pd

    flat = []
    for row in rows:
        row = dict(row)
        rewards = row.pop("rewards", {})
        row["t_s"] = row.pop("t") - t0
        row.update({f"reward_{name}": value for name, value in rewards.items()})
        flat.append(row)
    return pd.DataFrame(flat)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (an agent's steps, a coordinator's trajectory); a line cut by a kill is
    skipped."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_steps_log(steps_log: Path, t0: float) -> pd.DataFrame:
    """An agent's JSONL step log as a frame (`steps_frame`); a line cut by a kill is skipped."""
    return steps_frame(json_lines(steps_log.read_text()), t0)
