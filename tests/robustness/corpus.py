"""A corpus of damaged VM images, derived from real fixtures, for the robustness harness.

Bases are real images: the committed ``fixtures/demo.ova`` and images built here with the real
tools (``mke2fs -d``, ``sfdisk``/``sgdisk``, ``qemu-img``, ``mkfs.xfs -p``, ``mkfs.btrfs
--rootdir``, ``debugfs -w``). Each base comes with its *map*: the byte ranges of its metadata
(tar headers, VMDK header/markers/grain tables/directory, qcow2 header/L1/L2/refcount tables,
partition tables, ext superblock/group descriptors/inode table/directory blocks, XFS and btrfs
metadata blocks) and the boundaries between structures, all found by parsing the file with the
real tools (``dumpe2fs``, ``debugfs``, ``qemu-img map``, ``sfdisk --json``) or with the
documented on-disk layouts. A :class:`Mutation` is a small, reproducible description (a seed,
a list of byte patches, an optional truncation) applied to a copy of its base.

Mutations never touch file data: a flipped bit in a file's content is harmless by design.

Filesystem bases are wrapped in qcow2 (uncompressed: guest bytes sit verbatim in the file, at
the offsets ``qemu-img map`` reports), so a 300 MiB XFS costs a few hundred KiB per mutated copy.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
#: The largest damaged input :meth:`Mutation.apply` writes (the bases are a few MiB).
MAX_INPUT = 512 * MiB
REPO = Path(__file__).resolve().parents[2]
DEMO_OVA = REPO / "fixtures" / "demo.ova"


# --------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class Region:
    """A metadata byte range ``[start, end)`` of a base file."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Crafted:
    """A named, hand-aimed damage: patches at offsets of the base (or a derived base file)."""

    name: str
    patches: tuple[tuple[int, bytes], ...] = ()
    truncate: int | None = None
    derived: Path | None = None  # a base variant made by a real tool (debugfs -w)


@dataclass
class Base:
    """One real image and the map of its structures."""

    name: str
    path: Path
    suffix: str
    regions: list[Region] = field(default_factory=list)
    boundaries: list[tuple[str, int]] = field(default_factory=list)
    crafted: list[Crafted] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class Mutation:
    """One damaged input: ``base`` with ``patches`` applied, then cut at ``truncate``."""

    base: str
    kind: str  # truncate | bitflip | overwrite | crafted
    desc: str
    patches: tuple[tuple[int, bytes], ...] = ()
    truncate: int | None = None
    source: Path | None = None  # a derived base file, when not the base itself

    @property
    def ident(self) -> str:
        return f"{self.base}:{self.kind}:{self.desc}"

    def apply(self, bases: dict[str, Base], out_dir: Path) -> Path:
        """Write the damaged file into ``out_dir``; return its path."""
        base = bases[self.base]
        src = self.source or base.path
        out = out_dir / f"input{base.suffix}"
        size = src.stat().st_size
        if size > MAX_INPUT:
            raise ValueError(f"{src}: {size} bytes, more than a corpus input may be")
        keep = size if self.truncate is None else min(self.truncate, size)
        with src.open("rb") as fi, out.open("wb") as fo:
            left = keep
            while left:
                chunk = fi.read(min(left, 4 * MiB))
                if not chunk:
                    break
                fo.write(chunk)
                left -= len(chunk)
            for off, data in self.patches:
                if off < keep:
                    fo.seek(off)
                    fo.write(data[: keep - off])
        return out


# --------------------------------------------------------------------------------------------
# tools


