"""A mount point that is a symlink: mount(8) resolves the path in the guest as mounted so far
and mounts on the target, so the symlink stays a symlink and what the target directory held
is hidden (found by an audit: ova2img replaced the symlinks with directories)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from support.compare import assert_same_tree
from support.images import DiskLayout, Partition, build_disk, build_ext_image, fstab_text
from support.reference import make_reference

import ova2img

MiB = 1 << 20


def _root(stage: Path) -> None:
    (stage / "etc").mkdir()
    (stage / "etc" / "fstab").write_text(
        fstab_text(
            [
                ("LABEL=slroot", "/", "ext4", "defaults"),
                ("LABEL=slhome", "/home", "ext4", "defaults"),  # home -> srv/home
                ("LABEL=slopt", "/opt", "ext4", "defaults"),  # opt -> /srv/opt (absolute)
                ("LABEL=sllog", "/var/log/app", "ext4", "defaults"),  # var/log -> ../logs
            ]
        )
    )
    (stage / "srv" / "home").mkdir(parents=True)
    (stage / "srv" / "home" / "UNDER").write_text("hidden by the mount\n")
    (stage / "srv" / "opt").mkdir()
    (stage / "logs" / "app").mkdir(parents=True)
    (stage / "var").mkdir()
    os.symlink("srv/home", stage / "home")
    os.symlink("/srv/opt", stage / "opt")
    os.symlink("../logs", stage / "var" / "log")


def _holding(name: str):  # type: ignore[no-untyped-def]
    def populate(stage: Path) -> None:
        (stage / name).write_text(f"on the {name} filesystem\n")

    return populate


@pytest.mark.root
def test_symlinked_mount_points_mount_on_their_targets(require_root: None, tmp_path: Path) -> None:
    images = [
        build_ext_image(tmp_path / "root.ext4", 24 * MiB, _root, label="slroot"),
        build_ext_image(tmp_path / "home.ext4", 8 * MiB, _holding("alice"), label="slhome"),
        build_ext_image(tmp_path / "opt.ext4", 8 * MiB, _holding("tool"), label="slopt"),
        build_ext_image(tmp_path / "log.ext4", 8 * MiB, _holding("app.log"), label="sllog"),
    ]
    disk = build_disk(
        tmp_path / "disk.raw",
        DiskLayout(
            "gpt",
            tuple(Partition(i.size, image=i) for i in images),
            size=sum(i.size for i in images) + 4 * MiB,
        ),
    )
    ours = tmp_path / "ours.tar"
    ova2img.convert(disk.path, ours)
    # root's mounts, where mount(8) puts them: the symlinks resolved inside the guest
    where = ["/", "/srv/home", "/srv/opt", "/logs/app"]
    ref = tmp_path / "ref.tar"
    make_reference(
        disk.path,
        ref,
        [(w, p.start, p.size) for w, p in zip(where, disk.partitions, strict=True)],
    )
    assert_same_tree(ours, ref)
    with tarfile.open(ours) as tf:
        assert tf.getmember("./home").issym() and tf.getmember("./opt").issym()
        assert tf.getmember("./var/log").issym()
        names = tf.getnames()
    assert "./srv/home/alice" in names and "./srv/opt/tool" in names
    assert "./logs/app/app.log" in names
    assert "./srv/home/UNDER" not in names


def test_fstab_entry_on_a_missing_disk_says_so(tmp_path: Path) -> None:
    from ova2img.errors import AssemblyError

    def root(stage: Path) -> None:
        (stage / "etc").mkdir()
        (stage / "etc" / "fstab").write_text(
            fstab_text(
                [
                    ("LABEL=slroot", "/", "ext4", "defaults"),
                    ("LABEL=data", "/data", "ext4", "defaults"),
                ]
            )
        )
        (stage / "data").mkdir()

    img = build_ext_image(tmp_path / "root.ext4", 8 * MiB, root, label="slroot")
    with pytest.raises(AssemblyError, match=r"is a disk of the VM missing\? .*--no-fstab"):
        ova2img.convert(img.path, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
