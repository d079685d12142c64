"""The KVM image cache keeps what is in use and the previous image, and drops older builds."""

from __future__ import annotations

import os

from marllb_cli.deploy.kvm.image import SUITE, _prune


def test_prune_keeps_the_tree_in_use_and_the_two_newest_images(tmp_path):
    trees = [tmp_path / f"debootstrap-{SUITE}-{k}" for k in ("old", "cur")]
    images = [tmp_path / f"image-{SUITE}-{k}" for k in range(4)]
    for age, path in enumerate(reversed([*trees, *images])):
        path.mkdir()
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))  # images[3] newest, then 2, 1, 0
    other = tmp_path / "something-else"
    other.mkdir()
    _prune(tmp_path, keep=(trees[1], images[1]))  # the one just built is not the newest by mtime here
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == sorted([trees[1].name, images[1].name, images[3].name, other.name])
