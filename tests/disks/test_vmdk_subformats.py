"""Every VMDK subformat qemu-img (and VMDKstream) writes, decoded byte for byte.

The oracle is ``qemu-img convert -O raw`` of the very same file.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ova2img.disks import VirtualDisk, open_disk
from ova2img.disks.vmdk import GRAIN_CACHE_GRAINS
from ova2img.errors import DiskError, SourceError, UnsupportedError
from ova2img.sources import open_source

# 5 MiB + 3 sectors: not a multiple of the grain (64 KiB) nor of dissect's 8 KiB read block.
DISK_SIZE = 5 * 2**20 + 3 * 512
DATA_OFFSETS = [0, 70_000, 2**20 - 700, 3 * 2**20 + 123, DISK_SIZE - 1500]
VMDKSTREAM = Path("/usr/lib/python3/dist-packages/VMDKstream.py")

SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def make_raw(path: Path, size: int, offsets: list[int], seed: int = 1) -> None:
    """A raw image of zeros with 1500 random bytes at each offset."""
    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(rnd.randbytes(min(1500, size - off)))


def vmdkstream(raw: Path, out: Path) -> None:
    """streamOptimized with the grain directory at the end and a footer (as VMware writes it)."""
    if not VMDKSTREAM.exists():
        pytest.skip("needs Debian's python3-vmdkstream (apt-get install python3-vmdkstream)")
    run("/usr/bin/python3", VMDKSTREAM, raw, out)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vmdk-subformats")
    raw = d / "disk.raw"
    make_raw(raw, DISK_SIZE, DATA_OFFSETS)
    out = {"raw": raw}
    for sub in SUBFORMATS:
        sd = d / sub
        sd.mkdir()
        run("qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={sub}", raw, sd / "disk.vmdk")
        out[sub] = sd / "disk.vmdk"
    zd = d / "zeroed"
    zd.mkdir()
    run("qemu-img", "convert", "-O", "vmdk", "-o", "zeroed_grain=on", raw, zd / "disk.vmdk")
    out["zeroed_grain"] = zd / "disk.vmdk"
    return out


@pytest.fixture(scope="session")
def gd_at_end(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("vmdkstream") / "disk.vmdk"
    vmdkstream(images["raw"], out)
    return out


def oracle(path: Path, tmp: Path) -> bytes:
    ref = tmp / (path.parent.name + "-" + path.stem + ".ref")
    run("qemu-img", "convert", "-O", "raw", path, ref)
    return ref.read_bytes()


def open_one(path: Path) -> Iterator[VirtualDisk]:
    with open_source([str(path)]) as src:
        assert len(src.disks) == 1
        yield open_disk(src.disks[0])


@pytest.mark.parametrize("sub", [*SUBFORMATS, "zeroed_grain"])
def test_subformat_is_byte_identical_to_qemu(
    sub: str, images: dict[str, Path], tmp_path: Path
) -> None:
    expected = oracle(images[sub], tmp_path)
    assert expected == images["raw"].read_bytes()
    for disk in open_one(images[sub]):
        assert disk.format == "vmdk"
        assert disk.subformat == ("monolithicSparse" if sub == "zeroed_grain" else sub)
        assert disk.size == DISK_SIZE
        assert disk.stream.read() == expected
        assert disk.stream.read(10) == b""
        # Unaligned reads anywhere, in pieces smaller and larger than a grain.
        rnd = random.Random(7)
        for _ in range(200):
            off = rnd.randrange(DISK_SIZE)
            n = rnd.choice([1, 511, 513, 4096, 70_000, 200_000])
            disk.stream.seek(off)
            assert disk.stream.read(n) == expected[off : off + n]


def test_qemu_stream_optimized_keeps_the_grain_directory_in_front(images: dict[str, Path]) -> None:
    """qemu-img 7.2 writes the GD offset in the header (no footer), unlike VMware."""
    head = images["streamOptimized"].read_bytes()[:512]
    gd_offset = struct.unpack_from("<Q", head, 0x38)[0]
    assert head[:4] == b"KDMV" and gd_offset not in (0, 2**64 - 1)


def test_stream_optimized_with_footer(
    gd_at_end: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """GD_AT_END in the header: the real header is the footer, two sectors from the end."""
    data = gd_at_end.read_bytes()
    assert struct.unpack_from("<Q", data, 0x38)[0] == 2**64 - 1
    assert data[-1024:-1020] == b"KDMV"
    expected = oracle(gd_at_end, tmp_path)
    assert expected == images["raw"].read_bytes()
    for disk in open_one(gd_at_end):
        assert disk.subformat == "streamOptimized"
        assert disk.size == DISK_SIZE
        assert disk.stream.read() == expected


def test_last_bytes_gap_in_dissect(images: dict[str, Path]) -> None:
    """dissect's VMDK raises IndexError reading the end of a disk not a multiple of 8 KiB."""
    from dissect.hypervisor.disk.vmdk import VMDK

    expected = images["raw"].read_bytes()
    assert DISK_SIZE % 8192 != 0
    with images["monolithicSparse"].open("rb") as fh:
        v = VMDK(fh)
        v.seek(DISK_SIZE - 512)
        with pytest.raises(IndexError):
            v.read(512)
    for disk in open_one(images["monolithicSparse"]):
        disk.stream.seek(DISK_SIZE - 512)
        assert disk.stream.read(512) == expected[-512:]
        disk.stream.seek(DISK_SIZE - 1)
        assert disk.stream.read(4096) == expected[-1:]


