"""The PAX tar writer, read back by CPython's tarfile and by GNU tar, and compared with the
archive GNU tar itself makes of a real sparse file."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.walks import seek_runs
from test_tar_support import (
    CONTENT,
    DEEP_FILE,
    GIANT_AT,
    GIANT_DATA,
    GIANT_SIZE,
    NON_UTF8,
    NS,
    SPARSE_AT,
    SPARSE_DATA,
    SPARSE_SIZE,
    FakeFS,
    display,
    entry,
    expected_content,
    probe_fs,
)

from ova2img.assembly import TreeItem
from ova2img.errors import SinkError
from ova2img.filesystems.base import EntryType
from ova2img.sinks import tar as tarmod
from ova2img.sinks.tar import BLOCK, RECORD, TarWriter, write_tar

TARTYPES = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}


def member_name(item: TreeItem) -> bytes:
    """The member name GNU tar gives a path with ``-C mnt -cf x.tar .``."""
    if not item.path:
        return b"./"
    return b"./" + item.path + (b"/" if item.entry.type is EntryType.DIR else b"")


def build(items: Iterator[TreeItem] | list[TreeItem], **kw: object) -> tuple[bytes, object]:
    out = io.BytesIO()
    stats = write_tar(items, out, **kw)  # type: ignore[arg-type]
    return out.getvalue(), stats


@pytest.fixture(scope="module")
def probes() -> tuple[FakeFS, bytes, tarmod.TarStats, list[str]]:
    fs = probe_fs()
    warnings: list[str] = []
    out = io.BytesIO()
    stats = write_tar(fs.walk(), out, on_warning=warnings.append)
    return fs, out.getvalue(), stats, warnings


@pytest.fixture(scope="module")
def probe_tar(probes: tuple[FakeFS, bytes, tarmod.TarStats, list[str]], tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("probe") / "probes.tar"
    path.write_bytes(probes[1])
    return path


def first_paths(fs: FakeFS) -> dict[tuple[int, int], bytes]:
    """For inodes with several links, the member name of the first path in walk order."""
    first: dict[tuple[int, int], bytes] = {}
    for item in fs.walk():
        if item.entry.nlink > 1 and item.entry.type is not EntryType.DIR:
            first.setdefault(item.link_key, member_name(item))
    return first


def pax_mtime_ns(member: tarfile.TarInfo) -> int:
    """mtime in ns, exactly, from the PAX text (TarInfo.mtime is a float)."""
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * NS
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    value = int(whole) * NS + int((frac + "0" * 9)[:9])
    return -value if negative else value


# ---------------------------------------------------------------------------------------------
# CPython's tarfile
# ---------------------------------------------------------------------------------------------


def test_tarfile_reads_every_probe(probes) -> None:  # type: ignore[no-untyped-def]
    fs, data, stats, _ = probes
    first = first_paths(fs)
    expected = [item for item in fs.walk() if item.entry.type is not EntryType.SOCKET]
    with tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [
            display(member_name(i)).rstrip("/") if i.path else "." for i in expected
        ]
        for item, member in zip(expected, members, strict=True):
            e = item.entry
            name = member.name
            assert member.mode == e.mode, name
            assert (member.uid, member.gid) == (e.uid, e.gid), name
            assert member.uname == member.gname == "", name
            assert pax_mtime_ns(member) == e.mtime_ns, name
            xattrs = {
                k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                for k, v in member.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            assert xattrs == e.xattrs, name
            if first.get(item.link_key, member_name(item)) != member_name(item):
                assert member.type == tarfile.LNKTYPE, name
                assert member.linkname == display(first[item.link_key]), name
                continue
            assert member.type == TARTYPES[e.type], name
            if e.type is EntryType.SYMLINK:
                assert member.linkname.encode("utf-8", "surrogateescape") == e.link_target
            if e.type in (EntryType.CHAR, EntryType.BLOCK):
                assert (member.devmajor, member.devminor) == (e.rdev_major, e.rdev_minor)
            if e.type is EntryType.FILE:
                assert member.size == e.size, name
                fh = tf.extractfile(member)
                assert fh is not None
                with fh:
                    if e.size > 64 << 20:  # the 3 GiB one: read around its data only
                        fh.seek(GIANT_AT - 4096)
                        window = fh.read(len(GIANT_DATA) + 8192)
                        assert window == bytes(4096) + GIANT_DATA + bytes(4096)
                        fh.seek(GIANT_SIZE - 10)
                        assert fh.read() == bytes(10)
                    else:
                        assert fh.read() == expected_content(fs, item.handle), name  # type: ignore[arg-type]
    assert stats.entries == len(expected)
    assert stats.skipped == 1
    assert stats.hardlinks == 2
    assert stats.sparse_files == 4
    assert stats.devices == 3 and stats.fifos == 1


def test_member_names_and_layout(probes) -> None:  # type: ignore[no-untyped-def]
    _, data, stats, _ = probes
    assert len(data) % RECORD == 0
    assert stats.archive_bytes == len(data)
    # the last member's data is followed by at least two zero blocks
    assert data[-2 * BLOCK :] == bytes(2 * BLOCK)
    with tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as tf:
        last = tf.getmembers()[-1]
    assert data[last.offset_data :] == bytes(len(data) - last.offset_data)
    # ustar header fields: magic, version, raw ("./…/") member names
    headers = raw_headers(data)
    assert headers[0][0][:2] == b"./"
    names = {h[0] for h in headers}
    assert b"./" in names and b"./dev/" in names and b"./bin/setuid" in names
    for _, hdr, _ in headers:
        assert hdr[257:265] == b"ustar\x0000"
        assert hdr[265:329] == bytes(64)  # numeric owners: no uname/gname
        assert tarfile.calc_chksums(hdr)[0] == int(hdr[148:154], 8)


def raw_headers(data: bytes) -> list[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """(ustar name, ustar header, PAX records) of each member, parsed by hand."""
    out = []
    off = 0
    records: dict[bytes, bytes] = {}
    while off < len(data):
        hdr = data[off : off + BLOCK]
        if hdr == bytes(BLOCK):
            break
        size = tarfile.nti(hdr[124:136])
        body = data[off + BLOCK : off + BLOCK + size]
        off += BLOCK + -(-size // BLOCK) * BLOCK
        if hdr[156:157] == b"x":
            records = parse_pax(body)
            continue
        if records.get(b"GNU.sparse.major") == b"1":
            pass  # the data holds the map then the runs: size covers them all
        out.append((hdr[:100].rstrip(b"\0"), hdr, records))
        records = {}
    return out


def parse_pax(body: bytes) -> dict[bytes, bytes]:
    """Parse PAX records, checking every length is exact."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        space = body.index(b" ", pos)
        length = int(body[pos:space])
        record = body[pos : pos + length]
        assert record.endswith(b"\n"), record
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        records[key] = value
        pos += length
    assert pos == len(body)
    return records


