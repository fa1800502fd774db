"""One named test per class of damage: the exact error class and a message naming the object.

Inputs are real images (tests/robustness/corpus.py) damaged by a crafted patch or by
``debugfs -w``; each is converted in-process through the public API.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from robustness.corpus import Base, Mutation, build_bases

import ova2img
from ova2img.errors import (
    AssemblyError,
    DiskError,
    FilesystemError,
    Ova2imgError,
    SourceError,
    VolumeError,
)

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs e2fsprogs")


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Base]]:
    yield build_bases(tmp_path_factory.mktemp("corpus"), heavy=False)


def _convert(bases: dict[str, Base], base: str, crafted: str, tmp_path: Path, **kw: bool) -> Path:
    c = next(c for c in bases[base].crafted if c.name == crafted)
    src = Mutation(base, "crafted", c.name, c.patches, c.truncate, c.derived).apply(bases, tmp_path)
    out = tmp_path / "out.tar"
    try:
        ova2img.convert(str(src), str(out), **kw)
        return out
    finally:
        assert not out.exists() or out.stat().st_size > 0
        left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
        assert left == []


@pytest.mark.parametrize(
    ("base", "crafted", "exc", "message"),
    [
        ("demo", "ova truncated mid-vmdk", SourceError, r"member 'demo-disk1\.vmdk' is truncated"),
        ("demo", "tar size octal max demo.ovf", SourceError, r"member 'demo\.ovf' is truncated"),
        (
            "demo",
            "tar size base-256 2^62 demo-disk1.vmdk",
            SourceError,
            r"truncated: 4611686018427387904 bytes",
        ),
        ("demo", "tar name dotdot demo.ovf", SourceError, r"escapes the source with '\.\.'"),
        ("demo", "tar name absolute demo.ovf", SourceError, r"absolute file name"),
        ("demo", "tar bad checksum demo.ovf", SourceError, r"not a readable tar archive"),
        ("demo", "vmdk capacity 2^62", SourceError, r"SHA256 digest mismatch"),
        ("mbr-raw", "mbr overlapping partitions", VolumeError, r"overlap in the MBR"),
        ("mbr-raw", "mbr partition size huge", VolumeError, r"extends past the end of the disk"),
        (
            "mbr-raw",
            "mbr extended points at itself",
            VolumeError,
            r"outside its extended partition",
        ),
        ("mbr-raw", "ext directory loop", FilesystemError, r"directory loop: /a/b/c/loop"),
        (
            "mbr-raw",
            "ext directory points at root",
            FilesystemError,
            r"directory loop: /var/lib/many/up",
        ),
        ("mbr-raw", "ext inodes per group 0", FilesystemError, r"invalid ext superblock"),
        ("mbr-raw", "ext inode size 65535", FilesystemError, r"inode size 65535 out of range"),
        # a superblock claiming more than the volume holds, refused before anything is sized
        # from it (ext4_fill_super's "bad geometry" checks)
        (
            "mbr-raw",
            "ext first data block huge",
            FilesystemError,
            r"sda1: first data block 4000000000 is beyond the end of the filesystem "
            r"\(6144 blocks\)",
        ),
        (
            "mbr-raw",
            "ext blocks count huge",
            FilesystemError,
            r"sda1: block count 1099511627775 \(\d+ bytes\) exceeds the volume \(7340032 bytes\)",
        ),
        (
            "mbr-raw",
            "ext inodes count huge",
            FilesystemError,
            r"sda1: inodes count 4294967295 is not 1 groups of 1536 inodes",
        ),
        (
            "mbr-raw",
            "ext log block size 20",
            FilesystemError,
            r"sda1: invalid log block size 20 \(2\^30-byte blocks; at most 64 KiB\)",
        ),
        (
            "mbr-raw",
            "ext log block size 20 (raw)",
            FilesystemError,
            r"sda1: invalid log block size 20",
        ),
        (
            "mbr-raw",
            "ext desc size huge",
            FilesystemError,
            r"sda1: group descriptor size 65535 is invalid",
        ),
        (
            "mbr-raw",
            "ext extent length huge",
            FilesystemError,
            r"sda1: inode \d+: extent at block \d+\+32767 outside the volume",
        ),
        (
            "mbr-raw",
            "ext group desc inode table beyond fs",
            FilesystemError,
            r"sda1: inode 2: group 0's inode table at block 4000000000 is outside the "
            r"filesystem \(blocks 1\.\.6143\)",
        ),
        (
            "mbr-raw",
            "ext dirent name with slash",
            FilesystemError,
            r"directory /etc \(inode \d+ on sda1\) has an invalid entry name b'host/ame'",
        ),
        (
            "mbr-raw",
            "ext root not a directory",
            FilesystemError,
            r"the root directory \(inode 2 on sda1\) is not a directory",
        ),
        (
            "mbr-raw",
            "ext symlink loop fstab",
            AssemblyError,
            r"/etc/fstab of the root filesystem cannot be read: too many levels of symbolic "
            r"links .*--no-fstab",
        ),
        ("mbr-raw", "ext superblock magic bad", AssemblyError, r"no Linux filesystem found"),
    ],
)
def test_damage_class(
    bases: dict[str, Base],
    base: str,
    crafted: str,
    exc: type[Ova2imgError],
    message: str,
    tmp_path: Path,
) -> None:
    with pytest.raises(exc, match=message) as info:
        _convert(bases, base, crafted, tmp_path)
    assert "\n" not in str(info.value)
    assert type(info.value) is exc


@pytest.mark.parametrize(
    ("base", "crafted"),
    [
        ("gpt-raw", "gpt crc bad both copies"),
        ("gpt-raw", "gpt entry count 2^32-1"),
        ("gpt-raw", "gpt entry size 2^31"),
        ("gpt-raw", "gpt partition beyond disk"),
        ("gpt-raw", "gpt overlapping partitions"),
        ("qcow2", "qcow2 l1 size 2^31"),
        ("qcow2", "qcow2 L2 table beyond EOF"),
        ("qcow2", "qcow2 cluster bits 63"),
        ("ext-ova", "vmdk grain size 2^40"),
    ],
)
def test_damage_fails_as_ours(
    bases: dict[str, Base], base: str, crafted: str, tmp_path: Path
) -> None:
    """Whatever the layer decides, only an Ova2imgError with a one-line message escapes."""
    try:
        _convert(bases, base, crafted, tmp_path)
    except Ova2imgError as err:
        assert "\n" not in str(err)
        assert "Error:" not in str(err)  # no Python exception name in the message


def test_damage_vmdk_grain_table_beyond_eof(bases: dict[str, Base], tmp_path: Path) -> None:
    """A grain directory entry sending grain table 0 past the end of the VMDK (the manifest
    check is off, or it would catch the change first)."""
    with pytest.raises(DiskError) as info:
        _convert(bases, "ext-ova", "vmdk grain table beyond EOF", tmp_path, verify_manifest=False)
    assert type(info.value) is DiskError
    assert str(info.value).startswith(
        "disk: fuzzova-disk1.vmdk: grain table 0 at sector 1073741824 lies beyond the end of "
        "the file"
    )


def test_damage_dirent_named_dotdot(bases: dict[str, Base], tmp_path: Path) -> None:
    """A directory entry renamed ``..`` (not the real parent link): like the kernel's readdir
    consumers (tar, ls) ova2img never treats a ``.``/``..`` name as an entry, so the file it
    pointed at is not in the output and nothing escapes the image root."""
    import tarfile

    out = _convert(bases, "mbr-raw", "ext dirent name dotdot", tmp_path)
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "./etc/os-release" in names
    assert "./etc/hostname" not in names
    assert not [n for n in names if n.startswith("/") or ".." in n.split("/")]


@pytest.fixture(scope="module")
def btrfs_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A single-device btrfs (``mkfs.btrfs -m single``): the image, and the physical offsets
    of its root tree's and chunk tree's root blocks (``dump-super``, ``btrfs-map-logical``)."""
    import subprocess

    img = tmp_path_factory.mktemp("btrfs") / "fs.btrfs"
    with img.open("wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-m", "single", img], check=True, capture_output=True)
    sb = subprocess.run(
        ["btrfs", "inspect-internal", "dump-super", img], check=True, capture_output=True, text=True
    ).stdout

    def physical(field: str) -> int:
        logical = re.search(rf"^{field}\s+(\d+)$", sb, re.M).group(1)  # type: ignore[union-attr]
        out = subprocess.run(
            ["btrfs-map-logical", "-l", logical, img], check=True, capture_output=True, text=True
        ).stdout
        return int(re.search(r"physical (\d+)", out).group(1))  # type: ignore[union-attr]

    return img, physical("root"), physical("chunk_root")


