"""probe() against ``blkid -p -o value -s TYPE`` on images made by the real tools, and
open_filesystem()'s refusals."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ova2img.disks.base import VirtualDisk
from ova2img.errors import UnsupportedError
from ova2img.filesystems import Filesystem, open_filesystem, probe
from ova2img.volumes import find_volumes

MiB = 1 << 20
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def sh(*cmd: str, stdin: str | None = None) -> str:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False, env=LVM_ENV)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


def blkid_type(path: Path, offset: int = 0) -> str:
    """What libblkid's low-level probe says (``unknown`` when it finds nothing)."""
    res = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "value", "-s", "TYPE", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return res.stdout.strip() or "unknown"


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


@contextlib.contextmanager
def loop(path: Path) -> Iterator[str]:
    dev = sh("losetup", "--find", "--show", str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _pvcreate(path: Path) -> None:
    with loop(path) as dev:
        sh("pvcreate", "-q", "-ff", "-y", dev)


def _luks(path: Path, kind: str) -> None:
    sh(
        "cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", str(path), stdin="secret",
    )  # fmt: skip


def _lvm_bad_crc(path: Path) -> None:
    _pvcreate(path)
    with path.open("r+b") as fh:  # a byte of the PV header, covered by the label CRC
        fh.seek(512 + 100)
        fh.write(b"X")


def _xfs_bad_geometry(path: Path) -> None:
    sh("mkfs.xfs", "-q", str(path))
    with path.open("r+b") as fh:  # sb_blocklog no longer matches sb_blocksize
        fh.seek(120)
        fh.write(b"\x00")


def _squashfs(path: Path) -> None:
    src = path.parent / "sqsrc"
    src.mkdir()
    (src / "hello").write_text("hi\n")
    sh("mksquashfs", str(src), str(path), "-quiet", "-noappend")


def _iso(path: Path) -> None:
    src = path.parent / "isosrc"
    src.mkdir()
    (src / "hello").write_text("hi\n")
    sh("genisoimage", "-quiet", "-o", str(path), str(src))


Builder = Callable[[Path], None]


def cmd(*args: str) -> Builder:
    """A builder running ``args... IMAGE``."""

    def build(path: Path) -> None:
        sh(*args, str(path))

    return build


# name → (size, tools, builder, expected probe result, needs root)
CASES: dict[str, tuple[int, tuple[str, ...], Builder, str, bool]] = {
    "ext2": (8 * MiB, ("mke2fs",), cmd("mke2fs", "-q", "-F", "-t", "ext2"), "ext2", False),
    "ext3": (8 * MiB, ("mke2fs",), cmd("mke2fs", "-q", "-F", "-t", "ext3"), "ext3", False),
    "ext4": (8 * MiB, ("mke2fs",), cmd("mke2fs", "-q", "-F", "-t", "ext4"), "ext4", False),
    "ext4-nojournal": (
        8 * MiB,
        ("mke2fs",),
        cmd("mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal"),
        "ext4",
        False,
    ),
    "jbd": (
        8 * MiB,
        ("mke2fs",),
        cmd("mke2fs", "-q", "-F", "-b", "4096", "-O", "journal_dev"),
        "jbd",
        False,
    ),
    "xfs": (300 * MiB, ("mkfs.xfs",), cmd("mkfs.xfs", "-q"), "xfs", False),
    "xfs-bad-geometry": (300 * MiB, ("mkfs.xfs",), _xfs_bad_geometry, "unknown", False),
    "btrfs": (120 * MiB, ("mkfs.btrfs",), cmd("mkfs.btrfs", "-q"), "btrfs", False),
    "vfat12": (8 * MiB, ("mkfs.vfat",), cmd("mkfs.vfat", "-F", "12"), "vfat", False),
    "vfat16": (20 * MiB, ("mkfs.vfat",), cmd("mkfs.vfat", "-F", "16"), "vfat", False),
    "vfat32": (40 * MiB, ("mkfs.vfat",), cmd("mkfs.vfat", "-F", "32"), "vfat", False),
    "swap": (8 * MiB, ("mkswap",), cmd("mkswap", "-q"), "swap", False),
    "swap-16k": (8 * MiB, ("mkswap",), cmd("mkswap", "-q", "-p", "16384"), "swap", False),
    "swap-64k": (8 * MiB, ("mkswap",), cmd("mkswap", "-q", "-p", "65536"), "swap", False),
    "lvm2": (8 * MiB, ("pvcreate", "losetup"), _pvcreate, "LVM2_member", True),
    "lvm2-bad-crc": (8 * MiB, ("pvcreate", "losetup"), _lvm_bad_crc, "unknown", True),
    "luks2": (20 * MiB, ("cryptsetup",), lambda p: _luks(p, "luks2"), "crypto_LUKS", False),
    "luks1": (20 * MiB, ("cryptsetup",), lambda p: _luks(p, "luks1"), "crypto_LUKS", False),
    "ntfs": (8 * MiB, ("mkfs.ntfs",), cmd("mkfs.ntfs", "-q", "-F", "-f"), "ntfs", False),
    "squashfs": (0, ("mksquashfs",), _squashfs, "squashfs", False),
    "iso9660": (0, ("genisoimage",), _iso, "iso9660", False),
    "zeros": (8 * MiB, (), lambda p: None, "unknown", False),
}


@pytest.fixture(scope="session")
def probe_images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build each case's image once per session, on demand."""
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            size, _, build, _, _ = CASES[case]
            path = tmp_path_factory.mktemp(case) / f"{case}.img"
            if size:
                sparse(path, size)
            build(path)
            built[case] = path
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_probe_matches_blkid(
    case: str, probe_images: Callable[[str], Path], request: pytest.FixtureRequest
) -> None:
    _, tools, _, expected, root = CASES[case]
    for tool in ("blkid", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if root:
        request.getfixturevalue("require_root")
    path = probe_images(case)
    with path.open("rb") as fh:
        ours = probe(fh)
    assert ours == blkid_type(path)
    assert ours == expected


def test_probe_through_a_partition(tmp_path: Path) -> None:
    """probe() on a Volume's stream: ext4 made at an offset inside a GPT partition."""
    for tool in ("sgdisk", "mke2fs", "mkswap", "blkid"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    path = sparse(tmp_path / "disk.img", 32 * MiB)
    sh("sgdisk", "-n1:2048:+8M", "-n2:0:+4M", str(path))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={MiB}", str(path), "8M")
    with path.open("rb") as fh:
        disk = VirtualDisk(name="disk.img", format="raw", subformat="", size=32 * MiB, stream=fh)
        kinds = {v.name: probe(v.stream) for v in find_volumes(disk)}
    assert kinds == {"sda1": blkid_type(path, MiB), "sda2": "unknown"}
    assert kinds["sda1"] == "ext4"


def test_open_ext4(probe_images: Callable[[str], Path]) -> None:
    if shutil.which("mke2fs") is None:
        pytest.skip("mke2fs is not installed")
    with probe_images("ext4").open("rb") as fh:
        fs = open_filesystem(fh, "ext4", name="sda1")
        try:
            assert isinstance(fs, Filesystem)
        finally:
            fs.close()


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("crypto_LUKS", ("LUKS encryption", "decrypt the disk first")),
        ("BitLocker", ("BitLocker", "decrypt")),
        ("linux_raid_member", ("md-raid",)),
        ("zfs_member", ("ZFS",)),
        ("ntfs", ("ntfs",)),
        ("swap", ("swap", "not a filesystem")),
        ("LVM2_member", ("LVM2_member", "not a filesystem")),
        ("unknown", ("no filesystem signature",)),
    ],
)
def test_open_refuses(kind: str, words: tuple[str, ...]) -> None:
    with pytest.raises(UnsupportedError) as err:
        open_filesystem(io.BytesIO(), kind, name="sda2")
    message = str(err.value)
    assert message.startswith("unsupported: sda2 ")
    assert "\n" not in message
    for word in words:
        assert word in message