def test_pax_only_where_ustar_cannot_hold_it(probes) -> None:  # type: ignore[no-untyped-def]
    _, data, _, _ = probes
    by_name = {
        (rec.get(b"GNU.sparse.name") or rec.get(b"path") or name): (hdr, rec)
        for name, hdr, rec in raw_headers(data)
    }
    plain = [b"./bin/setuid", b"./owners/big", b"./dev/bigchar", b"./times/epoch", b"./tmp/"]
    for name in plain:
        assert by_name[name][1] == {}, name
    hdr, rec = by_name[b"./owners/huge"]
    assert rec == {b"uid": b"4294967294", b"gid": b"4294967294"}
    # the ustar field holds the value too, in GNU base-256
    assert hdr[108] == 0x80 and tarfile.nti(hdr[108:116]) == 2**32 - 2
    assert by_name[b"./owners/mixed"][1] == {b"uid": b"2097152"}
    assert by_name[b"./owners/mixed"][0][116:124] == b"7777777\0"
    assert by_name[b"./times/neg"][1] == {b"mtime": b"-1.5"}
    assert tarfile.nti(by_name[b"./times/neg"][0][136:148]) == -2  # floor, base-256
    assert by_name[b"./times/1960"][1] == {b"mtime": b"-315619199.876543211"}
    assert by_name[b"./times/2100"][1] == {b"mtime": b"4102444800.123456789"}
    assert by_name[b"./times/2300"][1] == {b"mtime": b"10413792000"}
    assert by_name[b"./times/ns"][1] == {b"mtime": b"1000000000.000000001"}
    assert by_name[b"./"][1] == {b"mtime": b"1700000000.000000005"}
    assert by_name[b"./names/\xc3\xa9t\xc3\xa9"][1] == {b"path": b"./names/\xc3\xa9t\xc3\xa9"}
    assert by_name[b"./names/" + NON_UTF8][1] == {b"path": b"./names/" + NON_UTF8}
    assert b"hdrcharset" not in data  # GNU tar 1.34 warns on it
    long_link = by_name[b"./names/long-link"][1]
    assert len(long_link[b"linkpath"]) == 300 and b"path" not in long_link
    deep = by_name[b"./" + DEEP_FILE]
    assert len(DEEP_FILE) == 4000 and deep[1][b"path"] == b"./" + DEEP_FILE
    dev = by_name[b"./dev/sda"][0]
    assert (int(dev[329:336], 8), int(dev[337:344], 8)) == (259, 1048575)
    # xattr values are raw bytes: NULs, newlines and '=' inside are fine
    acl = by_name[b"./acl/file"][1]
    assert acl[b"SCHILY.xattr.user.bin"] == b"\x00\x01\x02\xff\x00"
    assert acl[b"SCHILY.xattr.trusted.x"] == b"\n=\n"


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, b"0"),
        (-1_500_000_000, b"-1.5"),
        (-1, b"-0.000000001"),
        (-315_619_200 * NS + 123_456_789, b"-315619199.876543211"),
        (4_102_444_800_123_456_789, b"4102444800.123456789"),
        (1_000_000_000_100_000_000, b"1000000000.1"),
        (-7 * NS, b"-7"),
    ],
)
def test_pax_time_text(ns: int, text: bytes) -> None:
    assert tarmod._pax_time(ns) == text


