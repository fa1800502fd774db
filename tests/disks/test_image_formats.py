"""qcow2, VHD, VHDX, VDI and raw images detected by content and decoded byte for byte.

The oracle is ``qemu-img convert -f FMT -O raw`` of the very same file (``-f`` because qemu-img
probes a fixed VHD as raw: it has no header at its start).
"""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest
from dissect.hypervisor.disk import vdi as dissect_vdi
from dissect.hypervisor.disk.c_vdi import c_vdi

from ova2img.disks import open_disk
from ova2img.disks.base import VirtualDisk
from ova2img.errors import DiskError, SourceError, UnsupportedError
from ova2img.sources import open_source

DISK_SIZE = 5 * 2**20 + 3 * 512
MiB = 2**20


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def qemu_raw(image: Path, fmt: str, out: Path) -> bytes:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, out)
    return out.read_bytes()


def read_disk(path: Path, **options: bool) -> tuple[VirtualDisk, bytes]:
    with open_source([str(path)], **options) as src:
        disk = open_disk(src.disks[0])
        return disk, disk.stream.read()


@pytest.fixture(scope="session")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("formats")
    path = d / "disk.raw"
    rnd = random.Random(7)
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
        for i in range(24):
            f.seek(rnd.randrange(0, DISK_SIZE - 70_000))
            f.write(rnd.randbytes(rnd.randrange(1, 70_000)) if i % 2 else b"compressible " * 4000)
    return path


CASES = [
    # (qemu format, qemu-img convert options, our format, our subformat)
    ("qcow2", ["-c"], "qcow2", ""),
    ("qcow2", ["-c", "-o", "compression_type=zstd"], "qcow2", ""),
    ("qcow2", ["-o", "cluster_size=4096"], "qcow2", ""),
    ("vpc", ["-o", "subformat=fixed"], "vhd", "fixed"),
    ("vpc", ["-o", "subformat=dynamic"], "vhd", "dynamic"),
    ("vhdx", [], "vhdx", "dynamic"),
    ("vdi", [], "vdi", "dynamic"),
    ("vdi", ["-o", "static=on"], "vdi", "fixed"),
    ("raw", [], "raw", ""),
]


@pytest.mark.parametrize(("qfmt", "opts", "fmt", "subformat"), CASES)
def test_format_decodes_like_qemu(
    qfmt: str, opts: list[str], fmt: str, subformat: str, raw: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"  # the name says nothing: detection is by content
    run("qemu-img", "convert", "-f", "raw", "-O", qfmt, *opts, raw, image)
    expected = qemu_raw(image, qfmt, tmp_path / "ref.raw")
    disk, data = read_disk(image)
    assert (disk.format, disk.subformat) == (fmt, subformat)
    assert disk.size == len(expected)
    assert data == expected
    assert expected[: len(raw.read_bytes())].rstrip(b"\0") == raw.read_bytes().rstrip(b"\0")


def test_vdi_blocks_out_of_order(tmp_path: Path) -> None:
    """dissect reads a multi-block VDI request from the first block's place: wrong data."""
    image = tmp_path / "order.vdi"
    run("qemu-img", "create", "-f", "vdi", image, "4M")
    run(
        "qemu-io",
        "-c", "write -P 0x22 2M 1M",
        "-c", "write -P 0x11 0 1M",
        "-c", "write -P 0x33 1M 1M",
        image,
    )  # fmt: skip
    expected = qemu_raw(image, "vdi", tmp_path / "ref.raw")
    with image.open("rb") as fh:
        gap = dissect_vdi.VDI(fh).open().read()
    assert gap != expected  # the unpatched library is wrong
    _, data = read_disk(image)
    assert data == expected
    assert [data[i * MiB] for i in range(4)] == [0x11, 0x33, 0x22, 0]


@pytest.fixture
def chain(raw: Path, tmp_path: Path) -> Path:
    """base.qcow2 (compressed) ← mid.qcow2 (larger than its base) ← top.qcow2, by qemu-io."""
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, tmp_path / "base.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        tmp_path / "mid.qcow2", "7M")  # fmt: skip
    run("qemu-io", "-c", "write -P 0x55 1M 300k", "-c", "write -z 64k 64k",
        "-c", "write -P 0x66 6M 4k", tmp_path / "mid.qcow2")  # fmt: skip
    sub = tmp_path / "snap"
    sub.mkdir()
    run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        tmp_path / "top.qcow2")  # fmt: skip
    run("qemu-io", "-c", "write -P 0x77 3M 5k", tmp_path / "top.qcow2")
    return tmp_path / "top.qcow2"


