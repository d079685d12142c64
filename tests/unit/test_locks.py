"""`locks.exclusive`: one holder at a time across processes, the refused one told who holds it, nothing held
after the holder is killed, nested holds in one process, and no hold kept by a forked child (pyroute2's
namespace helpers) once its parent lets go. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marllb_cli.errors import TestbedError
from marllb_cli.locks import exclusive
from tests.conftest import REPO

HOLD = """
import sys, time
from pathlib import Path
from marllb_cli.errors import TestbedError
from marllb_cli.locks import exclusive
with exclusive(Path(sys.argv[1]), lambda holder: TestbedError(holder)):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""

TRY = """
import sys
from pathlib import Path
from marllb_cli.errors import TestbedError
from marllb_cli.locks import exclusive
try:
    with exclusive(Path(sys.argv[1]), lambda holder: TestbedError(holder)):
        print("got it")
except TestbedError as exc:
    print("refused:", exc.message)
"""


def refused(holder: str) -> TestbedError:
    return TestbedError(f"in use ({holder})")


def holder_process(lock: Path, seconds: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def try_elsewhere(lock: Path) -> str:
    """What another process gets when it tries the lock now."""
    result = subprocess.run([sys.executable, "-c", TRY, str(lock)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_refused_process_learns_who_holds_it_and_a_killed_holder_holds_nothing(tmp_path):
    lock = tmp_path / ".in-use"
    holder = holder_process(lock, 60)
    try:
        with pytest.raises(TestbedError) as refusal, exclusive(lock, refused):
            pass
        assert refusal.value.message.startswith(f"in use (pid {holder.pid}: ")
        assert "-c" in refusal.value.message  # its command, as this test started it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(lock, refused):  # SIGKILL left nothing held
        assert try_elsewhere(lock).startswith("refused: pid ")


def test_nested_holds_in_one_process_are_one_hold(tmp_path):
    lock = tmp_path / ".in-use"
    with exclusive(lock, refused):
        with exclusive(lock, refused):
            assert try_elsewhere(lock).startswith(f"refused: pid {os.getpid()}: ")
        assert try_elsewhere(lock).startswith("refused: ")  # the outer hold goes on
    assert try_elsewhere(lock) == "got it"


def test_a_forked_child_does_not_keep_the_hold_after_its_parent_lets_go(tmp_path):
    lock = tmp_path / ".in-use"
    with exclusive(lock, refused):
        child = os.fork()
        if child == 0:  # a helper that outlives the hold, as pyroute2's namespace helpers may
            time.sleep(10)
            os._exit(0)
    try:
        assert try_elsewhere(lock) == "got it"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


HOLD_TESTBED = """
import sys, time
from marllb_cli.config import load_config
from marllb_cli.deploy import testbed_for
from marllb_cli.deploy.base import exclusive_use
with exclusive_use(testbed_for(load_config(sys.argv[1]))):
    print("held", flush=True)
    time.sleep(60)
"""


def test_every_kind_of_testbed_is_held_in_the_state_directory_its_deploy_claimed(tmp_path, monkeypatch):
    """An SSH testbed keeps `ssh.json`, not a local testbed's `manifest.json`: the hold keys on the state
    directory that every kind's deploy claims, so it holds an SSH testbed too. Never deployed: not held."""
    from marllb_cli.config import load_config
    from marllb_cli.deploy import testbed_for
    from marllb_cli.deploy.base import exclusive_use, state_owner
    from marllb_cli.deploy.node.owned import claim

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("MARLLB_STATE_DIR", str(state))
    config_path = REPO / "configs" / "ssh-example.yaml"
    testbed = testbed_for(load_config(config_path))
    with exclusive_use(testbed):  # not deployed: nothing held, nothing made
        assert not testbed.state_dir.exists()
    claim(testbed.state_dir, state_owner(testbed.config))  # what its deploy does first

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_TESTBED, str(config_path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TestbedError) as refusal, exclusive_use(testbed):
            pass
        assert f"is in use by another marllb (pid {holder.pid}: " in refusal.value.message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