def test_pax_record_length_is_exact() -> None:
    # every length around the 1→2, 2→3, 3→4 and 4→5 digit boundaries of the length itself
    for n in range(0, 10_050):
        record = tarmod._pax_record(b"k", b"v" * n)
        length = int(record.split(b" ", 1)[0])
        assert length == len(record), n
        assert record.endswith(b"v" * n + b"\n")


def test_hardlinks_remember_only_pending_inodes() -> None:
    fs = probe_fs()
    writer = TarWriter(io.BytesIO())
    seen_links = 0
    for item in fs.walk():
        writer.add(item)
        if item.link_key == (1, 4242):
            seen_links += 1
            assert len(writer._links) == (0 if seen_links == 3 else 1)
    assert writer._links == {}
    writer.finish()


def test_warnings(probes) -> None:  # type: ignore[no-untyped-def]
    _, _, stats, warnings = probes
    assert warnings == stats.warnings
    assert "socket ./dev/sock skipped: tar cannot hold sockets" in warnings
    assert any(".wh.looks-like-a-whiteout" in w and "whiteout" in w for w in warnings)
    assert len(warnings) == 2


def test_deterministic() -> None:
    one, _ = build(probe_fs().walk())
    two, _ = build(probe_fs().walk())
    assert one == two


def test_giant_sparse_file_costs_only_its_data(probes) -> None:  # type: ignore[no-untyped-def]
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(
        b"giant",
        entry(EntryType.FILE, 0o644, size=GIANT_SIZE),
        chunks={GIANT_AT: GIANT_DATA},
        runs=[(GIANT_AT, len(GIANT_DATA))],
    )
    data, stats = build(fs.walk())
    assert len(data) < len(GIANT_DATA) + 6 * BLOCK + RECORD
    assert stats.data_bytes == len(GIANT_DATA)  # type: ignore[attr-defined]
    (name, hdr, rec), *_ = [h for h in raw_headers(data) if h[0] != b"./"]
    assert name == b"./GNUSparseFile.0/giant"
    assert rec == {
        b"GNU.sparse.major": b"1",
        b"GNU.sparse.minor": b"0",
        b"GNU.sparse.name": b"./giant",
        b"GNU.sparse.realsize": str(GIANT_SIZE).encode(),
    }
    assert tarfile.nti(hdr[124:136]) == BLOCK + len(GIANT_DATA)


def test_sparse_map_and_runs(probes) -> None:  # type: ignore[no-untyped-def]
    _, data, _, _ = probes
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmember("./sparse")
        assert member.sparse == [(SPARSE_AT, len(SPARSE_DATA)), (SPARSE_SIZE, 0)]
        # normalised: clipped to the size, merged, sorted; always ends with (size, 0)
        assert tf.getmember("./sparse-tail").sparse == [(1024 * 1024 - 4096, 4096), (1 << 20, 0)]
        assert tf.getmember("./sparse-holes-only").sparse == [(65536, 0)]
        # a 100-byte hole is written dense; runs covering everything too
        assert tf.getmember("./tiny-hole").sparse is None
        assert tf.getmember("./dense-runs").sparse is None