def run(argv: Sequence[str | os.PathLike[str]], **kw: object) -> str:
    """Run a tool, return its stdout; raise on failure."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, check=False, **kw
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return str(proc.stdout)


def _set_times(root: Path, t: int = 1_700_000_000) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(Path(dirpath) / n, (t, t), follow_symlinks=False)
    os.utime(root, (t, t))


def populate_tree(root: Path) -> None:
    """A small guest tree: files, a 300-entry directory, links, nesting, a sparse file."""
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("fuzz\n")
    (root / "etc" / "os-release").write_text('PRETTY_NAME="ova2img fuzz"\n')
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(bytes(range(256)) * 512)  # 128 KiB: a few extents
    os.chmod(root / "bin" / "tool", 0o4755)
    os.symlink("tool", root / "bin" / "alias")
    os.symlink("/etc/hostname", root / "etc" / "absolute-link")
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    big = root / "var" / "lib" / "many"
    big.mkdir(parents=True)
    for i in range(300):
        (big / f"entry-{i:04d}-{'x' * (i % 40)}").write_text(f"{i}\n")
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf\n")
    with (root / "var" / "sparse").open("wb") as f:
        f.seek(3 * MiB)
        f.write(b"end")
    os.mkfifo(root / "var" / "fifo")
    _set_times(root)


def _fstab(root: Path, spec: str, fstype: str) -> None:
    (root / "etc" / "fstab").write_text(f"{spec} / {fstype} defaults 0 1\n")
    _set_times(root)


# --------------------------------------------------------------------------------------------
# maps of the structures


def tar_map(path: Path, base_offset: int = 0) -> tuple[list[Region], list[tuple[str, int]]]:
    """Header blocks (with PAX/GNU extension headers) and member data boundaries of a tar."""
    regions: list[Region] = []
    bounds: list[tuple[str, int]] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf.getmembers():
            hdr = base_offset + m.offset
            data = base_offset + m.offset_data
            regions.append(Region(f"tar header {m.name}", hdr, data))
            bounds += [
                (f"tar header {m.name}", hdr),
                (f"tar header {m.name} +100", hdr + 100),
                (f"tar data {m.name}", data),
                (f"tar data {m.name} +1", data + 1),
                (f"tar data end {m.name} -1", data + m.size - 1),
                (f"tar data end {m.name}", data + m.size),
            ]
    end = base_offset + path.stat().st_size
    bounds += [("tar end-of-archive", end - 1024), ("tar end -1", end - 1)]
    return regions, bounds


# VMDK 1.1 "Hosted Sparse Extent Header", little-endian, 512 bytes.
_SPARSE = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKERS = {0: "EOS", 1: "GT", 2: "GD", 3: "footer"}


def vmdk_map(
    data_at: Callable[[int, int], bytes], size: int, base: int
) -> tuple[list[Region], list[tuple[str, int]]]:
    """Regions of a sparse/streamOptimized VMDK read through ``data_at(offset, n)``.

    streamOptimized (VMDK spec 1.1 §"Stream-Optimized Compressed Sparse Extents"): after the
    header and descriptor, a sequence of markers — a grain marker is ``lba:u64 size:u32`` with
    deflated data; a metadata marker has ``size == 0``, its type at byte 12 (EOS, GT, GD,
    footer) and ``lba`` = the number of sectors of metadata that follow the marker sector.
    """
    regions = [Region("vmdk header", base, base + 512)]
    bounds = [
        ("vmdk header", base),
        ("vmdk header +77", base + 77),
        ("vmdk header end", base + 512),
    ]
    hdr = _SPARSE.unpack(data_at(0, _SPARSE.size))
    _magic, _ver, flags, _cap, _grain, desc_off, desc_size, _ngte, rgd, gd, overhead = hdr[:11]
    if desc_off:
        regions.append(
            Region("vmdk descriptor", base + desc_off * 512, base + (desc_off + desc_size) * 512)
        )
        bounds.append(("vmdk descriptor", base + desc_off * 512))
    compressed = bool(flags & (1 << 16))
    if compressed and gd != 0xFFFFFFFFFFFFFFFF:
        # qemu-img's streamOptimized: grain directory and tables in front (as a sparse
        # extent's), then the grains with their markers.
        regions.append(Region("vmdk grain directory", base + gd * 512, base + gd * 512 + 512))
        bounds.append(("vmdk grain directory", base + gd * 512))
        if rgd:
            regions.append(
                Region("vmdk redundant grain directory", base + rgd * 512, base + rgd * 512 + 512)
            )
    if not compressed:
        gd_at = gd if gd != 0xFFFFFFFFFFFFFFFF else rgd
        regions.append(Region("vmdk grain directory", base + gd_at * 512, base + gd_at * 512 + 512))
        bounds.append(("vmdk grain directory", base + gd_at * 512))
        first_gt = struct.unpack("<I", data_at(gd_at * 512, 4))[0]
        regions.append(
            Region("vmdk grain table 0", base + first_gt * 512, base + first_gt * 512 + 2048)
        )
        bounds.append(("vmdk grain table 0", base + first_gt * 512))
        return regions, bounds
    pos = overhead * 512
    grains = 0
    while pos + 16 <= size:
        lba, msize, mtype = struct.unpack("<QII", data_at(pos, 16))
        if msize:
            if grains < 64:
                regions.append(Region(f"vmdk grain marker {grains}", base + pos, base + pos + 16))
            bounds += [
                (f"vmdk grain {grains}", base + pos),
                (f"vmdk grain {grains} data", base + pos + 12),
            ]
            grains += 1
            pos += (12 + msize + 511) // 512 * 512
            continue
        what = _MARKERS.get(mtype, f"marker{mtype}")
        regions.append(Region(f"vmdk {what} marker", base + pos, base + pos + 512 + lba * 512))
        bounds += [(f"vmdk {what}", base + pos), (f"vmdk {what} body", base + pos + 512)]
        if mtype == 0:
            break
        pos += 512 + lba * 512
    return regions, bounds


def ova_map(ova: Path) -> tuple[list[Region], list[tuple[str, int]]]:
    """Tar structure plus the VMDK structures of every ``.vmdk`` member, in OVA offsets."""
    regions, bounds = tar_map(ova)
    with tarfile.open(ova, "r:") as tf, ova.open("rb") as f:
        for m in tf.getmembers():
            if m.name.endswith(".ovf"):
                regions.append(Region(f"ovf {m.name}", m.offset_data, m.offset_data + m.size))
            if not m.name.endswith(".vmdk"):
                continue

            def data_at(off: int, n: int, _m: tarfile.TarInfo = m) -> bytes:
                f.seek(_m.offset_data + off)
                return f.read(n)

            r, b = vmdk_map(data_at, m.size, m.offset_data)
            regions += r
            bounds += b
    return regions, bounds


def qcow2_map(path: Path) -> tuple[list[Region], list[tuple[str, int]]]:
    """qcow2 header, L1 table, refcount table, L2 tables (QEMU docs/interop/qcow2.txt)."""
    with path.open("rb") as f:
        hdr = f.read(104)
        (_m, _v, _bo, _bs, cbits, _size, _crypt, l1_size, l1_off, rc_off, _rc_clusters) = (
            struct.unpack_from(">4sIQIIQIIQQI", hdr)
        )
        cluster = 1 << cbits
        regions = [
            Region("qcow2 header", 0, 112),
            Region("qcow2 L1 table", l1_off, l1_off + 8 * l1_size),
            Region("qcow2 refcount table", rc_off, rc_off + 64),
        ]
        bounds = [("qcow2 header", 0), ("qcow2 L1", l1_off), ("qcow2 refcount table", rc_off)]
        f.seek(l1_off)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for i, e in enumerate(l1):
            l2 = e & 0x00FFFFFFFFFFFE00
            if l2:
                f.seek(l2)
                table = f.read(cluster)
                used = max(
                    (j for j in range(0, cluster, 8) if table[j : j + 8] != bytes(8)), default=0
                )
                regions.append(Region(f"qcow2 L2 table {i}", l2, l2 + used + 8))
                bounds += [(f"qcow2 L2 {i}", l2), (f"qcow2 L2 {i} end", l2 + cluster)]
    return regions, bounds


def guest_to_file(qcow2: Path) -> Callable[[int], int | None]:
    """Map a guest offset to its offset in the (uncompressed) qcow2 file (``qemu-img map``)."""
    runs = [
        (r["start"], r["length"], r["offset"])
        for r in json.loads(run(["qemu-img", "map", "--output=json", qcow2]))
        if r.get("data") and "offset" in r
    ]

    def where(guest: int) -> int | None:
        for start, length, off in runs:
            if start <= guest < start + length:
                return off + guest - start
        return None

    return where


def map_guest_regions(
    regions: list[Region], where: Callable[[int], int | None], chunk: int = 512
) -> list[Region]:
    """Guest-offset regions → file-offset regions (split where the mapping is discontinuous)."""
    out: list[Region] = []
    for r in regions:
        pos = r.start
        while pos < r.end:
            n = min(chunk - pos % chunk, r.end - pos)
            f = where(pos)
            if f is not None:
                if out and out[-1].name == r.name and out[-1].end == f:
                    out[-1] = Region(r.name, out[-1].start, f + n)
                else:
                    out.append(Region(r.name, f, f + n))
            pos += n
    return out


def ext_regions(fs_image: Path, offset: int) -> list[Region]:
    """ext metadata of a filesystem image, shifted by ``offset`` (``dumpe2fs``, ``debugfs``)."""
    dump = run(["dumpe2fs", fs_image], env={**os.environ, "LC_ALL": "C"})
    bsize = int(re.search(r"Block size:\s+(\d+)", dump).group(1))  # type: ignore[union-attr]
    isize = int(re.search(r"Inode size:\s+(\d+)", dump).group(1))  # type: ignore[union-attr]
    regions = [Region("ext superblock", offset + 1024, offset + 2048)]
    patterns = {
        "ext group descriptors": r"Group descriptors at (\d+)-(\d+)",
        "ext block bitmap": r"Block bitmap at (\d+)()",
        "ext inode bitmap": r"Inode bitmap at (\d+)()",
    }
    for name, pat in patterns.items():
        for m in list(re.finditer(pat, dump))[:2]:
            a = int(m.group(1))
            b = int(m.group(2) or a)
            regions.append(Region(name, offset + a * bsize, offset + (b + 1) * bsize))
    m = re.search(r"Inode table at (\d+)-(\d+)", dump)
    if m:
        a = int(m.group(1))
        # the used inodes: reserved ones (1-11) and the first files, not the empty tail
        regions.append(
            Region("ext inode table", offset + a * bsize, offset + a * bsize + 400 * isize)
        )
    for path in ("/", "/etc", "/bin", "/var", "/var/lib", "/var/lib/many", "/a/b/c/d", "<8>"):
        out = run(["debugfs", "-R", f"blocks {path}", fs_image])
        blocks = [int(x) for x in out.split()][: 1 if path == "<8>" else 8]
        for blk in blocks:
            name = "ext journal superblock" if path == "<8>" else f"ext directory block {path}"
            regions.append(Region(name, offset + blk * bsize, offset + (blk + 1) * bsize))
    return regions


def magic_regions(
    qcow2: Path, size: int, block: int, match: Callable[[bytes], str | None], limit: int = 400
) -> list[Region]:
    """File regions of the guest blocks (of ``block`` bytes) whose start ``match`` names."""
    where = guest_to_file(qcow2)
    out: list[Region] = []
    with qcow2.open("rb") as f:
        for guest in range(0, size, block):
            off = where(guest)
            if off is None:
                continue
            f.seek(off)
            head = f.read(block)
            name = match(head)
            if name and where(guest + block - 1) == off + block - 1:
                out.append(Region(name, off, off + min(block, 1024)))
                if len(out) >= limit:
                    break
    return out


# --------------------------------------------------------------------------------------------
# crafted headers


def _p32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def _p64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def tar_crafted(path: Path, base_offset: int = 0) -> list[Crafted]:
    """Huge sizes and bad names in the first members' headers (checksums fixed up)."""
    out: list[Crafted] = []
    with path.open("rb") as f, tarfile.open(path, "r:") as tf:
        for m in tf.getmembers()[:3]:
            f.seek(m.offset)
            hdr = bytearray(f.read(512))

            def with_field(h: bytearray, off: int, value: bytes) -> bytes:
                h = bytearray(h)
                h[off : off + len(value)] = value
                h[148:156] = b"        "
                h[148:156] = b"%06o\0 " % sum(h)
                return bytes(h)

            at = base_offset + m.offset
            out += [
                Crafted(
                    f"tar size octal max {m.name}", ((at, with_field(hdr, 124, b"77777777777\0")),)
                ),
                Crafted(
                    f"tar size base-256 2^62 {m.name}",
                    (
                        (
                            at,
                            with_field(hdr, 124, b"\x80" + bytes(3) + (1 << 62).to_bytes(8, "big")),
                        ),
                    ),
                ),
                Crafted(
                    f"tar name absolute {m.name}", ((at, with_field(hdr, 0, b"/etc/x.vmdk\0")),)
                ),
                Crafted(f"tar name dotdot {m.name}", ((at, with_field(hdr, 0, b"../x.ovf\0")),)),
                Crafted(f"tar typeflag symlink {m.name}", ((at, with_field(hdr, 156, b"2")),)),
                Crafted(f"tar bad checksum {m.name}", ((at + 148, b"0000000\0"),)),
            ]
    return out