def test_qcow2_backing_chain(chain: Path, tmp_path: Path) -> None:
    expected = qemu_raw(chain, "qcow2", tmp_path / "ref.raw")
    disk, data = read_disk(chain)
    assert disk.size == 7 * MiB == len(expected)
    assert data == expected
    # past the end of the 5 MiB base: zeros, as qemu reads them
    assert data[DISK_SIZE : 6 * MiB] == bytes(6 * MiB - DISK_SIZE)
    assert data[6 * MiB : 6 * MiB + 4096] == b"\x66" * 4096
    assert data[3 * MiB : 3 * MiB + 5120] == b"\x77" * 5120


def test_qcow2_raw_backing(raw: Path, tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(raw.read_bytes())
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.img", "-F", "raw", top)
    run("qemu-io", "-c", "write -P 0x42 100k 8k", top)
    _, data = read_disk(top)
    assert data == qemu_raw(top, "qcow2", tmp_path / "ref.raw")


def test_qcow2_external_backing_refused_unless_allowed(raw: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "vm"
    outside.mkdir()
    inside.mkdir()
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, outside / "base.qcow2")
    for backing in [str(outside / "base.qcow2"), "../outside/base.qcow2"]:
        top = inside / "top.qcow2"
        top.unlink(missing_ok=True)
        run("qemu-img", "create", "-f", "qcow2", "-b", backing, "-F", "qcow2", top)
        run("qemu-io", "-c", "write -P 0x42 100k 8k", top)
        with open_source([str(top)]) as src, pytest.raises(SourceError, match="refused"):
            open_disk(src.disks[0])
        _, data = read_disk(top, allow_external=True)
        assert data == qemu_raw(top, "qcow2", tmp_path / "ref.raw")


def test_qcow2_missing_backing_is_an_error(chain: Path) -> None:
    (chain.parent / "base.qcow2").unlink()
    with open_source([str(chain)]) as src, pytest.raises(SourceError, match=r"base\.qcow2"):
        open_disk(src.disks[0])


def test_qcow2_subclusters_refused(raw: Path, tmp_path: Path) -> None:
    # dissect loops without end (and eats memory) on extended L2 entries: refused up front.
    image = tmp_path / "x.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on", raw, image)
    with open_source([str(image)]) as src, pytest.raises(UnsupportedError, match="subclusters"):
        open_disk(src.disks[0])


def patched(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("qfmt", "offset", "fmt", "value", "message"),
    [
        ("qcow2", 36, ">I", 0x7FFFFFFF, "L1 table"),  # l1_size
        ("qcow2", 24, ">Q", 2**60, "absurd"),  # virtual size
        ("qcow2", 20, ">I", 30, "cluster size"),
        ("vdi", 0x48 + c_vdi.VDIHEADER1PLUS.fields["cBlocks"].offset, "<I", 2**27, "block map"),
    ],
)
def test_header_checked_against_file_size(
    qfmt: str, offset: int, fmt: str, value: int, message: str, raw: Path, tmp_path: Path
) -> None:
    image = tmp_path / "good"
    run("qemu-img", "convert", "-f", "raw", "-O", qfmt, raw, image)
    bad = patched(image, tmp_path / "bad", offset, fmt, value)
    with open_source([str(bad)]) as src, pytest.raises(DiskError, match=message):
        open_disk(src.disks[0])


def test_truncated_images_are_errors(raw: Path, tmp_path: Path) -> None:
    for qfmt, opts in [("vpc", []), ("qcow2", []), ("vdi", []), ("vhdx", [])]:
        image = tmp_path / f"t.{qfmt}"
        run("qemu-img", "convert", "-f", "raw", "-O", qfmt, *opts, raw, image)
        data = image.read_bytes()
        image.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(DiskError), open_source([str(image)]) as src:
            open_disk(src.disks[0]).stream.read()
