"""Property-based tests (hypothesis) over the structure parsers.

The property everywhere: *any* input gives either a valid result or an
:class:`~ova2img.errors.Ova2imgError` subclass, never another exception. Where a result can be
checked, it is (partitions inside the disk, the tar writer's output read back by CPython's
:mod:`tarfile` equal to what was written). The byte-level inputs are real structures made by
the real tools (``sfdisk``, ``sgdisk``, ``lvm2``, the committed ``demo.ova``) with bytes
replaced by hypothesis. Kept fast for CI: few examples, a deadline per example.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ova2img.assembly import Excluder, TreeItem, parse_fstab
from ova2img.disks.base import VirtualDisk
from ova2img.errors import Ova2imgError
from ova2img.filesystems.base import DataRun, Entry, EntryType, Filesystem
from ova2img.sinks.tar import write_tar

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

FAST = settings(
    max_examples=60,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def _ours_or_result(call: Callable[[], Any]) -> Any:
    """Run *call*: its result, or ``None`` when it raised one of our errors (anything else
    propagates and fails the test)."""
    try:
        return call()
    except Ova2imgError as err:
        assert "\n" not in str(err)
        return None


# --------------------------------------------------------------------------------------------
# text parsers


FSTAB_WORDS = st.sampled_from(
    [
        "/",
        "/boot",
        "UUID=0a2a",
        "LABEL=x",
        "ext4",
        "swap",
        "defaults,nofail",
        "0",
        "1",
        "#",
        "\\040",
        "/dev/sda1",
        "none",
        "bind",
        "\t",
        " ",
    ]
)


@FAST
@given(
    st.one_of(
        st.binary(max_size=512),
        st.lists(st.lists(FSTAB_WORDS | st.text(max_size=8), max_size=7), max_size=8).map(
            lambda rows: "\n".join(" ".join(r) for r in rows).encode("utf-8", "surrogatepass")
        ),
    )
)
def test_fstab_parser_never_fails(text: bytes) -> None:
    for e in parse_fstab(text):
        assert e.lineno >= 1
        assert e.options
        assert isinstance(e.mountpoint, bytes)


GLOB = st.text(alphabet=st.sampled_from("ab/*?[]!.-\\é\udcff"), max_size=12)


@FAST
@given(st.lists(GLOB, max_size=4), st.binary(max_size=40))
def test_excluder_any_pattern_any_path(patterns: list[str], path: bytes) -> None:
    assert Excluder(patterns)(path) in (True, False)


@FAST
@given(st.lists(st.text(alphabet="abc.-_ ", min_size=1, max_size=6), min_size=1, max_size=4))
def test_excluder_literal_path_matches_itself_and_below(parts: list[str]) -> None:
    path = "/".join(parts)
    assume(all(p.strip() and p not in (".", "..") for p in parts))
    raw = path.encode()
    assert Excluder([path])(raw)
    assert Excluder(["/" + path])(raw)
    assert Excluder([path])(b"x/" + raw)  # floating: any trailing part


def _vmdk_lines() -> st.SearchStrategy[str]:
    access = st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw", "XX"])
    kind = st.sampled_from(["FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "BOGUS"])
    number = st.one_of(st.integers(-5, 1 << 40).map(str), st.sampled_from(["", "x", "0x10"]))
    name = st.sampled_from(['"flat.img"', '"../x.img"', '"/abs"', '""', "noquote", '"a b"'])
    extent = st.tuples(access, number, kind, name, number).map(" ".join)
    other = st.sampled_from(
        [
            "# Disk DescriptorFile",
            "version=1",
            "version=3",
            'createType="monolithicFlat"',
            'createType="streamOptimized"',
            "parentCID=ffffffff",
            "CID=fffffffe",
            'parentFileNameHint="p.vmdk"',
            'ddb.adapterType = "ide"',
            "",
            "garbage =",
        ]
    )
    return st.one_of(extent, other, st.text(max_size=30))


@FAST
@given(st.lists(_vmdk_lines(), max_size=10))
def test_vmdk_descriptor_parser(lines: list[str]) -> None:
    from ova2img.disks.vmdk import open_vmdk

    text = ("# Disk DescriptorFile\n" + "\n".join(lines) + "\n").encode("utf-8", "surrogatepass")

    def resolve(name: str) -> BinaryIO:
        if name != "flat.img":
            from ova2img.errors import SourceError

            raise SourceError(f"no file {name!r}")
        return io.BytesIO(bytes(64 * 1024))

    disk = _ours_or_result(lambda: open_vmdk(io.BytesIO(text), "d.vmdk", resolve))
    if disk is not None:
        assert disk.size >= 0
        _ours_or_result(lambda: (disk.seek(0), disk.read(4096)))


@pytest.fixture(scope="module")
def demo_ovf() -> bytes:
    with tarfile.open(REPO / "fixtures" / "demo.ova") as tf:
        f = tf.extractfile("demo.ovf")
        assert f is not None
        with f:
            return f.read()


def _patched(base: bytes, patches: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(base)
    for off, chunk in patches:
        off %= max(1, len(data))
        data[off : off + len(chunk)] = chunk
    return bytes(data)


PATCHES = st.lists(
    st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)), max_size=4
)


@FAST
@given(PATCHES, st.integers(0, 1 << 16))
def test_ovf_parser(demo_ovf: bytes, patches: list[tuple[int, bytes]], cut: int) -> None:
    from ova2img.sources.ovf import parse_envelope

    data = _patched(demo_ovf, patches)[:cut]
    env = _ours_or_result(lambda: parse_envelope(data, "x.ovf"))
    if env is not None:
        for d in env.disks:
            assert d.capacity is None or d.capacity >= 0


@FAST
@given(
    st.sampled_from(
        ["KiB", "MiB", "GiB", "byte", "byte * 2^20", "byte * 2^-3", "byte*10^3", "furlong", ""]
    ),
    st.sampled_from(["1", "-1", "0", "1e3", "99999999999999999999999", "x", "", "4294967296"]),
)
def test_ovf_capacity(units: str, value: str) -> None:
    from ova2img.sources.ovf import parse_capacity

    got = _ours_or_result(lambda: parse_capacity(value, units, "x.ovf"))
    assert got is None or got >= 0


@FAST
@given(st.binary(max_size=400))
def test_manifest_and_vmx_parsers(data: bytes) -> None:
    from ova2img.sources.manifest import parse_manifest
    from ova2img.sources.vmx import parse_vmx

    _ours_or_result(lambda: parse_manifest(data, "x.mf"))
    _ours_or_result(lambda: parse_vmx(data, "x.vmx"))


@FAST
@given(st.binary(min_size=0, max_size=120), st.integers(0, 1 << 40))
def test_qcow2_header_check(head: bytes, file_size: int) -> None:
    from ova2img.disks.qcow2 import check_header

    _ours_or_result(lambda: check_header(b"QFI\xfb" + head, file_size, "x.qcow2"))


# --------------------------------------------------------------------------------------------
# partition tables (MBR with logical partitions, GPT) made by sfdisk / sgdisk


def _disk(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if not (shutil.which("sfdisk") and shutil.which("sgdisk")):
        pytest.skip("needs sfdisk and sgdisk")
    work = tmp_path_factory.mktemp("tables")
    mbr = work / "mbr.img"
    gpt = work / "gpt.img"
    for p in (mbr, gpt):
        with p.open("wb") as f:
            f.truncate(4 * MiB)
    script = "label: dos\nstart=2048, size=1024, type=83\nstart=4096, type=5\n" \
        "size=1024, type=83\nsize=1024, type=82\n"  # fmt: skip
    subprocess.run(["sfdisk", "-q", mbr], input=script, text=True, check=True)
    subprocess.run(
        ["sgdisk", "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:0", "-t", "2:8300", gpt],
        check=True,
        capture_output=True,
    )
    return {"mbr": _disk(mbr), "gpt": _disk(gpt)}


def _check_volumes(data: bytes) -> None:
    from ova2img.volumes import find_volumes

    disk = VirtualDisk("sda", "raw", "", len(data), io.BytesIO(data))
    volumes = _ours_or_result(lambda: find_volumes(disk))
    for v in volumes or []:
        assert v.offset >= 0 and v.size >= 0
        assert v.offset + v.size <= len(data), (v.name, v.offset, v.size)


def _table_patches(regions: list[tuple[int, int]]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    offsets = st.one_of(*(st.integers(a, b - 1) for a, b in regions))
    values = st.one_of(
        st.binary(min_size=1, max_size=8),
        st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x05", b"\x0f", b"\xee"]),
    )
    return st.lists(st.tuples(offsets, values), min_size=1, max_size=6)


@FAST
@given(_table_patches([(446, 512), (2048 * 512 + 1024 * 512 + 446, 2048 * 512 + 1024 * 512 + 512)]))
def test_mbr_tables(tables: dict[str, bytes], patches: list[tuple[int, bytes]]) -> None:
    _check_volumes(_patched(tables["mbr"], patches))


@FAST
@given(_table_patches([(446, 512), (512, 604), (1024, 1024 + 256), (4 * MiB - 512, 4 * MiB - 420)]))
def test_gpt_tables(tables: dict[str, bytes], patches: list[tuple[int, bytes]]) -> None:
    _check_volumes(_patched(tables["gpt"], patches))


# --------------------------------------------------------------------------------------------
# LVM metadata text (a PV made by lvm2, its metadata text replaced)


@pytest.fixture(scope="module")
def lvm_pv(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int]:
    """A whole-disk PV with one VG and two LVs, and where its metadata text lies."""
    from support.lvm import LVSpec, PVSpec, create_vg, unique_vg

    if os.geteuid() != 0 or shutil.which("pvcreate") is None:
        pytest.skip("needs root and lvm2")
    disk = tmp_path_factory.mktemp("lvm") / "pv.img"
    with disk.open("wb") as f:
        f.truncate(16 * MiB)
    vg = unique_vg("prop")
    create_vg(vg, [PVSpec(disk, 0, 16 * MiB)], [LVSpec("root", 4), LVSpec("home", 4)])
    data = disk.read_bytes()
    at = data.rfind(vg.encode() + b" {")  # the newest copy of the text
    end = data.index(b"\0", at)
    return data, at, end


LVM_TOKENS = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        "=",
        '"',
        ",",
        "\n",
        "#",
        "extent_size",
        "physical_volumes",
        "logical_volumes",
        "segment_count",
        "start_extent",
        "extent_count",
        "stripes",
        "pv0",
        "0",
        "-1",
        "18446744073709551616",
        "4",
        "type",
        '"striped"',
        '"thin"',
        "seqno",
        "id",
        "x",
    ]
)


@FAST
@given(
    st.one_of(
        st.lists(LVM_TOKENS, max_size=60).map(" ".join),
        st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=6)), max_size=5),
    )
)
def test_lvm_metadata_text(lvm_pv: tuple[bytes, int, int], change: Any) -> None:
    from ova2img.volumes import find_volumes
    from ova2img.volumes.lvm import assemble_lvm

    data, at, end = lvm_pv
    text = data[at:end]
    new = change.encode() if isinstance(change, str) else _patched(text, change)
    new = new[: end - at].ljust(end - at, b"\0")
    image = data[:at] + new + data[end:]
    disk = VirtualDisk("sda", "raw", "", len(image), io.BytesIO(image))
    (pv,) = find_volumes(disk)
    got = _ours_or_result(lambda: assemble_lvm([pv]))
    if got is not None:
        for lv in got[0]:
            assert lv.size >= 0
            _ours_or_result(lambda lv=lv: (lv.stream.seek(0), lv.stream.read(512)))


# --------------------------------------------------------------------------------------------
# the tar writer, read back by CPython's tarfile


class _MemFS(Filesystem):
    """Entries held in memory: handle = index into ``nodes``."""

    fstype = "mem"

    def __init__(self) -> None:
        self.nodes: list[tuple[Entry, bytes]] = []

    def root(self) -> object:
        return 0

    def stat(self, handle: object) -> Entry:
        return self.nodes[int(handle)][0]  # type: ignore[call-overload]

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        return iter(())

    def open(self, handle: object) -> BinaryIO:
        return io.BytesIO(self.nodes[int(handle)][1])  # type: ignore[call-overload]

    def data_runs(self, handle: object) -> list[DataRun] | None:
        return None


NAME = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
) | st.text(alphabet="abcé中 -_.", min_size=1, max_size=110).map(str.encode).filter(
    lambda n: n not in (b".", b"..")
)

KINDS = [EntryType.FILE, EntryType.DIR, EntryType.SYMLINK, EntryType.FIFO, EntryType.CHAR]


@st.composite
def _entries(draw: st.DrawFn) -> list[tuple[bytes, Entry, bytes]]:
    names = draw(st.lists(NAME, min_size=1, max_size=8, unique=True))
    out = []
    for i, name in enumerate(names):
        kind = draw(st.sampled_from(KINDS))
        data = draw(st.binary(max_size=700)) if kind is EntryType.FILE else b""
        e = Entry(
            type=kind,
            mode=draw(st.integers(0, 0o7777)),
            uid=draw(st.integers(0, (1 << 32) - 1)),
            gid=draw(st.integers(0, (1 << 32) - 1)),
            size=len(data),
            mtime_ns=draw(st.integers(-(1 << 33), 1 << 40)) * 10**9
            + draw(st.integers(0, 10**9 - 1)),
            atime_ns=0,
            ctime_ns=0,
            nlink=1,
            inode=i + 1,
        )
        if kind is EntryType.SYMLINK:
            e.link_target = draw(NAME | st.just(b"/etc/x" * 30))
        if kind is EntryType.CHAR:
            e.rdev_major, e.rdev_minor = draw(st.integers(0, 4095)), draw(st.integers(0, 1 << 19))
        e.xattrs = draw(
            st.dictionaries(
                st.sampled_from(["user.a", "user.é", "security.selinux", "trusted.x=y"]),
                st.binary(max_size=20),
                max_size=2,
            )
        )
        out.append((b"d/" + name, e, data))
    return out


@settings(FAST, max_examples=80)
@given(_entries())
def test_tar_writer_round_trip(entries: list[tuple[bytes, Entry, bytes]]) -> None:
    fs = _MemFS()
    root = Entry(type=EntryType.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=0,
                 atime_ns=0, ctime_ns=0, nlink=2, inode=1000)  # fmt: skip
    fs.nodes.append((root, b""))
    items = [TreeItem(b"d", root, fs, 0, 0)]
    for path, e, data in entries:
        fs.nodes.append((e, data))
        items.append(TreeItem(path, e, fs, 0, len(fs.nodes) - 1))
    buf = io.BytesIO()
    write_tar(iter(items), buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["./d"] + [
            "./" + p.decode("utf-8", "surrogateescape") for p, _e, _d in entries
        ]
        for m, (_path, e, data) in zip(members[1:], entries, strict=True):
            assert m.mode == stat.S_IMODE(e.mode)
            assert (m.uid, m.gid) == (e.uid, e.gid)
            assert int(m.mtime // 1) == e.mtime_ns // 10**9 or abs(m.mtime - e.mtime_ns / 1e9) < 1
            for k, v in e.xattrs.items():
                # GNU tar's xattr_encode_keyword: '%' and '=' percent-encoded
                key = k.replace("%", "%25").replace("=", "%3D")
                got = m.pax_headers.get("SCHILY.xattr." + key)
                assert got is not None
                assert got.encode("utf-8", "surrogateescape") == v
            if e.type is EntryType.FILE:
                f = tf.extractfile(m)
                assert f is not None
                with f:
                    assert f.read() == data
            elif e.type is EntryType.SYMLINK:
                assert m.issym()
                assert m.linkname.encode("utf-8", "surrogateescape") == e.link_target
            elif e.type is EntryType.DIR:
                assert m.isdir()
            elif e.type is EntryType.FIFO:
                assert m.isfifo()
            else:
                assert m.ischr()
                assert (m.devmajor, m.devminor) == (e.rdev_major, e.rdev_minor)
