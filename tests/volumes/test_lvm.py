"""LVM2 read through our own segment mapping, against metadata written by lvm2 itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dissect.volume.lvm import LVM2
from support.lvm import LVSpec, PVSpec, create_vg, unique_vg

from ova2img.errors import VolumeError
from ova2img.volumes.base import Volume
from ova2img.volumes.lvm import assemble_lvm

MiB = 1 << 20


def _whole_disk_volume(path: Path, index: int, stack: list[object]) -> Volume:
    fh = path.open("rb")
    stack.append(fh)
    return Volume(
        f"sd{chr(97 + index)}", index, 0, 0, path.stat().st_size, fh, content="LVM2_member"
    )


@pytest.fixture(scope="module")
def vg_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if os.geteuid() != 0:
        pytest.skip("needs root and loop devices to run lvm2")
    top = tmp_path_factory.mktemp("lvm")
    disks = [top / "a.img", top / "b.img"]
    for d in disks:
        with d.open("wb") as fh:
            fh.truncate(64 * MiB)
    striped = top / "striped.bin"
    linear = top / "linear.bin"
    striped.write_bytes(os.urandom(16 * MiB))
    linear.write_bytes(os.urandom(40 * MiB))
    vg = unique_vg()
    # Each 64 MiB PV has 15 extents of 4 MiB; after "striped" and a pad on each, 8 are free on
    # each, so the 10 extents of "linear" are split over both: a multi-segment LV over two PVs.
    info = create_vg(
        vg,
        [PVSpec(d, 0, 64 * MiB) for d in disks],
        [
            LVSpec("striped", 16, stripes=2, stripe_kib=64, content=striped),
            LVSpec("pad", 20, pvs=[0]),
            LVSpec("pad2", 20, pvs=[1]),
            LVSpec("linear", 40, content=linear, pvs=[0, 1]),
        ],
    )
    yield {"vg": vg, "disks": disks, "striped": striped, "linear": linear, "info": info}


def test_striped_lv_is_interleaved(vg_images: dict[str, object]) -> None:
    stack: list[object] = []
    disks: list[Path] = vg_images["disks"]  # type: ignore[assignment]
    vols = [_whole_disk_volume(d, i, stack) for i, d in enumerate(disks)]
    try:
        lvs, refused = assemble_lvm(vols)
        assert refused == []
        by_name = {v.name: v for v in lvs}
        vg = vg_images["vg"]
        striped = by_name[f"{vg}/striped"]
        assert striped.type == "striped"
        assert striped.extra["mapper"] == f"{vg}-striped"
        expected = Path(vg_images["striped"]).read_bytes()  # type: ignore[arg-type]
        striped.stream.seek(0)
        assert striped.stream.read() == expected
        # The gap we work around: dissect concatenates the stripes.
        unpatched = LVM2([v.stream for v in vols])
        assert unpatched.vg.logical_volumes["striped"].open().read(len(expected)) != expected
    finally:
        for fh in stack:
            fh.close()  # type: ignore[attr-defined]


def test_multi_segment_lv_over_two_pvs(vg_images: dict[str, object]) -> None:
    stack: list[object] = []
    disks: list[Path] = vg_images["disks"]  # type: ignore[assignment]
    vols = [_whole_disk_volume(d, i, stack) for i, d in enumerate(disks)]
    try:
        lvs, _ = assemble_lvm(vols)
        vg = vg_images["vg"]
        linear = next(v for v in lvs if v.name == f"{vg}/linear")
        segs = vg_images["info"]["lvs"]["linear"]  # type: ignore[index]
        assert len({dev for dev, *_ in segs}) == 2, segs  # really spans both PVs
        expected = Path(vg_images["linear"]).read_bytes()  # type: ignore[arg-type]
        linear.stream.seek(0)
        assert linear.stream.read() == expected
        assert linear.size == len(expected)
    finally:
        for fh in stack:
            fh.close()  # type: ignore[attr-defined]


def test_missing_pv_names_the_vg(vg_images: dict[str, object]) -> None:
    disks: list[Path] = vg_images["disks"]  # type: ignore[assignment]
    stack: list[object] = []
    vols = [_whole_disk_volume(disks[0], 0, stack)]
    try:
        with pytest.raises(VolumeError, match=f"volume group {vg_images['vg']} is missing"):
            assemble_lvm(vols)
    finally:
        for fh in stack:
            fh.close()  # type: ignore[attr-defined]
