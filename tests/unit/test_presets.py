"""Presets: the README's table is what `presets.py` and the learners' defaults hold, value by value, and a
preset run trains with exactly those settings (command-line values still win)."""

from __future__ import annotations

import json
import math

import pytest

from marllb_cli.agents.rl.qmix import QmixHyper
from marllb_cli.agents.rl.sac import SacHyper
from marllb_cli.presets import PRESETS
from tests.conftest import REPO

COLUMNS = ("marllb default", "cikm22-moderate", "cikm22-large", "neurips22")


def readme_table() -> dict[str, dict[str, str]]:
    text = (REPO / "README.md").read_text()
    lines = text[text.index("### Presets") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break  # the table ends at its first non-row line
        rows.append(line)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[0] == "---":
            continue
        table[cells[0]] = dict(zip(header[1:], cells[1:], strict=False))
    return table


SAC = {"isac", "ssac", "distr", "centr"}
EVERY = SAC | {"qmix"}
#: README row → (the names it sets, the algorithms it is about).
ROWS = {
    "episodes": (["episodes"], EVERY),
    "episode_s": (["episode_s"], EVERY),
    "reward (isac, ssac)": (["reward"], {"isac", "ssac"}),
    "reward (distr)": (["reward"], {"distr"}),
    "reward (qmix, centr)": (["reward"], {"qmix", "centr"}),
    "reward_smoothing": (["reward_smoothing"], EVERY),
    "levels": (["levels"], EVERY),
    "hidden": (["hidden"], EVERY),
    "lr (qmix)": (["lr"], {"qmix"}),
    "lr_actor, lr_critic (SAC)": (["lr_actor", "lr_critic"], SAC),
    "lr_alpha (SAC)": (["lr_alpha"], SAC),
    "batch_episodes": (["batch_episodes"], EVERY),
    "buffer_episodes": (["buffer_episodes"], EVERY),
    "updates_per_episode": (["updates_per_episode"], EVERY),
    "warmup_episodes": (["warmup_episodes"], EVERY),
    "target_entropy_scale (SAC)": (["target_entropy_scale"], SAC),
    "reward_norm": (["reward_norm"], EVERY),
    "residual": (["residual"], EVERY),
    "neurips_obs": (["neurips_obs"], EVERY),
}


def value(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def stated(column: str, algo: str) -> dict:
    """What the code holds for `algo` under a column: episodes, episode_s, reward and the hyperparameters."""
    defaults = QmixHyper() if algo == "qmix" else SacHyper()
    values = {name: getattr(defaults, name) for name in vars(defaults)}
    if column == "marllb default":
        reward = {"isac": "jain", "ssac": "jain"}.get(algo, "vbf-log")
        return {"episodes": 72, "episode_s": 60.0, "reward": reward, **values}
    preset = PRESETS[column]
    hyper = {**values, **preset.hyper_for(set(values))}
    return {"episodes": preset.episodes, "episode_s": preset.episode_s, "reward": preset.rewards[algo], **hyper}


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("algo", ["isac", "distr", "qmix", "centr"])
def test_the_readme_table_is_what_the_code_holds(column, algo):
    table = readme_table()
    assert set(table) == set(ROWS)
    held = stated(column, algo)
    for row, (names, algos) in ROWS.items():
        if algo not in algos:
            continue
        cells = [value(part.strip()) for part in table[row][column].split(",")]
        if names == ["levels"]:
            assert list(held["levels"]) == cells, (row, column)
            continue
        cells = cells * len(names) if len(cells) == 1 else cells
        for name, want in zip(names, cells, strict=True):
            got = held[name]
            assert got == (pytest.approx(want, abs=5e-5) if isinstance(want, float) else want), (row, column, name)


def test_a_preset_trains_with_its_settings_and_the_command_line_wins(cli, tmp_path):
    def trained(algo: str, preset: str) -> tuple[object, dict]:
        out = tmp_path / f"{algo}-{preset}"
        result = cli(
            "train", REPO / "configs" / "sim-moderate.yaml", "--algo", algo, "--preset", preset,
            "--episodes", "1", "--episode-s", "2", "--hyper", "hidden=8", "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return result, json.loads((out / "train.json").read_text())

    result, saved = trained("qmix", "cikm22-large")
    assert "CIKM'22 Table 2 (large scale)" in result.output
    assert saved["reward"] == "pbf" and saved["episode_s"] == 2.0
    hyper = saved["hyper"]
    assert hyper["hidden"] == 8 and hyper["lr"] == 3e-4 and hyper["batch_episodes"] == 12
    assert hyper["levels"] == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0] and hyper["reward_smoothing"] == 0.1
    assert hyper["warmup_episodes"] == 25 and hyper["reward_norm"] is False
    _, saved = trained("distr", "neurips22")
    assert saved["reward"] == "vbf-log" and saved["hyper"]["target_entropy_scale"] == pytest.approx(-1 / math.log(6))
    assert saved["hyper"]["neurips_obs"] is True and saved["episode_s"] == 2.0
    _, saved = trained("isac", "cikm22-moderate")
    assert saved["reward"] == "pbf" and saved["hyper"]["lr_alpha"] == 1e-3 and saved["hyper"]["batch_episodes"] == 12
    bad = cli("train", REPO / "configs" / "sim-moderate.yaml", "--algo", "qmix", "--preset", "icml23")
    assert bad.exit_code == 2 and "--preset 'icml23': unknown" in bad.stderr
