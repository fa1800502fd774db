"""ExtFilesystem against the kernel: full walks of ext2/3/4 images compared with a loop mount.

Every image is made by real tools (mke2fs, a read-write kernel mount populated with real
syscalls, setfacl, setcap, ``e2fsck -fyD`` for htree directories); the oracle is a read-only
kernel loop mount walked with ``os.lstat``/``listxattr``/``getxattr``/``readlink`` and
``SEEK_DATA``/``SEEK_HOLE``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dissect.extfs import ExtFS
from support.compare import assert_same_tree
from support.reference import make_reference
from support.walks import Seen, adapter_walk, assert_same_walk, kernel_walk, seek_runs

import ova2img
from ova2img.errors import FilesystemError, UnsupportedError
from ova2img.filesystems.ext import ExtFilesystem

MiB = 1 << 20

# Times the kernel stores in the probes (ns since the epoch).
T_PRE_1970 = -1_234_567_890_123_456_789  # 1930
T_2038 = (2**31 + 10) * 10**9 + 5  # just past the 32-bit signed rollover
T_2100 = 4_102_444_800 * 10**9 + 999_999_999  # needs the epoch bits


def _is_root() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


def run(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True)
    if proc.returncode not in ok:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def mounted(img: Path, *, rw: bool = False, options: str = "") -> Iterator[Path]:
    """Loop-mount *img* on a unique directory; unmount (and free the loop) on exit."""
    mnt = Path(f"/tmp/o2i-ext-{uuid.uuid4().hex[:12]}")
    mnt.mkdir()
    opts = ",".join(o for o in ("rw" if rw else "ro", options) if o)
    dev = run("losetup", "--find", "--show", img).strip()
    try:
        run("mount", "-t", "ext4", "-o", opts, dev, mnt)
        try:
            yield mnt
        finally:
            run("umount", mnt)
    finally:
        run("losetup", "--detach", dev, ok=(0, 1))
        mnt.rmdir()


def mkfs(img: Path, *args: str, size: str = "32M") -> None:
    run("mke2fs", "-q", "-F", "-E", "root_owner=0:0", *args, img, size)


# -- populating an image through the kernel ---------------------------------------------------


def populate(m: Path, *, unwritten: bool, big_dir: int = 3000) -> None:
    """The fidelity probes (plus ext specifics), made with real syscalls on a rw mount."""
    rnd = random.Random(7)
    (m / "empty").write_bytes(b"")
    (m / "small").write_bytes(b"hello\n")
    (m / "tiny100").write_bytes(bytes(range(100)))  # inline with a system.data tail
    (m / "medium").write_bytes(rnd.randbytes(5000))
    (m / "big").write_bytes(rnd.randbytes(MiB + 123))
    (m / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(m / "setuid", 0o4755)
    (m / "sticky").mkdir()
    os.chmod(m / "sticky", 0o1777)
    (m / "setgid").mkdir()
    os.chmod(m / "setgid", 0o2750)
    (m / "emptydir").mkdir()
    (m / "cap").write_bytes(b"\x7fELF")
    run("setcap", "cap_net_raw+ep", m / "cap")
    (m / "xattrs").write_bytes(b"x")
    os.setxattr(m / "xattrs", "user.binary", b"\x00\xff\x01value")
    os.setxattr(m / "xattrs", "trusted.t", b"trusted")
    os.setxattr(m / "xattrs", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    (m / "bigxattr").write_bytes(b"y")
    os.setxattr(m / "bigxattr", "user.big", rnd.randbytes(900))  # into the xattr block
    os.setxattr(m / "bigxattr", "user.small", b"s")
    (m / "acl").write_bytes(b"acl")
    run("setfacl", "-m", "u:1234:rwx,g:55:r-x,m::rwx", m / "acl")
    (m / "acldir").mkdir()
    run("setfacl", "-m", "u:4321:rx", "-d", "-m", "u:1234:rwx,g:55:r", m / "acldir")
    (m / "hard1").write_bytes(b"linked")
    os.link(m / "hard1", m / "hard2")
    os.mkfifo(m / "fifo")
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(m / "sda1", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(m / "bigdev", stat.S_IFCHR | 0o600, os.makedev(259, 70000))
    with open(m / "sparse", "wb") as fh:  # data in the middle
        fh.truncate(5 * MiB)
        fh.seek(2 * MiB + 100)
        fh.write(rnd.randbytes(6000))
    with open(m / "endhole", "wb") as fh:  # ends in a hole
        fh.write(rnd.randbytes(8192))
        fh.truncate(MiB + 3000)  # the last block's tail is past 1 KiB: block 0 has the sb
    (m / ("n" * 255)).write_bytes(b"long name")
    (m / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.symlink("small", m / "fastlink")
    os.symlink("/" + "x" * 299, m / "slowlink")
    (m / "owned").write_bytes(b"owner")
    os.chown(m / "owned", 100000, 100000)
    for name, t in (("old", T_PRE_1970), ("y2038", T_2038), ("y2100", T_2100)):
        (m / name).write_bytes(name.encode())
        os.utime(m / name, ns=(t, t))
    os.symlink("old", m / "oldlink")
    os.utime(m / "oldlink", ns=(T_PRE_1970, T_PRE_1970), follow_symlinks=False)
    if unwritten:
        with open(m / "fallocated", "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, MiB)  # unwritten extent
            fh.seek(512 * 1024)
            fh.write(b"D" * 4096)
        with open(m / "holeunwritten", "wb") as fh:
            os.posix_fallocate(fh.fileno(), MiB, MiB)  # hole, then unwritten
            fh.seek(3 * MiB)
            fh.write(b"after" * 1000)
    d = m / "bigdir"
    d.mkdir()
    for i in range(big_dir):
        (d / f"entry-{i:05d}-{'p' * (i % 40)}").write_bytes(b"%d\n" % i if i % 3 == 0 else b"")
    inl = m / "inl5"  # an inline directory grown into system.data by the kernel
    inl.mkdir()
    for n in "vwxyz":
        (inl / n).write_bytes(n.encode())
    deep = m / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf")


def build_image(path: Path, mkfs_args: tuple[str, ...], *, unwritten: bool) -> Path:
    mkfs(path, "-N", "6000", *mkfs_args)
    with mounted(path, rw=True) as m:
        populate(m, unwritten=unwritten)
    # Rebuild every directory index, as fidelity.md asks (mke2fs -d never builds an htree).
    run("e2fsck", "-fyD", path, ok=(0, 1))
    return path


# -- fixtures -------------------------------------------------------------------------------------

VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "ext2-1k": (("-t", "ext2", "-b", "1024"), False),
    "ext3": (("-t", "ext3", "-b", "4096"), False),
    "ext4": (("-t", "ext4", "-b", "4096"), True),
    "ext4-i128": (("-t", "ext4", "-b", "4096", "-I", "128"), True),
    "ext4-inline": (("-t", "ext4", "-b", "4096", "-O", "inline_data"), True),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not _is_root():
        pytest.skip("needs root and loop devices to build a reference")
    base = tmp_path_factory.mktemp("ext-images")
    return {
        name: build_image(base / f"{name}.img", args, unwritten=unwritten)
        for name, (args, unwritten) in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def references(images: dict[str, Path]) -> dict[str, dict[bytes, Seen]]:
    refs = {}
    for name, img in images.items():
        with mounted(img) as m:
            refs[name] = kernel_walk(m)
    return refs


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_walk_matches_kernel(
    require_root: None,
    variant: str,
    images: dict[str, Path],
    references: dict[str, dict[bytes, Seen]],
) -> None:
    with open(images[variant], "rb") as fh:
        fs = ExtFilesystem(fh, name=variant)
        ours = adapter_walk(fs)
    ref = references[variant]
    assert len(ref) > 3000  # the big directory is there
    assert_same_walk(ours, ref)
    # The probes did land where intended (guards against a silently weaker fixture).
    assert ref[b"/old"].mtime_ns < 0
    assert ref[b"/acl"].xattrs["system.posix_acl_access"][:4] == b"\x02\x00\x00\x00"
    assert "security.capability" in ref[b"/cap"].xattrs
    assert ref[b"/bigdev"].rdev == (259, 70000)
    assert ref[b"/sparse"].runs is not None and len(ref[b"/sparse"].runs) == 1
    assert ref[b"/slowlink"].target == b"/" + b"x" * 299


@pytest.mark.root
@pytest.mark.parametrize("variant", ["ext4", "ext4-inline", "ext2-1k"])
def test_read_content_takes_one_extent_files_only(
    require_root: None, variant: str, images: dict[str, Path]
) -> None:
    # The tar writer reads a file in one extent without a stream (ExtFilesystem.read_content);
    # holes, inline data, block maps of several runs and unwritten extents go through open().
    with open(images[variant], "rb") as fh:
        fs = ExtFilesystem(fh, name=variant)
        quick: dict[str, bytes | None] = {}
        for name in ("big", "sparse", "tiny100", "fallocated"):
            try:
                h = fs.lookup(b"/" + name.encode())
            except FileNotFoundError:
                continue
            quick[name] = fs.read_content(h)
            with fs.open(h) as stream:
                content = stream.read()
            assert quick[name] is None or quick[name] == content, name
    assert quick["sparse"] is None  # a hole before the data
    assert quick["big"] is not None and len(quick["big"]) == MiB + 123
    if variant == "ext4-inline":
        assert quick["tiny100"] is None  # inline data, with a system.data tail
    else:
        assert quick["tiny100"] == bytes(range(100))
    if variant != "ext2-1k":
        assert quick["fallocated"] is None  # unwritten extents around the written block


@pytest.mark.root
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_matches_blkid(require_root: None, variant: str, images: dict[str, Path]) -> None:
    blkid = run("blkid", "-p", "-o", "export", images[variant])
    tags = dict(line.split("=", 1) for line in blkid.splitlines() if "=" in line)
    with open(images[variant], "rb") as fh:
        fs = ExtFilesystem(fh)
    assert fs.fstype == tags["TYPE"]
    assert fs.uuid == tags["UUID"]
    assert fs.label is None and "LABEL" not in tags


def test_fstype_uuid_label_unprivileged(tmp_path: Path) -> None:
    """fstype/uuid/label for the three kinds, against blkid (no mount needed)."""
    for kind in ("ext2", "ext3", "ext4"):
        img = tmp_path / f"{kind}.img"
        mkfs(img, "-t", kind, "-L", f"lbl-{kind}", size="4M")
        tags = dict(
            line.split("=", 1)
            for line in run("blkid", "-p", "-o", "export", img).splitlines()
            if "=" in line
        )
        with open(img, "rb") as fh:
            fs = ExtFilesystem(fh)
        assert (fs.fstype, fs.uuid, fs.label) == (tags["TYPE"], tags["UUID"], f"lbl-{kind}")
        assert fs.uuid == fs.uuid.lower() and fs.uuid.count("-") == 4


def test_errors_small_and_bad_magic(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 1500)
    with open(small, "rb") as fh, pytest.raises(FilesystemError, match="too small") as info:
        ExtFilesystem(fh, name="vol1")
    assert info.value.offset == 1024 and "vol1" in str(info.value)
    img = tmp_path / "xfs-ish.img"
    mkfs(img, "-t", "ext4", size="4M")
    with open(img, "r+b") as fh:
        fh.seek(0x438)
        fh.write(b"\0\0")
    with open(img, "rb") as fh, pytest.raises(FilesystemError, match="magic") as info:
        ExtFilesystem(fh)
    assert info.value.offset == 0x438


def _corrupt_image(tmp_path: Path) -> tuple[Path, int]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"z" * 20000)
    img = tmp_path / "c.img"
    mkfs(img, "-t", "ext4", "-d", str(src), size="4M")
    inum = int(run("debugfs", "-R", "stat /file", img).split("Inode: ")[1].split()[0])
    return img, inum


def test_corrupt_extent_header_names_inode(tmp_path: Path) -> None:
    img, inum = _corrupt_image(tmp_path)
    # Break the extent header magic (i_block[0] low 16 bits) with debugfs.
    run("debugfs", "-w", "-R", "sif /file block[0] 0x12345678", img)
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        handle = fs.lookup(b"/file")
        assert fs.stat(handle).size == 20000  # stat alone does not touch the extents
        with pytest.raises(FilesystemError, match=f"inode {inum}: extent header magic"):
            fs.open(handle)
        with pytest.raises(FilesystemError, match=f"inode {inum}"):
            fs.data_runs(handle)


def test_corrupt_directory_and_mode(tmp_path: Path) -> None:
    img, inum = _corrupt_image(tmp_path)
    run("debugfs", "-w", "-R", "sif /file mode 0170644", img)
    run("debugfs", "-w", "-R", "sif / block[5] 0", img)  # root dir extent → block 0
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        with pytest.raises(FilesystemError, match=r"inode 2:"):
            list(fs.iterdir(fs.root()))
        with pytest.raises(FilesystemError, match=f"inode {inum}: invalid file type"):
            fs.stat(inum)
        with pytest.raises(FilesystemError, match="inode 999999: inode number out of range"):
            fs.stat(999999)
        with pytest.raises(FilesystemError, match="handle"):
            fs.stat("/file")


def test_handles_are_ints_and_lookup(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content")
    os.symlink("d/f", src / "l")
    img = tmp_path / "l.img"
    mkfs(img, "-t", "ext4", "-d", str(src), size="4M")
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        assert fs.root() == 2
        assert fs.read_file(b"/l") == b"content"
        h = fs.lookup(b"/d/f")
        assert isinstance(h, int)
        assert fs.data_runs(h) == [(0, 7)]
        assert fs.data_runs(fs.lookup(b"/d")) is None


# -- dissect gaps: each shows the unpatched library wrong and the adapter right ---------------


def _dissect(img: Path) -> tuple[Any, Any]:
    fh = open(img, "rb")  # noqa: SIM115 - closed by the caller
    return fh, ExtFS(fh)


@pytest.mark.root
@pytest.mark.parametrize("variant", ["ext4", "ext4-i128"])
def test_gap_timestamps(
    require_root: None,
    variant: str,
    images: dict[str, Path],
    references: dict[str, dict[bytes, Seen]],
) -> None:
    """Before 1970 / from 2038: dissect reads seconds unsigned (and 128-byte inodes wrongly)."""
    ref = references[variant]
    fh, dfs = _dissect(images[variant])
    with fh:
        dissect_times = {n: dfs.get(n).mtime_ns for n in ("/old", "/y2038", "/y2100")}
        fs = ExtFilesystem(fh)
        ours = {n: fs.stat(fs.lookup(n.encode())).mtime_ns for n in dissect_times}
    kernel = {n: ref[n.encode()].mtime_ns for n in dissect_times}
    assert dissect_times != kernel  # the gap
    assert dissect_times["/old"] != kernel["/old"]
    assert ours == kernel
    if variant == "ext4":
        assert kernel == {"/old": T_PRE_1970, "/y2038": T_2038, "/y2100": T_2100}
    else:  # no extra fields: whole seconds, clamped to signed 32 bits by the kernel
        assert kernel["/old"] == T_PRE_1970 // 10**9 * 10**9
        assert kernel["/y2100"] == (2**31 - 1) * 10**9


@pytest.mark.root
def test_gap_inline_data(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    """Inline files over 60 bytes, inline directories and the hidden system.data xattr."""
    ref = references["ext4-inline"]
    fh, dfs = _dissect(images["ext4-inline"])
    with fh:
        node = dfs.get("/tiny100")
        assert node.inode.i_flags & 0x10000000  # really inline
        assert len(node.open().read()) == 60  # the gap: truncated
        assert "system.data" in [x.name for x in node.xattr]  # the gap: hidden by the kernel
        parent_entries = [(n.filename, n.inum) for n in dfs.get("/a").iterdir()]
        fs = ExtFilesystem(fh)
        h = fs.lookup(b"/tiny100")
        with fs.open(h) as f:
            assert f.read() == bytes(range(100))
        assert "system.data" not in fs.stat(h).xattrs
        assert fs.stat(h).xattrs == ref[b"/tiny100"].xattrs
        a = fs.lookup(b"/a")
        assert fs.stat(a).size == 60  # an inline directory
        ours_a = [n for n, _ in fs.iterdir(a)]
        inl = fs.lookup(b"/inl5")
        assert fs.stat(inl).size > 60  # entries continue in system.data
        assert sorted(n for n, _ in fs.iterdir(inl)) == [b"v", b"w", b"x", b"y", b"z"]
    assert ours_a == [b"b"]
    assert [n.encode() for n, _ in parent_entries] != [b"b"]  # bogus entry / lost names
    assert ref[b"/inl5/z"].type == "file"


def _inline_tree(src: Path) -> None:
    (src / "d" / "sub").mkdir(parents=True)
    for i in range(2):  # libext2fs keeps a directory inline only while it fits in i_block
        (src / "d" / f"name-{i}").write_bytes(b"%d" % i)
    (src / "f100").write_bytes(bytes(range(100)))
    (src / "f60").write_bytes(b"6" * 60)
    (src / "f20").write_bytes(b"2" * 20)
    os.symlink("t" * 100, src / "l100")
    os.symlink("s" * 20, src / "l20")


def test_inline_data_mke2fs_d_vs_debugfs(tmp_path: Path) -> None:
    """``mke2fs -O inline_data -d``: content and listings as debugfs shows them (no root)."""
    src = tmp_path / "src"
    src.mkdir()
    _inline_tree(src)
    img = tmp_path / "inline.img"
    mkfs(img, "-t", "ext4", "-O", "inline_data", "-d", str(src), size="4M")
    assert "Size of inline data" in run("debugfs", "-R", "stat /d", img)
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        for name in ("f100", "f60", "f20"):
            assert "Size of inline data" in run("debugfs", "-R", f"stat /{name}", img)
            h = fs.lookup(b"/" + name.encode())
            with fs.open(h) as f:  # the input of mke2fs -d is the oracle for content
                assert f.read() == (src / name).read_bytes()
            assert fs.data_runs(h) == [(0, (src / name).stat().st_size)]
        ls = run("debugfs", "-R", "ls -p /d", img)
        want = sorted(
            line.split("/")[5].encode() for line in ls.splitlines() if line.count("/") >= 6
        )
        ours = sorted(n for n, _ in fs.iterdir(fs.lookup(b"/d")))
        assert ours == [n for n in want if n not in (b".", b"..")]
        assert len(ours) == 3
        assert fs.stat(fs.lookup(b"/l100", follow=False)).link_target == b"t" * 100
        assert fs.stat(fs.lookup(b"/l20", follow=False)).link_target == b"s" * 20
    fh2, dfs = _dissect(img)
    with fh2:
        assert len(dfs.get("/l100").link) == 60  # dissect truncates inline symlinks


@pytest.mark.root
def test_inline_data_mke2fs_d_vs_kernel(require_root: None, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _inline_tree(src)
    img = tmp_path / "inline.img"
    mkfs(img, "-t", "ext4", "-O", "inline_data", "-d", str(src), size="4M")
    with open(img, "rb") as fh:
        ours = adapter_walk(ExtFilesystem(fh))
    with mounted(img) as m:
        ref = kernel_walk(m)
    assert_same_walk(ours, ref)


@pytest.mark.root
def test_gap_blockmap_hole_at_end(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    """ext3: a file ending in a hole read its tail from block 0; holes were never merged."""
    ref = references["ext3"]
    fh, dfs = _dissect(images["ext3"])
    with fh:
        data = dfs.get("/endhole").open().read()
        assert hashlib.sha256(data).hexdigest() != ref[b"/endhole"].sha256  # the gap
        assert len(dfs.get("/sparse").dataruns()) > 100  # one run per hole block
        fs = ExtFilesystem(fh)
        h = fs.lookup(b"/endhole")
        with fs.open(h) as f:
            assert hashlib.sha256(f.read()).hexdigest() == ref[b"/endhole"].sha256
        assert fs.data_runs(h) == ref[b"/endhole"].runs == [(0, 8192)]
        assert fs.data_runs(fs.lookup(b"/sparse")) == ref[b"/sparse"].runs


@pytest.mark.root
@pytest.mark.parametrize("kind", ["ext2", "ext3"])
def test_blockmap_5gib_sparse(require_root: None, tmp_path: Path, kind: str) -> None:
    """A 5 GiB sparse block-mapped file is a handful of runs, read in bounded memory."""
    import tracemalloc

    img = tmp_path / "sparse.img"
    mkfs(img, "-t", kind, size="16M")
    with mounted(img, rw=True) as m, open(m / "huge", "wb") as f:
        f.truncate(5 << 30)
        for off in (0, 1 << 30, (3 << 30) + 4096):
            f.seek(off)
            f.write(b"Q" * 12288)
    with mounted(img) as m:
        fd = os.open(m / "huge", os.O_RDONLY)
        try:
            want_runs = seek_runs(fd, 5 << 30)
            want_tail = os.pread(fd, MiB, (5 << 30) - MiB)
            want_mid = os.pread(fd, 20000, (1 << 30) - 4000)
        finally:
            os.close(fd)
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        h = fs.lookup(b"/huge")
        tracemalloc.start()
        try:
            runs = fs.data_runs(h)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert runs == want_runs
        assert len(runs or []) == 3
        assert peak < 4 * MiB
        with fs.open(h) as f:
            f.seek((5 << 30) - MiB)
            assert f.read() == want_tail == bytes(MiB)
            f.seek((1 << 30) - 4000)
            assert f.read(20000) == want_mid


@pytest.mark.root
def test_gap_128_byte_inodes(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    """-I 128: no extra fields; dissect parses the next inode as this one's xattr area."""
    ref = references["ext4-i128"]
    fh, dfs = _dissect(images["ext4-i128"])
    with fh:
        wrong = 0
        for name in ("/xattrs", "/acl", "/small", "/cap", "/old"):
            try:
                got = {x.name: x.value for x in dfs.get(name).xattr}
            except Exception:  # dissect raises on the neighbour's bytes
                wrong += 1
                continue
            wrong += got != ref[name.encode()].xattrs
        assert wrong  # the gap
        fs = ExtFilesystem(fh)
        for name in ("/xattrs", "/acl", "/small", "/cap", "/old"):
            e = fs.stat(fs.lookup(name.encode()))
            assert e.xattrs == ref[name.encode()].xattrs
            assert e.mtime_ns == ref[name.encode()].mtime_ns


