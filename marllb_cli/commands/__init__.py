"""Command groups that have sub-commands, each a Typer app of its own, joined in `marllb_cli.cli`."""