def assert_readers_fail(data: bytes, tmp_path: Path) -> None:
    """GNU tar and CPython's tarfile both report the archive as broken."""
    path = tmp_path / "broken.tar"
    path.write_bytes(data)
    res = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True)  # as from a pipe
    assert res.returncode == 2
    assert b"Unexpected EOF in archive" in res.stderr
    with pytest.raises(tarfile.ReadError), tarfile.open(path) as tf:
        for member in tf:
            fh = tf.extractfile(member)
            if fh is not None:
                with fh:
                    fh.read()


def test_short_content_is_an_error_and_readers_see_a_broken_archive(tmp_path: Path) -> None:
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(b"a", entry(EntryType.FILE, 0o644, size=3), chunks={0: b"abc"})
    fs.add(b"short", entry(EntryType.FILE, 0o644, size=5 << 20), truncate_at=3 << 20)
    fs.add(b"z", entry(EntryType.FILE, 0o644, size=3), chunks={0: b"xyz"})
    out = io.BytesIO()
    with pytest.raises(SinkError, match=r"\./short: content ended at byte 3145728 of 5242880"):
        write_tar(fs.walk(), out)
    data = out.getvalue()
    assert 3 << 20 <= len(data) < (3 << 20) + 8 * BLOCK  # what was read, not padded
    assert b"./z" not in data
    assert_readers_fail(data, tmp_path)


@pytest.mark.parametrize("fail_at", [0, 1, 30, 55])
def test_failure_between_members_ends_inside_a_member(tmp_path: Path, fail_at: int) -> None:
    """GNU tar, tarfile and Go all accept an archive cut at a member boundary without a
    word; the writer must end it inside a member instead."""

    def items() -> Iterator[TreeItem]:
        for n, item in enumerate(probe_fs().walk()):
            if n == fail_at:
                raise KeyboardInterrupt
            yield item

    out = io.BytesIO()
    with pytest.raises(KeyboardInterrupt):
        write_tar(items(), out)
    data = out.getvalue()
    assert len(data) % BLOCK == 0
    last = data[-BLOCK:]
    assert last[:100].rstrip(b"\0") == tarmod.FAILED_NAME
    assert tarfile.nti(last[124:136]) == 8**11 - 1
    assert_readers_fail(data, tmp_path)


def test_sparse_run_past_the_end_of_the_stream_is_an_error() -> None:
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(
        b"s",
        entry(EntryType.FILE, 0o644, size=1 << 20),
        runs=[(0, 4096), (900_000, 4096)],
        truncate_at=500_000,
    )
    with pytest.raises(SinkError, match=r"content ended at byte 900000 of 1048576"):
        write_tar(fs.walk(), io.BytesIO())


