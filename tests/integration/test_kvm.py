"""`kind: kvm` end to end (`make test-kvm`; marked kvm, never in `make test`): `configs/kvm-small.yaml` under
its own name boots five Debian guests (2 LBs, 3 servers), provisions them over SSH, replays 30 s of a Poisson
trace through kernel GRE tunnels, serves a static file and a MediaWiki page through LBs running a learned
policy, trains QMIX for two short episodes through its coordinator across the guests, and tears down to
nothing.

Each stage's duration is printed (`pytest -s`) and written down in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from marllb_cli.deploy.node.manifest import state_root
from marllb_cli.hosts import LocalNamespace
from marllb_cli.wikipages import page_path
from tests.conftest import REPO
from tests.integration.helpers import rendered_opening

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="guests, taps and namespaces need root"),
]
NAME = "itkvm"
MARLLB = str(Path(sys.executable).with_name("marllb"))
CONFIG = REPO / "configs" / "kvm-small.yaml"


def marllb(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [MARLLB, *args, "--set", f"testbed.name={NAME}"] if args[0] != "trace" else [MARLLB, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "160"},
    )
    return result


STRANGER_SENDS_GRE = """
import socket, sys
inner = bytes.fromhex("45000014000100004006" + "0000" + "0a000001" + "0a63ff01")  # an IPv4 header to the VIP
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE) as sock:
    sock.sendto(b"\\x00\\x00\\x08\\x00" + inner, (sys.argv[1], 0))
"""


def gre_drops_after_a_stranger_sends() -> tuple[int, int]:
    """One server guest sends a GRE packet to another (a host on the data network that is not an LB); return
    the receiver's drop counters: (GRE from a non-LB, tunnel packets not for the VIP)."""
    from marllb_cli.config import load_config
    from marllb_cli.deploy import testbed_for
    from marllb_cli.deploy.node.roles import nft_table

    kvm = testbed_for(load_config(CONFIG, [f"testbed.name={NAME}"]))
    sender, receiver = [host for host in kvm.ssh.hosts if host.node.startswith("srv")][:2]
    receiver_ip = str(next(node.ip for node in kvm.topology.servers if node.name == receiver.node))
    kvm.ssh.connect(sender).run(["python3", "-c", STRANGER_SENDS_GRE, receiver_ip])
    time.sleep(0.5)
    listed = kvm.ssh.connect(receiver).run(["nft", "list", "table", "ip", nft_table(NAME)]).stdout
    counters = [int(line.split("counter packets ")[1].split()[0]) for line in listed.splitlines() if "counter" in line]
    return counters[0], counters[1]


