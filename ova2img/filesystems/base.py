"""The uniform entry model every filesystem adapter fills, and the filesystem interface.

The assembly layer only ever sees :class:`Entry` objects and :class:`Filesystem` methods, so
ext, XFS, btrfs and FAT look alike above this line.
"""

from __future__ import annotations

import enum
import stat
import struct
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, Self, TypeVar

from ..errors import FilesystemError, Ova2imgError

_H = TypeVar("_H")
_T = TypeVar("_T")

#: what parsing damaged on-disk structures raises, in Python and inside the dissect libraries
#: (besides each library's own error class and the adapter's own): each adapter turns them into
#: a FilesystemError that names the object
DECODE_ERRORS: tuple[type[Exception], ...] = (
    EOFError,
    struct.error,
    ValueError,
    IndexError,
    KeyError,
    RecursionError,
    ArithmeticError,
)


#: an on-disk owner of -1 (``(uid_t)-1``) is no valid id: the kernel maps it to the overflow id
#: (``make_kuid`` gives ``INVALID_UID``, ``stat`` shows ``/proc/sys/kernel/overflowuid``)
NO_ID = 0xFFFFFFFF
OVERFLOW_ID = 65534
#: nanoseconds in a second. A time whose nanoseconds are out of range (10^9 or more, which an
#: ext4, XFS or btrfs inode can hold) is taken with none, as GNU tar records it (code_timespec:
#: "ignore invalid values of ns")
NS_PER_S = 1_000_000_000