def test_progress_is_cumulative_content_bytes() -> None:
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(b"big", entry(EntryType.FILE, 0o644, size=(5 << 20) + 7))
    fs.add(b"small", entry(EntryType.FILE, 0o644, size=10))
    seen: list[int] = []
    _, stats = build(fs.walk(), on_progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == (5 << 20) + 17 == stats.data_bytes  # type: ignore[attr-defined]
    assert max(b - a for a, b in zip([0, *seen], seen, strict=False)) <= 1 << 20


class _Zeros(io.RawIOBase):
    """An endless stream of zeros without allocating per read."""

    _chunk = bytes(1 << 20)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._chunk if n == len(self._chunk) else bytes(n)


class _Head(io.RawIOBase):
    """Keeps the first bytes written and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.head = bytearray()
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def,override]
        if len(self.head) < 8192:
            self.head += bytes(data[: 8192 - len(self.head)])
        self.total += len(data)
        return len(data)


def test_file_of_8_gib_or_more_gets_pax_size() -> None:
    size = 8 * 1024**3 + 1
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    handle = fs.add(b"huge", entry(EntryType.FILE, 0o644, size=size))
    fs.open = lambda h: _Zeros() if h == handle else None  # type: ignore[method-assign,assignment,return-value]
    sink = _Head()
    stats = write_tar(fs.walk(), sink)  # type: ignore[arg-type]
    assert sink.total == stats.archive_bytes and sink.total % RECORD == 0
    (_, hdr, rec), *_ = [h for h in raw_headers(bytes(sink.head)) if h[0] != b"./"]
    assert rec == {b"size": str(size).encode()}
    assert hdr[124] == 0x80 and tarfile.nti(hdr[124:136]) == size
    head = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
    assert head.size == size


# ---------------------------------------------------------------------------------------------
# GNU tar
# ---------------------------------------------------------------------------------------------


def test_gnu_tar_lists_without_warnings(probe_tar: Path, probes) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run(["tar", "--numeric-owner", "-tvf", probe_tar], capture_output=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""
    lines = res.stdout.splitlines()
    assert len(lines) == probes[2].entries
    listing = b"\n".join(lines)
    for expected in [
        rb"crw------- 0/0 +300,70000 .* \./dev/bigchar$",
        rb"brw-rw---- 0/6 +259,1048575 .* \./dev/sda$",
        rb"prw--w---- 0/0 .* \./dev/fifo$",
        rb"hrw-r----- 7/8 +0 .* \./links/b link to \./links/a$",
        rb"-rwsr-xr-x 0/0 +1100 .* \./bin/setuid$",
        rb"-rwx--s--x 0/50 .* \./bin/setgid$",
        rb"drwxrwxrwt 0/0 .* \./tmp/$",
        rb"-rw-r--r-- 4294967294/4294967294 .* \./owners/huge$",
        rb"-rw------- 0/0 +3221225472 .* \./sparse-giant$",
        rb"-rw-r--r-- 0/0 .* 1960-01-01 00:00 \./times/1960$",
        rb"-rw-r--r-- 0/0 .* 2100-01-01 00:00 \./times/2100$",
        rb"-rw-r--r-- 0/0 .* \./names/caf\\351$",
        rb"lrwxrwxrwx 0/0 .* \./names/binary-link -> target-\\377\\376$",
    ]:
        assert re.search(expected, listing, re.M), expected


def test_gnu_tar_extracts_every_probe(  # type: ignore[no-untyped-def]
    probe_tar: Path, probes, tmp_path: Path, require_root
) -> None:
    fs, _, _, _ = probes
    dest = tmp_path / "x"
    dest.mkdir()
    res = subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", probe_tar, "-C", dest],
        capture_output=True,
    )
    assert res.returncode == 0, res.stderr
    # GNU tar only complains about the timestamps (implausibly old / in the future)
    for line in res.stderr.splitlines():
        assert b"time stamp" in line, line
    inodes: dict[tuple[int, int], int] = {}
    for item in fs.walk():
        e = item.entry
        path = os.path.join(os.fsencode(dest), item.path) if item.path else os.fsencode(dest)
        name = display(item.path)
        if e.type is EntryType.SOCKET:
            assert not os.path.lexists(path)
            continue
        st = os.lstat(path)
        assert EntryType.from_mode(st.st_mode) is e.type, name
        if e.type is not EntryType.SYMLINK:
            assert stat.S_IMODE(st.st_mode) == e.mode, name
        assert (st.st_uid, st.st_gid) == (e.uid, e.gid), name
        assert st.st_mtime_ns == e.mtime_ns, name
        if e.type is EntryType.SYMLINK:
            assert os.readlink(path) == e.link_target
            continue
        xattrs = {x: os.getxattr(path, x) for x in os.listxattr(path)}
        assert xattrs == e.xattrs, name
        if e.type in (EntryType.CHAR, EntryType.BLOCK):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (e.rdev_major, e.rdev_minor)
        if e.nlink > 1:
            assert inodes.setdefault(item.link_key, st.st_ino) == st.st_ino, name
        if e.type is EntryType.FILE:
            assert st.st_size == e.size, name
            if e.size == GIANT_SIZE:
                assert st.st_blocks * 512 < 1 << 20  # GNU tar restored it sparse
                with open(path, "rb") as fh:
                    assert os.lseek(fh.fileno(), 0, os.SEEK_DATA) <= GIANT_AT
                    fh.seek(GIANT_AT)
                    assert fh.read(len(GIANT_DATA)) == GIANT_DATA
            else:
                with open(path, "rb") as fh:
                    got = hashlib.sha256(fh.read()).digest()
                assert got == hashlib.sha256(expected_content(fs, item.handle)).digest(), name  # type: ignore[arg-type]
    assert inodes and all(os.lstat(dest / "links/a").st_nlink == 3 for _ in inodes)
    assert (dest / "bin/setuid").read_bytes() == CONTENT


#: where the data of a 1 MiB sparse file lies (offset, length)
LAYOUTS = [
    [(409600, 8192)],  # data in the middle
    [(0, 4096), (1 << 19, 4096), ((1 << 20) - 4096, 4096)],  # data at both ends
    [],  # all hole
]


def _sparse_file(tmp_path: Path, layout: list[tuple[int, int]]) -> Path:
    """``src/sp``: 1 MiB of holes with random data at *layout*, holes as the filesystem
    reports them (SEEK_DATA/SEEK_HOLE, as GNU tar --sparse finds them)."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "sp"
    with open(f, "wb") as fh:
        fh.truncate(1 << 20)
        for offset, length in layout:
            fh.seek(offset)
            fh.write(os.urandom(length))
    os.utime(f, ns=(1_600_000_000 * NS, 1_700_000_000 * NS + 120_000_000))
    with open(f, "rb") as fh:
        runs = seek_runs(fh.fileno(), 1 << 20)
    assert runs == layout, "the scratch filesystem must report holes (SEEK_HOLE) exactly"
    return f


@pytest.mark.parametrize("layout", LAYOUTS, ids=["middle", "ends", "empty"])
def test_sparse_member_matches_gnu_tar(tmp_path: Path, layout: list[tuple[int, int]]) -> None:
    f = _sparse_file(tmp_path, layout)
    src, runs = f.parent, layout
    gnu_tar = tmp_path / "gnu.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=pax", "--numeric-owner", "-C", src, "-cf", gnu_tar, "./sp"],
        check=True,
    )
    st = os.stat(f)
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    content = f.read_bytes()
    fs.add(
        b"sp",
        entry(
            EntryType.FILE,
            stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
        ),
        chunks={off: content[off : off + n] for off, n in runs},
        runs=runs,
    )
    ours, _ = build([i for i in fs.walk() if i.path])
    gnu = gnu_tar.read_bytes()
    assert len(ours) == len(gnu)
    ((g_name, g_hdr, g_rec),) = raw_headers(gnu)
    ((o_name, o_hdr, o_rec),) = raw_headers(ours)
    assert g_name.startswith(b"./GNUSparseFile.") and g_name.endswith(b"/sp")
    assert o_name == b"./GNUSparseFile.0/sp"
    for key in (b"atime", b"ctime"):
        g_rec.pop(key)  # GNU tar also stores atime/ctime; ova2img keeps mtime only
    assert o_rec == g_rec
    # the ustar header: same bytes but for the name (PID) and so the checksum
    assert o_hdr[100:148] == g_hdr[100:148]
    assert o_hdr[156:] == g_hdr[156:]
    # the member data (sparse map, then the runs) and everything after it
    assert ours[2 * BLOCK + BLOCK :] == gnu[2 * BLOCK + BLOCK :]
    # and GNU tar extracts ours to the same file
    dest = tmp_path / "out"
    dest.mkdir()
    out_tar = tmp_path / "ours.tar"
    out_tar.write_bytes(ours)
    subprocess.run(["tar", "-xf", out_tar, "-C", dest], check=True)
    assert (dest / "sp").read_bytes() == content
    assert not (dest / "GNUSparseFile.0").exists()