def test_grain_cache_inflates_each_grain_once(images: dict[str, Path]) -> None:
    """Small sequential reads: dissect inflates a grain per 8 KiB read; we inflate it once."""
    from dissect.hypervisor.disk.vmdk import VMDK, SparseDisk

    path = images["streamOptimized"]
    calls = 0
    original = SparseDisk._read_compressed_grain

    def counting(self: SparseDisk, sector: int) -> bytes:
        nonlocal calls
        calls += 1
        return original(self, sector)

    with pytest.MonkeyPatch.context() as mp, path.open("rb") as fh:
        mp.setattr(SparseDisk, "_read_compressed_grain", counting)
        v = VMDK(fh)
        for off in range(0, DISK_SIZE - 8192, 4096):
            v.seek(off)
            v.read(4096)
    for disk in open_one(path):
        for off in range(0, DISK_SIZE, 4096):
            disk.stream.seek(off)
            disk.stream.read(4096)
        ours = disk.stream.inflations  # type: ignore[attr-defined]
    # 64 KiB grains holding data (1500 bytes at each offset, some straddling two grains)
    allocated = len({g for off in DATA_OFFSETS for g in (off >> 16, (off + 1499) >> 16)})
    assert ours == allocated
    assert calls >= 6 * allocated  # dissect: one inflation per 8 KiB aligned read
    assert GRAIN_CACHE_GRAINS >= 16


def test_delta_disk_reads_its_parent_through_the_source(tmp_path: Path) -> None:
    base_raw = tmp_path / "base.raw"
    make_raw(base_raw, DISK_SIZE, DATA_OFFSETS)
    run("qemu-img", "convert", "-O", "vmdk", base_raw, tmp_path / "base.vmdk")
    run(
        "qemu-img", "create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", tmp_path / "delta.vmdk"
    )
    run("qemu-io", "-c", "write -P 0x5a 1048000 100000", tmp_path / "delta.vmdk")
    expected = oracle(tmp_path / "delta.vmdk", tmp_path)
    assert expected != base_raw.read_bytes()
    for disk in open_one(tmp_path / "delta.vmdk"):
        assert disk.stream.read() == expected
    # The parent is looked up in the same source only: without it, an error naming it.
    (tmp_path / "base.vmdk").rename(tmp_path / "elsewhere.vmdk")
    with (
        open_source([str(tmp_path / "delta.vmdk")]) as src,
        pytest.raises(SourceError, match=r"base\.vmdk"),
    ):
        open_disk(src.disks[0])


def test_disk_over_2gib_split_in_extents(tmp_path: Path) -> None:
    """twoGbMaxExtent{Sparse,Flat} of a 2 GiB + 5 MiB sparse disk: data across the boundary."""
    size = 2 * 2**30 + 5 * 2**20
    offsets = [4096, 2**31 - 700, 2**31 + 3 * 2**20, size - 1500]
    raw = tmp_path / "big.raw"
    make_raw(raw, size, offsets)
    for sub in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        d = tmp_path / sub
        d.mkdir()
        run("qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={sub}", raw, d / "big.vmdk")
        assert len(list(d.glob("big-*.vmdk"))) == 2
        for disk in open_one(d / "big.vmdk"):
            assert disk.size == size and disk.subformat == sub
            with raw.open("rb") as ref:
                for off in [*offsets, 2**31 - 4096, 2**30]:
                    start = max(0, off - 5000)
                    ref.seek(start)
                    disk.stream.seek(start)
                    assert disk.stream.read(70_000) == ref.read(70_000)


# --- validation: damaged copies of real images ---------------------------------------------