@pytest.mark.parametrize(
    ("which", "field", "value", "message"),
    [
        # dissect's B-tree search never ends on a node without items (a fuzz finding)
        ("root", 0x60, b"\0\0\0\0", r"tree block 0x[0-9a-f]+ holds 0 items"),
        ("chunk", 0x60, b"\0\0\0\0", r"tree block 0x[0-9a-f]+ holds 0 items"),
        # the kernel's "bad tree block start": a block that does not name its own address
        ("root", 0x30, bytes(8), r"tree block 0x[0-9a-f]+ has a foreign header \(bytenr 0x0"),
    ],
    ids=["root-tree-no-items", "chunk-tree-no-items", "root-tree-foreign-block"],
)
def test_damage_btrfs_tree_blocks(
    btrfs_image: tuple[Path, int, int],
    tmp_path: Path,
    which: str,
    field: int,
    value: bytes,
    message: str,
) -> None:
    """Run in a limited child process: before the fix these inputs never finished."""
    from robustness.harness import run_subprocess

    img, root_at, chunk_at = btrfs_image
    src = tmp_path / "in" / "fs.btrfs"
    src.parent.mkdir()
    shutil.copyfile(img, src)
    with src.open("r+b") as f:
        f.seek((root_at if which == "root" else chunk_at) + field)
        f.write(value)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    o = run_subprocess(which, src, out_dir)
    assert not o.timed_out and o.seconds < 5, o.seconds
    assert o.rc == 1, o.stderr
    assert o.problems == []
    assert re.fullmatch(
        r"ova2img: error: filesystem: sda: invalid chunk or root tree: "
        + message
        + r".*\(at offset 0x10000\)\n",
        o.stderr,
    ), o.stderr
