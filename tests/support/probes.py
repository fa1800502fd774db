"""The fidelity probes of ``/work/shared/design/fidelity.md``, planted into a root directory.

:func:`populate_probes` creates, as root, every probe a fixture rootfs should carry, with real
tools where the probe is about a tool's encoding (``setcap`` for ``security.capability``,
``setfacl`` for POSIX ACLs) and fixed timestamps everywhere, so the tree is reproducible.

It works on a mounted ext2/3/4 as well as on a staging directory fed to ``mke2fs -d``
(:func:`tests.support.images.build_ext_image` then re-applies what ``mke2fs -d`` 1.47.0 drops:
nanoseconds and times after 2038).

Paths in the constants below are relative to the root, as :mod:`tests.support.compare`
normalises tar member names (``/`` for the root itself, then ``/probes/…``); non-UTF-8 names
are ``str`` with surrogate escapes (``os.fsdecode``).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

__all__ = [
    "BIG_DIR_ENTRIES",
    "DEFAULT_MTIME_NS",
    "ETC_PATHS",
    "PROBE_DIR",
    "PROBE_PATHS",
    "PROBE_SOCKET",
    "SPARSE_DATA_LEN",
    "SPARSE_DATA_OFFSET",
    "SPARSE_SIZE",
    "populate_probes",
    "sparse_probe_bytes",
]

PROBE_DIR = "/probes"
"""Every probe lives under this directory of the root (``/probes`` in tar-normalised form)."""

DEFAULT_MTIME_NS = 1_700_000_000_123_456_789
"""mtime of every path that is not a timestamp probe (2023-11-14T22:13:20.123456789Z)."""

BIG_DIR_ENTRIES = 3000
"""Entries in ``/probes/bigdir``: enough for an ext4 htree once ``e2fsck -fyD`` has run."""

SPARSE_SIZE = 8 * 1024 * 1024
SPARSE_DATA_OFFSET = 3 * 1024 * 1024
SPARSE_DATA_LEN = 64 * 1024

NAME_255 = "n" * 255
NON_UTF8_NAME = os.fsdecode(b"caf\xe9")  # 'caf\udce9'
LONG_TARGET = "../" + "t" * 297  # 300 bytes, so it needs a PAX linkpath
BIG_ID = 100000
HUGE_ID = 3_000_000_000  # >= 2**21 (needs PAX), < 2**32 - 1

#: mtimes of the timestamp probes, in ns since the epoch.
MTIME_1960_NS = -315_619_200 * 10**9 + 123_456_789  # 1960-01-01T00:00:00.123456789Z
MTIME_2100_NS = 4_102_444_800 * 10**9 + 987_654_321  # 2100-01-01T00:00:00.987654321Z
MTIME_NANO_NS = 1_577_836_800 * 10**9 + 1  # 2020-01-01T00:00:00.000000001Z

_P = PROBE_DIR
PROBE_SOCKET = f"{_P}/socket"
"""A unix socket: tar cannot carry it; GNU tar says ``socket ignored`` and skips it."""

PROBE_PATHS: tuple[str, ...] = (
    _P,
    f"{_P}/setuid-busybox",  # copy of busybox, mode 4755
    f"{_P}/capability",  # security.capability from `setcap cap_net_raw+ep`
    f"{_P}/user-xattr",  # user.ova2img (text), user.binary (non-UTF-8 bytes), trusted.ova2img
    f"{_P}/acl-file",  # setfacl -m u:1234:rwx
    f"{_P}/acl-dir",  # access ACL + default ACL (setfacl -d -m u:1234:rx)
    f"{_P}/hardlink-a",  # hardlink-a and hardlink-b are one inode
    f"{_P}/hardlink-b",
    f"{_P}/fifo",
    f"{_P}/char-1-3",  # char device 1,3 (like /dev/null)
    f"{_P}/block-8-1",  # block device 8,1 (like /dev/sda1)
    f"{_P}/sparse",  # 8 MiB, 64 KiB of data at 3 MiB, holes elsewhere
    f"{_P}/{NAME_255}",  # a 255-byte name component
    f"{_P}/{NON_UTF8_NAME}",  # b'caf\xe9' (Latin-1 é), not UTF-8
    f"{_P}/long-symlink",  # a 300-byte symlink target
    f"{_P}/owned-100000",  # uid/gid 100000
    f"{_P}/owned-3000000000",  # uid/gid 3000000000 (PAX uid/gid)
    f"{_P}/bigdir",  # 3000 entries: an ext4 htree after e2fsck -fyD
    f"{_P}/bigdir/f0000",
    f"{_P}/bigdir/f{BIG_DIR_ENTRIES - 1:04d}",
    f"{_P}/mtime-1960",  # 1960-01-01T00:00:00.123456789Z
    f"{_P}/mtime-2100",  # 2100-01-01T00:00:00.987654321Z
    f"{_P}/mtime-ns",  # 2020-01-01T00:00:00.000000001Z
    f"{_P}/symlink-1960",  # a symlink whose own mtime is 1960 (touch -h)
    f"{_P}/empty-file",
    f"{_P}/empty-dir",
    f"{_P}/setgid-dir",  # mode 2775
    f"{_P}/tmp",  # mode 1777 (sticky)
    f"{_P}/.wh.not-a-whiteout",  # looks like an OCI whiteout; docker import would drop it
    "/tmp",  # mode 1777
    "/root",  # mode 0700
)
"""Paths that must be present in a faithful tarball of a probed root (the socket excluded)."""

ETC_PATHS: tuple[str, ...] = ("/etc", "/etc/fstab", "/etc/os-release", "/etc/passwd", "/etc/group")
"""Written only when ``populate_probes(..., with_etc=True)``."""


def sparse_probe_bytes() -> bytes:
    """The 64 KiB of data at offset 3 MiB of ``/probes/sparse`` (seeded, so reproducible)."""
    return random.Random(20240101).randbytes(SPARSE_DATA_LEN)


def _run(*argv: str | os.PathLike[str]) -> None:
    subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True)


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).is_file():
            return Path(cand)
    raise FileNotFoundError("busybox not found (apt-get install busybox-static)")


def _set_mtime(path: Path, mtime_ns: int) -> None:
    # atime = mtime: atime is never compared, a fixed value keeps the tree reproducible.
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def populate_probes(
    root: Path,
    *,
    with_etc: bool = True,
    fstab: str | None = None,
    mtime_ns: int = DEFAULT_MTIME_NS,
) -> None:
    """Create every fidelity probe under ``root`` (must run as root).

    Args:
        root: an existing directory: a staging directory for ``mke2fs -d`` or the mount point
            of a filesystem mounted read-write.
        with_etc: also write a small ``/etc`` (``fstab``, ``os-release``, ``passwd``,
            ``group``); leave it out when ``root`` already holds a distribution.
        fstab: the text of ``/etc/fstab`` (default: a comment only, meaning "no other
            filesystems").
        mtime_ns: the mtime of every path that is not a timestamp probe, and of ``root``.

    The socket ``/probes/socket`` is created but is not in :data:`PROBE_PATHS`: tar cannot
    carry it, so compare with ``ignore={PROBE_SOCKET}`` where needed.
    """
    if os.geteuid() != 0:
        raise PermissionError("populate_probes needs root (mknod, chown, setcap, trusted.*)")
    p = root / PROBE_DIR.lstrip("/")
    p.mkdir(mode=0o755)
    os.chmod(p, 0o755)

    setuid = p / "setuid-busybox"
    shutil.copyfile(_busybox(), setuid)
    os.chmod(setuid, 0o4755)  # after any chown: chown clears S_ISUID

    cap = p / "capability"
    cap.write_bytes(b"#!/bin/sh\necho 'I may open raw sockets'\n")
    os.chmod(cap, 0o755)
    _run("setcap", "cap_net_raw+ep", cap)  # security.capability, VFS_CAP_REVISION_2

    ux = p / "user-xattr"
    ux.write_bytes(b"xattrs\n")
    os.chmod(ux, 0o644)
    os.setxattr(ux, "user.ova2img", b"hello")
    os.setxattr(ux, "user.binary", b"\x00\xff\xfe\x80 binary \x00")
    os.setxattr(ux, "trusted.ova2img", b"root only")

    acl_file = p / "acl-file"
    acl_file.write_bytes(b"acl\n")
    os.chmod(acl_file, 0o640)
    _run("setfacl", "-m", "u:1234:rwx", acl_file)  # system.posix_acl_access
    acl_dir = p / "acl-dir"
    acl_dir.mkdir()
    os.chmod(acl_dir, 0o750)
    _run("setfacl", "-m", "u:1234:rx", acl_dir)
    _run("setfacl", "-d", "-m", "u:1234:rx", acl_dir)  # system.posix_acl_default

    hl = p / "hardlink-a"
    hl.write_bytes(b"one inode, two names\n")
    os.chmod(hl, 0o644)
    os.link(hl, p / "hardlink-b")

    os.mkfifo(p / "fifo", 0o644)
    os.mknod(p / "char-1-3", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(p / "block-8-1", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    # mknod(2) can make a socket inode without bind(2), so no 108-byte sun_path limit.
    os.mknod(p / "socket", stat.S_IFSOCK | 0o755)
    # Second names of a FIFO, a device and a symlink: GNU tar writes the first two whole
    # under each name and the symlink's second name as a hardlink member.
    os.link(p / "fifo", p / "fifo-link")
    os.link(p / "char-1-3", p / "char-1-3-link")
    os.symlink("hardlink-a", p / "symlink-linked")
    os.link(p / "symlink-linked", p / "symlink-linked-2", follow_symlinks=False)

    sparse = p / "sparse"
    with sparse.open("wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_DATA_OFFSET)
        f.write(sparse_probe_bytes())
    os.chmod(sparse, 0o644)

    (p / NAME_255).write_bytes(b"255-byte name\n")
    (p / NON_UTF8_NAME).write_bytes(b"latin-1 name\n")
    os.symlink(LONG_TARGET, p / "long-symlink")

    for ident in (BIG_ID, HUGE_ID):
        owned = p / f"owned-{ident}"
        owned.write_bytes(b"owned\n")
        os.chown(owned, ident, ident)
        os.chmod(owned, 0o640)

    big = p / "bigdir"
    big.mkdir()
    for i in range(BIG_DIR_ENTRIES):
        (big / f"f{i:04d}").touch()

    for name in ("mtime-1960", "mtime-2100", "mtime-ns", "empty-file", ".wh.not-a-whiteout"):
        (p / name).touch()
    os.symlink("mtime-1960", p / "symlink-1960")
    (p / "empty-dir").mkdir()
    (p / "setgid-dir").mkdir()
    os.chmod(p / "setgid-dir", 0o2775)
    (p / "tmp").mkdir()
    os.chmod(p / "tmp", 0o1777)

    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    os.chmod(tmp, 0o1777)
    rootdir = root / "root"
    rootdir.mkdir(exist_ok=True)
    os.chmod(rootdir, 0o700)

    if with_etc:
        _write_etc(root, fstab)

    # Times last, children before parents (creating a child changes its parent's mtime).
    for dirpath, dirnames, filenames in os.walk(p, topdown=False):
        d = Path(dirpath)
        for name in filenames + dirnames:
            _set_mtime(d / name, mtime_ns)
        _set_mtime(d, mtime_ns)
    _set_mtime(p / "mtime-1960", MTIME_1960_NS)
    _set_mtime(p / "symlink-1960", MTIME_1960_NS)
    _set_mtime(p / "mtime-2100", MTIME_2100_NS)
    _set_mtime(p / "mtime-ns", MTIME_NANO_NS)
    if with_etc:
        for name in ("fstab", "os-release", "passwd", "group", ""):
            _set_mtime(root / "etc" / name, mtime_ns)
    for d in (tmp, rootdir, root):
        _set_mtime(d, mtime_ns)


def _write_etc(root: Path, fstab: str | None) -> None:
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    files = {
        "fstab": fstab if fstab is not None else "# <file system> <mount point> <type> <options>\n",
        "os-release": (
            'PRETTY_NAME="ova2img probes"\nNAME="ova2img probes"\nID=ova2img-probes\n'
            'VERSION_ID="1"\n'
        ),
        "passwd": (
            "root:x:0:0:root:/root:/bin/sh\n"
            "prober:x:1234:1234:probe user:/nonexistent:/bin/false\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        ),
        "group": "root:x:0:\nprober:x:1234:\nnogroup:x:65534:\n",
    }
    for name, text in files.items():
        f = etc / name
        f.write_text(text)
        os.chmod(f, 0o644)