def mbr_crafted(part_offset_lba: int, disk_sectors: int, at: int = 0) -> list[Crafted]:
    """MBR entries (at 446 + 16 n) overlapping, beyond the disk, huge, zero-sized, looping."""

    def entry(ptype: int, start: int, count: int, boot: int = 0x80) -> bytes:
        return bytes([boot, 0, 0, 0, ptype, 0, 0, 0]) + _p32(start) + _p32(count)

    e = 446 + at
    return [
        Crafted("mbr overlapping partitions", ((e + 16, entry(0x83, part_offset_lba + 8, 64, 0)),)),
        Crafted("mbr partition beyond disk", ((e, entry(0x83, disk_sectors + 10, 2048)),)),
        Crafted("mbr partition size huge", ((e, entry(0x83, part_offset_lba, 0xFFFFFFFF)),)),
        Crafted("mbr partition size zero", ((e, entry(0x83, part_offset_lba, 0)),)),
        Crafted("mbr extended points at itself", ((e + 16, entry(0x05, 0, 16, 0)),)),
        Crafted("mbr extended loop", ((e + 16, entry(0x05, 1, 2, 0)),)),
        Crafted("mbr bad signature", ((at + 510, b"\x00\x00"),)),
    ]


def _crc32(b: bytes) -> int:
    import zlib

    return zlib.crc32(b) & 0xFFFFFFFF


