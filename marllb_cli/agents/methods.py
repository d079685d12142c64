"""The method vocabulary: every name `--method` accepts, and the one check of it (`resolve_method`).

Two words, kept apart:

    policy     what the user picks with `--method`: a heuristic (`HEURISTICS`), a simulator oracle
               (`ORACLES`, `LOOKAHEAD`), `rl:DIR`, a policy trained by `marllb train --out DIR`,
               `static:FILE`, fixed SED weights from a file, or `static-opt` (`STATIC_OPT`), the best
               fixed SED weights, searched for in the simulator when the run starts
    selection  the rule the dataplane applies with the weights a policy sets (`SELECTIONS`: sed, lsq,
               wcmp, ecmp); `Agent.method` is a selection

A command resolves its method once and passes the resolved value down; nothing below it checks again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from marllb_cli.agents.weights_file import STATIC_PREFIX, read_weights, static_file
from marllb_cli.dataplane.selection import METHODS as SELECTIONS
from marllb_cli.errors import ConfigError

__all__ = [
    "ALGOS",
    "HEURISTICS",
    "LOOKAHEAD",
    "ORACLES",
    "PYTHON_ONLY",
    "RL_PREFIX",
    "SELECTIONS",
    "SIM_METHODS",
    "STATIC_OPT",
    "STATIC_PREFIX",
    "policy_dir",
    "resolve_method",
]

#: Policies that run on the testbed and in the simulator alike (`agents.heuristics`).
HEURISTICS = ("ecmp", "wcmp", "lsq", "sed", "awcmp")
#: Simulator-only references that read what no LB can see (`sim.lbs`).
ORACLES = ("oracle-srt", "oracle-gsq")
#: SED weights chosen by simulating candidate splits ahead (`sim.lookahead`).
LOOKAHEAD = "oracle-weights"
#: The best fixed SED weights for the scenario, searched for on validation seeds (`sim.static_search`).
STATIC_OPT = "static-opt"
#: Methods the compiled simulator cannot run (they need the Python engine's job-level state).
PYTHON_ONLY = ("oracle-srt", LOOKAHEAD)
#: Everything `marllb simulate --method` accepts besides `rl:DIR` and `static:FILE`.
SIM_METHODS = (*HEURISTICS, *ORACLES, LOOKAHEAD, STATIC_OPT)
#: `rl:DIR` names a trained policy.
RL_PREFIX = "rl:"
#: What `marllb train --algo` accepts, each with its default reward. isac: independent learners; ssac: one LB
#: that sees all traffic; distr: Distr-LB, independent learners on the per-LB VBF+log (the Markov potential
#: game); qmix: QMIX on the team (mean) reward; centr: Centr-LB, one SAC learner that sees every LB's
#: observation and sets every LB's weights (m × n heads), on the team reward.
ALGOS = {"isac": "jain", "ssac": "jain", "distr": "vbf-log", "qmix": "vbf-log", "centr": "vbf-log"}


def policy_dir(method: str) -> Path | None:
    """The directory of an `rl:DIR` method, None for any other."""
    return Path(method.removeprefix(RL_PREFIX)) if method.startswith(RL_PREFIX) else None


def resolve_method(method: str, allowed: Sequence[str] = HEURISTICS) -> str:
    """`method` checked (exit-2 error naming the choices) and, for `rl:DIR` and `static:FILE`, with the path
    made absolute (a weights file is read and checked here; its server count where the servers are known)."""
    weights = static_file(method)
    if weights is not None:
        read_weights(weights)
        return STATIC_PREFIX + str(weights.resolve())
    directory = policy_dir(method)
    if directory is not None:
        directory = directory.resolve()
        if not (directory / "policy.pt").is_file():
            raise ConfigError(
                f"--method {method}: no {directory / 'policy.pt'}", hint="train one with `marllb train ... --out DIR`"
            )
        return RL_PREFIX + str(directory)
    if method not in allowed:
        raise ConfigError(
            f"--method {method!r}: unknown", hint=f"choose one of {', '.join(allowed)}, rl:DIR or static:FILE"
        )
    return method
