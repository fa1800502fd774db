"""find_volumes against sfdisk, sgdisk, partx and blkid on images those tools wrote.

Each dissect.volume gap the adapter fixes is shown on the unpatched library next to the
oracle: MBR logicals numbered 3, 4, … (Linux: 5, 6, …); GPT partitions one sector short; no
backup-GPT fallback; a hybrid MBR's entries listed beside the GPT's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from dissect.volume.disk import Disk

from ova2img.disks.base import VirtualDisk
from ova2img.errors import VolumeError
from ova2img.volumes import Volume, find_volumes
from ova2img.volumes import mbr as mbr_module
from ova2img.volumes.table import disk_name, partition_name

MiB = 1 << 20


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def sh(*cmd: str, stdin: str | None = None, stderr: bool = True) -> str:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout + res.stderr if stderr else res.stdout


@contextlib.contextmanager
def opened(path: Path, index: int = 0) -> Iterator[VirtualDisk]:
    with path.open("rb") as fh:
        yield VirtualDisk(
            name=path.name, format="raw", subformat="", size=path.stat().st_size, stream=fh,
            index=index,
        )  # fmt: skip


def volumes_of(path: Path, index: int = 0) -> list[Volume]:
    with opened(path, index) as disk:
        return find_volumes(disk)


def sfdisk_parts(path: Path) -> list[dict[str, object]]:
    """``sfdisk --json``: node, start, size (sectors), type, uuid, name; node → number."""
    table = json.loads(sh("sfdisk", "--json", str(path), stderr=False))["partitiontable"]
    parts = table["partitions"]
    for p in parts:
        p["number"] = int(re.search(r"(\d+)$", p["node"]).group(1))  # type: ignore[union-attr]
    return parts  # type: ignore[no-any-return]


def partx_uuids(path: Path) -> dict[int, str]:
    """PARTUUID per partition number as libblkid computes it (``partx -o NR,UUID``)."""
    out = sh("partx", "-g", "-r", "-o", "NR,UUID", str(path))
    return {int(nr): uuid for nr, _, uuid in (line.partition(" ") for line in out.splitlines())}


def stamp(path: Path, parts: list[tuple[int, int]]) -> dict[int, tuple[bytes, bytes]]:
    """Write random first and last sectors into each ``(start, sectors)``; return them."""
    marks = {}
    with path.open("r+b") as fh:
        for start, sectors in parts:
            first, last = os.urandom(512), os.urandom(512)
            fh.seek(start * 512)
            fh.write(first)
            fh.seek((start + sectors - 1) * 512)
            fh.write(last)
            marks[start] = (first, last)
    return marks


def assert_window(vol: Volume, first: bytes, last: bytes) -> None:
    """The volume's stream is exactly its range: first and last sector, nothing after."""
    vol.stream.seek(0)
    assert vol.stream.read(512) == first
    vol.stream.seek(vol.size - 512)
    assert vol.stream.read(1024) == last  # asks past the end: gets only the last sector
    vol.stream.seek(vol.size)
    assert vol.stream.read(512) == b""


# --- MBR -------------------------------------------------------------------------------------

MBR_SCRIPT = """label: dos
label-id: 0x1f2e3d4c
start=2048, size=4096, type=83, bootable
start=6144, size=4096, type=82
start=10240, size=4096, type=8e
start=14336, type=5
start=16384, size=2048, type=83
start=20480, size=2048, type=b
start=24576, size=2048, type=83
start=28672, size=2048, type=83
start=32768, size=2048, type=83
start=36864, size=2048, type=83
start=40960, size=2048, type=83
"""


@pytest.fixture(scope="session")
def mbr_image(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[int, tuple[bytes, bytes]]]:
    """3 primaries, an extended partition holding 7 logicals (5-11), written by sfdisk."""
    need("sfdisk", "partx")
    path = tmp_path_factory.mktemp("mbr") / "mbr.img"
    with path.open("wb") as fh:
        fh.truncate(64 * MiB)
    sh("sfdisk", "-q", str(path), stdin=MBR_SCRIPT)
    parts = [(p["start"], p["size"]) for p in sfdisk_parts(path) if p["type"] != "5"]
    return path, stamp(path, parts)  # type: ignore[arg-type]