def gpt_crafted(disk: Path) -> list[Crafted]:
    """GPT headers with huge entry counts/sizes (CRCs recomputed) and both copies broken."""
    with disk.open("rb") as f:
        f.seek(512)
        hdr = f.read(92)
        alt = struct.unpack_from("<Q", hdr, 32)[0]
    size = disk.stat().st_size

    def fixed(h: bytes, **fields: tuple[int, bytes]) -> bytes:
        b = bytearray(h)
        for off, val in fields.values():
            b[off : off + len(val)] = val
        b[16:20] = bytes(4)
        b[16:20] = _p32(_crc32(bytes(b)))
        return bytes(b)

    out = [
        Crafted("gpt entry count 2^32-1", ((512, fixed(hdr, n=(80, _p32(0xFFFFFFFF)))),)),
        Crafted("gpt entry count 2^20", ((512, fixed(hdr, n=(80, _p32(1 << 20)))),)),
        Crafted("gpt entry size 2^31", ((512, fixed(hdr, s=(84, _p32(1 << 31)))),)),
        Crafted("gpt entry size 7", ((512, fixed(hdr, s=(84, _p32(7)))),)),
        Crafted("gpt header size huge", ((512, fixed(hdr, s=(12, _p32(1 << 30)))),)),
        Crafted("gpt entries lba beyond disk", ((512, fixed(hdr, s=(72, _p64(1 << 40)))),)),
        Crafted("gpt last usable huge", ((512, fixed(hdr, s=(48, _p64(1 << 60)))),)),
        Crafted(
            "gpt crc bad both copies",
            ((512 + 16, b"\xde\xad\xbe\xef"), (alt * 512 + 16, b"\xde\xad\xbe\xef")),
        ),
        Crafted("gpt backup only (primary zeroed)", ((512, bytes(92)),)),
        Crafted("gpt truncated before backup", truncate=size - 512 * 20),
    ]
    # an entry running past the disk, and two overlapping entries (entries CRC recomputed)
    with disk.open("rb") as f:
        f.seek(1024)
        entries = bytearray(f.read(128 * 128))
    for name, edit in (
        ("gpt partition beyond disk", lambda e: e.__setitem__(slice(168, 176), _p64(1 << 40))),
        ("gpt overlapping partitions", lambda e: e.__setitem__(slice(160, 168), _p64(40))),
        ("gpt partition first > last", lambda e: e.__setitem__(slice(168, 176), _p64(3))),
    ):
        e = bytearray(entries)
        edit(e)
        h = fixed(hdr, c=(88, _p32(_crc32(bytes(e)))))
        out.append(Crafted(name, ((512, h), (1024, bytes(e)))))
    return out


def vmdk_crafted(
    hdr_at: int,
    marker_at: int | None,
    grain_marker_at: int | None,
    gd_at: tuple[int, ...] = (),
) -> list[Crafted]:
    """Sparse header fields set to huge/zero values (VMDK 1.1 header offsets); ``gd_at``: the
    grain directories (and redundant copy) whose first entry to send beyond the file."""
    out = [
        Crafted("vmdk capacity 2^62", ((hdr_at + 12, _p64(1 << 62)),)),
        Crafted("vmdk capacity 0", ((hdr_at + 12, _p64(0)),)),
        Crafted("vmdk grain size 2^40", ((hdr_at + 20, _p64(1 << 40)),)),
        Crafted("vmdk grain size 0", ((hdr_at + 20, _p64(0)),)),
        Crafted("vmdk grain size 3", ((hdr_at + 20, _p64(3)),)),
        Crafted("vmdk descriptor size huge", ((hdr_at + 36, _p64(1 << 40)),)),
        Crafted("vmdk GTEs per GT 2^31", ((hdr_at + 44, _p32(1 << 31)),)),
        Crafted("vmdk GTEs per GT 0", ((hdr_at + 44, _p32(0)),)),
        Crafted("vmdk gd offset beyond EOF", ((hdr_at + 56, _p64(1 << 40)),)),
        Crafted("vmdk overhead beyond EOF", ((hdr_at + 64, _p64(1 << 40)),)),
        Crafted("vmdk compression 7", ((hdr_at + 77, b"\x07\x00"),)),
        Crafted("vmdk bad magic", ((hdr_at, b"XDMV"),)),
    ]
    if grain_marker_at is not None:
        out += [
            Crafted("vmdk grain marker size huge", ((grain_marker_at + 8, _p32(0x7FFFFFFF)),)),
            Crafted("vmdk grain marker lba huge", ((grain_marker_at, _p64(1 << 60)),)),
        ]
    if marker_at is not None:
        out += [
            Crafted("vmdk metadata marker sectors huge", ((marker_at, _p64(1 << 50)),)),
            Crafted("vmdk grain table beyond EOF", ((marker_at, _p64(1 << 30)),)),
        ]
    elif gd_at:
        # the grain directory's first entry: the sector of grain table 0
        out.append(Crafted("vmdk grain table beyond EOF", tuple((g, _p32(1 << 30)) for g in gd_at)))
    return out