@pytest.mark.root
@pytest.mark.parametrize("variant", ["ext2-1k", "ext4"])
def test_gap_acl_format(require_root: None, variant: str, images: dict[str, Path]) -> None:
    """ext's version-1 ACLs become the kernel's version-2 xattr (getfattr -e hex)."""
    fh, dfs = _dissect(images[variant])
    with fh:
        raw = {x.name: x.value for x in dfs.get("/acldir").xattr}
        fs = ExtFilesystem(fh)
        ours = fs.stat(fs.lookup(b"/acldir")).xattrs
    assert raw["system.posix_acl_default"][:4] == b"\x01\x00\x00\x00"  # the gap
    with mounted(images[variant]) as m:
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            out = run("getfattr", "--absolute-names", "-e", "hex", "-n", name, m / "acldir")
            hexval = next(ln for ln in out.splitlines() if ln.startswith(name)).split("=0x")[1]
            assert ours[name] == bytes.fromhex(hexval)
            assert ours[name][:4] == b"\x02\x00\x00\x00"


def _debugfs_extents(img: Path, path: str) -> list[tuple[int, int, bool]]:
    """``(logical block, length, unwritten)`` of a file's leaf extents, from ``debugfs ex``."""
    out = []
    pattern = re.compile(
        r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)\s*(\w*)"
    )
    for line in run("debugfs", "-R", f"ex {path}", img).splitlines():
        match = pattern.match(line)
        if match and match[1] == match[2]:  # a leaf, not an index node
            out.append((int(match[3]), int(match[4]), match[5] == "Uninit"))
    return out


