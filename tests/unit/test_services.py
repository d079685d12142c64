"""Starting a service and waiting for it: what the error says when it does not come up."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from marllb_cli.deploy.node.lbs import _wait
from marllb_cli.errors import TestbedError
from marllb_cli.hosts.local import LocalHost
from marllb_cli.processes import become_subreaper, is_running, kill_pids
from marllb_cli.services import start_process, start_service

PREVIOUS = "2026-12-01 23:18:53,850 agent INFO lb1: stopped after 65 steps\n"


def _log_with_a_previous_run(tmp_path):
    log = tmp_path / "lb1.agent.log"
    log.write_text(PREVIOUS)
    return log, log.stat().st_size


def test_a_service_that_fails_at_start_is_reported_by_its_own_words_not_the_previous_runs(tmp_path):
    log, mark = _log_with_a_previous_run(tmp_path)
    service = start_service(LocalHost(), "lb1-agent", "marllb_cli.agents.runner", [str(tmp_path / "none.json")], log)
    with pytest.raises(TestbedError) as failure:
        _wait(service, lambda: False, "take its first step", since=mark, timeout_s=30)
    message = str(failure.value)
    assert "lb1-agent did not take its first step: exited with status 1; its last words:" in message
    assert "FileNotFoundError" in message and "stopped after 65 steps" not in message


def test_a_service_killed_before_it_logs_says_by_which_signal(tmp_path):
    log, mark = _log_with_a_previous_run(tmp_path)
    service = start_process(LocalHost(), "lb1-agent", ["sh", "-c", "kill -KILL $$"], log)
    with pytest.raises(TestbedError) as failure:
        _wait(service, lambda: False, "take its first step", since=mark, timeout_s=30)
    assert str(failure.value).startswith(
        "lb1-agent did not take its first step: was killed by SIGKILL before writing to its log"
    )


def test_kill_pids_reaps_the_orphans_it_inherits_and_leaves_a_handles_child_to_its_handle():
    """As subreaper a controller inherits what it kills in a namespace or cgroup (Apache's processes): each
    stayed its zombie until it exited (51 in a test session). A child with a Popen handle is not reaped
    there: its exit status is the handle's, and a reap would make it read "exited 0"."""
    become_subreaper()  # as every marllb command is
    started = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    orphan = int(started.stdout)  # sh has exited: the sleep is now our child
    handled = LocalHost().popen(["sleep", "60"])
    pids = [orphan, handled.pid]
    kill_pids(lambda: [pid for pid in pids if is_running(pid)])
    assert not Path(f"/proc/{orphan}").exists()  # reaped: no zombie left behind
    assert handled.wait(timeout=5) == -signal.SIGTERM