class EntryType(enum.Enum):
    """What kind of inode an entry is (the ``S_IFMT`` part of a mode)."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    @classmethod
    def from_mode(cls, mode: int) -> EntryType | None:
        """Map an ``st_mode``-style value to a type, or ``None`` for an invalid ``S_IFMT``."""
        return ENTRY_TYPES.get(stat.S_IFMT(mode))


#: the ``S_IFMT`` bits of a mode -> its entry type (what :meth:`EntryType.from_mode` looks up;
#: adapters that make an entry for every path look it up directly)
ENTRY_TYPES = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
}


@dataclass(slots=True)
class Entry:
    """One inode as the guest kernel would show it through ``lstat``/``getxattr``/``readlink``.

    Attributes:
        type: the inode type.
        mode: the 12 permission bits (setuid, setgid, sticky included), without ``S_IFMT``.
        uid, gid: numeric owners, 32-bit.
        size: ``st_size`` (for a symlink the length of its target).
        mtime_ns, atime_ns, ctime_ns: times in nanoseconds since the epoch, signed (before
            1970 is negative).
        nlink: ``st_nlink``.
        inode: the inode number, unique within its filesystem (hardlink identity).
        rdev_major, rdev_minor: device numbers of a char or block device, else 0.
        xattrs: every extended attribute, name → raw value, as ``getxattr`` returns them
            (POSIX ACLs as ``system.posix_acl_access``/``system.posix_acl_default`` in the
            kernel's version-2 format).
        link_target: the raw target of a symlink.
    """

    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    inode: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    link_target: bytes = b""


class InodeFields(Protocol):
    """What :func:`inode_entry` reads of an adapter's decoded inode."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int


def inode_entry(ino: InodeFields, inum: int) -> Entry | None:
    """The :class:`Entry` of a decoded inode (type, permissions, owners, size, times, links),
    or ``None`` when its mode holds no valid file type. Built positionally, in the order of
    Entry's fields: a walk makes one per path."""
    mode = ino.mode
    etype = ENTRY_TYPES.get(mode & 0o170000)
    if etype is None:
        return None
    return Entry(
        etype,
        mode & 0o7777,
        ino.uid,
        ino.gid,
        ino.size,
        ino.mtime_ns,
        ino.atime_ns,
        ino.ctime_ns,
        ino.nlink,
        inum,
    )


DataRun = tuple[int, int]
"""``(offset, length)`` of a stretch of a file that holds data; everything else reads as zeros."""

Piece = tuple[int, int]
"""``(offset, length)`` of a stretch of a file's content where the adapter reads it (its own
address space: a byte offset of the volume for ext and XFS, a logical address for btrfs), for
:meth:`Filesystem.read_piece`."""

#: every filesystem object alive in this process (see :func:`live_filesystems`)
_LIVE: weakref.WeakSet[Filesystem] = weakref.WeakSet()


def live_filesystems() -> dict[int, Filesystem]:
    """Every :class:`Filesystem` object alive now, by ``id()``: a process forked after this call
    holds the same objects under the same ids, so a piece of content can be named to it by
    ``(id(fs), token, offset, length)`` (see :mod:`ova2img.sinks.split`). The dict holds them
    alive, so no id is reused while it is kept."""
    return {id(fs): fs for fs in list(_LIVE)}


class Filesystem(ABC):
    """A mounted-read-only view of one filesystem, addressed by inode handles.

    A *handle* is whatever the adapter needs to find an inode again (an inode number, a
    library object); the assembly layer treats it as opaque and keeps it only while it walks
    one directory.
    """

    #: short type name as ``mount -t`` knows it: ``ext4``, ``xfs``, ``btrfs``, ``vfat``
    fstype: str = ""
    #: filesystem UUID in the form ``blkid`` prints (``UUID=`` in fstab), or ``None``
    uuid: str | None = None
    #: filesystem label (``LABEL=`` in fstab), or ``None``
    label: str | None = None

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        """Every filesystem object is known to :func:`live_filesystems`."""
        self = super().__new__(cls)
        _LIVE.add(self)
        return self

    @abstractmethod
    def root(self) -> object:
        """The handle of the root directory."""

    @abstractmethod
    def stat(self, handle: object) -> Entry:
        """Metadata of the inode behind *handle*."""

    @abstractmethod
    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        """The entries of a directory as ``(name, handle)``, without ``.`` and ``..``.

        Names are raw bytes (any encoding); order is unspecified (the caller sorts).
        """

    @abstractmethod
    def open(self, handle: object) -> BinaryIO:
        """A seekable stream over the content of a regular file."""

    def content_pieces(self, handle: object) -> tuple[int, list[Piece]] | None:
        """Where the whole content of a regular file lies, when it is plain stored bytes
        without holes (most files): ``(token, pieces)``, the content being the pieces read
        with :meth:`read_piece` (each may be read in parts) one after the other, their
        lengths adding up to the file's size. ``None`` for anything else (holes, preallocated
        stretches, inline or compressed data, an empty file): the caller uses
        :meth:`read_content` or :meth:`open`.

        Finding the pieces costs only metadata; reading them is the disk work (inflating
        grains), which the tar writer can hand to another process."""
        return None

    def read_piece(self, token: int, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset* of a piece that :meth:`content_pieces` gave with
        *token* (which names the file in error messages)."""
        raise FilesystemError(f"{self.fstype or 'this'} filesystem has no content pieces")

    def read_content(self, handle: object) -> bytes | None:
        """The whole content of a regular file without holes, read in one call, when the
        adapter has a quicker way than :meth:`open` (its :meth:`content_pieces`, inline data);
        ``None`` when it has not, and the caller opens the file. Either way the bytes are the
        same. A file with holes or preallocated stretches always gets ``None``: content
        returned here is dense, and the caller need not ask for its :meth:`data_runs`."""
        found = self.content_pieces(handle)
        if found is None:
            return None
        token, pieces = found
        if len(pieces) == 1:
            return self.read_piece(token, *pieces[0])
        return b"".join([self.read_piece(token, offset, n) for offset, n in pieces])

    def data_runs(self, handle: object) -> list[DataRun] | None:
        """The stretches of a regular file that hold data, merged and sorted, or ``None``
        when the adapter cannot tell (the file is then treated as fully dense)."""
        return None

    def mount(self, options: Sequence[str]) -> Filesystem:
        """The view a mount with these fstab options shows (``subvol=``/``subvolid=`` for btrfs,
        ``uid=``/``gid=``/``umask=``/``fmask=``/``dmask=`` for vfat, …); the default is the
        filesystem itself. A view is a :class:`Filesystem` whose inode numbers are unique within
        it (hardlink identity).

        Raises:
            FilesystemError: an option names something the filesystem does not have.
        """
        return self

    def root_candidates(self) -> Iterator[Filesystem]:
        """Views that might be the guest's root, best first: the default mount view, then
        (btrfs) each subvolume, so the assembly can find the one holding ``/etc/fstab``."""
        yield self

    def lookup(self, path: bytes, *, follow: bool = True) -> object:
        """Resolve an absolute path inside this filesystem to a handle.

        Symlinks are followed inside this filesystem only (an absolute target restarts at this
        filesystem's root), never on the host.

        Raises:
            FileNotFoundError: a component does not exist (or a loop was detected).
        """
        return _lookup(self, path, follow=follow)

    def read_file(self, path: bytes, limit: int = 1 << 20) -> bytes:
        """Read at most *limit* bytes of the file at *path* (for ``/etc/fstab`` and friends)."""
        handle = self.lookup(path)
        if self.stat(handle).type is not EntryType.FILE:
            raise FileNotFoundError(path.decode(errors="replace"))
        with self.open(handle) as fh:
            return fh.read(limit)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the adapter holds (most hold nothing)."""


def _lookup(fs: Filesystem, path: bytes, *, follow: bool) -> object:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    stack: list[object] = [fs.root()]
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        current = stack[-1]
        if fs.stat(current).type is not EntryType.DIR:
            raise FileNotFoundError(path.decode(errors="replace"))
        child = next((h for n, h in fs.iterdir(current) if n == name), None)
        if child is None:
            raise FileNotFoundError(path.decode(errors="replace"))
        entry = fs.stat(child)
        if entry.type is EntryType.SYMLINK and (parts or follow):
            hops += 1
            if hops > 40:  # Linux's MAXSYMLINKS
                raise FileNotFoundError(f"{path.decode(errors='replace')}: too many symlinks")
            target = entry.link_target
            if target.startswith(b"/"):
                stack = [fs.root()]
            parts = [p for p in target.split(b"/") if p and p != b"."] + parts
            continue
        stack.append(child)
    return stack[-1]


def inode_label(inum: int) -> str:
    """How an error names an inode of a filesystem whose handles are inode numbers."""
    return f"inode {inum}"


def decode_guarded(
    func: Callable[[_H], _T],
    handle: _H,
    errors: tuple[type[Exception], ...],
    describe: Callable[[_H], str],
    name: str,
) -> _T:
    """``func(handle)`` for an adapter's public call: what decoding damaged structures raises
    (*errors*) becomes a :class:`FilesystemError` saying which object (``describe(handle)``)
    on which filesystem (*name*). The description is made only on failure: this runs several
    times for every file of a conversion."""
    try:
        return func(handle)
    except Ova2imgError:
        raise
    except errors as exc:
        raise FilesystemError(f"{describe(handle)}: {exc}", obj=name) from exc
