"""End to end: an OVA made by real tools, converted without privileges, equals root's
mount-and-tar reference in every property of shared/design/fidelity.md."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.compare import assert_same_tree, read_tree
from support.images import (
    BuiltDisk,
    disk_gpt_bios,
    disk_mbr_boot_logical,
    disk_mbr_single,
    disk_whole,
    make_ova,
    to_vmdk,
)
from support.probes import PROBE_PATHS, PROBE_SOCKET, populate_probes
from support.reference import make_reference
from unpriv import Unprivileged

import ova2img

MiB = 1 << 20


@dataclass
class Built:
    disk: BuiltDisk
    ova: Path
    ref: Path
    ref_warnings: list[str]


LAYOUTS: dict[str, tuple[Callable[..., BuiltDisk], dict[str, Any]]] = {
    "mbr-ext4": (disk_mbr_single, {}),
    "gpt-ext4": (disk_gpt_bios, {}),
    "whole-ext2": (disk_whole, {"fstype": "ext2"}),
    "mbr-ext3-128byte-inodes": (disk_mbr_single, {"fstype": "ext3", "mkfs_args": ("-I", "128")}),
    "boot-ext2-logical-root": (disk_mbr_boot_logical, {}),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    if os.geteuid() != 0:
        pytest.skip("needs root and loop devices to build the reference")
    name = request.param
    maker, kwargs = LAYOUTS[name]
    work = tmp_path_factory.mktemp(name)
    disk = maker(work, populate_probes, name=name.split("-")[0], fs_size=48 * MiB, **kwargs)
    vmdk = to_vmdk(disk.path, work / "disk.vmdk")
    ova = make_ova(work / f"{name}.ova", [vmdk], name)
    ref = work / "ref.tar"
    warnings = make_reference(disk.path, ref, disk.mounts())
    return Built(disk, ova, ref, warnings)


def test_convert_equals_reference(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    result = ova2img.convert(built.ova, out)
    assert_same_tree(out, built.ref)
    tree = read_tree(out)
    for probe in PROBE_PATHS:
        assert probe in tree.entries, probe
    # The socket is skipped, with a warning, as GNU tar skips it.
    assert PROBE_SOCKET not in tree.entries
    assert any("socket" in w for w in result.warnings)
    assert any("socket" in w for w in built.ref_warnings)


def test_conversion_is_deterministic(built: Built, tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    ova2img.convert(built.ova, a)
    ova2img.convert(built.ova, b)
    assert a.read_bytes() == b.read_bytes()


def test_unprivileged_convert_equals_reference(built: Built, nobody: Unprivileged) -> None:
    ova = nobody.add_input(built.ova)
    out = nobody.work / f"{built.ova.stem}.tar"
    res = nobody.run(["convert", str(ova), "-o", str(out)])
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    try:
        assert out.stat().st_uid == 65534
        assert_same_tree(out, built.ref)
    finally:
        out.unlink(missing_ok=True)
