"""A run's scenario: everything it measured besides its method and seed, so that `marllb report` compares
methods only on the same system under the same traffic.

Why: a folder of runs mixes set-ups (sim-moderate, sim-large, an IO mix, four loads of a rate sweep). Pooled
by method they give one row whose mean means nothing, and a ratio to a baseline measured on another mix of
scenarios. Two runs share a scenario when they share:
- where they ran (`kind`: sim or testbed) and the system's shape: LBs, forwarding, server groups (count,
  cpus, app, speed), cpu_unit, work_scale, the testbed's kind (local, ssh, kvm), the simulator's model;
- the traffic: the simulator's traffic spec without its duration; on the testbed the trace's file name and
  the load asked for (`--load`) or, without one, the speed;
- the timed events (`experiment.events` and `--event`, as the run's meta.json lists them): a run in which a
  server fails is another experiment than one in which none does. A drift is one scenario whatever it drew.
Names, addresses, seeds, durations, the trace window and the agent period are not part of it: a run of testbed
`lt` and one of `small` with the same shape are the same experiment, and a window of a trace is a sample of its
traffic as a seed is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import yaml

__all__ = ["Scenario", "scenario_of", "label_scenarios"]


@dataclass(frozen=True)
class Scenario:
    """A scenario: a digest of what defines it, and a readable label (unique among the runs reported).
    `family` digests the same but the offered traffic's level, which is `level` (`level_name`: load, rate or
    speed): the scenarios of one family are the points of a load or rate sweep."""

    key: str
    label: str
    family: str = ""
    level: float | None = None
    level_name: str = ""
    #: Server group → CPUs per server (what tells the big group from the small one).
    group_cpus: dict[str, float] = field(default_factory=dict, compare=False)


def scenario_of(meta: dict[str, Any], config_yaml: str | None) -> Scenario:
    """The scenario of a run from its meta.json and resolved config.yaml (absent in runs written by hand)."""
    config = _config(config_yaml)
    testbed = config.get("testbed") or {}
    shape = {
        "kind": meta.get("kind"),
        "testbed_kind": testbed.get("kind"),
        "lbs": testbed.get("lbs"),
        "forwarding": testbed.get("forwarding"),
        "cpu_unit": testbed.get("cpu_unit"),
        "work_scale": testbed.get("work_scale"),
        "cpu_page_echo_every": testbed.get("cpu_page_echo_every") or 0,  # runs from before it: 0
        "servers": [
            {key: group.get(key) for key in ("name", "count", "cpus", "app", "speed")}
            for group in testbed.get("servers") or []
        ],
    }
    events = meta.get("events") or ((config.get("experiment") or {}).get("events")) or []
    if events:  # only then, so that the digests of runs without events stay what they were
        shape["events"] = events
    traffic: dict[str, Any]
    words = [str(meta.get("testbed") or testbed.get("name") or "?"), str(meta.get("kind") or "?")]
    if meta.get("kind") == "sim":
        spec = dict(meta.get("traffic") or (config.get("sim") or {}).get("traffic") or {})
        spec.pop("duration_s", None)
        model = {k: v for k, v in (config.get("sim") or {}).items() if k not in ("traffic", "engine")}
        traffic = {"sim": spec, "model": model}
        if spec.get("rate") is not None:
            words.append(f"rate {spec['rate']:g}/s")
        elif spec.get("load") is not None:
            words.append(f"load {spec['load']:g}")
        if spec.get("io_share"):
            words.append(f"io {spec['io_share']:g}")
        if spec.get("trace"):
            words.append(PurePath(str(spec["trace"])).name)
    else:
        trace = meta.get("trace") or {}
        load = meta.get("load") or {}
        name = PurePath(str(trace["file"])).name if trace.get("file") else None
        traffic = {"trace": name, "load": load.get("target")}
        if load.get("target") is None:
            traffic["speed"] = meta.get("speed")
        if name:
            words.append(name)
        if load.get("target") is not None:
            words.append(f"load {load['target']:g}")
        elif meta.get("speed") is not None:
            words.append(f"speed {meta['speed']:.3g}")
    if events:
        words.append(f"{len(events)} event{'s' if len(events) > 1 else ''}")
    level_name, level = _level(traffic)
    return Scenario(
        key=_digest([shape, traffic]),
        label=" · ".join(words),
        family=_digest([shape, _without_level(traffic)]),
        level=level,
        level_name=level_name,
        group_cpus={
            str(group["name"]): float(group["cpus"])
            for group in testbed.get("servers") or []
            if "name" in group and "cpus" in group
        },
    )


def _level(traffic: dict[str, Any]) -> tuple[str, float | None]:
    """Which level of offered traffic a scenario is at: its rate, else its load, else its speed."""
    spec = traffic.get("sim", traffic)
    for name in ("rate", "load", "speed"):
        if spec.get(name) is not None:
            return name, float(spec[name])
    return "", None


def _without_level(traffic: dict[str, Any]) -> dict[str, Any]:
    if "sim" in traffic:
        return {**traffic, "sim": {k: v for k, v in traffic["sim"].items() if k not in ("rate", "load")}}
    return {k: v for k, v in traffic.items() if k not in ("load", "speed")}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def label_scenarios(scenarios: list[Scenario]) -> dict[str, str]:
    """key → label, with a short digest added where two different scenarios would read alike."""
    by_label: dict[str, set[str]] = {}
    for scenario in scenarios:
        by_label.setdefault(scenario.label, set()).add(scenario.key)
    return {s.key: s.label if len(by_label[s.label]) == 1 else f"{s.label} #{s.key[:6]}" for s in scenarios}


def _config(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