def debugfs_variant(src: Path, dst: Path, requests: Sequence[str], *, offset: int = 0) -> Path:
    """Copy ``src`` to ``dst`` and apply ``debugfs -w`` requests to the ext at ``offset``."""
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    spec = f"{dst}?offset={offset}" if offset else os.fspath(dst)
    for req in requests:
        out = subprocess.run(
            ["debugfs", "-w", "-R", req, spec],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_limit_file_size,
        )
        # debugfs exits 0 even when a request fails ("invalid field specifier"): a damage
        # that silently did nothing would be a test of nothing.
        complaints = [ln for ln in out.stderr.splitlines() if not ln.startswith("debugfs 1.")]
        if out.returncode != 0 or complaints:
            raise RuntimeError(f"debugfs {req}: {out.stderr}")
    # debugfs writes the superblock backups where the *damaged* geometry puts them: with
    # ``ssv first_data_block 4000000000`` that is 4 TB into the file (a sparse 4 TB file, which
    # any copy then tries to fill). The damage that counts is in the primary superblock: cut
    # the file back to the image's size.
    if dst.stat().st_size != size:
        os.truncate(dst, size)
    return dst


#: The largest file a corpus tool may write (RLIMIT_FSIZE of debugfs and the like).
TOOL_FSIZE_LIMIT = 1 << 30


def _limit_file_size() -> None:
    """In a tool's child process: no file over :data:`TOOL_FSIZE_LIMIT` (a write past it
    fails with EFBIG instead of filling the disk)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (TOOL_FSIZE_LIMIT, TOOL_FSIZE_LIMIT))


#: (name, debugfs requests): damage only a metadata editor makes cleanly (checksums kept valid).
EXT_DEBUGFS_DAMAGE: list[tuple[str, tuple[str, ...]]] = [
    ("ext directory loop", ("link /a/b /a/b/c/loop",)),
    ("ext directory points at root", ("link / /var/lib/many/up",)),
    ("ext symlink loop fstab", ("rm /etc/fstab", "symlink /etc/fstab /etc/fstab")),
    ("ext symlink loop pair", ("symlink /etc/l1 /etc/l2", "symlink /etc/l2 /etc/l1")),
    ("ext inodes count huge", ("ssv inodes_count 4294967295",)),
    ("ext blocks count huge", ("ssv blocks_count 1099511627775",)),
    ("ext log block size 20", ("ssv log_block_size 20",)),
    ("ext inodes per group 0", ("ssv inodes_per_group 0",)),
    ("ext blocks per group 0", ("ssv blocks_per_group 0",)),
    ("ext inode size 3", ("ssv inode_size 3",)),
    ("ext inode size 65535", ("ssv inode_size 65535",)),
    ("ext desc size huge", ("ssv desc_size 65535",)),
    ("ext first inode 0", ("ssv first_ino 0",)),
    ("ext file size 2^60", ("sif /etc/hostname size 0x1000000000000000",)),
    ("ext extent length huge", ("sif /bin/tool block[4] 0x7fff",)),
    ("ext extent start beyond fs", ("sif /bin/tool block[5] 0xfffffff0",)),
    ("ext extent entries huge", ("sif /bin/tool block[0] 0xfff0f30a",)),
    ("ext extent depth huge", ("sif /bin/tool block[1] 0x00ff0004",)),
    ("ext dir size huge", ("sif /var/lib/many size 0x100000000000",)),
    ("ext dir extent beyond fs", ("sif /etc block[5] 0xfffffff0",)),
    ("ext symlink size huge", ("sif /bin/alias size 0x7fffffff",)),
    ("ext inode links 0 dir", ("sif /a links_count 0",)),
    ("ext root not a directory", ("sif <2> mode 0100644",)),
    ("ext inode mode bogus type", ("sif /etc/hostname mode 0170644",)),
    ("ext group desc inode table beyond fs", ("set_bg 0 inode_table 4000000000",)),
    ("ext group desc inode table 0", ("set_bg 0 inode_table 0",)),
    ("ext xattr block beyond fs", ("sif /etc/hostname file_acl 4000000000",)),
]


# --------------------------------------------------------------------------------------------
# the bases


def _disk_sectors(path: Path) -> int:
    return path.stat().st_size // 512


def _mbr_start(disk: Path) -> int:
    table = json.loads(run(["sfdisk", "--json", disk]))["partitiontable"]
    return int(table["partitions"][0]["start"])


def _gpt_root_start(disk: Path) -> int:
    table = json.loads(run(["sfdisk", "--json", disk]))["partitiontable"]
    return int(table["partitions"][-1]["start"])


def _build_ext(work: Path, name: str, size: int) -> Path:
    stage = work / f"{name}.stage"
    stage.mkdir()
    populate_tree(stage)
    _fstab(stage, "LABEL=fuzzroot", "ext4")
    img = work / f"{name}.ext4"
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "fuzzroot",
            "-b",
            "1024",
            "-E",
            "hash_seed=0a2a0000-0000-4000-8000-000000000000",
            "-U",
            "0a2a0000-0000-4000-8000-0000000000f2",
            "-d",
            stage,
            img,
            f"{size // 1024}k",
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    subprocess.run(
        ["e2fsck", "-fyD", img],
        capture_output=True,
        check=False,
        env={**os.environ, "E2FSCK_TIME": "1700000000"},
    )
    run(["e2fsck", "-fn", img])
    shutil.rmtree(stage)
    return img


def _place(disk: Path, size: int, table: str, fs: Path) -> int:
    """Write ``fs`` into a new partitioned disk file; return the partition's byte offset."""
    with disk.open("wb") as f:
        f.truncate(size)
    if table == "mbr":
        run(
            [
                "sh",
                "-c",
                "printf '%s\\n' 'label: dos' 'label-id: 0x0a2af022'"
                " 'start=2048, type=83, bootable' | sfdisk -q \"$0\"",
                disk,
            ]
        )
        start = _mbr_start(disk) * 512
    else:
        run(
            [
                "sgdisk",
                "-o",
                "-U",
                "0a2a0000-0000-4000-8000-0000000000d1",
                "-n",
                "1:2048:+1M",
                "-t",
                "1:ef02",
                "-n",
                "2:0:0",
                "-t",
                "2:8300",
                disk,
            ]
        )
        start = _gpt_root_start(disk) * 512
    with fs.open("rb") as fi, disk.open("r+b") as fo:
        fo.seek(start)
        shutil.copyfileobj(fi, fo)
    return start


