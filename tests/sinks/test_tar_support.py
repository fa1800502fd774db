"""An in-memory Filesystem for the sink's unit tests, and the fidelity probe tree built on it.

This is not a disk: the sink only sees TreeItems, so a fake filesystem is the honest input for
testing the tar encoding. The archives are then read back by real tools (GNU tar, CPython's
tarfile) in test_tar.py.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ova2img.assembly import TreeItem
from ova2img.filesystems.base import DataRun, Entry, EntryType, Filesystem

NS = 1_000_000_000


class VirtualFile(io.RawIOBase):
    """A seekable file of *size* bytes: *chunks* (offset → bytes) over zeros; ``truncate_at``
    makes it end early (a file shorter than its inode size)."""

    def __init__(self, size: int, chunks: dict[int, bytes], truncate_at: int | None = None):
        super().__init__()
        self.size = size if truncate_at is None else truncate_at
        self.chunks = sorted(chunks.items())
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        start, end = self.pos, self.pos + n
        view[:n] = bytes(n)
        for off, data in self.chunks:
            lo, hi = max(off, start), min(off + len(data), end)
            if lo < hi:
                view[lo - start : hi - start] = data[lo - off : hi - off]
        self.pos = end
        return n


@dataclass
class Node:
    entry: Entry
    chunks: dict[int, bytes] = field(default_factory=dict)
    runs: list[DataRun] | None = None
    children: dict[bytes, int] = field(default_factory=dict)
    truncate_at: int | None = None


class FakeFS(Filesystem):
    """Handles are indexes into :attr:`nodes`; 0 is the root directory."""

    fstype = "fake"

    def __init__(self, root_entry: Entry) -> None:
        self.nodes: list[Node] = [Node(root_entry)]
        self.opened = 0

    def root(self) -> object:
        return 0

    def stat(self, handle: object) -> Entry:
        assert isinstance(handle, int)
        return self.nodes[handle].entry

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        assert isinstance(handle, int)
        yield from self.nodes[handle].children.items()

    def open(self, handle: object) -> BinaryIO:
        assert isinstance(handle, int)
        node = self.nodes[handle]
        self.opened += 1
        stream = VirtualFile(node.entry.size, node.chunks, node.truncate_at)
        return io.BufferedReader(stream)  # type: ignore[return-value]

    def data_runs(self, handle: object) -> list[DataRun] | None:
        assert isinstance(handle, int)
        return self.nodes[handle].runs

    # -- building -----------------------------------------------------------------------------

    def add(self, path: bytes, entry: Entry, **kw: object) -> int:
        parent = 0
        parts = path.split(b"/")
        for part in parts[:-1]:
            parent = self.nodes[parent].children[part]
        self.nodes.append(Node(entry, **kw))  # type: ignore[arg-type]
        handle = len(self.nodes) - 1
        self.nodes[parent].children[parts[-1]] = handle
        return handle

    def link(self, path: bytes, handle: int) -> None:
        parent = 0
        parts = path.split(b"/")
        for part in parts[:-1]:
            parent = self.nodes[parent].children[part]
        self.nodes[parent].children[parts[-1]] = handle

    def walk(self) -> Iterator[TreeItem]:
        """Every path, parents first, children sorted by name (the assembly walk's order)."""

        def visit(path: bytes, handle: int) -> Iterator[TreeItem]:
            node = self.nodes[handle]
            yield TreeItem(path, node.entry, self, 1, handle)
            for name in sorted(node.children):
                yield from visit(path + b"/" + name if path else name, node.children[name])

        yield from visit(b"", 0)


def entry(kind: EntryType, mode: int, **kw: object) -> Entry:
    values: dict[str, object] = {"uid": 0, "gid": 0, "size": 0, "mtime_ns": 1_700_000_000 * NS}
    values.update(kw)
    return Entry(kind, mode, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The fidelity probes (design/fidelity.md), as raw paths → what a reader must see.
# ---------------------------------------------------------------------------------------------

NAME_255 = b"n" * 255
NON_UTF8 = b"caf\xe9"
LONG_TARGET = b"../" + b"t" * 297  # 300 bytes
NON_UTF8_TARGET = b"target-\xff\xfe"
#: 15 directories of 255-byte names, then a file: a path of 4000 bytes
DEEP_DIRS = [bytes([0x61 + i]) * 255 for i in range(15)]
DEEP_FILE = b"/".join([b"deep", *DEEP_DIRS, b"f" * 155])
# setcap cap_net_raw+ep (a VFS_CAP_REVISION_2 blob: 20 bytes, mostly NULs)
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")
# setfacl -m u:1234:rwx on a 0644 file (POSIX ACL xattr version 2); the mode becomes 0674
ACL_ACCESS = bytes.fromhex(
    "0200000001000600ffffffff02000700d204000004000400ffffffff10000700ffffffff20000400ffffffff"
)
# setfacl -m u:1234:rx,d:u:1234:rwx on a 0755 directory
ACL_DIR_ACCESS = bytes.fromhex(
    "0200000001000700ffffffff02000500d204000004000500ffffffff10000500ffffffff20000500ffffffff"
)
ACL_DIR_DEFAULT = bytes.fromhex(
    "0200000001000700ffffffff02000700d204000004000500ffffffff10000700ffffffff20000500ffffffff"
)
SPARSE_SIZE = 4 * 1024 * 1024
SPARSE_AT = 1024 * 1024 + 4096
_RNG = random.Random(1234)  # the same bytes in every process (stdout tests compare runs)
SPARSE_DATA = _RNG.randbytes(40_000)
TAIL_SIZE = 1024 * 1024
TAIL_DATA = b"tail" * 1024
GIANT_SIZE = 3 * 1024**3
GIANT_AT = 2 * 1024**3 - 65536
GIANT_DATA = _RNG.randbytes(65536)
MTIME_NEG = -1_500_000_000  # -1.5 s
MTIME_1960 = -315_619_200 * NS + 123_456_789
MTIME_2100 = 4_102_444_800 * NS + 123_456_789
MTIME_2300 = 10_413_792_000 * NS  # 2300-01-01: past the 11-digit octal field (2242)
CONTENT = b"hello, tar\n" * 100


def probe_fs() -> FakeFS:
    """A tree with every probe of design/fidelity.md that a tar can hold, plus a socket."""
    fs = FakeFS(entry(EntryType.DIR, 0o755, mtime_ns=1_700_000_000 * NS + 5))
    d = EntryType.DIR
    f = EntryType.FILE
    fs.add(b"bin", entry(d, 0o755))
    fs.add(b"bin/setuid", entry(f, 0o4755, size=len(CONTENT)), chunks={0: CONTENT})
    fs.add(b"bin/setgid", entry(f, 0o2711, uid=0, gid=50, size=3), chunks={0: b"abc"})
    fs.add(
        b"bin/ping",
        entry(f, 0o755, uid=1000, gid=1000, size=4, xattrs={"security.capability": CAPABILITY}),
        chunks={0: b"ping"},
    )
    fs.add(b"tmp", entry(d, 0o1777))
    fs.add(b"empty-dir", entry(d, 0o700))
    fs.add(b"empty-file", entry(f, 0o600))
    fs.add(
        b"acl",
        entry(
            d,
            0o755,
            xattrs={
                "system.posix_acl_access": ACL_DIR_ACCESS,
                "system.posix_acl_default": ACL_DIR_DEFAULT,
            },
        ),
    )
    fs.add(
        b"acl/file",
        entry(
            f,
            0o674,
            size=2,
            xattrs={
                "system.posix_acl_access": ACL_ACCESS,
                "user.bin": b"\x00\x01\x02\xff\x00",
                "user.text": b"hello world",
                "trusted.x": b"\n=\n",
            },
        ),
        chunks={0: b"ok"},
    )
    fs.add(b"owners", entry(d, 0o755))
    fs.add(b"owners/big", entry(f, 0o644, uid=100000, gid=100000))
    fs.add(b"owners/huge", entry(f, 0o644, uid=2**32 - 2, gid=2**32 - 2))
    fs.add(b"owners/mixed", entry(f, 0o644, uid=2**21, gid=2**21 - 1))
    fs.add(b"times", entry(d, 0o755, mtime_ns=MTIME_2100))
    fs.add(b"times/neg", entry(f, 0o644, mtime_ns=MTIME_NEG))
    fs.add(b"times/1960", entry(f, 0o644, mtime_ns=MTIME_1960))
    fs.add(b"times/2100", entry(f, 0o644, mtime_ns=MTIME_2100))
    fs.add(b"times/2300", entry(f, 0o644, mtime_ns=MTIME_2300))
    fs.add(b"times/epoch", entry(f, 0o644, mtime_ns=0))
    fs.add(
        b"times/ns",
        entry(
            EntryType.SYMLINK, 0o777, mtime_ns=1_000_000_000 * NS + 1, link_target=b"2100", size=4
        ),
    )
    fs.add(b"dev", entry(d, 0o755))
    fs.add(b"dev/null", entry(EntryType.CHAR, 0o666, rdev_major=1, rdev_minor=3))
    fs.add(b"dev/bigchar", entry(EntryType.CHAR, 0o600, rdev_major=300, rdev_minor=70000))
    fs.add(b"dev/sda", entry(EntryType.BLOCK, 0o660, gid=6, rdev_major=259, rdev_minor=1048575))
    fs.add(b"dev/fifo", entry(EntryType.FIFO, 0o620))
    fs.add(b"dev/sock", entry(EntryType.SOCKET, 0o755))
    fs.add(b"names", entry(d, 0o755))
    fs.add(b"names/" + NAME_255, entry(f, 0o644, size=3), chunks={0: b"255"})
    fs.add(b"names/" + NON_UTF8, entry(f, 0o644, size=4), chunks={0: b"\xe9\xe9\xe9\xe9"})
    fs.add(b"names/\xc3\xa9t\xc3\xa9", entry(f, 0o644))  # "été", UTF-8
    fs.add(b"names/.wh.looks-like-a-whiteout", entry(f, 0o644))
    fs.add(
        b"names/long-link",
        entry(EntryType.SYMLINK, 0o777, link_target=LONG_TARGET, size=len(LONG_TARGET)),
    )
    fs.add(
        b"names/binary-link",
        entry(EntryType.SYMLINK, 0o777, link_target=NON_UTF8_TARGET, size=len(NON_UTF8_TARGET)),
    )
    parent = b"deep"
    fs.add(parent, entry(d, 0o755))
    for comp in DEEP_DIRS:
        parent += b"/" + comp
        fs.add(parent, entry(d, 0o755))
    fs.add(DEEP_FILE, entry(f, 0o640, size=4), chunks={0: b"deep"})
    links = fs.add(b"links", entry(d, 0o755))
    assert links
    shared = fs.add(
        b"links/a",
        entry(f, 0o640, uid=7, gid=8, size=5, nlink=3, inode=4242, xattrs={"user.k": b"v"}),
        chunks={0: b"hlink"},
    )
    fs.link(b"links/b", shared)
    fs.link(b"names/" + NON_UTF8 + b"-link", shared)
    sparse = fs.add(
        b"sparse",
        entry(f, 0o644, size=SPARSE_SIZE),
        chunks={SPARSE_AT: SPARSE_DATA},
        runs=[(SPARSE_AT, len(SPARSE_DATA))],
    )
    assert sparse
    fs.add(
        b"sparse-tail",
        entry(f, 0o644, size=TAIL_SIZE),
        chunks={TAIL_SIZE - len(TAIL_DATA): TAIL_DATA},
        # unsorted, overlapping and out-of-range runs: the writer normalises them
        runs=[(TAIL_SIZE - 1024, 4096), (TAIL_SIZE - len(TAIL_DATA), 3072)],
    )
    fs.add(b"sparse-holes-only", entry(f, 0o644, size=65536), runs=[])
    fs.add(
        b"sparse-giant",
        entry(f, 0o600, size=GIANT_SIZE),
        chunks={GIANT_AT: GIANT_DATA},
        runs=[(GIANT_AT, len(GIANT_DATA))],
    )
    fs.add(
        b"dense-runs",  # runs cover all: a plain member
        entry(f, 0o644, size=5000),
        chunks={0: b"x" * 5000},
        runs=[(0, 4096), (4096, 904)],
    )
    fs.add(
        b"tiny-hole",  # a 100-byte hole is not worth a sparse map
        entry(f, 0o644, size=5000),
        chunks={0: b"y" * 4000, 4100: b"z" * 900},
        runs=[(0, 4000), (4100, 900)],
    )
    return fs


def expected_content(fs: FakeFS, handle: int) -> bytes:
    """The full content of a file node (only for small files)."""
    node = fs.nodes[handle]
    with fs.open(handle) as stream:
        return stream.read(node.entry.size)


def display(path: bytes) -> str:
    """A raw tree path as CPython's tarfile names it (errors="surrogateescape")."""
    return os.fsdecode(path)
