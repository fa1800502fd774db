"""XfsFilesystem against the kernel: full walks of XFS images compared with a loop mount.

Images are made by mkfs.xfs (xfsprogs 6.1) on sparse files and populated through a read-write
kernel mount with real syscalls (setfacl, setcap, setxattr, fallocate); the oracle is a
read-only kernel loop mount walked with ``os.lstat``/``listxattr``/``getxattr``/``readlink`` and
``SEEK_DATA``/``SEEK_HOLE``. This kernel has no XFS v4 support (CONFIG_XFS_SUPPORT_V4 unset),
so the v4 image is built by ``mkfs.xfs -p`` from a protofile and compared with its source tree.
Each dissect.xfs gap the adapter fixes is shown on the unpatched library.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dissect.xfs import XFS
from support.walks import Seen, adapter_walk, assert_same_walk, kernel_walk

from ova2img.errors import FilesystemError
from ova2img.filesystems.base import EntryType
from ova2img.filesystems.probe import open_filesystem
from ova2img.filesystems.xfs import XfsFilesystem

MiB = 1 << 20

T_PRE_1970 = -1_234_567_890_123_456_789  # 1930
T_2038 = (2**31 + 10) * 10**9 + 5  # just past the 32-bit signed rollover
T_2100 = 4_102_444_800 * 10**9 + 999_999_999
STALE = b"STALE-DATA-" * 1000


def _is_root() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


def run(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,), stdin: str | None = None) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, input=stdin)
    if proc.returncode not in ok:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def mounted(img: Path, *, rw: bool = False) -> Iterator[Path]:
    """Loop-mount *img* on a unique directory; unmount (and free the loop) on exit."""
    mnt = Path(f"/tmp/o2i-xfs-{uuid.uuid4().hex[:12]}")
    mnt.mkdir()
    dev = run("losetup", "--find", "--show", img).strip()
    try:
        run("mount", "-t", "xfs", "-o", "rw" if rw else "ro", dev, mnt)
        try:
            yield mnt
        finally:
            run("umount", mnt)
    finally:
        run("losetup", "--detach", dev, ok=(0, 1))
        mnt.rmdir()


def mkfs(img: Path, *args: str, size: int = 300 * MiB) -> None:
    with open(img, "wb") as fh:
        fh.truncate(size)  # sparse: XFS wants >= 300 MiB, which costs nothing here
    run("mkfs.xfs", "-q", "-f", *args, img)


# -- populating an image through the kernel -------------------------------------------------------


def populate(m: Path, *, block_size: int) -> None:
    """The fidelity probes plus XFS specifics, made with real syscalls on a rw mount."""
    rnd = random.Random(11)
    (m / "empty").write_bytes(b"")
    (m / "small").write_bytes(b"hello\n")
    (m / "big").write_bytes(rnd.randbytes(MiB + 123))
    (m / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(m / "setuid", 0o4755)
    (m / "sticky").mkdir()
    os.chmod(m / "sticky", 0o1777)
    (m / "emptydir").mkdir()
    (m / "cap").write_bytes(b"\x7fELF")
    run("setcap", "cap_net_raw+ep", m / "cap")
    (m / "xattrs").write_bytes(b"x")  # shortform attribute fork
    os.setxattr(m / "xattrs", "user.binary", b"\x00\xff\x01value")
    os.setxattr(m / "xattrs", "trusted.t", b"trusted")
    os.setxattr(m / "xattrs", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    (m / "leafattrs").write_bytes(b"l")  # one attribute leaf block
    for i in range(12):
        os.setxattr(m / "leafattrs", f"user.a{i:02d}", rnd.randbytes(60))
    (m / "nodeattrs").write_bytes(b"n")  # a dabtree: node + several leaves
    for i in range(40 * block_size // 1024):
        os.setxattr(m / "nodeattrs", f"user.attribute-{i:04d}", rnd.randbytes(40 + i % 50))
    os.setxattr(m / "nodeattrs", "trusted.remote", rnd.randbytes(3000))
    (m / "remote").write_bytes(b"r")  # values in their own blocks
    os.setxattr(m / "remote", "user.big", rnd.randbytes(10000))
    os.setxattr(m / "remote", "security.selinux", b"unconfined_u:object_r:user_home_t:s0\x00")
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
    with open(m / "fragmented", "wb") as fh:  # one block every other block: a bmbt
        for i in range(400):
            fh.seek(2 * i * block_size)
            fh.write(rnd.randbytes(block_size))
    (m / ("n" * 255)).write_bytes(b"long name")
    (m / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.symlink("small", m / "fastlink")
    os.symlink("/" + "x" * 299, m / "link300")
    os.symlink("/" + "y" * 899, m / "link900")
    os.symlink("/" + "z" * 1022, m / "link1023")
    (m / "owned").write_bytes(b"owner")
    os.chown(m / "owned", 100000, 100000)
    for name, t in (("old", T_PRE_1970), ("y2038", T_2038), ("y2100", T_2100)):
        (m / name).write_bytes(name.encode())
        os.utime(m / name, ns=(t, t))
    os.symlink("old", m / "oldlink")
    os.utime(m / "oldlink", ns=(T_PRE_1970, T_PRE_1970), follow_symlinks=False)
    with open(m / "fallocated", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, MiB)
        fh.seek(512 * 1024)
        fh.write(b"D" * 4096)
    with open(m / "holeunwritten", "wb") as fh:
        os.posix_fallocate(fh.fileno(), MiB, MiB)  # hole, then unwritten
        fh.seek(3 * MiB)
        fh.write(b"after" * 1000)
    run("fallocate", "-l", "100000", m / "allunwritten")
    dirs = {"blockdir": 20, "leafdir": 150, "bigdir": 3000}
    for dname, n in dirs.items():
        d = m / dname
        d.mkdir()
        for i in range(n):
            (d / f"entry-{i:05d}-{'p' * (i % 40)}").write_bytes(b"%d\n" % i if i % 3 == 0 else b"")
    # Holes in the directory's data space: remove most entries of the big directory's middle.
    for i in range(1000, 2000):
        if i % 50:
            (m / "bigdir" / f"entry-{i:05d}-{'p' * (i % 40)}").unlink()
    deep = m / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf")


def stale_unwritten(img: Path, inum: int, block_size: int) -> int:
    """Fill the unwritten extents of inode *inum* with STALE bytes, as a reused disk would hold.

    Unwritten blocks are never read by the kernel (it returns zeros), so their content is
    free; a fresh sparse image would hold zeros there and hide readers that ignore the flag.
    The extents come from ``xfs_db bmap`` (``flag 1`` = unwritten). Returns the blocks filled.
    """
    agblocks = int(run("xfs_db", "-r", "-c", "sb 0", "-c", "print agblocks", img).split("=")[1])
    bmap = run("xfs_db", "-r", "-c", f"inode {inum}", "-c", "bmap", img)
    filled = 0
    with open(img, "r+b") as fh:
        for m in re.finditer(r"startblock \d+ \((\d+)/(\d+)\) count (\d+) flag 1", bmap):
            agno, agbno, count = map(int, m.groups())
            fh.seek((agno * agblocks + agbno) * block_size)
            fh.write((STALE * (count * block_size // len(STALE) + 1))[: count * block_size])
            filled += count
    return filled


def build_image(path: Path, args: tuple[str, ...], block_size: int) -> Path:
    mkfs(path, "-b", f"size={block_size}", *args)
    with mounted(path, rw=True) as m:
        populate(m, block_size=block_size)
        inum = os.stat(m / "fallocated").st_ino
    assert stale_unwritten(path, inum, block_size) > 0
    return path


# -- fixtures -------------------------------------------------------------------------------------

VARIANTS: dict[str, tuple[tuple[str, ...], int]] = {
    # xfsprogs 6.1 defaults: crc=1 (v5), bigtime=1 since 5.15 — spell both out.
    "v5-bigtime": (("-m", "crc=1,bigtime=1"), 4096),
    "v5-legacytime": (("-m", "crc=1,bigtime=0"), 4096),
    "v5-nrext64": (("-m", "crc=1,bigtime=1", "-i", "nrext64=1"), 4096),
    # 1 KiB blocks: remote symlinks and remote attribute values span blocks; 4 KiB directory
    # blocks make every directory block four filesystem blocks.
    "v5-1k": (("-m", "crc=1,bigtime=1", "-n", "size=4096"), 1024),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not _is_root():
        pytest.skip("needs root and loop devices to build a reference")
    base = tmp_path_factory.mktemp("xfs-images")
    return {
        name: build_image(base / f"{name}.img", args, bs) for name, (args, bs) in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def references(images: dict[str, Path]) -> dict[str, dict[bytes, Seen]]:
    refs = {}
    for name, img in images.items():
        with mounted(img) as m:
            refs[name] = kernel_walk(m)
    return refs


def _formats(fs: XfsFilesystem, path: bytes) -> tuple[int, int]:
    """(data fork format, attribute fork format) of the inode at *path*."""
    ino = fs._inode(fs._inum(fs.lookup(path, follow=False)))
    return ino.format, ino.aformat if ino.forkoff else -1


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
        fs = XfsFilesystem(fh, name=variant)
        ours = adapter_walk(fs)
        formats = {
            p: _formats(fs, p)
            for p in (
                b"/xattrs",
                b"/leafattrs",
                b"/nodeattrs",
                b"/fragmented",
                b"/emptydir",
                b"/blockdir",
                b"/leafdir",
                b"/bigdir",
                b"/link300",
                b"/link1023",
            )
        }
    ref = references[variant]
    assert_same_walk(ours, ref)
    # The probes did land where intended (guards against a silently weaker fixture).
    assert len(ref) > 2000
    assert ref[b"/old"].mtime_ns < 0
    assert ref[b"/acl"].xattrs["system.posix_acl_access"][:4] == b"\x02\x00\x00\x00"
    assert "system.posix_acl_default" in ref[b"/acldir"].xattrs
    assert "security.capability" in ref[b"/cap"].xattrs
    assert ref[b"/bigdev"].rdev == (259, 70000)
    assert ref[b"/sparse"].runs == [(2 * MiB, 8192)] or len(ref[b"/sparse"].runs or []) == 1
    assert ref[b"/allunwritten"].runs == [] and ref[b"/fallocated"].runs is not None
    assert len(ref[b"/fallocated"].runs) == 1
    assert ref[b"/link1023"].target == b"/" + b"z" * 1022
    assert ref[b"/remote"].xattrs["user.big"] and len(ref[b"/remote"].xattrs["user.big"]) == 10000
    # Fork formats: shortform / leaf / node attributes, bmbt file, every directory format.
    local, extents, btree = 1, 2, 3
    assert formats[b"/xattrs"][1] == local
    assert formats[b"/leafattrs"][1] in (extents, btree)
    assert formats[b"/nodeattrs"][1] in (extents, btree)
    assert formats[b"/fragmented"][0] == btree
    assert formats[b"/emptydir"][0] == local
    assert formats[b"/blockdir"][0] == extents
    assert formats[b"/bigdir"][0] in (extents, btree)
    assert formats[b"/link300"][0] == local
    assert formats[b"/link1023"][0] == extents
    if variant == "v5-legacytime":
        assert ref[b"/y2100"].mtime_ns == (2**31 - 1) * 10**9  # clamped by the kernel
    else:
        assert ref[b"/y2100"].mtime_ns == T_2100


@pytest.mark.root
def test_directory_and_attr_tree_shapes(require_root: None, images: dict[str, Path]) -> None:
    """The fixture really has node-form attributes and leaf/node directories (magic numbers)."""
    with open(images["v5-bigtime"], "rb") as fh:
        fs = XfsFilesystem(fh)
        ino = fs._inode(fs._inum(fs.lookup(b"/nodeattrs")))
        amap = fs._map_cache(ino.inum, True)
        first = fs._read_logical(amap, 0, 1)
        assert first[8:10] == b"\x3e\xbe"  # XFS_DA3_NODE_MAGIC: a dabtree root
        bigdir = fs._inode(fs._inum(fs.lookup(b"/bigdir")))
        dmap = fs._map_cache(bigdir.inum, False)
        leaf_space = [e for e in dmap if e.logical * 4096 >= 32 << 30]
        assert leaf_space, "the big directory has leaf/node blocks"
        free_space = [e for e in dmap if e.logical * 4096 >= 64 << 30]
        assert free_space, "the big directory is node-form (has a free index)"
        holes = sorted(e.logical for e in dmap if e.logical * 4096 < 32 << 30)
        assert holes != list(range(holes[0], holes[0] + len(holes))), "data space has holes"


@pytest.mark.root
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_matches_blkid(require_root: None, variant: str, images: dict[str, Path]) -> None:
    tags = dict(
        line.split("=", 1)
        for line in run("blkid", "-p", "-o", "export", images[variant]).splitlines()
        if "=" in line
    )
    with open(images[variant], "rb") as fh:
        fs = open_filesystem(fh, "xfs", name=variant)
    assert isinstance(fs, XfsFilesystem)
    assert (fs.fstype, fs.uuid, fs.label) == (tags["TYPE"], tags["UUID"], None)


def test_uuid_label_and_meta_uuid(tmp_path: Path) -> None:
    """blkid prints sb_uuid; after ``xfs_admin -U`` on v5 the metadata UUID stays the old one."""
    img = tmp_path / "lbl.img"
    mkfs(img, "-L", "rootfs")
    new = "0b3e3d53-6f2e-4c55-a1de-5e1a1f0c0ffe"
    run("xfs_admin", "-U", new, img)
    tags = dict(
        line.split("=", 1)
        for line in run("blkid", "-p", "-o", "export", img).splitlines()
        if "=" in line
    )
    with open(img, "rb") as fh:
        fs = XfsFilesystem(fh)
        dissected = XFS(fh)
    assert (fs.fstype, fs.uuid, fs.label) == ("xfs", tags["UUID"], "rootfs")
    assert fs.uuid == new and str(dissected.meta_uuid) != new


# -- gaps of the unpatched dissect.xfs ------------------------------------------------------------


@pytest.mark.root
def test_gap_no_xattr_api(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    with open(images["v5-bigtime"], "rb") as fh:
        node = XFS(fh).get("/remote")
        assert not any(hasattr(node, a) for a in ("xattr", "xattrs", "listxattr", "get_xattr"))
        fs = XfsFilesystem(fh)
        ours = fs.stat(fs.lookup(b"/remote")).xattrs
        acl = fs.stat(fs.lookup(b"/acldir")).xattrs
    assert ours == references["v5-bigtime"][b"/remote"].xattrs
    assert acl == references["v5-bigtime"][b"/acldir"].xattrs
    # The kernel lists the raw XFS ACLs to root as trusted.SGI_ACL_* next to system.posix_acl_*.
    assert acl["trusted.SGI_ACL_DEFAULT"][:4] == b"\x00\x00\x00\x06"  # be32 count, XFS format


@pytest.mark.root
def test_gap_unwritten_extents_read_stale_bytes(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    with open(images["v5-bigtime"], "rb") as fh:
        node = XFS(fh).get("/fallocated")
        theirs = node.open().read()
        assert STALE[:100] in theirs  # dissect returns the stale disk bytes
        # ... and maps the whole preallocation as data (256 blocks), not just the 1 written.
        assert sum(n for b, n in node.dataruns if b is not None) == MiB // 4096
        fs = XfsFilesystem(fh)
        handle = fs.lookup(b"/fallocated")
        with fs.open(handle) as f:
            ours = f.read()
        runs = fs.data_runs(handle)
    assert ours == b"\0" * (512 * 1024) + b"D" * 4096 + b"\0" * (MiB - 512 * 1024 - 4096)
    assert hashlib.sha256(ours).hexdigest() == references["v5-bigtime"][b"/fallocated"].sha256
    assert runs == references["v5-bigtime"][b"/fallocated"].runs == [(512 * 1024, 4096)]


@pytest.mark.root
def test_gap_legacy_timestamps_before_1970(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    want = references["v5-legacytime"][b"/old"].mtime_ns
    assert want < 0
    with open(images["v5-legacytime"], "rb") as fh:
        assert XFS(fh).get("/old").mtime_ns > 0  # t_sec decoded unsigned: year 2106-ish
        fs = XfsFilesystem(fh)
        assert fs.stat(fs.lookup(b"/old")).mtime_ns == want


# -- v4 (the kernel here cannot mount it): mkfs.xfs -p protofile vs the source -----------------


def test_v4_protofile_matches_source(tmp_path: Path) -> None:
    """XFS v4 (crc=0, ftype=0, 512-byte blocks) built by mkfs.xfs from a protofile."""
    rnd = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "empty": b"",
        "small": b"hello\n",
        "big": rnd.randbytes(300_000),
        "n" * 255: b"long",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    proto = ["/dev/null", "0 0", "d--755 0 0"]
    for name in files:
        proto.append(f"{name} ---644 100000 100001 {src / name}")
    proto.append("suid -u-755 0 0 " + str(src / "small"))
    proto.append("link l--777 0 0 /" + "t" * 1000)  # remote on 512-byte blocks, 2 blocks
    proto.append("short l--777 0 0 small")
    proto.append("null c--666 0 0 1 3")
    proto.append("disk b--660 0 6 259 70000")
    proto.append("pipe p--600 5 5")
    proto.append("sub d--750 7 8")
    for i in range(400):
        proto.append(f"entry-{i:04d}-{'q' * (i % 30)} ---600 0 0 /dev/null")
    proto.append("$")
    proto.append("$")
    (tmp_path / "proto").write_text("\n".join(proto) + "\n")
    img = tmp_path / "v4.img"
    with open(img, "wb") as fh:
        fh.truncate(300 * MiB)
    run(
        "mkfs.xfs",
        "-q",
        "-f",
        "-m",
        "crc=0",
        "-n",
        "ftype=0",
        "-b",
        "size=512",
        "-p",
        tmp_path / "proto",
        img,
    )
    with open(img, "rb") as fh:
        fs = XfsFilesystem(fh)
        assert fs.version == 4 and not fs._ftype
        root = fs.root()
        names = {n: h for n, h in fs.iterdir(root)}
        for name, data in files.items():
            e = fs.stat(names[name.encode()])
            assert (e.type, e.mode, e.uid, e.gid, e.size) == (
                EntryType.FILE,
                0o644,
                100000,
                100001,
                len(data),
            )
            with fs.open(names[name.encode()]) as f:
                assert f.read() == data
        assert fs.stat(names[b"suid"]).mode == 0o4755
        assert fs.stat(names[b"link"]).link_target == b"/" + b"t" * 1000
        assert fs.stat(names[b"short"]).link_target == b"small"
        null, disk = fs.stat(names[b"null"]), fs.stat(names[b"disk"])
        assert (null.type, null.rdev_major, null.rdev_minor) == (EntryType.CHAR, 1, 3)
        assert (disk.type, disk.rdev_major, disk.rdev_minor, disk.gid) == (
            EntryType.BLOCK,
            259,
            70000,
            6,
        )
        assert fs.stat(names[b"pipe"]).type is EntryType.FIFO
        sub = fs.stat(names[b"sub"])
        assert (sub.type, sub.mode, sub.uid, sub.gid, sub.nlink) == (EntryType.DIR, 0o750, 7, 8, 2)
        sub_names = sorted(n for n, _ in fs.iterdir(names[b"sub"]))
        assert sub_names == sorted(f"entry-{i:04d}-{'q' * (i % 30)}".encode() for i in range(400))
        assert fs.stat(root).nlink == 3


# -- errors ---------------------------------------------------------------------------------------


def test_errors_small_bad_magic_and_corrupt_inode(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 300)
    with open(small, "rb") as fh, pytest.raises(FilesystemError, match="too small") as info:
        XfsFilesystem(fh, name="vol1")
    assert "vol1" in str(info.value)
    img = tmp_path / "x.img"
    mkfs(img)
    with open(img, "r+b") as fh:
        fh.write(b"XFSC")
    with open(img, "rb") as fh, pytest.raises(FilesystemError, match="magic") as info:
        XfsFilesystem(fh)
    assert info.value.offset == 0
    with open(img, "r+b") as fh:
        fh.write(b"XFSB")
    with open(img, "rb") as fh:
        fs = XfsFilesystem(fh, name="vol2")
        root = fs._inum(fs.root())
        offset = (
            fs._linear(root >> fs._inopblog) * fs.block_size
            + (root & (fs._inopblock - 1)) * fs._inode_size
        )
    with open(img, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"ZZ")
    with open(img, "rb") as fh:
        fs = XfsFilesystem(fh, name="vol2")
        with pytest.raises(FilesystemError, match="inode magic") as info:
            fs.stat(fs.root())
    assert "vol2" in str(info.value) and f"inode {root}" in str(info.value)
    with pytest.raises(FilesystemError, match="handle"):
        fs.stat("root")


@pytest.mark.root
def test_gap_directory_blocks_larger_than_fs_blocks(
    require_root: None, images: dict[str, Path], references: dict[str, dict[bytes, Seen]]
) -> None:
    """``mkfs.xfs -n size=4096`` on 1 KiB blocks: dissect parses 1 KiB pieces, losing entries."""
    ref = references["v5-1k"]
    want = sorted(p[1:] for p in ref if p.count(b"/") == 1 and p != b"/")
    with open(images["v5-1k"], "rb") as fh:
        theirs = sorted(
            os.fsencode(e.filename) for e in XFS(fh).root.iterdir() if e.filename not in (".", "..")
        )
        fs = XfsFilesystem(fh)
        ours = sorted(n for n, _ in fs.iterdir(fs.root()))
    assert theirs != want and set(theirs) < set(want)
    assert ours == want


@pytest.mark.root
def test_log_needing_recovery_is_told(
    require_root: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A copy taken while mounted, after fsync()s: the changes are only in the log, which a
    # kernel mount replays and ova2img does not; it says so. A clean log says nothing.
    def opened(img: Path) -> XfsFilesystem:
        with open(img, "rb") as fh:  # the log is checked when the filesystem is opened
            return XfsFilesystem(fh, name=img.name)

    fresh_v4 = tmp_path / "v4.img"
    mkfs(fresh_v4, "-m", "crc=0")
    img, dirty = tmp_path / "xfs.img", tmp_path / "dirty.img"
    mkfs(img, "-l", "su=32k")
    with mounted(img, rw=True) as m:
        run("sync")
        for i in range(5):
            with open(m / f"logged{i}", "w") as fh:
                fh.write("x")
                fh.flush()
                os.fsync(fh.fileno())
        shutil.copyfile(img, dirty)
    with caplog.at_level(logging.WARNING, logger="ova2img"):
        assert opened(fresh_v4).log_pending is False
        assert opened(img).log_pending is False
        assert not caplog.records
        assert opened(dirty).log_pending is True
    assert any("XFS log not replayed" in r.getMessage() for r in caplog.records)
