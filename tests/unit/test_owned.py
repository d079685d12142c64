"""Risk 1 of the reliability review: marllb runs as root and removes directories, so it removes only
directories it made (a marker names their owner) and refuses configs that point it at system directories.
On commit 094bd00, `marllb node down` deleted any state directory it was given, `teardown --purge` any image
cache, and `workdir: /`, `image_cache: /` and `MARLLB_STATE_DIR=/` were accepted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from marllb_cli.config import load_config
from marllb_cli.deploy.kvm.image import claim_cache, purge_cache
from marllb_cli.deploy.node.owned import MARKER, claim, mounts_below, owner_of, remove_owned
from marllb_cli.errors import ConfigError, TestbedError
from tests.conftest import REPO, minimal_testbed


def foreign_directory(tmp_path):
    """A directory with someone's files in it, as /usr or a home would be."""
    directory = tmp_path / "someone"
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "precious.txt").write_text("not marllb's")
    return directory


def test_node_down_never_deletes_a_directory_marllb_did_not_make(tmp_path):
    directory = foreign_directory(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "marllb_cli.deploy.node.cli", "down", "--state", str(directory)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert (directory / "data" / "precious.txt").read_text() == "not marllb's"


def test_claim_makes_and_accepts_ours_and_refuses_anything_else(tmp_path):
    ours = tmp_path / "a" / "b"
    claim(ours, "testbed x")
    assert owner_of(ours) == "testbed x" and (ours / MARKER).is_file()
    claim(ours, "testbed x")  # a second deploy
    with pytest.raises(TestbedError, match="marllb did not make it"):
        claim(ours, "testbed y")
    with pytest.raises(TestbedError, match="marllb did not make it"):
        claim(foreign_directory(tmp_path), "testbed x")
    (tmp_path / "link").symlink_to(ours)
    with pytest.raises(TestbedError):
        claim(tmp_path / "link", "testbed x")
    assert not remove_owned(tmp_path / "link") and ours.is_dir()
    assert not remove_owned(ours, "testbed y") and ours.is_dir()
    assert remove_owned(ours, "testbed x") and not ours.exists()


def test_purge_removes_only_the_images_marllb_built(tmp_path):
    cache = tmp_path / "cache"
    (cache / "image-bookworm-abc").mkdir(parents=True)
    (cache / "debootstrap-bookworm-def").mkdir()
    claim_cache(cache)  # a cache from before markers, holding only marllb's entries, is adopted
    (cache / "notes.txt").write_text("the user's")
    assert purge_cache(cache) == 2
    assert sorted(p.name for p in cache.iterdir()) == [MARKER, "notes.txt"]
    foreign = foreign_directory(tmp_path)
    (foreign / "image-bookworm-x").mkdir()
    assert purge_cache(foreign) == 0 and (foreign / "image-bookworm-x").is_dir()
    with pytest.raises(TestbedError):
        claim_cache(foreign)


@pytest.mark.parametrize(
    "override, field",
    [
        ("testbed.kvm.image_cache=/", "testbed.kvm.image_cache"),
        ("testbed.kvm.image_cache=/home", "testbed.kvm.image_cache"),
        ("testbed.kvm.image_cache=/var/cache/../../etc/x", "testbed.kvm.image_cache"),
    ],
)
def test_a_system_directory_as_image_cache_is_refused(write_config, override, field):
    config = write_config(minimal_testbed("unitkvm", kind="kvm"))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(config, [override])


@pytest.mark.parametrize("workdir", ["/", "/usr", "/var", "/var/lib/../..", "relative"])
def test_a_system_directory_as_ssh_workdir_is_refused(workdir):
    with pytest.raises(ConfigError, match=r"--set testbed\.hosts\.0\.workdir: "):
        load_config(REPO / "configs" / "ssh-example.yaml", [f"testbed.hosts.0.workdir={workdir}"])


@pytest.mark.parametrize("root", ["/", "/etc", "relative/state"])
def test_a_state_root_in_a_system_directory_is_refused(cli, write_config, monkeypatch, root):
    monkeypatch.setenv("MARLLB_STATE_DIR", root)
    result = cli("status", write_config(minimal_testbed("unitroot")))
    assert result.exit_code == 2 and "MARLLB_STATE_DIR" in result.stderr


def test_a_state_root_others_can_write_is_refused(cli, write_config, monkeypatch, tmp_path):
    root = tmp_path / "shared"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    monkeypatch.setenv("MARLLB_STATE_DIR", str(root))
    result = cli("status", write_config(minimal_testbed("unitroot")))
    assert result.exit_code == 2 and "writable by another user" in result.stderr


@pytest.mark.parametrize("address", ["h; rm -rf / #", "evil\nhost", "$(reboot)", "a b"])
def test_an_ssh_address_that_is_not_a_host_name_is_refused(address):
    with pytest.raises(ConfigError, match=r"--set testbed\.hosts\.0\.address: "):
        load_config(REPO / "configs" / "ssh-example.yaml", [f"testbed.hosts.0.address={address!r}"])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_removing_a_tree_never_deletes_through_a_mount_left_in_it(tmp_path):
    """A debootstrap killed mid-run leaves the host's /proc and /sys (or a bind of /dev) mounted in its tree;
    an rmtree of the tree then deleted the host's files through the mount."""
    host_files = tmp_path / "host-dev"
    host_files.mkdir()
    (host_files / "null").write_text("a file of the host")
    cache = tmp_path / "cache"
    claim_cache(cache)
    target = cache / "debootstrap-bookworm-0123" / "root" / "dev"
    target.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(host_files), str(target)], check=True)
    try:
        assert purge_cache(cache) == 1
        assert (host_files / "null").read_text() == "a file of the host"
        assert not mounts_below(tmp_path / "cache") and not cache.exists()
    finally:
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True)


def test_a_failed_command_is_reported_by_its_error_line_not_its_caret_marker():
    """nft prints its error, then the input and a `^^^` marker: the KVM deploy once said only "^^^"."""
    from marllb_cli.hosts.local import LocalHost

    with pytest.raises(TestbedError, match="Error: Could not process rule|Error: syntax error"):
        LocalHost().run(["nft", "-c", "-f", "-"], input="table ip t { chain c { ip protocol nosuchproto drop } }\n")


def test_the_telling_line_skips_a_usage_box_and_a_caret_marker():
    """Local and SSH commands alike report this line; the KVM tier's SSH failure once said only `╰───╯`."""
    from marllb_cli.hosts.local import telling_line

    box = "Usage: x usage [OPTIONS]\n╭─ Error ───╮\n│ No such command 'usage'. │\n╰───────────╯\n"
    assert telling_line(box) == "No such command 'usage'."
    nft = "/dev/stdin:4:17-19: Error: Could not resolve protocol name\n    ip protocol gre\n                ^^^\n"
    assert telling_line(nft) == "/dev/stdin:4:17-19: Error: Could not resolve protocol name"
    assert telling_line("") == "no output"