def damaged(src: Path, tmp: Path, patch: dict[int, bytes] | None = None, cut: int = 0) -> Path:
    out = tmp / src.parent.name
    shutil.copytree(src.parent, out)
    path = out / src.name
    data = bytearray(path.read_bytes())
    for off, b in (patch or {}).items():
        data[off : off + len(b)] = b
    if cut:
        del data[-cut:]
    path.write_bytes(bytes(data))
    return path


def read_all(path: Path) -> None:
    for disk in open_one(path):
        while disk.stream.read(2**20):
            pass


def test_absurd_capacity(images: dict[str, Path], tmp_path: Path) -> None:
    path = damaged(images["monolithicSparse"], tmp_path, {0x0C: struct.pack("<Q", 2**60)})
    with pytest.raises(DiskError, match="capacity"):
        read_all(path)


def test_grain_directory_beyond_the_file(images: dict[str, Path], tmp_path: Path) -> None:
    path = damaged(images["monolithicSparse"], tmp_path, {0x38: struct.pack("<Q", 10**9)})
    with pytest.raises(DiskError, match="grain directory"):
        read_all(path)


def test_grain_table_beyond_the_file(images: dict[str, Path], tmp_path: Path) -> None:
    data = images["streamOptimized"].read_bytes()
    gd = struct.unpack_from("<Q", data, 0x38)[0] * 512
    path = damaged(images["streamOptimized"], tmp_path, {gd: struct.pack("<I", 10**8)})
    with pytest.raises(DiskError, match="grain table 0") as err:
        read_all(path)
    assert err.value.offset == 10**8 * 512


def test_corrupt_compressed_grain(images: dict[str, Path], tmp_path: Path) -> None:
    data = images["streamOptimized"].read_bytes()
    gd = struct.unpack_from("<Q", data, 0x38)[0] * 512
    gt = struct.unpack_from("<I", data, gd)[0] * 512
    grain = struct.unpack_from("<I", data, gt)[0] * 512
    path = damaged(images["streamOptimized"], tmp_path, {grain + 12: b"\xff" * 64})
    with pytest.raises(DiskError, match="inflate") as err:
        read_all(path)
    assert err.value.offset == grain


def test_truncated_footer_layout(gd_at_end: Path, tmp_path: Path) -> None:
    path = damaged(gd_at_end, tmp_path, cut=1024)
    with pytest.raises(DiskError, match="footer"):
        read_all(path)


def test_truncated_sparse_extent(images: dict[str, Path], tmp_path: Path) -> None:
    size = images["monolithicSparse"].stat().st_size
    path = damaged(images["monolithicSparse"], tmp_path, cut=size // 2)
    with pytest.raises(DiskError):
        read_all(path)


def test_short_flat_extent(images: dict[str, Path], tmp_path: Path) -> None:
    path = damaged(images["monolithicFlat"], tmp_path)
    flat = path.parent / "disk-flat.vmdk"
    with flat.open("r+b") as f:
        f.truncate(DISK_SIZE - 4096)
    with pytest.raises(DiskError, match=r"disk-flat\.vmdk"):
        read_all(path)


def test_unparsable_extent_line_is_refused(images: dict[str, Path], tmp_path: Path) -> None:
    path = damaged(images["twoGbMaxExtentFlat"], tmp_path)
    text = path.read_text().replace("FLAT", "FLUT")
    path.write_text(text)
    with pytest.raises(DiskError, match="extent line"):
        read_all(path)


@pytest.mark.parametrize(
    ("fmt", "opts", "name"),
    [
        ("qed", [], "QED"),
        ("parallels", [], "Parallels"),
    ],
)
def test_other_formats_are_named_and_refused(
    fmt: str, opts: list[str], name: str, images: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / f"disk.{fmt}"
    run("qemu-img", "convert", "-O", fmt, *opts, images["raw"], out)
    with open_source([str(out)]) as src, pytest.raises(UnsupportedError, match=name) as err:
        open_disk(src.disks[0])
    assert "convert it with qemu-img" in str(err.value)


def test_raw_image(images: dict[str, Path]) -> None:
    for disk in open_one(images["raw"]):
        assert (disk.format, disk.subformat, disk.size) == ("raw", "", DISK_SIZE)
        disk.stream.seek(DATA_OFFSETS[1])
        assert disk.stream.read(1500) == images["raw"].read_bytes()[DATA_OFFSETS[1] :][:1500]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    with open_source([str(tmp_path / "empty.img")]) as src, pytest.raises(DiskError, match="empty"):
        open_disk(src.disks[0])