@pytest.mark.parametrize("layout", LAYOUTS, ids=["middle", "ends", "empty"])
def test_dense_member_matches_gnu_tar_without_sparse(
    tmp_path: Path, layout: list[tuple[int, int]]
) -> None:
    """``sparse=False`` (image layers) writes a file with holes as GNU tar does without
    ``--sparse``: one plain member of the full size, holes as zeros."""
    f = _sparse_file(tmp_path, layout)
    src, runs = f.parent, layout
    gnu_tar = tmp_path / "gnu.tar"
    subprocess.run(
        ["tar", "--format=pax", "--numeric-owner", "-C", src, "-cf", gnu_tar, "./sp"], check=True
    )
    st = os.stat(f)
    content = f.read_bytes()
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(
        b"sp",
        entry(
            EntryType.FILE,
            stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
        ),
        # only the runs can be read: the holes must come from the writer, not the stream
        chunks={off: content[off : off + n] for off, n in runs},
        runs=runs,
    )
    items = [i for i in fs.walk() if i.path]
    ours, stats = build(items, sparse=False)
    assert stats.sparse_files == 0 and stats.data_bytes == 1 << 20  # type: ignore[attr-defined]
    assert tarmod.measure_tar(items, sparse=False).archive_bytes == len(ours)
    ((g_name, g_hdr, g_rec),) = raw_headers(gnu_tar.read_bytes())
    ((o_name, o_hdr, o_rec),) = raw_headers(ours)
    assert o_name == g_name == b"./sp"
    for key in (b"atime", b"ctime"):
        g_rec.pop(key)  # GNU tar also stores atime/ctime; ova2img keeps mtime only
    assert o_rec == g_rec and not any(k.startswith(b"GNU.sparse") for k in o_rec)
    assert o_hdr == g_hdr  # mode, owners, size, mtime, type, checksum: all equal
    with tarfile.open(fileobj=io.BytesIO(ours)) as tf:
        member = tf.getmember("./sp")
        assert member.sparse is None and member.size == 1 << 20
        fh = tf.extractfile(member)
        assert fh is not None
        with fh:
            assert fh.read() == content


