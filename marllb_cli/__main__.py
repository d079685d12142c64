from marllb_cli.cli import app

app(prog_name="marllb")