def test_mbr_matches_sfdisk_and_partx(
    mbr_image: tuple[Path, dict[int, tuple[bytes, bytes]]],
) -> None:
    path, marks = mbr_image
    oracle = [p for p in sfdisk_parts(path) if p["type"] != "5"]  # no extended container
    uuids = partx_uuids(path)
    with opened(path) as disk:
        vols = find_volumes(disk)
        for v in vols:
            assert_window(v, *marks[v.offset // 512])
    assert [(v.number, v.offset, v.size, v.type) for v in vols] == [
        (p["number"], p["start"] * 512, p["size"] * 512, f"{int(p['type'], 16):#04x}")  # type: ignore[operator, call-overload]
        for p in oracle
    ]
    assert [v.number for v in vols] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert [v.name for v in vols] == ["sda1", "sda2", "sda3", *(f"sda{n}" for n in range(5, 12))]
    # libblkid: "%08x-%02x" — partition 10 is "-0a", not "-10".
    assert {v.number: v.partuuid for v in vols} == {n: uuids[n] for n in uuids if n != 4}
    assert vols[8].partuuid == "1f2e3d4c-0a"
    assert all(v.scheme == "mbr" and v.partlabel is None for v in vols)
    assert vols[0].extra["bootable"] == "1" and "bootable" not in vols[1].extra
    assert vols[0].extra["ptuuid"] == "1f2e3d4c"


def test_dissect_gap_mbr_logical_numbering(mbr_image: tuple[Path, object]) -> None:
    """Unpatched dissect numbers the logicals after the EBR entry's slot: 3, 4, …"""
    path, _ = mbr_image
    with path.open("rb") as fh:
        numbers = [p.number for p in Disk(fh).partitions]
    assert numbers[:3] == [1, 2, 3]
    assert numbers[3:] != [5, 6, 7, 8, 9, 10, 11]  # Linux's numbers, which sfdisk shows
    assert numbers[3] == 4  # the first logical, /dev/sda5 for Linux


def test_second_disk_is_sdb(mbr_image: tuple[Path, object]) -> None:
    path, _ = mbr_image
    vols = volumes_of(path, index=1)
    assert vols[3].name == "sdb5" and all(v.disk_index == 1 for v in vols)


def test_empty_disk(tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.touch()
    assert volumes_of(path) == []


def test_disk_and_partition_names() -> None:
    assert [disk_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "sda", "sdb", "sdz", "sdaa", "sdab", "sdzz", "sdaaa",
    ]  # fmt: skip
    assert partition_name("sda", 5) == "sda5"
    assert partition_name("nvme0n1", 2) == "nvme0n1p2"


def test_mbr_signature_zero_has_no_partuuid(tmp_path: Path) -> None:
    need("sfdisk", "partx")
    path = tmp_path / "z.img"
    with path.open("wb") as fh:
        fh.truncate(8 * MiB)
    sh("sfdisk", "-q", str(path), stdin="label: dos\nlabel-id: 0x0\nstart=2048,type=83\n")
    assert partx_uuids(path) == {1: ""}
    (vol,) = volumes_of(path)
    assert vol.partuuid is None


def _ebr_chain(path: Path, extended_start: int) -> list[int]:
    """Sectors of the EBRs, following each link (slot 2) — to corrupt the chain."""
    ebrs, this = [], extended_start
    with path.open("rb") as fh:
        while True:
            ebrs.append(this)
            fh.seek(this * 512 + 446 + 16)
            link = fh.read(16)
            if link[4] not in (0x05, 0x0F, 0x85):
                return ebrs
            this = extended_start + struct.unpack_from("<I", link, 8)[0]


def test_ebr_loop_is_an_error(mbr_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "loop.img"
    shutil.copyfile(mbr_image[0], path)
    ebrs = _ebr_chain(path, 14336)
    assert len(ebrs) == 7
    # The last EBR's (empty) link slot gets a copy of the first EBR's link: back to EBR 2.
    with path.open("r+b") as fh:
        fh.seek(ebrs[0] * 512 + 462)
        link = fh.read(16)
        fh.seek(ebrs[-1] * 512 + 462)
        fh.write(link)
    with pytest.raises(VolumeError, match=rf"EBR chain loops back to sector {ebrs[1]}"):
        volumes_of(path)


def test_too_many_logicals_is_an_error(
    mbr_image: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # sfdisk stops at 60 partitions, so lower the bound rather than build 129 logicals.
    monkeypatch.setattr(mbr_module, "MAX_LOGICAL", 4)
    with pytest.raises(VolumeError, match="more than 4 logical partitions"):
        volumes_of(mbr_image[0])


def test_mbr_partition_past_disk_end(mbr_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    shutil.copyfile(mbr_image[0], path)
    os.truncate(path, 12 * MiB)  # 24576 sectors: partition 3 (10240+4096) still fits
    with pytest.raises(VolumeError) as err:
        volumes_of(path)
    # The extended partition (14336 + 116736 sectors) is the first thing past the end.
    assert "extended partition" in str(err.value) and f"({12 * MiB} bytes)" in str(err.value)


def test_mbr_overlap(tmp_path: Path) -> None:
    need("sfdisk")
    path, other = tmp_path / "a.img", tmp_path / "b.img"
    for p in (path, other):
        with p.open("wb") as fh:
            fh.truncate(16 * MiB)
    sh("sfdisk", "-q", str(path), stdin="label: dos\nstart=2048,size=4096\nstart=8192,size=2048\n")
    sh("sfdisk", "-q", str(other), stdin="label: dos\nstart=4096,size=2048\n")
    # sfdisk refuses to write overlapping partitions: copy B's entry into A's third slot.
    with other.open("rb") as src, path.open("r+b") as dst:
        src.seek(446)
        dst.seek(446 + 32)
        dst.write(src.read(16))
    assert "Partition 1: overlaps partition 3" in sh("sfdisk", "--verify", str(path))
    with pytest.raises(
        VolumeError, match=r"partition 1 \(bytes 1048576\.\.3145727\) and partition 3"
    ):
        volumes_of(path)


# --- no partition table ------------------------------------------------------------------------


@pytest.mark.parametrize("mkfs", ["ext4", "vfat", "ntfs"])
def test_filesystem_on_whole_disk(mkfs: str, tmp_path: Path) -> None:
    """FAT and NTFS boot sectors end in 0x55AA like an MBR, but are not one (blkid agrees)."""
    need("blkid", {"vfat": "mkfs.vfat", "ntfs": "mkfs.ntfs", "ext4": "mke2fs"}[mkfs])
    path = tmp_path / f"{mkfs}.img"
    with path.open("wb") as fh:
        fh.truncate(40 * MiB)
    if mkfs == "ext4":
        sh("mke2fs", "-q", "-F", "-t", "ext4", str(path))
    else:
        if mkfs == "vfat":
            sh("mkfs.vfat", "-F", "32", str(path))
        else:
            sh("mkfs.ntfs", "-q", "-F", "-f", str(path))
        with path.open("rb") as fh:
            fh.seek(510)
            assert fh.read(2) == b"\x55\xaa"
    blkid = sh("blkid", "-p", "-o", "export", str(path))
    assert f"TYPE={mkfs}" in blkid and "PTTYPE" not in blkid
    with opened(path) as disk, path.open("rb") as fh:
        (vol,) = find_volumes(disk)
        vol.stream.seek(1024)
        fh.seek(1024)
        assert vol.stream.read(4096) == fh.read(4096)
    assert (vol.name, vol.number, vol.offset, vol.size, vol.scheme) == (
        "sda", 0, 0, 40 * MiB, "none",
    )  # fmt: skip
    assert vol.partuuid is None and vol.type == ""


# --- GPT ---------------------------------------------------------------------------------------

SGDISK_ARGS = [
    "-n1:2048:+2M", "-t1:ef00", "-c1:EFI System",
    "-n2:0:+4M", "-t2:8300", "-c2:root",
    "-n3:0:+1M", "-t3:8200", "-c3:swap",
    "-n4:0:+3M", "-t4:8e00", "-c4:données",
    "-n6:0:+2M", "-t6:8302", "-c6:",
]  # fmt: skip


@pytest.fixture(scope="session")
def gpt_image(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[int, tuple[bytes, bytes]]]:
    """GPT with entries 1-4 and 6 (slot 5 empty), written by sgdisk."""
    need("sgdisk", "sfdisk", "partx")
    path = tmp_path_factory.mktemp("gpt") / "gpt.img"
    with path.open("wb") as fh:
        fh.truncate(32 * MiB)
    sh("sgdisk", *SGDISK_ARGS, str(path))
    parts = [(p["start"], p["size"]) for p in sfdisk_parts(path)]
    return path, stamp(path, parts)  # type: ignore[arg-type]


def sgdisk_info(path: Path, number: int) -> dict[str, str]:
    out = sh("sgdisk", "-i", str(number), str(path))
    info = dict(re.findall(r"^([^:\n]+): (.*)$", out, re.MULTILINE))
    return {
        "type": info["Partition GUID code"].split()[0].lower(),
        "guid": info["Partition unique GUID"].lower(),
        "first": info["First sector"].split()[0],
        "last": info["Last sector"].split()[0],
        "name": info["Partition name"].strip("'"),
    }


def test_gpt_matches_sgdisk(gpt_image: tuple[Path, dict[int, tuple[bytes, bytes]]]) -> None:
    path, marks = gpt_image
    with opened(path) as disk:
        vols = find_volumes(disk)
        for v in vols:
            assert_window(v, *marks[v.offset // 512])
    assert [v.number for v in vols] == [1, 2, 3, 4, 6]
    assert [v.name for v in vols] == ["sda1", "sda2", "sda3", "sda4", "sda6"]
    uuids = partx_uuids(path)
    for v in vols:
        info = sgdisk_info(path, v.number)
        assert v.offset == int(info["first"]) * 512
        assert v.size == (int(info["last"]) - int(info["first"]) + 1) * 512
        assert (v.type, v.partuuid, v.partlabel) == (
            info["type"],
            info["guid"],
            info["name"] or None,
        )
        assert v.partuuid == uuids[v.number]
        assert v.scheme == "gpt" and "gpt_header" not in v.extra
    assert vols[3].partlabel == "données"
    assert vols[0].type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


def test_dissect_gap_gpt_one_sector_short(gpt_image: tuple[Path, object]) -> None:
    path, _ = gpt_image
    with path.open("rb") as fh:
        theirs = {p.number: p.size for p in Disk(fh).partitions}
    for v in volumes_of(path):
        assert theirs[v.number] == v.size - 512  # sgdisk's size is ours, dissect's is a sector less


def test_hybrid_mbr_gpt_wins(gpt_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "hybrid.img"
    shutil.copyfile(gpt_image[0], path)
    sh("sgdisk", "-h", "2:3", str(path))  # MBR: 0xEE + partitions 2 and 3
    assert str(sfdisk_parts(path)[0]["node"]).endswith("1")
    mbr = sh("sgdisk", "-O", str(path))  # --print-mbr
    assert re.search(r"primary\s+0xEE", mbr) and re.search(r"primary\s+0x83", mbr)
    with path.open("rb") as fh:
        dissect_numbers = [p.number for p in Disk(fh).partitions]
    assert len(dissect_numbers) > 5  # unpatched: the MBR's copies are listed too
    assert [(v.number, v.offset, v.size) for v in volumes_of(path)] == [
        (v.number, v.offset, v.size) for v in volumes_of(gpt_image[0])
    ]


def test_gpt_primary_header_corrupt_uses_backup(
    gpt_image: tuple[Path, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "noprimary.img"
    shutil.copyfile(gpt_image[0], path)
    with path.open("r+b") as fh:
        fh.seek(512)
        fh.write(b"\0" * 512)  # LBA 1: the primary header
    with path.open("rb") as fh, pytest.raises(Exception):  # noqa: B017 - unpatched: no fallback
        Disk(fh)
    oracle = sfdisk_parts(path)  # libfdisk reads the backup too
    with caplog.at_level(logging.WARNING, logger="ova2img.volumes"):
        vols = volumes_of(path)
    assert "using the backup GPT" in caplog.text
    assert [(v.number, v.offset, v.size) for v in vols] == [
        (p["number"], p["start"] * 512, p["size"] * 512)  # type: ignore[operator]
        for p in oracle
    ]
    assert all(v.extra["gpt_header"] == "backup" for v in vols)


def test_gpt_both_headers_corrupt(gpt_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "noheaders.img"
    shutil.copyfile(gpt_image[0], path)
    with path.open("r+b") as fh:
        fh.seek(512 + 0x10)
        fh.write(b"\xff")  # header CRC no longer matches
        fh.seek(-512, os.SEEK_END)
        fh.write(b"\0" * 512)
    with pytest.raises(
        VolumeError, match=r"no valid GPT: primary: header CRC .*; backup: no 'EFI PART'"
    ):
        volumes_of(path)


def test_gpt_disk_truncated(gpt_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "trunc.img"
    shutil.copyfile(gpt_image[0], path)
    os.truncate(path, 8 * MiB)
    with pytest.raises(VolumeError, match=r"last usable LBA .* past the disk's last LBA 16383"):
        volumes_of(path)


def _rewrite_primary_gpt(path: Path, patch_entry: int, first_lba: int) -> None:
    """Move entry *patch_entry*'s first LBA and fix both primary CRCs, as a buggy tool would."""
    with path.open("r+b") as fh:
        fh.seek(512)
        header = bytearray(fh.read(512))
        array_lba, count, esize = struct.unpack_from("<QII", header, 72)
        fh.seek(array_lba * 512)
        array = bytearray(fh.read(count * esize))
        struct.pack_into("<Q", array, (patch_entry - 1) * esize + 32, first_lba)
        struct.pack_into("<I", header, 88, zlib.crc32(array))
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(header[:92]))
        fh.seek(array_lba * 512)
        fh.write(array)
        fh.seek(512)
        fh.write(header)


def test_gpt_overlap(gpt_image: tuple[Path, object], tmp_path: Path) -> None:
    path = tmp_path / "overlap.img"
    shutil.copyfile(gpt_image[0], path)
    start2 = int(sgdisk_info(path, 2)["first"])
    _rewrite_primary_gpt(path, 2, start2 - 1024)  # into partition 1
    assert re.search(r"[Pp]artitions? .*overlap", sh("sgdisk", "-v", str(path)))
    with pytest.raises(VolumeError, match=r"partition 1 .* and partition 2 .* overlap in the GPT"):
        volumes_of(path)
