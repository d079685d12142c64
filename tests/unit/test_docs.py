"""The README's configuration reference documents every config field, so docs and models cannot drift."""

from __future__ import annotations

from pydantic import BaseModel

from marllb_cli.config import Config, nested_model
from tests.conftest import REPO


def _fields(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        nested = nested_model(field.annotation)
        if nested is None:
            out.append(path)
        else:
            is_list = getattr(field.annotation, "__origin__", None) is list
            out.extend(_fields(nested, f"{path}[]." if is_list else f"{path}."))
    return out


def test_every_config_field_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    fields = _fields(Config, "")
    assert len(fields) > 20
    missing = [field for field in fields if f"`{field}`" not in readme]
    assert not missing, f"document these in README.md's configuration reference: {missing}"


def _commands(group, prefix: str) -> list[str]:
    out = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a command group
            out.extend(_commands(command, f"{prefix}{name} "))
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_command_is_in_the_readme():
    import typer.main

    from marllb_cli.cli import app

    readme = (REPO / "README.md").read_text()
    commands = _commands(typer.main.get_command(app), "marllb ")
    assert "marllb replay-trace" in commands and "marllb trace gen wiki" in commands
    missing = [c for c in commands if f"`{c} " not in readme and f"`{c}`" not in readme]
    assert not missing, f"document these commands in README.md: {missing}"
