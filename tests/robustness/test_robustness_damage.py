"""One named test per class of damage: the exact error class and a message naming the object.

Inputs are real images (tests/robustness/corpus.py) damaged by a crafted patch or by
``debugfs -w``; each is converted in-process through the public API.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from robustness.corpus import Base, Mutation, build_bases

import ova2img
from ova2img.errors import FilesystemError, Ova2imgError, SourceError, VolumeError

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs e2fsprogs")


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Base]]:
    yield build_bases(tmp_path_factory.mktemp("corpus"), heavy=False)


def _convert(bases: dict[str, Base], base: str, crafted: str, tmp_path: Path) -> None:
    c = next(c for c in bases[base].crafted if c.name == crafted)
    src = Mutation(base, "crafted", c.name, c.patches, c.truncate, c.derived).apply(bases, tmp_path)
    out = tmp_path / "out.tar"
    try:
        ova2img.convert(str(src), str(out))
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
        ("mbr-raw", "ext superblock magic bad"),
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
