"""VfatFilesystem against real FAT12/16/32 images made by mkfs.vfat + mtools.

This kernel has no vfat driver, so the oracles are (a) mtools itself (``mcopy -s -m`` extracts
the tree with names, content and mtimes), (b) ``blkid -p`` for UUID/LABEL/VERSION, (c)
``fsck.fat -n`` that the image is consistent, and (d) the expected tree *derived* from the
source files copied in, under the mount options (what fs/fat/inode.c ``fat_fill_inode`` makes
of them: see ova2img/filesystems/vfat.py). mtools runs with ``TZ=UTC`` so that FAT's local
times are UTC, as the adapter reads them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dissect.fat import FATFS

from ova2img.errors import FilesystemError
from ova2img.filesystems.base import Entry, EntryType
from ova2img.filesystems.probe import open_filesystem, probe
from ova2img.filesystems.vfat import (
    VfatFilesystem,
    _fat_checksum,
    _utf16_to_utf8,
    parse_vfat_options,
)

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.vfat") and shutil.which("mcopy")), reason="needs dosfstools + mtools"
)

ENV = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}
S = 1_000_000_000
T_2001 = 981_173_106  # 2001-02-03 04:05:06 UTC (even: FAT keeps 2-second mtimes)
T_1980 = 315_532_800  # 1980-01-01 00:00:00, FAT's first second
T_2107 = 4_354_819_198  # 2107-12-31 23:59:58, FAT's last
T_2100_MARCH = 4_107_542_400  # 2100-03-01 00:00:00: 2100 is not a leap year
UNICODE = "Grüße ñandú ÆØÅ 日本語 ☃.txt"  # BMP only: mtools 4.0.32 mangles astral planes
LONG = "L" * 200 + ".long-extension"
BIG_DIR = 600


def run(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, env=ENV)
    if proc.returncode not in ok:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def mtools(img: Path, tool: str, *args: str) -> str:
    return run(tool, "-i", img, *args)


@dataclass
class Image:
    img: Path
    src: Path  # the tree copied in (what the guest wrote)
    bits: int
    readonly: set[str]  # relative paths given ATTR_RO
    fragmented: str


def _populate(src: Path, rnd: random.Random) -> None:
    src.mkdir()

    def put(rel: str, data: bytes, mtime: int = T_2001) -> None:
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (mtime, mtime))

    put("big.bin", rnd.randbytes(5000))  # 8.3 lowercase: NT lcase flags, no long name
    put("UPPER.TXT", b"upper\n", T_1980)
    put("Mixed.Txt", b"mixed\n", T_2107)  # mixed case: needs a long name
    put("lower.TXT", b"base lower only\n")  # lcase flag on the base only
    put("UP.txt", b"ext lower only\n")  # lcase flag on the extension only
    put("noext", b"x")
    put(UNICODE, "unicode ✓\n".encode())
    put(LONG, b"long")
    put("empty.dat", b"")
    put("readonly.cfg", b"ro\n")
    put("hidden.sys", b"hidden and system\n")
    put("RUN.EXE", b"MZ")
    put("script.bat", b"@echo off\r\n")
    put("EFI/BOOT/BOOTX64.EFI", rnd.randbytes(20000))
    put("EFI/debian/grub.cfg", b"search --fs-uuid\n")
    put("a/b/c/d/e/f/g/deep file.txt", b"deep\n")
    for i in range(BIG_DIR):
        put(f"many/entry-with-a-long-name-{i:04d}.txt", f"{i}\n".encode() if i % 50 == 0 else b"")
    (src / "empty dir").mkdir()
    (src / "RODIR").mkdir()
    for d in sorted((p for p in src.rglob("*") if p.is_dir()), reverse=True):
        os.utime(d, (T_2001 + 2, T_2001 + 2))


@pytest.fixture(scope="session", params=[12, 16, 32])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Image:
    bits: int = request.param
    base = tmp_path_factory.mktemp(f"fat{bits}")
    src = base / "src"
    rnd = random.Random(bits)
    _populate(src, rnd)
    img = base / "fat.img"
    # FAT32 on 40 MiB has fewer than 65525 clusters: legal for Linux (FAT32 iff the 16-bit
    # FAT size is 0), mis-typed as FAT16 by dissect.fat.
    size = {12: "4M", 16: "16M", 32: "40M"}[bits]
    run("truncate", "-s", size, img)
    run("mkfs.vfat", "-F", str(bits), "-n", f"ESP{bits}", "-i", f"1234ABC{bits % 10}", img)
    names = sorted(p.name for p in src.iterdir())
    mtools(img, "mcopy", "-s", "-m", "-Q", *[str(src / n) for n in names], "::/")
    # A fragmented file: fill the volume with small files, delete every other one, then copy a
    # file that needs the holes (it also leaves deleted 0xE5 entries behind).
    cluster = int(mtools(img, "minfo", "::").split("cluster size: ")[1].split()[0]) * 512
    holes = src / "frag"
    holes.mkdir()
    while True:
        # mmd stamps the new directory with the current time, at FAT's 2-second resolution:
        # retry until no 2-second boundary falls inside the call, so that we know that time.
        before = time.time()
        mtools(img, "mmd", "::/frag")
        after = time.time()
        if int(before) // 2 == int(after) // 2:
            break
        mtools(img, "mrd", "::/frag")
    made = int(before) // 2 * 2
    for i in range(12):
        filler = base / f"f{i:02d}"
        filler.write_bytes(rnd.randbytes(cluster))
        mtools(img, "mcopy", "-m", str(filler), f"::/frag/f{i:02d}")
    for i in range(0, 12, 2):
        mtools(img, "mdel", f"::/frag/f{i:02d}")
    for i in range(1, 12, 2):
        shutil.copy2(base / f"f{i:02d}", holes / f"f{i:02d}")
    frag = holes / "fragmented.bin"
    frag.write_bytes(rnd.randbytes(cluster * 5 + 100))
    os.utime(frag, (T_2001, T_2001))
    mtools(img, "mcopy", "-m", str(frag), "::/frag/fragmented.bin")
    for f in holes.iterdir():
        os.utime(f, (T_2001, T_2001))
        mtools(img, "mcopy", "-m", "-o", str(f), f"::/frag/{f.name}")  # re-stamp the mtime
    os.utime(holes, (made, made))  # the source tree says what mmd stored
    mtools(img, "mattrib", "+r", "::/readonly.cfg")
    mtools(img, "mattrib", "+r", "::/RODIR")
    mtools(img, "mattrib", "+h", "+s", "::/hidden.sys")
    run("fsck.fat", "-n", img)
    return Image(img, src, bits, {"readonly.cfg", "RODIR"}, "frag/fragmented.bin")


def walk(fs: VfatFilesystem) -> Iterator[tuple[str, Entry, object]]:
    root = fs.root()
    yield "", fs.stat(root), root
    stack = [("", root)]
    while stack:
        prefix, handle = stack.pop()
        for name, child in fs.iterdir(handle):
            path = f"{prefix}{name.decode('utf-8', 'surrogateescape')}"
            entry = fs.stat(child)
            yield path, entry, child
            if entry.type is EntryType.DIR:
                stack.append((path + "/", child))


def expected(
    img: Image, *, uid: int, gid: int, fmask: int, dmask: int
) -> dict[str, tuple[object, ...]]:
    """The tree a vfat mount would show, derived from the source tree (fat_fill_inode)."""
    out: dict[str, tuple[object, ...]] = {}
    src = img.src
    subdirs = sum(1 for p in src.iterdir() if p.is_dir())
    out[""] = ("dir", 0o777 & ~dmask, uid, gid, 0, subdirs + 2)  # fat_read_root: times 0
    for p in src.rglob("*"):
        rel = p.relative_to(src).as_posix()
        st = p.stat()
        mtime = st.st_mtime_ns // (2 * S) * (2 * S)
        if p.is_dir():
            nlink = 2 + sum(1 for c in p.iterdir() if c.is_dir())
            out[rel] = ("dir", 0o777 & ~dmask, uid, gid, mtime, nlink)
        else:
            mode = 0o777 & ~(0o222 if rel in img.readonly else 0) & ~fmask
            out[rel] = ("file", mode, uid, gid, mtime, 1, st.st_size)
    return out


def observed(fs: VfatFilesystem) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for path, e, _ in walk(fs):
        if e.type is EntryType.DIR:
            out[path] = ("dir", e.mode, e.uid, e.gid, e.mtime_ns, e.nlink)
        else:
            out[path] = ("file", e.mode, e.uid, e.gid, e.mtime_ns, e.nlink, e.size)
    return out


@pytest.mark.parametrize(
    ("options", "uid", "gid", "fmask", "dmask"),
    [
        ((), 0, 0, 0o022, 0o022),  # defaults: root, umask 0022 at boot
        (("umask=0077", "shortname=mixed", "errors=remount-ro"), 0, 0, 0o077, 0o077),  # an ESP
        (("uid=1000,gid=1000,fmask=0133,dmask=0022",), 1000, 1000, 0o133, 0o022),
    ],
)
def test_tree_matches_derived_reference(
    image: Image, options: tuple[str, ...], uid: int, gid: int, fmask: int, dmask: int
) -> None:
    with image.img.open("rb") as fh:
        fs = VfatFilesystem(fh, options=options)
        assert observed(fs) == expected(image, uid=uid, gid=gid, fmask=fmask, dmask=dmask)
        # mount() gives the same view from a default-opened filesystem
        view = VfatFilesystem(fh).mount(options)
        assert observed(view) == observed(fs)


def test_content_names_and_mtimes_match_mtools(image: Image, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mtools(image.img, "mcopy", "-s", "-m", "-n", "::/*", str(out))
    ref = {p.relative_to(out).as_posix(): p for p in out.rglob("*")}
    with image.img.open("rb") as fh:
        fs = VfatFilesystem(fh)
        seen = {}
        inodes = set()
        for path, e, handle in walk(fs):
            inodes.add(e.inode)
            if not path:
                continue
            seen[path] = e
            r = ref[path]
            if e.mtime_ns > T_2100_MARCH * S:
                # mtools 4.0.32 counts 2100 as a leap year; the kernel (fat_time_fat2unix,
                # YEAR_2100) does not, and so neither do we: mtools is a day late.
                assert r.stat().st_mtime_ns - e.mtime_ns == 86400 * S, path
            else:
                assert e.mtime_ns == r.stat().st_mtime_ns, path
            if e.type is EntryType.FILE:
                with fs.open(handle) as data:
                    assert data.read() == r.read_bytes(), path
                assert fs.data_runs(handle) == ([(0, e.size)] if e.size else [])
        assert set(seen) == set(ref)
        assert len(inodes) == len(seen) + 1  # unique inode numbers: no hardlinks on FAT
        assert sum(1 for p in seen if p.startswith("many/")) == BIG_DIR


def test_fragmented_file_follows_the_chain(image: Image) -> None:
    with image.img.open("rb") as fh:
        fs = VfatFilesystem(fh)
        handle = fs.lookup(b"/" + image.fragmented.encode())
        assert isinstance(handle, int)
        runs = fs._vol.runs(fs._vol.start_cluster(fs._dirent(handle)))
        # mtools fills the holes on FAT12/16; on FAT32 it allocates after FSInfo's hint.
        assert len(runs) > 1 or image.bits == 32
        with fs.open(handle) as data:
            data.seek(1000)
            assert data.read(5000) == (image.src / image.fragmented).read_bytes()[1000:6000]


def test_uuid_label_version_match_blkid(image: Image) -> None:
    info = dict(
        line.split("=", 1)
        for line in run("blkid", "-p", "-o", "export", image.img).splitlines()
        if "=" in line
    )
    with image.img.open("rb") as fh:
        assert probe(fh) == "vfat"
        fs = open_filesystem(fh, "vfat", name="p1")
        assert isinstance(fs, VfatFilesystem)
        assert (fs.fstype, fs.uuid, fs.label) == ("vfat", info["UUID"], info["LABEL"])
        assert fs.version == info["VERSION"] == f"FAT{image.bits}"
        assert fs.uuid == f"1234-ABC{image.bits % 10}"


def test_label_from_root_dir_entry_wins(tmp_path: Path) -> None:
    img = tmp_path / "l.img"
    run("truncate", "-s", "4M", img)
    run("mkfs.vfat", "-n", "BOOTLBL", img)
    mtools(img, "mlabel", "::ROOTLBL")  # mlabel rewrites both; then restore the boot sector's
    data = bytearray(img.read_bytes())
    data[43:54] = b"BOOTLBL    "
    img.write_bytes(data)
    assert "LABEL=ROOTLBL" in run("blkid", "-p", "-o", "export", img).split()
    with img.open("rb") as fh:
        assert VfatFilesystem(fh).label == "ROOTLBL"
    mtools(img, "mlabel", "-c", "::")  # no label at all
    exported = run("blkid", "-p", "-o", "export", img).split()
    with img.open("rb") as fh:
        label = VfatFilesystem(fh).label
    assert label is None and not any(x.startswith("LABEL=") for x in exported)


# -- dissect.fat gaps, each shown on the library and fixed in the adapter -----------------------


def test_gap_lowercase_flags(image: Image) -> None:
    with image.img.open("rb") as fh:
        names = {e.name for e in FATFS(fh).root.iterdir()}
        assert "BIG.BIN" in names and "big.bin" not in names  # the gap
        ours = {n for n, _ in VfatFilesystem(fh).iterdir(1)}
    assert {b"big.bin", b"UPPER.TXT", b"lower.TXT", b"UP.txt", b"noext", b"EFI"} <= ours
    assert {b"a", b"frag", b"many"} <= ours and b"BIG.BIN" not in ours


def test_gap_volume_label_and_dots_listed(image: Image) -> None:
    with image.img.open("rb") as fh:
        root = FATFS(fh).root
        assert f"ESP{image.bits}" in {e.name for e in root.iterdir()}  # the label as a file
        sub = next(e for e in root.iterdir() if e.name.upper() == "EFI")
        assert {".", ".."} <= {e.name for e in sub.iterdir()}
        fs = VfatFilesystem(fh)
        assert f"ESP{image.bits}".encode() not in {n for n, _ in fs.iterdir(1)}
        efi = fs.lookup(b"/EFI")
        assert sorted(n for n, _ in fs.iterdir(efi)) == [b"BOOT", b"debian"]


def test_gap_fat32_type(tmp_path: Path) -> None:
    img = tmp_path / "small32.img"
    run("truncate", "-s", "40M", img)
    run("mkfs.vfat", "-F", "32", "-s", "8", img)  # 4 KiB clusters: ~10 k, fewer than 65525
    with img.open("rb") as fh:
        assert str(FATFS(fh).type) != "Fattype.FAT32"  # dissect: by cluster count → FAT16
        assert VfatFilesystem(fh).version == "FAT32"
    assert "VERSION=FAT32" in run("blkid", "-p", "-o", "export", img).split()


def _dirent_offset(img: Path, fs: VfatFilesystem, path: bytes) -> int:
    handle = fs.lookup(path)
    assert isinstance(handle, int)
    return handle * 32


def test_gap_orphan_long_name(tmp_path: Path) -> None:
    """A long name whose checksum does not match its short entry (a DOS tool renamed the 8.3
    entry) is ignored by Linux (fat_parse_long) — dissect glues it on anyway."""
    src = tmp_path / "A long file name.txt"
    src.write_bytes(b"x")
    img = tmp_path / "o.img"
    run("truncate", "-s", "4M", img)
    run("mkfs.vfat", img)
    mtools(img, "mcopy", str(src), "::/")
    with img.open("rb") as fh:
        off = _dirent_offset(img, VfatFilesystem(fh), b"/A long file name.txt")
    with img.open("r+b") as fh:  # rename the 8.3 entry as DOS would, leaving the LFN slots
        fh.seek(off)
        fh.write(b"OTHER   TXT")
    assert _fat_checksum(b"OTHER   TXT") != _fat_checksum(b"ALONGF~1TXT")
    assert "OTHER" in run("fsck.fat", "-n", "-l", img, ok=(0, 1))
    with img.open("rb") as fh:
        assert [e.name for e in FATFS(fh).root.iterdir()] == ["A long file name.txt"]  # the gap
        assert [n for n, _ in VfatFilesystem(fh).iterdir(1)] == [b"OTHER.TXT"]


def test_gap_times_are_naive(image: Image) -> None:
    with image.img.open("rb") as fh:
        entry = next(e for e in FATFS(fh).root.iterdir() if e.name == "Mixed.Txt")
        assert entry.mtime.tzinfo is None  # naive local time: the gap
        fs = VfatFilesystem(fh)
        ours = fs.stat(fs.lookup(b"/Mixed.Txt"))
    assert ours.mtime_ns == T_2107 * S and ours.ctime_ns == ours.mtime_ns


def test_cluster_loop_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * 2048))
    img = tmp_path / "loop.img"
    run("truncate", "-s", "4M", img)
    run("mkfs.vfat", "-F", "12", "-s", "4", img)  # 2 KiB clusters
    mtools(img, "mcopy", str(src), "::/f.bin")
    with img.open("rb") as fh:
        fs = VfatFilesystem(fh)
        handle = fs.lookup(b"/f.bin")
        start = fs._vol.start_cluster(fs._dirent(handle))  # type: ignore[arg-type]
        fat = fs._vol.fat_offset
    with img.open("r+b") as fh:  # make the last cluster point back at the first (FAT12)
        last = start + 2
        off = fat + last + last // 2
        fh.seek(off)
        raw = int.from_bytes(fh.read(2), "little")
        raw = (raw & 0x000F) | (start << 4) if last & 1 else (raw & 0xF000) | start
        fh.seek(off)
        fh.write(raw.to_bytes(2, "little"))
    with img.open("rb") as fh:
        fs = VfatFilesystem(fh)
        with pytest.raises(FilesystemError, match="loops"):
            fs.open(fs.lookup(b"/f.bin"))


# -- mount options ----------------------------------------------------------------------------


def test_option_semantics(image: Image) -> None:
    with image.img.open("rb") as fh:
        fs = VfatFilesystem(fh)

        def mode(view: VfatFilesystem, path: bytes) -> int:
            return view.stat(view.lookup(path)).mode

        # showexec: only .EXE/.COM/.BAT keep x bits (is_exec on the stored extension)
        se = fs.mount(["showexec"])
        assert (mode(se, b"/RUN.EXE"), mode(se, b"/script.bat")) == (0o755, 0o755)
        assert mode(se, b"/big.bin") == 0o644 and mode(se, b"/EFI") == 0o755
        # ATTR_RO on a directory counts only with rodir (fat_make_mode)
        assert mode(fs, b"/RODIR") == 0o755 and mode(fs.mount(["rodir"]), b"/RODIR") == 0o555
        assert mode(fs, b"/readonly.cfg") == 0o555
        # hidden/system attributes do not change the mode
        assert mode(fs, b"/hidden.sys") == 0o755
        # shortname=win95 shows 8.3 names as stored, lower lowers them all
        win95 = {n for n, _ in fs.mount(["shortname=win95"]).iterdir(1)}
        lower = {n for n, _ in fs.mount(["shortname=lower"]).iterdir(1)}
        assert b"BIG.BIN" in win95 and b"UPPER.TXT" in win95 and b"Mixed.Txt" in win95
        assert b"big.bin" in lower and b"upper.txt" in lower and b"Mixed.Txt" in lower
        # time_offset: the disk holds local time east of UTC
        shifted = fs.mount(["time_offset=60"]).stat(fs.lookup(b"/UPPER.TXT"))
        assert shifted.mtime_ns == (T_1980 - 3600) * S
        assert fs.mount(["tz=UTC"]).stat(fs.lookup(b"/UPPER.TXT")).mtime_ns == T_1980 * S
        # utf8 is the default (CONFIG_FAT_DEFAULT_UTF8=y); without it, iocharset shows '?'
        names = {n for n, _ in fs.iterdir(1)}
        assert UNICODE.encode() in names
        ascii_names = {n for n, _ in fs.mount(["utf8=no"]).iterdir(1)}
        assert b"Gr??e ?and? ??? ??? ?.txt" in ascii_names
        latin1 = {n for n, _ in fs.mount(["utf8=0", "iocharset=iso8859-1"]).iterdir(1)}
        assert "Grüße ñandú ÆØÅ ??? ?.txt".encode("latin-1") in latin1
        xlate = {n for n, _ in fs.mount(["uni_xlate"]).iterdir(1)}
        assert b"Gr:00fc:00dfe" in b"|".join(xlate)


def test_option_parsing() -> None:
    o = parse_vfat_options(["defaults,noatime,uid=5,gid=6,umask=027", "fmask=0133", "nofail"])
    assert (o.uid, o.gid, o.fmask, o.dmask) == (5, 6, 0o133, 0o027)
    assert parse_vfat_options(["shortname=winnt", "codepage=850"]).codepage == 850
    with pytest.raises(FilesystemError):
        parse_vfat_options(["umask=9z"])
    with pytest.raises(FilesystemError):
        parse_vfat_options(["time_offset=5000"])


def test_utf16_conversion_like_the_kernel() -> None:
    # utf16s_to_utf8s: pairs combined, lone surrogates dropped, stops at NUL
    assert _utf16_to_utf8([0x41, 0xD83D, 0xDE00, 0x42]) == "A😀B".encode()
    assert _utf16_to_utf8([0x41, 0xDE00, 0xD83D, 0x42, 0, 0x43]) == b"AB"


def test_not_fat_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "z.img"
    img.write_bytes(bytes(1 << 20))
    with img.open("rb") as fh, pytest.raises(FilesystemError):
        VfatFilesystem(fh)