@pytest.mark.root
def test_gap_unwritten_extents(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    """Unwritten extents: zeros, never data; dissect's runlist puts them at the wrong place."""
    ref = references["ext4"]
    img = images["ext4"]
    extents = _debugfs_extents(img, "/holeunwritten")
    unwritten = [(lb, n) for lb, n, u in extents if u]
    assert unwritten == [(256, 256)]  # 1 MiB in, 1 MiB long (4 KiB blocks)
    fh, dfs = _dissect(img)
    with fh:
        pos, placed = 0, []
        for blk, count in dfs.get("/holeunwritten").dataruns():
            placed.append((pos, count, blk))
            pos += count
        assert (256, 256, None) not in placed  # the gap: the unwritten run sits at block 0
        fs = ExtFilesystem(fh)
        h = fs.lookup(b"/holeunwritten")
        with fs.open(h) as f:
            ours = f.read()
        assert hashlib.sha256(ours).hexdigest() == ref[b"/holeunwritten"].sha256
        assert ours[MiB : 2 * MiB] == bytes(MiB)
        written = [(lb * 4096, n * 4096) for lb, n, u in extents if not u]
        size = ref[b"/holeunwritten"].size
        assert fs.data_runs(h) == [(o, min(n, size - o)) for o, n in written]
        assert fs.data_runs(h) == ref[b"/holeunwritten"].runs == [(3 * MiB, 5000)]
        f2 = fs.lookup(b"/fallocated")
        assert fs.data_runs(f2) == ref[b"/fallocated"].runs == [(512 * 1024, 4096)]


@pytest.mark.root
def test_xattr_namespaces_and_ea_inode(require_root: None, tmp_path: Path) -> None:
    """Every namespace, in-inode and block values, and ea_inode values (> a block)."""
    img = tmp_path / "ea.img"
    mkfs(img, "-t", "ext4", "-O", "ea_inode", size="16M")
    big = random.Random(3).randbytes(10000)
    with mounted(img, rw=True) as m:
        (m / "f").write_bytes(b"f")
        os.setxattr(m / "f", "user.huge", big)
        os.setxattr(m / "f", "trusted.x", b"t")
        os.setxattr(m / "f", "security.y", b"s")
        os.setxattr(m / "f", "user.mid", b"m" * 1500)
    with mounted(img) as m:
        ref = kernel_walk(m)
    with open(img, "rb") as fh:
        fs = ExtFilesystem(fh)
        ours = adapter_walk(fs)
    assert ours[b"/f"].xattrs["user.huge"] == big
    assert_same_walk(ours, ref)


# -- journal -----------------------------------------------------------------------------------


def _crashed_image(tmp_path: Path, kind: str) -> Path:
    """A filesystem as a crash leaves it: transactions committed, nothing checkpointed.

    The kernel writes the journal (commit=1: every second), then a copy of the image is taken
    while it is still mounted. Whether the in-place metadata reached the image by then depends
    on writeback timing, so every block the journal logged (``debugfs logdump -a``) and no
    later transaction revoked is put back to its content from before the first transaction,
    which is exactly the state of a crash before the first checkpoint. The first transaction's
    directory is deleted in the second, which writes revoke records.
    """
    img = tmp_path / "live.img"
    mkfs(img, "-t", kind, "-b", "4096", size="16M")
    pre = tmp_path / "pre.img"
    crash = tmp_path / "crash.img"
    with mounted(img, rw=True, options="commit=1") as m:
        shutil.copyfile(img, pre)
        (m / "gone").mkdir()
        for i in range(200):
            (m / "gone" / f"f{i}").write_bytes(b"%d" % i)
        time.sleep(1.5)
        shutil.rmtree(m / "gone")
        (m / "d").mkdir()
        rnd = random.Random(5)
        for i in range(3):
            (m / "d" / f"f{i}").write_bytes(rnd.randbytes(20000))
        os.setxattr(m / "d" / "f0", "user.x", b"1")
        os.utime(m / "d" / "f1", ns=(T_PRE_1970, T_PRE_1970))
        time.sleep(2.5)
        shutil.copyfile(img, crash)
    logdump = run("debugfs", "-R", "logdump -a", crash)
    logged = {int(x) for x in re.findall(r"FS block (\d+) logged at journal block", logdump)}
    revoked = {int(x) for x in re.findall(r"Revoke FS block (\d+)", logdump)}
    assert logged and revoked
    with open(pre, "rb") as old, open(crash, "r+b") as new:
        for block in sorted(logged - revoked):
            old.seek(block * 4096)
            new.seek(block * 4096)
            new.write(old.read(4096))
    return crash


@pytest.mark.root
@pytest.mark.parametrize("kind", ["ext3", "ext4"])
def test_gap_journal_replay(require_root: None, tmp_path: Path, kind: str) -> None:
    crash = _crashed_image(tmp_path, kind)
    stats = run("debugfs", "-R", "stats", crash)
    assert "needs_recovery" in stats
    logdump = run("debugfs", "-R", "logdump", crash)
    assert "revoke table" in logdump and "commit block" in logdump
    fh, dfs = _dissect(crash)
    with fh:
        assert "d" not in [n.filename for n in dfs.root.iterdir()]  # the gap: stale metadata
        as_is = ExtFilesystem(fh, ignore_journal=True)
        assert not as_is.journal_replayed
        assert b"d" not in [n for n, _ in as_is.iterdir(as_is.root())]
        fs = ExtFilesystem(fh)
        assert fs.journal_replayed
        ours = adapter_walk(fs)
    ref_img = tmp_path / "ref.img"
    shutil.copyfile(crash, ref_img)
    with mounted(ref_img) as m:  # a read-only mount replays the journal
        ref = kernel_walk(m)
    assert b"/d/f2" in ref
    assert_same_walk(ours, ref)


def test_acl_from_mke2fs_d_vs_getfattr(tmp_path: Path) -> None:
    """No root: mke2fs -d stores the source's ACLs in ext's v1 format; we give back v2."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "file").write_bytes(b"f")
    run("setfacl", "-m", "u:1234:rwx,g:55:r-x,m::rwx", src / "file")
    run("setfacl", "-d", "-m", "u:1234:rwx,g:55:r", src / "dir")
    img = tmp_path / "acl.img"
    mkfs(img, "-t", "ext4", "-d", str(src), size="4M")
    fh, dfs = _dissect(img)
    with fh:
        raw = {x.name: x.value for x in dfs.get("/file").xattr}
        assert raw["system.posix_acl_access"][:4] == b"\x01\x00\x00\x00"  # the gap
        fs = ExtFilesystem(fh)
        for path, name in (
            ("file", "system.posix_acl_access"),
            ("dir", "system.posix_acl_default"),
        ):
            out = run("getfattr", "--absolute-names", "-e", "hex", "-n", name, src / path)
            want = bytes.fromhex(out.split(f"{name}=0x")[1].split()[0])
            assert fs.stat(fs.lookup(b"/" + path.encode())).xattrs[name] == want


@pytest.mark.root
def test_encrypted_directory_is_refused_or_left_out(require_root: None, tmp_path: Path) -> None:
    # fscrypt (mke2fs -O encrypt, e4crypt): the kernel without the key shows encoded names and
    # refuses to read the files; ova2img must never write the ciphertext as the guest's files.
    img = tmp_path / "enc.img"
    mkfs(img, "-t", "ext4", "-O", "encrypt")
    with mounted(img, rw=True) as m:
        (m / "etc").mkdir()
        (m / "etc" / "fstab").write_text("")
        (m / "secret").mkdir()
        proc = subprocess.run(
            ["e4crypt", "add_key", "-S", "0x1234567812345678", str(m / "secret")],
            input="a passphrase\n",
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        (m / "secret" / "file.txt").write_text("top secret content\n")
        (m / "secret" / "sub").mkdir()
        os.symlink("target-name", m / "secret" / "link")
        (m / "plain").write_text("readable\n")
    out = tmp_path / "out.tar"
    with pytest.raises(FilesystemError) as err:
        ova2img.convert(img, out)
    assert err.value.message.startswith("/secret: ")
    assert "encrypted directory (ext4 encryption, fscrypt)" in err.value.message
    assert not out.exists()
    result = ova2img.convert(img, out, lenient=True)
    assert any("/secret" in w and "encrypted" in w for w in result.warnings)
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "./plain" in names and "./etc/fstab" in names
    assert not any(n.startswith("./secret") for n in names)


@pytest.mark.root
def test_pending_fast_commit_journal_is_refused_clearly(require_root: None, tmp_path: Path) -> None:
    # A copy taken while mounted, after fsync()s that went to the fast-commit area: the
    # kernel replays it; ova2img does not, and says so without library-level advice.
    img = tmp_path / "fc.img"
    mkfs(img, "-t", "ext4", "-O", "fast_commit")
    copy = tmp_path / "copy.img"
    with mounted(img, rw=True, options="commit=300") as m:
        run("sync")
        for i in range(4):
            with open(m / f"f{i}", "w") as fh:
                fh.write(f"fast commit {i}\n")
                fh.flush()
                os.fsync(fh.fileno())
        shutil.copyfile(img, copy)
    with pytest.raises(UnsupportedError) as err:
        ova2img.convert(copy, tmp_path / "out.tar", use_fstab=False)
    message = str(err.value)
    assert "fast commits" in message and "ignore_journal" not in message


@pytest.mark.root
def test_odd_owner_and_nanoseconds_as_root_tar_shows_them(
    require_root: None, tmp_path: Path
) -> None:
    # debugfs writes what no kernel would: an owner of (uid_t)-1, which stat shows as the
    # overflow id 65534, and an mtime_extra whose nanoseconds are >= 10^9, which GNU tar
    # records as none.
    img = tmp_path / "odd.img"
    mkfs(img, "-t", "ext4", "-I", "256")
    with mounted(img, rw=True) as m:
        (m / "etc").mkdir()
        (m / "etc" / "fstab").write_text("")
        for name in ("minus-one", "big-ns", "plain"):
            (m / name).write_text(name + "\n")
    for request in (
        "sif /minus-one uid 0xffff",
        "sif /minus-one uid_hi 0xffff",
        "sif /minus-one gid 0xffff",
        "sif /minus-one gid_hi 0xffff",
        "sif /big-ns mtime 1700000000",
        "sif /big-ns mtime_extra 0xfffffffc",
    ):
        run("debugfs", "-w", "-R", request, img)
    ours, ref = tmp_path / "ours.tar", tmp_path / "ref.tar"
    ova2img.convert(img, ours)
    make_reference(img, ref, [("/", 0, img.stat().st_size)])
    assert_same_tree(ours, ref, ignore=("/lost+found",))
    with tarfile.open(ours) as tf:
        odd = tf.getmember("./minus-one")
        assert (odd.uid, odd.gid) == (65534, 65534)
        assert tf.getmember("./big-ns").mtime == 1700000000