def _write_ova(work: Path, name: str, vmdk: Path) -> Path:
    """An OVA of one VMDK with the project's own OVF writer (tests/support/images.py)."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from support.images import make_ova

    return make_ova(work / f"{name}.ova", [vmdk], name, mtime=1_700_000_000)


def _ova_base(name: str, ova: Path) -> Base:
    regions, bounds = ova_map(ova)
    base = Base(name, ova, ".ova", regions, bounds)
    base.crafted += tar_crafted(ova)
    with tarfile.open(ova, "r:") as tf:
        vm = next(m for m in tf.getmembers() if m.name.endswith(".vmdk"))
    grain = next((r.start for r in regions if r.name == "vmdk grain marker 0"), None)
    gt = next((r.start for r in regions if r.name == "vmdk GT marker"), None)
    gds = tuple(r.start for r in regions if r.name.endswith("grain directory"))
    base.crafted += vmdk_crafted(vm.offset_data, gt, grain, gds)
    base.crafted += [
        Crafted("ova truncated mid-vmdk", truncate=vm.offset_data + vm.size // 2),
        Crafted("ova truncated after ovf header", truncate=512),
    ]
    return base


def _ext_crafted(work: Path, disk: Path, part_off: int, tag: str) -> list[Crafted]:
    out: list[Crafted] = []
    for i, (name, reqs) in enumerate(EXT_DEBUGFS_DAMAGE):
        variant = work / f"{tag}-dbg{i}{disk.suffix}"
        debugfs_variant(disk, variant, reqs, offset=part_off)
        out.append(Crafted(name, derived=variant))
    return out


def superblock_crafted(disk: Path, part_off: int) -> list[Crafted]:
    """Primary-superblock fields patched in place, its ``metadata_csum`` checksum recomputed.

    debugfs cannot make these: ``ssv`` has no ``magic`` field, and with ``ssv first_data_block
    4000000000`` it writes the superblock where the damaged geometry puts group 0 — 4 TB into
    the file — and leaves the primary one as it was.
    """
    from dissect.util.hash import crc32c

    with disk.open("rb") as f:
        f.seek(part_off + 1024)
        sb = f.read(1024)
    csum = bool(struct.unpack_from("<I", sb, 0x64)[0] & 0x400)  # RO_COMPAT_METADATA_CSUM

    def patched(*fields: tuple[int, bytes]) -> tuple[tuple[int, bytes], ...]:
        b = bytearray(sb)
        for off, val in fields:
            b[off : off + len(val)] = val
        if csum:
            # ext4_superblock_csum(): crc32c seeded with ~0, no final inversion.
            b[0x3FC:0x400] = _p32(crc32c.crc32c(bytes(b[:0x3FC])) ^ 0xFFFFFFFF)
        return ((part_off + 1024, bytes(b)),)

    return [
        Crafted("ext superblock magic bad", patched((0x38, b"\x34\x12"))),
        Crafted("ext first data block huge", patched((0x14, _p32(4_000_000_000)))),
        Crafted("ext log block size 20 (raw)", patched((0x18, _p32(20)), (0x1C, _p32(20)))),
    ]


def _dir_entry_patches(disk: Path, regions: list[Region]) -> list[Crafted]:
    """Directory entry names turned into '.', '..', 'a/b', a NUL; rec_len/name_len broken."""
    out: list[Crafted] = []
    with disk.open("rb") as f:
        for r in regions:
            if r.name != "ext directory block /etc":
                continue
            f.seek(r.start)
            blk = f.read(r.end - r.start)
            i = blk.find(b"hostname")
            if i < 8:
                continue
            at = r.start + i
            out += [
                Crafted("ext dirent name with slash", ((at, b"host/ame"),)),
                Crafted("ext dirent name with NUL", ((at, b"host\0ame"),)),
                Crafted("ext dirent name dotdot", ((at - 2, b"\x02"), (at, b".."))),
                Crafted("ext dirent name dot", ((at - 2, b"\x01"), (at, b"."))),
                Crafted("ext dirent rec_len 0", ((at - 4, b"\x00\x00"),)),
                Crafted("ext dirent rec_len huge", ((at - 4, b"\xfc\xff"),)),
                Crafted("ext dirent name_len huge", ((at - 2, b"\xff"),)),
                Crafted("ext dirent inode huge", ((at - 8, b"\xff\xff\xff\x7f"),)),
            ]
            break
    return out


def build_bases(work: Path, *, heavy: bool = True) -> dict[str, Base]:
    """Build every base under ``work`` (needs mke2fs, debugfs, sfdisk, sgdisk, qemu-img;
    ``heavy``: also XFS and btrfs)."""
    work.mkdir(parents=True, exist_ok=True)
    bases: dict[str, Base] = {}

    # 1. the committed demo OVA
    demo = work / "demo.ova"
    shutil.copyfile(DEMO_OVA, demo)
    bases["demo"] = _ova_base("demo", demo)

    # 2. ext4 with the fuzz tree, MBR → raw disk; the same as streamOptimized VMDK in an OVA
    ext = _build_ext(work, "fuzz", 6 * MiB)
    mbr = work / "mbr.raw"
    off = _place(mbr, 8 * MiB, "mbr", ext)
    ereg = ext_regions(ext, off)
    base = Base("mbr-raw", mbr, ".img", [Region("mbr", 446, 512), *ereg])
    base.boundaries = [("mbr", 446), ("mbr end", 512), ("partition start", off)]
    base.boundaries += [(r.name, r.start) for r in ereg] + [(r.name + " end", r.end) for r in ereg]
    base.crafted = mbr_crafted(off // 512, _disk_sectors(mbr))
    base.crafted += _ext_crafted(work, mbr, off, "mbr")
    base.crafted += superblock_crafted(mbr, off)
    base.crafted += _dir_entry_patches(mbr, ereg)
    bases["mbr-raw"] = base

    vmdk = work / "fuzz.vmdk"
    run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            mbr,
            vmdk,
        ]
    )
    bases["ext-ova"] = _ova_base("ext-ova", _write_ova(work, "fuzzova", vmdk))
    vmdk.unlink()

    # 3. GPT raw disk with the same ext4
    gpt = work / "gpt.raw"
    goff = _place(gpt, 10 * MiB, "gpt", ext)
    greg = ext_regions(ext, goff)
    size = gpt.stat().st_size
    gregions = [
        Region("gpt protective mbr", 446, 512),
        Region("gpt header", 512, 604),
        Region("gpt entries", 1024, 1024 + 256),
        Region("gpt backup header", size - 512, size - 420),
        *greg[:6],
    ]
    base = Base("gpt-raw", gpt, ".img", gregions)
    base.boundaries = [
        ("gpt header", 512),
        ("gpt entries", 1024),
        ("gpt entries end", 1024 + 16384),
        ("gpt partition", goff),
        ("gpt backup entries", size - 33 * 512),
        ("gpt backup header", size - 512),
    ]
    base.boundaries += [(r.name, r.start) for r in greg[:6]]
    base.crafted = gpt_crafted(gpt)
    bases["gpt-raw"] = base

    # 4. qcow2 of the MBR disk: qcow2 structures and the ext metadata it carries
    q = work / "mbr.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", mbr, q])
    qreg, qb = qcow2_map(q)
    where = guest_to_file(q)
    base = Base("qcow2", q, ".qcow2", [*qreg, *map_guest_regions(ereg, where)], qb)
    with q.open("rb") as f:
        hdr = f.read(104)
    l1_off = struct.unpack_from(">Q", hdr, 40)[0]
    base.crafted = [
        Crafted("qcow2 l1 size 2^31", ((36, struct.pack(">I", 1 << 31)),)),
        Crafted("qcow2 l1 offset beyond EOF", ((40, struct.pack(">Q", 1 << 40)),)),
        Crafted("qcow2 cluster bits 63", ((20, struct.pack(">I", 63)),)),
        Crafted("qcow2 cluster bits 8", ((20, struct.pack(">I", 8)),)),
        Crafted("qcow2 virtual size 2^62", ((24, struct.pack(">Q", 1 << 62)),)),
        Crafted("qcow2 backing file name huge", ((8, struct.pack(">QI", 200, 1 << 30)),)),
        Crafted("qcow2 L2 table beyond EOF", ((l1_off, struct.pack(">Q", (1 << 63) | (1 << 40))),)),
        Crafted("qcow2 version 99", ((4, struct.pack(">I", 99)),)),
        Crafted(
            "qcow2 compressed cluster bit in L1", ((l1_off, struct.pack(">Q", (1 << 62) | 0x200)),)
        ),
    ]
    bases["qcow2"] = base

    if heavy:
        bases.update(_heavy_bases(work))
    for b in bases.values():
        b.boundaries = sorted(
            {(n, o) for n, o in b.boundaries if 0 < o < b.size}, key=lambda x: x[1]
        )
        b.regions = [r for r in b.regions if r.start < r.end <= b.size]
    return bases


def _heavy_bases(work: Path) -> dict[str, Base]:
    """XFS (mkfs.xfs -p protofile) and btrfs (mkfs.btrfs --rootdir), whole-disk, in qcow2."""
    out: dict[str, Base] = {}
    stage = work / "heavy.stage"
    stage.mkdir()
    populate_tree(stage)
    (stage / "var" / "fifo").unlink()

    # XFS: mkfs.xfs -p protofile ("tree:" not available in 6.1; use the documented protofile)
    _fstab(stage, "LABEL=fuzzxfs", "xfs")
    xfs = work / "fuzz.xfs"
    with xfs.open("wb") as f:
        f.truncate(300 * MiB)
    proto = work / "proto.txt"
    proto.write_text(_protofile(stage))
    run(["mkfs.xfs", "-q", "-f", "-L", "fuzzxfs", "-p", proto, xfs])
    qx = work / "xfs.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", xfs, qx])
    xfs.unlink()

    def xfs_meta(head: bytes) -> str | None:
        for magic in (
            b"XFSB",
            b"XAGF",
            b"XAGI",
            b"XAFL",
            b"IN",
            b"XDB3",
            b"XDD3",
            b"XDF3",
            b"XD2B",
            b"XD2D",
            b"XD2F",
            b"IAB3",
            b"FIB3",
            b"AB3B",
            b"AB3C",
            b"BMA3",
        ):
            if head.startswith(magic):
                return f"xfs {magic.decode()}"
        return None

    regs = magic_regions(qx, 300 * MiB, 512, xfs_meta)
    out["xfs"] = Base("xfs", qx, ".qcow2", regs, [(r.name, r.start) for r in regs[:200]])

    # btrfs
    _fstab(stage, "LABEL=fuzzbtrfs", "btrfs")
    bt = work / "fuzz.btrfs"
    with bt.open("wb") as f:
        f.truncate(128 * MiB)
    run(["mkfs.btrfs", "-q", "-f", "-L", "fuzzbtrfs", "--rootdir", stage, bt])
    qb2 = work / "btrfs.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", bt, qb2])
    with bt.open("rb") as f:
        f.seek(64 * 1024)
        sb = f.read(4096)
    bt.unlink()
    fsid = sb[32:48]
    nodesize = struct.unpack_from("<I", sb, 0x94)[0]

    def btrfs_meta(head: bytes) -> str | None:
        if head[64 + 0x40 : 64 + 0x48] == b"_BHRfS_M":
            return "btrfs superblock"
        if head[0x20:0x30] == fsid:
            return "btrfs tree block"
        return None

    sbreg = magic_regions(qb2, 128 * MiB, 64 * 1024, btrfs_meta, limit=4)
    treg = magic_regions(qb2, 128 * MiB, nodesize, btrfs_meta)
    out["btrfs"] = Base("btrfs", qb2, ".qcow2", sbreg + treg, [(r.name, r.start) for r in treg])
    shutil.rmtree(stage)
    return out


def _protofile(root: Path) -> str:
    """An ``mkfs.xfs -p`` protofile (xfs_mkfs(8) "-p protofile") of ``root``."""
    lines = ["boot", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            st = p.lstat()
            perm = f"{st.st_mode & 0o777:03o}"
            ind = " " * depth
            if p.is_symlink():
                lines.append(f"{ind}{p.name} l--{perm} 0 0 {os.readlink(p)}")
            elif p.is_dir():
                lines.append(f"{ind}{p.name} d--{perm} 0 0")
                walk(p, depth + 1)
                lines.append(f"{ind}$")
            else:
                u = "u" if st.st_mode & 0o4000 else "-"
                lines.append(f"{ind}{p.name} -{u}-{perm} 0 0 {p}")

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# mutations


def mutations(bases: dict[str, Base], count: int, seed: int = 0) -> Iterator[Mutation]:
    """``count`` mutations spread over the bases: every truncation boundary and crafted
    header first, then seeded bit flips and byte overwrites in the metadata regions."""
    made = 0
    fixed: list[Mutation] = []
    for b in bases.values():
        for c in b.crafted:
            fixed.append(Mutation(b.name, "crafted", c.name, c.patches, c.truncate, c.derived))
        for name, off in b.boundaries:
            fixed.append(Mutation(b.name, "truncate", f"{name}@{off}", truncate=off))
    rng = random.Random(seed)
    rng.shuffle(fixed)
    if count < len(fixed):
        # keep every crafted case, sample the truncations
        crafted = [m for m in fixed if m.kind == "crafted"]
        rest = [m for m in fixed if m.kind != "crafted"]
        fixed = (crafted + rest)[:count]
    for m in fixed:
        yield m
        made += 1
    names = [n for n, b in bases.items() if b.regions]
    i = 0
    while made < count:
        b = bases[names[i % len(names)]]
        i += 1
        r = rng.choice(b.regions)
        mseed = rng.getrandbits(32)
        yield random_mutation(b, r, mseed)
        made += 1


_SPECIAL = [
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\x7f",
    b"\x00\x00\x00\x80",
    b"\x01\x00\x00\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x00\x00\x00\x00\x00\x00\x00\x40",
]


def random_mutation(b: Base, r: Region, seed: int) -> Mutation:
    """One seeded bit-flip, overwrite or truncation inside region ``r`` of base ``b``."""
    rng = random.Random(seed)
    how = rng.choice(("bitflip", "bitflip", "overwrite", "special", "truncate"))
    if how == "truncate":
        off = rng.randrange(r.start, r.end)
        return Mutation(b.name, "truncate", f"in {r.name}@{off} seed={seed}", truncate=off)
    with b.path.open("rb") as f:
        patches: list[tuple[int, bytes]] = []
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            off = rng.randrange(r.start, r.end)
            f.seek(off)
            cur = f.read(8)
            if how == "bitflip":
                patches.append((off, bytes([cur[0] ^ (1 << rng.randrange(8))])))
            elif how == "overwrite":
                n = rng.choice((1, 2, 4, 8, 16))
                patches.append((off, rng.randbytes(min(n, r.end - off))))
            else:
                off -= (off - r.start) % 4
                patches.append((off, rng.choice(_SPECIAL)[: r.end - off]))
    return Mutation(
        b.name, how if how != "special" else "overwrite", f"{r.name} seed={seed}", tuple(patches)
    )
