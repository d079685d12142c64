"""A SIGTERM is reported as a SIGTERM (exit 143) even when it lands inside a library that wraps what our
handler raises. Found by the chaos tier: a deploy killed while pydantic serialized its manifest exited 1
with "unexpected PydanticSerializationError: … Terminated: SIGTERM". A real process, a real signal."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

COMMAND = """
import os, signal
import typer
from pydantic import BaseModel, field_serializer
from marllb_cli.cli_support import reports_errors

class Record(BaseModel):
    ip: str = "10.0.0.1"

    @field_serializer("ip")
    def ser_ip(self, ip: str) -> str:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, inside the serializer
        for _ in range(1000):
            pass
        return ip

app = typer.Typer()

@app.command()
@reports_errors
def save() -> None:
    Record().model_dump_json()

app()
"""


def test_a_sigterm_inside_a_pydantic_serializer_is_reported_as_the_signal():
    result = subprocess.run([sys.executable, "-c", COMMAND], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 128 + 15, result.stderr
    assert result.stderr.strip() == "terminated (SIGTERM)"
