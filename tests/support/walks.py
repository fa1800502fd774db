"""A filesystem as ``tar`` would see it, from the kernel (a mount) or from one of our adapters,
and the comparison of the two walks: the oracle of the filesystem adapters' tests."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ova2img.filesystems.base import EntryType, Filesystem

MiB = 1 << 20


@dataclass
class Seen:
    """What one path looks like, from either side."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int
    inode: int
    rdev: tuple[int, int]
    xattrs: dict[str, bytes]
    target: bytes
    sha256: str | None
    runs: list[tuple[int, int]] | None
    identity: object = None  # kernel: (st_dev, st_ino); ours: Entry.inode (not compared as is)


KIND = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def seek_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """The data runs of an open file, as ``SEEK_DATA``/``SEEK_HOLE`` report them."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        runs.append((data, hole - data))
        pos = hole
    return runs


def sha256_of(read: Callable[[int], bytes]) -> str:
    h = hashlib.sha256()
    while chunk := read(MiB):
        h.update(chunk)
    return h.hexdigest()


def kernel_walk(mnt: Path) -> dict[bytes, Seen]:
    """Walk a mounted filesystem the way tar would see it."""
    out: dict[bytes, Seen] = {}
    root = os.fsencode(mnt)

    def visit(rel: bytes) -> None:
        path = root + rel if rel != b"/" else root
        st = os.lstat(path)
        kind = KIND[stat.S_IFMT(st.st_mode)]
        xattrs = {
            n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)
        }
        sha = runs = None
        target = b""
        if kind == "file":
            fd = os.open(path, os.O_RDONLY)
            try:
                runs = seek_runs(fd, st.st_size)  # before reading: the page cache changes it
                os.lseek(fd, 0, os.SEEK_SET)
                with os.fdopen(os.dup(fd), "rb") as fh:
                    sha = sha256_of(fh.read)
            finally:
                os.close(fd)
        elif kind == "symlink":
            target = os.readlink(path)
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0)
        out[rel] = Seen(
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_atime_ns,
            st.st_ctime_ns,
            st.st_nlink,
            st.st_ino,
            rdev,
            xattrs,
            target,
            sha,
            runs,
            (st.st_dev, st.st_ino),
        )
        if kind == "dir":
            for name in os.listdir(path):
                visit((rel if rel != b"/" else b"") + b"/" + name)

    visit(b"/")
    return out


def adapter_walk(fs: Filesystem, *, inode: Callable[[int], int] = int) -> dict[bytes, Seen]:
    """Walk one of our filesystem adapters the same way; *inode* maps ``Entry.inode`` to what
    the kernel shows as ``st_ino`` (btrfs: the low 40 bits)."""
    out: dict[bytes, Seen] = {}

    def visit(rel: bytes, handle: object) -> None:
        e = fs.stat(handle)
        sha = runs = None
        if e.type is EntryType.FILE:
            runs = fs.data_runs(handle)
            with fs.open(handle) as fh:
                sha = sha256_of(fh.read)
            # The one-call read the tar writer prefers must give the stream's bytes.
            quick = fs.read_content(handle)
            if quick is not None:
                assert hashlib.sha256(quick).hexdigest() == sha, f"read_content of {rel!r}"
                # ... and only for a dense file: the tar writer then skips data_runs().
                dense = [(0, e.size)] if e.size else []
                assert runs is None or runs == dense, f"read_content of sparse {rel!r}"
        out[rel] = Seen(
            e.type.value,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime_ns,
            e.atime_ns,
            e.ctime_ns,
            e.nlink,
            inode(e.inode),
            (e.rdev_major, e.rdev_minor),
            e.xattrs,
            e.link_target,
            sha,
            runs,
            e.inode,
        )
        if e.type is EntryType.DIR:
            for name, child in fs.iterdir(handle):
                visit((rel if rel != b"/" else b"") + b"/" + name, child)

    visit(b"/", fs.root())
    return out


def assert_same_walk(
    ours: dict[bytes, Seen],
    ref: dict[bytes, Seen],
    *,
    ignore: Callable[[Seen, str], bool] | None = None,
    identities: Callable[[Seen], bool] | None = None,
) -> None:
    """Every path of the kernel's walk *ref* looks the same in *ours*, field by field.

    Args:
        ignore: ``ignore(kernel's Seen, field)`` is true for fields not to compare there.
        identities: when given, our inode identities must be unique exactly where the kernel's
            ``(st_dev, st_ino)`` are, over the paths for which it is true.
    """
    assert sorted(ours) == sorted(ref), set(ours) ^ set(ref)
    diffs = []
    for path, want in ref.items():
        got = ours[path]
        for field in Seen.__dataclass_fields__:
            if field == "identity" or (ignore is not None and ignore(want, field)):
                continue
            if getattr(got, field) != getattr(want, field):
                ours_v, ref_v = getattr(got, field), getattr(want, field)
                diffs.append(f"{path!r} {field}: ours {ours_v!r} kernel {ref_v!r}")
    assert not diffs, "\n".join(diffs[:40])
    if identities is not None:
        pairs = {(ours[p].identity, ref[p].identity) for p in ref if identities(ref[p])}
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})