def test_kvm_small_deploys_replays_through_gre_and_tears_down(tmp_path, trained):
    stages: dict[str, float] = {}
    started = time.monotonic()
    try:
        deployed = marllb("deploy", str(CONFIG))
        stages["deploy"] = time.monotonic() - started
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        status = json.loads(marllb("status", str(CONFIG), "--json").stdout)
        assert status["state"] == "up", status
        assert sum(node["role"] == "server" and node["http_status"] == 200 for node in status["nodes"]) == 3

        trace = tmp_path / "poisson.parquet"
        made = marllb(
            "trace", "gen", "poisson", "--rate", "4", "--duration", "30", "--work-mean", "100000", "--out", str(trace)
        )
        assert made.returncode == 0, made.stderr
        mark = time.monotonic()
        runs = tmp_path / "runs"
        replay = marllb("replay-trace", str(CONFIG), "--trace", str(trace), "--method", "wcmp", "--runs-dir", str(runs))
        stages["replay 30 s"] = time.monotonic() - mark
        assert replay.returncode == 0, replay.stderr[-3000:]
        run = next(runs.iterdir())
        meta = json.loads((run / "meta.json").read_text())
        requests = pd.read_parquet(run / "requests.parquet")
        assert meta["complete"] is True
        assert len(requests) == meta["scheduled_requests"] > 60
        assert (requests["status"] == 200).all(), requests["error"].value_counts()
        # WCMP (random in proportion to capacity) reaches every server's GRE tunnel: missing the 1-unit srv1
        # in 100+ requests has probability (3/4)^100. (SED at this light load may never need it.)
        assert requests["server"].nunique() == 3
        steps = pd.read_parquet(run / "agents" / "lb0.parquet")
        assert len(steps) > 60 and steps["t_s"].between(-120, 120).all()  # moved onto this machine's clock
        # A server's tunnel takes GRE from the LBs only: the LBs' 100+ requests passed, a stranger's is dropped.
        assert gre_drops_after_a_stranger_sends() == (1, 0)

        # A static file through the LBs (GRE to a server guest), whole.
        client = LocalNamespace(f"{NAME}-client")
        # The LBs now run a learned policy: PyTorch is in the image, the policy file goes to the LB guests.
        policy = trained("distr", "policy", CONFIG)
        mark = time.monotonic()
        started_lbs = marllb("lb", "start", str(CONFIG), "--method", f"rl:{policy}")
        stages["lb start rl"] = time.monotonic() - mark
        assert started_lbs.returncode == 0, started_lbs.stderr
        out = client.run(
            [
                "curl",
                "-s",
                "-m",
                "20",
                "-o",
                str(tmp_path / "1k"),
                "-w",
                "%{http_code}",
                f"http://{status['vip']}/static/1k.bin",
            ]
        )
        assert out.stdout == "200" and (tmp_path / "1k").stat().st_size == 1024

        # A MediaWiki page through the LBs: rendered by a server guest from its own database.
        mark = time.monotonic()
        page = client.run(
            ["curl", "-s", "-m", "120", "-i", f"http://{status['vip']}{page_path(7)}"], timeout=130
        ).stdout
        stages["first wiki page"] = time.monotonic() - mark
        head, _, body = page.partition("\n\n")  # text mode: CRLF read as LF
        assert head.startswith("HTTP/1.1 200"), head
        assert "<title>Page 7 - marllb</title>" in body
        assert rendered_opening(7, 200) in body  # the generated article itself, not an error page
        missing = client.run(
            [
                "curl",
                "-s",
                "-m",
                "60",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{status['vip']}{page_path(201)}",
            ]
        )
        assert missing.stdout == "404"  # a title beyond the 200 imported pages
        # lb stats from the LB guests: the learned policies run and the requests above went through them.
        stats = json.loads(marllb("lb", "stats", str(CONFIG), "--json").stdout)
        assert [lb["lb"] for lb in stats] == ["lb0", "lb1"] and all(lb["agent_running"] for lb in stats)
        assert sum(server["packets"] for lb in stats for server in lb["servers"]) >= 3 * 3  # 3 requests

        # Two short QMIX episodes on the guests: the coordinator on lb0's guest, the agents on both, over the
        # guests' own network; the trajectory comes back to this machine and the learner stores it.
        mark = time.monotonic()
        out = tmp_path / "qmix"
        trained_live = marllb(
            "train", str(CONFIG), "--env", "testbed", "--algo", "qmix", "--episodes", "2", "--episode-s", "10",
            "--speed", "1", "--trace", str(trace), "--out", str(out),
        )  # fmt: skip
        stages["qmix 2 × 10 s"] = time.monotonic() - mark
        assert trained_live.returncode == 0, trained_live.stderr[-3000:]
        curve = pd.read_parquet(out / "curve.parquet")
        assert curve["episode"].tolist() == [0, 1] and (curve["lbs_stored"] == 2).all()
        assert (curve["coordinator_bytes_per_step"] > 0).all()
        for run in curve["run"]:
            for lb in ("lb0", "lb1"):
                steps = pd.read_parquet(out / run / "agents" / f"{lb}.parquet")
                inside = steps[steps["t_s"].between(0, 10)]
                assert len(inside) >= 30 and (~inside["missed"]).mean() > 0.5, (lb, inside["missed"].mean())
    finally:
        mark = time.monotonic()
        removed = marllb("teardown", str(CONFIG))
        stages["teardown"] = time.monotonic() - mark
        print("kvm stages (s):", {k: round(v, 1) for k, v in stages.items()})
    assert removed.returncode == 0, removed.stderr
    assert subprocess.run(["pgrep", "-f", f"marllb-{NAME}-"], capture_output=True).returncode == 1  # no qemu
    assert not (state_root() / NAME).exists()  # overlays and seeds lived there
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert NAME not in namespaces  # the taps and bridges lived in the switch namespace