def test_dense_giant_sparse_file_streams_zeros() -> None:
    """A 3 GiB file with 64 KiB of data, dense: the right length, the data in place, and the
    writer's buffers stay small (the holes are written in chunks, never read)."""
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    fs.add(
        b"giant",
        entry(EntryType.FILE, 0o644, size=GIANT_SIZE),
        chunks={GIANT_AT: GIANT_DATA},
        runs=[(GIANT_AT, len(GIANT_DATA))],
    )

    class Sink:
        def __init__(self) -> None:
            self.size = 0
            self.largest = 0
            self.window = b""

        def write(self, data: bytes) -> int:
            start = self.size
            self.size += len(data)
            self.largest = max(self.largest, len(data))
            lo, hi = GIANT_AT - 4096 + 2 * BLOCK, GIANT_AT + len(GIANT_DATA) + 4096 + 2 * BLOCK
            if start < hi and self.size > lo:
                self.window += bytes(data)[max(lo - start, 0) : hi - start]
            return len(data)

    items = list(fs.walk())
    sink = Sink()
    stats = write_tar(items, sink, sparse=False)  # type: ignore[arg-type]
    assert stats.sparse_files == 0
    assert stats.archive_bytes == sink.size == tarmod.measure_tar(items, sparse=False).archive_bytes
    assert sink.size >= GIANT_SIZE
    assert sink.largest <= tarmod.CHUNK + tarmod.CHUNK // 4
    # the headers of ./ and ./giant (no PAX records needed), then the data: at 2 blocks
    assert sink.window == bytes(4096) + GIANT_DATA + bytes(4096)


def test_empty_tree_is_just_the_end() -> None:
    data, stats = build([])
    assert data == bytes(RECORD)
    assert stats.entries == 0  # type: ignore[attr-defined]


def test_nul_in_path_is_refused() -> None:
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    item = TreeItem(b"a\0b", entry(EntryType.FILE, 0o644), fs, 1, 0)
    with pytest.raises(SinkError, match="NUL"):
        build([item])


def test_only_files_and_symlinks_become_hardlink_members() -> None:
    # GNU tar 1.34 (create.c) links the later names of a regular file or a symlink to the
    # first; a FIFO or a device node with several names is written whole under each.
    fs = FakeFS(entry(EntryType.DIR, 0o755))
    for kind, extra in (
        (EntryType.FILE, {}),
        (EntryType.SYMLINK, {"link_target": b"t"}),
        (EntryType.FIFO, {}),
        (EntryType.CHAR, {"rdev_major": 1, "rdev_minor": 3}),
        (EntryType.BLOCK, {"rdev_major": 8, "rdev_minor": 1}),
    ):
        e = entry(kind, 0o644, nlink=2, inode=100 + len(fs.nodes), **extra)
        handle = fs.add(kind.value.encode() + b"-a", e)
        fs.link(kind.value.encode() + b"-b", handle)
    data, stats = build(fs.walk())
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        links = {m.name: m.linkname for m in tf.getmembers() if m.islnk()}
        kinds = {m.name: m.type for m in tf.getmembers()}
    assert links == {"./file-b": "./file-a", "./symlink-b": "./symlink-a"}
    assert kinds["./fifo-b"] == tarfile.FIFOTYPE and kinds["./char-b"] == tarfile.CHRTYPE
    assert kinds["./block-b"] == tarfile.BLKTYPE
    assert stats.hardlinks == 2  # type: ignore[attr-defined]
