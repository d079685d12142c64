"""`app: mediawiki` servers on a local testbed: MediaWiki from the distribution, each server with its own
MariaDB and memcached inside its CPU cgroup, generated pages whose titles are those of `trace gen wiki`.
Pages and static files are fetched through the LB, a generated wiki trace is replayed with zero errors,
and teardown leaves nothing (the database and cache processes included).

Testbed name `itmw`, so it never meets a user's testbed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from marllb_cli.config import load_config
from marllb_cli.deploy.local import LocalTestbed
from marllb_cli.hosts import LocalNamespace
from marllb_cli.wikipages import page_path
from tests.conftest import REPO
from tests.integration.helpers import deployed, rendered_opening

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local testbed needs root"),
]
NAME = "itmw"
PAGES = 40
MARLLB = [sys.executable, "-m", "marllb_cli"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    wiki = {"app": "mediawiki", "mediawiki": {"pages": PAGES}}
    config = {
        "testbed": {
            "name": NAME,
            "lbs": 1,
            "cpu_unit": 0.25,
            "servers": [
                {"name": "small", "count": 1, "cpus": 1, **wiki},
                {"name": "large", "count": 1, "cpus": 2, **wiki},
            ],
        }
    }
    path = tmp_path_factory.mktemp("mw") / "wiki.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def testbed(config_file):
    with deployed(LocalTestbed(load_config(config_file))) as testbed:
        yield testbed


def get(testbed: LocalTestbed, path: str) -> tuple[int, dict[str, str], str]:
    """GET through the VIP from the client namespace: (status, headers, body)."""
    out = LocalNamespace(testbed.topology.client.namespace).run(
        ["curl", "-s", "-m", "30", "-i", f"http://{testbed.topology.vip}{path}"], timeout=40
    )
    head, _, body = out.stdout.partition("\n\n")  # text mode: CRLF read as LF
    lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def memcached_items(testbed: LocalTestbed, server) -> int:
    """`curr_items` of a server's memcached, read over its unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(testbed.apache(server).mediawiki.cache_socket))
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += sock.recv(65536)
    stats = dict(line.split()[1:3] for line in data.decode().splitlines() if line.startswith("STAT "))
    return int(stats["curr_items"])


def test_pages_and_static_files_come_from_each_servers_own_mediawiki(testbed):
    started = subprocess.run([*MARLLB, "lb", "start", str(testbed.config.source), "--method", "sed"], cwd=REPO)
    assert started.returncode == 0
    try:
        served_by = set()
        for k in (1, 2, 3, 17, PAGES):
            status, headers, body = get(testbed, page_path(k))
            assert status == 200, body[-500:]
            assert f"<title>Page {k} - marllb</title>" in body
            assert rendered_opening(k, PAGES) in body  # the generated article, from the server's database
            served_by.add(headers["x-server"])
        assert get(testbed, page_path(PAGES + 1))[0] == 404  # beyond the imported pages
        static = LocalNamespace(testbed.topology.client.namespace).run(
            ["curl", "-s", "-m", "30", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
            + [f"http://{testbed.topology.vip}/static/10k.bin"]
        )
        assert static.stdout == f"200 {10 * 1024}"
        assert get(testbed, "/dummy.php/?n=1000")[0] == 200  # the for-loop page is still there
    finally:
        subprocess.run([*MARLLB, "lb", "stop", str(testbed.config.source)], cwd=REPO, check=True)
    for server in testbed.topology.servers:
        instance = testbed.apache(server)
        database = int((instance.mediawiki.db_socket.parent / "mysqld.pid").read_text())
        assert database in instance.cgroup.pids()  # the database spends the server's capacity, as on a VM
        if server.name in served_by:
            assert memcached_items(testbed, server) > 0  # parser and object cache in the server's memcached


def test_a_generated_wiki_trace_replays_without_errors(testbed, tmp_path):
    trace = tmp_path / "wiki.parquet"
    made = subprocess.run(
        [*MARLLB, "trace", "gen", "wiki", "--rate", "6", "--duration", "20", "--day", "20", "--pages", str(PAGES)]
        + ["--out", str(trace)],
        cwd=REPO,
    )
    assert made.returncode == 0
    runs = tmp_path / "runs"
    replay = subprocess.run(
        [*MARLLB, "replay-trace", str(testbed.config.source), "--trace", str(trace), "--method", "sed"]
        + ["--runs-dir", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    run = next(runs.iterdir())
    assert json.loads((run / "meta.json").read_text())["complete"] is True
    requests = pd.read_parquet(run / "requests.parquet")
    assert len(requests) > 60
    assert (requests["status"] == 200).all(), requests.groupby("status").size()
    assert set(requests["class"]) == {"wiki", "static"}
    assert requests["server"].nunique() == 2
