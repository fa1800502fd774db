"""ext2/ext3/ext4, read the way a read-only Linux mount shows them.

Built over :mod:`dissect.extfs` (``ExtFS`` validates and parses the superblock), but inodes,
extents, block maps, directories and xattrs are decoded here from the raw on-disk bytes: the
library gets several of them silently wrong (see /work/shared/design/dissect-gaps.md) and its
per-inode struct parsing is the slowest part of a walk. References: the kernel's fs/ext4/
(``ext4_iget``, ``ext4_decode_extra_time``, xattr.c, inline.c, acl.c, dir.c), fs/jbd2/recovery.c,
and https://docs.kernel.org/filesystems/ext4/ ("the ext4 disk layout").

Handles are inode numbers (``int``).
"""

from __future__ import annotations

import io
import stat as _stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, TypeVar
from uuid import UUID

from dissect.extfs.exceptions import Error as DissectExtError
from dissect.extfs.extfs import ExtFS
from dissect.util.stream import AlignedStream

from ..errors import FilesystemError, Ova2imgError, UnsupportedError
from ._posix_acl import AclFormatError, ext_acl_to_xattr
from ._runlist import RunlistReader
from .base import (
    DECODE_ERRORS,
    NO_ID,
    NS_PER_S,
    OVERFLOW_ID,
    DataRun,
    Entry,
    EntryType,
    Filesystem,
    Piece,
    decode_guarded,
    inode_entry,
    inode_label,
)

__all__ = ["ExtFilesystem"]

_SB_OFFSET = 1024
_SB_MAGIC_OFFSET = _SB_OFFSET + 0x38
_EXT_MAGIC = 0xEF53
_ROOT_INO = 2
_GOOD_OLD_INODE_SIZE = 128

# Superblock feature bits (the ext4 disk layout, "The Super Block").
_COMPAT_HAS_JOURNAL = 0x4
_INCOMPAT_COMPRESSION = 0x1
_INCOMPAT_FILETYPE = 0x2
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_LARGEDIR = 0x4000
_INCOMPAT_KNOWN = 0x3FFFF & ~0x800  # every bit up to casefold (0x20000); 0x800 is unused
_RO_COMPAT_SPARSE_SUPER = 0x1
_RO_COMPAT_HUGE_FILE = 0x8
_COMPAT_SPARSE_SUPER2 = 0x200
# libblkid (superblocks/ext.c): what ext3 cannot mount makes it "ext4".
_EXT3_INCOMPAT_SUPPORTED = _INCOMPAT_FILETYPE | _INCOMPAT_RECOVER | _INCOMPAT_META_BG
_EXT3_RO_COMPAT_SUPPORTED = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir

# Inode flags.
_INDEX_FL = 0x1000
_HUGE_FILE_FL = 0x40000
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_ENCRYPT_FL = 0x800  # EXT4_ENCRYPT_FL: fscrypt; names and contents are ciphertext

_EXTENT_MAGIC = 0xF30A
_EXTENT_INIT_MAX_LEN = 1 << 15
_XATTR_MAGIC = 0xEA020000
_XATTR_MAGIC_BYTES = struct.pack("<I", _XATTR_MAGIC)
_INLINE_DATA_SIZE = 60  # EXT4_MIN_INLINE_DATA_SIZE: the i_block array
_JBD2_MAGIC = 0xC03B3998  # JBD2_MAGIC_NUMBER (include/linux/jbd2.h)

# fs/ext4/xattr.c ext4_xattr_handler_map: the namespaces listxattr(2) shows. Index 7 (system.,
# holding "system.data" of inline data), 5 (lustre), 8 (richacl), 9 (encryption) have no handler
# there and are hidden from userspace.
_XATTR_PREFIX = {1: "user.", 4: "trusted.", 6: "security.", 10: "gnu."}
_XATTR_ACL_NAMES = {2: "system.posix_acl_access", 3: "system.posix_acl_default"}
_XATTR_INDEX_SYSTEM = 7

# struct ext4_inode, first 128 bytes (EXT4_GOOD_OLD_INODE_SIZE). Times are signed 32-bit.
_INODE = struct.Struct("<HHIiiiIHHIII60sIIIIHHHHHH")
#: an i_*time_extra field at or above this holds nanoseconds >= 10^9 (30 bits, then 2 epoch bits)
_EXTRA_NS_LIMIT = 4 * NS_PER_S
_EXTRA_TIMES = struct.Struct("<III")  # i_ctime_extra, i_mtime_extra, i_atime_extra at 0x84
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_EXTENT_HEADER = struct.Struct("<HHHHI")
_EXTENT = struct.Struct("<IHHI")
_EXTENT_IDX = struct.Struct("<IIHH")
_XATTR_ENTRY = struct.Struct("<BBHIII")
_DIRENT = struct.Struct("<IHBB")
_DIRENT_OLD = struct.Struct("<IHH")

_INODE_CACHE = 8192
_META_CACHE = 1024
_ITABLE_CHUNK = 64 << 10  # inode table read a VMDK grain at a time …
_ITABLE_CACHE = 128  # … and 8 MiB of it kept
_RUNS_CACHE = 64

_T = TypeVar("_T")


class _Corrupt(Exception):  # noqa: N818 - internal, always re-raised as FilesystemError
    """Internal: a structure failed a sanity check (turned into FilesystemError at the API)."""


#: what decoding damaged structures raises, here or in dissect: a FilesystemError at the API
_DECODE_ERRORS = (_Corrupt, DissectExtError, AclFormatError, *DECODE_ERRORS)


def _by_logical(extent: _Extent) -> int:
    return extent.logical


@dataclass(slots=True)
class _Extent:
    """A mapped stretch of a file: logical block, physical block, block count."""

    logical: int
    physical: int
    length: int
    unwritten: bool = False


class _Inode:
    """The fields of one raw inode the adapter needs, decoded once."""

    __slots__ = (
        "atime_ns",
        "ctime_ns",
        "extra_end",
        "file_acl",
        "flags",
        "gid",
        "has_ibody_xattrs",
        "i_block",
        "i_blocks",
        "inum",
        "mode",
        "mtime_ns",
        "nlink",
        "raw",
        "size",
        "uid",
    )
    atime_ns: int
    ctime_ns: int
    extra_end: int
    file_acl: int
    flags: int
    gid: int
    has_ibody_xattrs: bool
    i_block: bytes
    i_blocks: int
    inum: int
    mode: int
    mtime_ns: int
    nlink: int
    raw: bytes
    size: int
    uid: int

    def __init__(self, fs: ExtFilesystem, inum: int, raw: bytes) -> None:
        (
            mode,
            uid_lo,
            size_lo,
            atime,
            ctime,
            mtime,
            _dtime,
            gid_lo,
            links,
            blocks_lo,
            flags,
            _osd1,
            i_block,
            _generation,
            file_acl_lo,
            size_high,
            _faddr,
            blocks_high,
            file_acl_high,
            uid_high,
            gid_high,
            _csum_lo,
            _reserved,
        ) = _INODE.unpack_from(raw, 0)
        self.inum = inum
        self.raw = raw
        self.mode = mode
        self.flags = flags
        self.i_block = i_block
        # osd2 (Linux): the high 16 bits of the owners.
        uid = uid_lo | uid_high << 16
        gid = gid_lo | gid_high << 16
        self.uid = uid if uid != NO_ID else OVERFLOW_ID
        self.gid = gid if gid != NO_ID else OVERFLOW_ID
        self.nlink = links
        self.file_acl = file_acl_lo | file_acl_high << 32
        # ext4_inode_blocks(): 512-byte units unless huge_file + EXT4_HUGE_FILE_FL (fs blocks).
        blocks = blocks_lo
        if fs.huge_file:
            blocks |= blocks_high << 32
            if flags & _HUGE_FILE_FL:
                blocks *= fs.block_size >> 9
        self.i_blocks = blocks
        # ext4_isize(): i_size_high counts only for regular files (or with largedir); it was
        # i_dir_acl on ext2 directories.
        fmt = mode & 0o170000
        if fmt == _stat.S_IFREG or fs.largedir:
            self.size = size_lo | size_high << 32
        else:
            self.size = size_lo
        # Times: 32-bit signed seconds; inodes with room for the extra fields (128-byte inodes
        # have none: EXT4_FITS_IN_INODE) add 2 epoch bits and 30 ns bits each
        # (ext4_decode_extra_time, fs/ext4/ext4.h).
        extra_isize = 0
        if len(raw) > _GOOD_OLD_INODE_SIZE:
            (extra_isize,) = _U16.unpack_from(raw, 128)
            if extra_isize & 3 or _GOOD_OLD_INODE_SIZE + extra_isize > len(raw):
                raise _Corrupt(f"i_extra_isize {extra_isize} does not fit a {len(raw)}-byte inode")
        self.extra_end = _GOOD_OLD_INODE_SIZE + extra_isize
        end = self.extra_end
        # ext4_xattr_ibody_header: the in-inode xattr area starts with a magic
        self.has_ibody_xattrs = end + 4 <= len(raw) and raw[end : end + 4] == _XATTR_MAGIC_BYTES
        if extra_isize >= 16:  # the usual 256-byte inode: all three extra fields at once
            # (an extra field of 4 * 10^9 or more holds out-of-range nanoseconds: none, as
            # GNU tar records them)
            c_extra, m_extra, a_extra = _EXTRA_TIMES.unpack_from(raw, 132)
            self.ctime_ns = (ctime + ((c_extra & 3) << 32)) * NS_PER_S + (
                c_extra >> 2 if c_extra < _EXTRA_NS_LIMIT else 0
            )
            self.mtime_ns = (mtime + ((m_extra & 3) << 32)) * NS_PER_S + (
                m_extra >> 2 if m_extra < _EXTRA_NS_LIMIT else 0
            )
            self.atime_ns = (atime + ((a_extra & 3) << 32)) * NS_PER_S + (
                a_extra >> 2 if a_extra < _EXTRA_NS_LIMIT else 0
            )
        else:
            self.ctime_ns = _time_ns(ctime, raw, 132, extra_isize)
            self.mtime_ns = _time_ns(mtime, raw, 136, extra_isize)
            self.atime_ns = _time_ns(atime, raw, 140, extra_isize)


def _time_ns(seconds: int, raw: bytes, extra_offset: int, extra_isize: int) -> int:
    if extra_offset + 4 > _GOOD_OLD_INODE_SIZE + extra_isize:
        return seconds * 1_000_000_000
    extra: int = _U32.unpack_from(raw, extra_offset)[0]
    seconds += (extra & 3) << 32
    return seconds * NS_PER_S + (extra >> 2 if extra < _EXTRA_NS_LIMIT else 0)


class _OverlayStream(AlignedStream):  # type: ignore[misc]
    """The filesystem as it is after journal replay: blocks redirected into the journal.

    Nothing is copied: *overlay* maps a filesystem block to the byte offset of its newest
    committed copy in the journal (and whether jbd2 escaped its first 4 bytes).
    """

    def __init__(
        self, fh: BinaryIO, size: int, block_size: int, overlay: dict[int, tuple[int, bool]]
    ) -> None:
        super().__init__(size, block_size)
        self._fh = fh
        self._bs = block_size
        self._overlay = overlay

    def _read(self, offset: int, length: int) -> bytes:
        self._fh.seek(offset)
        data = self._fh.read(length)
        bs = self._bs
        first = offset // bs
        last = (offset + len(data) - 1) // bs
        if last - first < len(self._overlay):
            hits = [b for b in range(first, last + 1) if b in self._overlay]
        else:
            hits = sorted(b for b in self._overlay if first <= b <= last)
        if not hits:
            return bytes(data)
        buf = bytearray(data)
        for block in hits:
            src, escaped = self._overlay[block]
            self._fh.seek(src)
            content = bytearray(self._fh.read(bs))
            if escaped:  # JBD2_FLAG_ESCAPE: the block began with the jbd2 magic
                content[0:4] = struct.pack(">I", _JBD2_MAGIC)
            start = block * bs - offset
            lo = max(start, 0)
            hi = min(start + bs, len(buf))
            buf[lo:hi] = content[lo - start : hi - start]
        return bytes(buf)


class ExtFilesystem(Filesystem):
    """A read-only view of an ext2/ext3/ext4 filesystem, as the Linux kernel shows it.

    Args:
        stream: the volume (seekable).
        name: how error messages name this filesystem (e.g. the partition).
        ignore_journal: read a filesystem whose journal needs recovery as it is on disk, instead
            of replaying the journal in memory first (what a read-only kernel mount does).

    Raises:
        FilesystemError: not ext, or a malformed superblock / journal.
        UnsupportedError: features that change how data is read and that are not implemented
            (compression, bigalloc, external journal devices, unknown incompat bits).
    """

    def __init__(self, stream: BinaryIO, *, name: str = "", ignore_journal: bool = False) -> None:
        self._name = name or "ext"
        self._raw = stream
        try:
            stream.seek(0, io.SEEK_END)
            self._stream_size = stream.tell()
            if self._stream_size < _SB_OFFSET + 1024:
                raise FilesystemError(
                    f"volume of {self._stream_size} bytes is too small for an ext superblock",
                    offset=_SB_OFFSET,
                    obj=self._name,
                )
            stream.seek(_SB_MAGIC_OFFSET)
            (magic,) = _U16.unpack(stream.read(2))
        except OSError as exc:
            raise FilesystemError(f"cannot read the superblock: {exc}", obj=self._name) from exc
        if magic != _EXT_MAGIC:
            raise FilesystemError(
                f"bad ext superblock magic {magic:#06x}, expected {_EXT_MAGIC:#06x}",
                offset=_SB_MAGIC_OFFSET,
                obj=self._name,
            )
        self._setup(stream)
        #: whether the journal was replayed in memory (``False``: clean, or ``ignore_journal``)
        self.journal_replayed = False
        needs_recovery = self._incompat & _INCOMPAT_RECOVER and self._compat & _COMPAT_HAS_JOURNAL
        if needs_recovery and not ignore_journal:
            overlay = self._wrap(self._replay_journal, "journal replay")
            if overlay:
                self._setup(_OverlayStream(stream, self._stream_size, self.block_size, overlay))
            self.journal_replayed = True

    # -- set-up --------------------------------------------------------------------------------

    def _setup(self, fh: BinaryIO) -> None:
        problem = _bad_geometry(fh, self._stream_size)
        if problem:
            raise FilesystemError(problem, offset=_SB_OFFSET, obj=self._name)
        try:
            extfs = ExtFS(fh)
        except NotImplementedError as exc:
            raise UnsupportedError(f"ext feature not supported: {exc}", obj=self._name) from exc
        except (DissectExtError, EOFError, struct.error, ValueError) as exc:
            raise FilesystemError(
                f"invalid ext superblock: {exc}", offset=_SB_OFFSET, obj=self._name
            ) from exc
        self.extfs: Any = extfs
        self._fh = fh
        sb = extfs.sb
        self._sb = sb
        self._compat = int(sb.s_feature_compat)
        self._incompat = int(sb.s_feature_incompat)
        self._ro_compat = int(sb.s_feature_ro_compat)
        for bit, what in (
            (_INCOMPAT_COMPRESSION, "compression"),
            (_INCOMPAT_JOURNAL_DEV, "an external journal device (journal_dev), not a filesystem"),
        ):
            if self._incompat & bit:
                raise UnsupportedError(f"ext feature {what}", offset=_SB_OFFSET, obj=self._name)
        unknown = self._incompat & ~_INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedError(
                f"unknown ext incompat features {unknown:#x}", offset=_SB_OFFSET, obj=self._name
            )
        self.block_size: int = int(extfs.block_size)
        self.block_count: int = int(extfs.block_count)
        self.huge_file = bool(self._ro_compat & _RO_COMPAT_HUGE_FILE)
        self.largedir = bool(self._incompat & _INCOMPAT_LARGEDIR)
        self._filetype = bool(self._incompat & _INCOMPAT_FILETYPE)
        self._inodes_count = int(sb.s_inodes_count)
        self._inodes_per_group = int(sb.s_inodes_per_group)
        self._inode_size = int(sb.s_inode_size) if sb.s_rev_level else _GOOD_OLD_INODE_SIZE
        if self._inode_size < _GOOD_OLD_INODE_SIZE or self._inode_size > self.block_size:
            raise FilesystemError(
                f"inode size {self._inode_size} out of range", offset=_SB_OFFSET, obj=self._name
            )
        if self._incompat & _INCOMPAT_64BIT:
            self._desc_size = int(sb.s_desc_size) or 32
        else:
            self._desc_size = 32
        if self._desc_size not in (32, 64, 128, 256, 512, 1024):
            # ext4_fill_super: "unsupported descriptor size" (a power of 2 up to 1024)
            raise FilesystemError(
                f"group descriptor size {self._desc_size} is invalid (a power of 2 up to 1024)",
                offset=_SB_OFFSET,
                obj=self._name,
            )

        # fstype the way blkid names it (libblkid superblocks/ext.c): anything ext3 cannot mount
        # is ext4; otherwise a journal makes ext3.
        if (self._incompat & ~_EXT3_INCOMPAT_SUPPORTED) or (
            self._ro_compat & ~_EXT3_RO_COMPAT_SUPPORTED
        ):
            self.fstype = "ext4"
        elif self._compat & _COMPAT_HAS_JOURNAL:
            self.fstype = "ext3"
        else:
            self.fstype = "ext2"
        self.uuid = str(UUID(bytes=bytes(sb.s_uuid)))
        label = bytes(sb.s_volume_name).split(b"\0", 1)[0]
        self.label = label.decode("utf-8", "surrogateescape") or None

        self._meta_block: Callable[[int], bytes] = lru_cache(_META_CACHE)(self._read_meta_block)
        self._inode_table: Callable[[int], int] = lru_cache(4096)(self._read_inode_table)
        self._itable_chunk: Callable[[int, int], bytes] = lru_cache(_ITABLE_CACHE)(
            self._read_itable_chunk
        )
        self._inode: Callable[[int], _Inode] = lru_cache(_INODE_CACHE)(self._load_inode)
        self._runs_cache: Callable[[int], list[_Extent]] = lru_cache(_RUNS_CACHE)(
            self._load_extents
        )

    # -- Filesystem API ------------------------------------------------------------------------

    def root(self) -> object:
        """The root directory's inode number (2)."""
        return _ROOT_INO

    def stat(self, handle: object) -> Entry:
        """Metadata of the inode, as ``lstat``/``listxattr``/``readlink`` show it."""
        return self._on_inode(self._stat, handle)

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        """``(name, inode number)`` of a directory's entries, without ``.`` and ``..``."""
        return iter(self._on_inode(self._listdir, handle))

    def open(self, handle: object) -> BinaryIO:
        """A seekable stream over the content of a regular file (or directory, symlink)."""
        return self._on_inode(self._open, handle)

    def content_pieces(self, handle: object) -> tuple[int, list[Piece]] | None:
        """A regular file whose written extents cover it from block 0 without a gap (most
        files): ``(inode number, [(volume offset, length), …])``; reading a piece is one read
        of the volume, without a stream object (a quarter of the per-file cost of reading a
        small file)."""
        return self._on_inode(self._content_pieces, handle)

    def read_piece(self, token: int, offset: int, length: int) -> bytes:
        """*length* bytes of the volume at *offset*, a piece of inode *token*'s content."""
        return decode_guarded(
            lambda _: self._read(offset, length), token, _DECODE_ERRORS, inode_label, self._name
        )

    def data_runs(self, handle: object) -> list[DataRun] | None:
        """Byte ranges of a file that hold data, merged, sorted and clipped to its size.

        Unwritten (fallocated) extents read as zeros and are not data. Inline data is one run.
        """
        return self._on_inode(self._data_runs, handle)

    # -- internals: errors ---------------------------------------------------------------------

    def _inum(self, handle: object) -> int:
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise FilesystemError(f"not an ext inode handle: {handle!r}", obj=self._name)
        return handle

    def _on_inode(self, func: Callable[[int], _T], handle: object) -> _T:
        """``func(inode number)``, a decoding failure raised as :class:`FilesystemError`
        naming the inode."""
        inum = handle if type(handle) is int else self._inum(handle)
        return decode_guarded(func, inum, _DECODE_ERRORS, inode_label, self._name)

    def _wrap(self, func: Callable[[], _T], context: str) -> _T:
        try:
            return func()
        except Ova2imgError:
            raise
        except _DECODE_ERRORS as exc:
            raise FilesystemError(f"{context}: {exc}", obj=self._name) from exc

    # -- internals: reading --------------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self._stream_size:
            raise _Corrupt(f"read of {length} bytes at {offset:#x} beyond the volume end")
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise _Corrupt(f"short read at {offset:#x}: {len(data)} of {length} bytes")
        return bytes(data)

    def _read_meta_block(self, block: int) -> bytes:
        if block <= 0 or block >= self.block_count:
            raise _Corrupt(f"block {block} outside 1..{self.block_count - 1}")
        return self._read(block * self.block_size, self.block_size)

    def _bg_has_super(self, group: int) -> bool:
        # ext4_bg_has_super() (fs/ext4/balloc.c)
        if group == 0:
            return True
        if self._compat & _COMPAT_SPARSE_SUPER2:
            return group in tuple(self._sb.s_backup_bgs)
        if group <= 1 or not self._ro_compat & _RO_COMPAT_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _read_inode_table(self, group: int) -> int:
        # descriptor_loc() (fs/ext4/super.c): group descriptors follow the superblock, or with
        # meta_bg sit in the first group of each meta group (after its superblock backup).
        per_block = self.block_size // self._desc_size
        gd_block_nr, index = divmod(group, per_block)
        first_data_block = int(self._sb.s_first_data_block)
        if not self._incompat & _INCOMPAT_META_BG or gd_block_nr < int(self._sb.s_first_meta_bg):
            block = first_data_block + 1 + gd_block_nr
        else:
            first_group = gd_block_nr * per_block
            block = (
                first_data_block
                + first_group * int(self._sb.s_blocks_per_group)
                + (1 if self._bg_has_super(first_group) else 0)
            )
        data = self._meta_block(block)
        off = index * self._desc_size
        table: int = _U32.unpack_from(data, off + 8)[0]
        if self._desc_size >= 64:
            hi: int = _U32.unpack_from(data, off + 0x28)[0]
            table |= hi << 32
        if table <= 0 or table >= self.block_count:  # ext4_check_descriptors()
            raise _Corrupt(
                f"group {group}'s inode table at block {table} is outside the filesystem "
                f"(blocks 1..{self.block_count - 1})"
            )
        return table

    def _load_inode(self, inum: int) -> _Inode:
        if inum < 1 or inum > self._inodes_count:
            raise _Corrupt(f"inode number out of range 1..{self._inodes_count}")
        group, index = divmod(inum - 1, self._inodes_per_group)
        table = self._inode_table(group)
        chunk, off = divmod(index * self._inode_size, _ITABLE_CHUNK)
        data = self._itable_chunk(table, chunk)
        return _Inode(self, inum, data[off : off + self._inode_size])

    def _read_itable_chunk(self, table: int, chunk: int) -> bytes:
        """*chunk* (of :data:`_ITABLE_CHUNK` bytes) of the inode table at block *table*: the
        inodes of a directory's files lie together, so one read serves a few hundred of them
        (one block per read cost a pread through every layer for each 16 inodes)."""
        table_bytes = self._inodes_per_group * self._inode_size
        start = chunk * _ITABLE_CHUNK
        length = min(_ITABLE_CHUNK, table_bytes - start)
        if table * self.block_size + start + length > self.block_count * self.block_size:
            raise _Corrupt(f"inode table at block {table} runs past the end of the filesystem")
        return self._read(table * self.block_size + start, length)

    def _stat(self, inum: int) -> Entry:
        ino = self._inode(inum)
        entry = inode_entry(ino, inum)
        if entry is None:
            raise _Corrupt(f"invalid file type in mode {ino.mode:#o}")
        etype = entry.type
        if ino.file_acl or ino.has_ibody_xattrs:
            entry.xattrs = self._xattrs(ino)[0]
        if etype is EntryType.FILE or etype is EntryType.DIR:
            return entry
        if etype is EntryType.CHAR or etype is EntryType.BLOCK:
            # ext4_iget → init_special_inode: old_decode_dev(i_block[0]) when non-zero, else
            # new_decode_dev(i_block[1]).
            old, new = struct.unpack_from("<II", ino.i_block, 0)
            if old:
                entry.rdev_major, entry.rdev_minor = (old >> 8) & 0xFF, old & 0xFF
            else:
                entry.rdev_major = (new & 0xFFF00) >> 8
                entry.rdev_minor = (new & 0xFF) | ((new >> 12) & 0xFFF00)
        elif etype is EntryType.SYMLINK:
            entry.link_target = self._symlink_target(ino)
        return entry

    def _is_fast_symlink(self, ino: _Inode) -> bool:
        # ext4_inode_is_fast_symlink(): no data blocks besides the xattr block → in i_block.
        ea_blocks = (self.block_size >> 9) if ino.file_acl else 0
        return ino.i_blocks - ea_blocks == 0

    def _symlink_target(self, ino: _Inode) -> bytes:
        if ino.flags & _INLINE_DATA_FL:
            return self._inline_content(ino)
        if self._is_fast_symlink(ino):
            if ino.size > _INLINE_DATA_SIZE:
                raise _Corrupt(f"fast symlink of {ino.size} bytes")
            return ino.i_block[: ino.size]
        with self._open(ino.inum) as fh:
            target = fh.read(ino.size)
        if len(target) != ino.size:
            raise _Corrupt(f"symlink target {len(target)} of {ino.size} bytes")
        return bytes(target)

    # -- xattrs --------------------------------------------------------------------------------

    def _xattrs(self, ino: _Inode) -> tuple[dict[str, bytes], bytes | None]:
        """``(visible xattrs, system.data value or None)``: in-inode first, then the block."""
        out: dict[str, bytes] = {}
        system_data: list[bytes | None] = [None]
        raw = ino.raw
        start = ino.extra_end
        # In-inode xattrs (ext4_xattr_ibody_header): a magic, then entries whose value offsets
        # count from the first entry.
        if start + 4 <= len(raw) and _U32.unpack_from(raw, start)[0] == _XATTR_MAGIC:
            self._parse_xattrs(raw, start + 4, start + 4, len(raw), out, system_data)
        if ino.file_acl:
            block = self._meta_block(ino.file_acl)
            magic, _refcount, nblocks = struct.unpack_from("<III", block, 0)
            if magic != _XATTR_MAGIC or nblocks != 1:
                raise _Corrupt(
                    f"xattr block {ino.file_acl}: magic {magic:#x} blocks {nblocks}, expected "
                    f"{_XATTR_MAGIC:#x} and 1"
                )
            # ext4_xattr_header is 32 bytes; value offsets count from the block start.
            self._parse_xattrs(block, 32, 0, len(block), out, system_data)
        return out, system_data[0]

    def _parse_xattrs(
        self,
        buf: bytes,
        pos: int,
        value_base: int,
        end: int,
        out: dict[str, bytes],
        system_data: list[bytes | None],
    ) -> None:
        while pos + 4 <= end and buf[pos : pos + 4] != b"\0\0\0\0":  # EXT4_XATTR_IS_LAST_ENTRY
            if pos + _XATTR_ENTRY.size > end:
                raise _Corrupt(f"xattr entry overruns its area at {pos}")
            name_len, index, voff, vinum, vsize, _hash = _XATTR_ENTRY.unpack_from(buf, pos)
            name = buf[pos + 16 : pos + 16 + name_len]
            pos += (16 + name_len + 3) & ~3  # EXT4_XATTR_LEN: padded to 4 bytes
            if vinum:
                # ea_inode: the value is the content of a separate inode.
                with self._open(vinum) as fh:
                    value = bytes(fh.read(vsize))
            else:
                lo = value_base + voff
                if lo + vsize > end:
                    raise _Corrupt(f"xattr value at {voff}+{vsize} overruns its area")
                value = buf[lo : lo + vsize]
            if len(value) != vsize:
                raise _Corrupt(f"xattr value of {len(value)} of {vsize} bytes")
            if index in _XATTR_ACL_NAMES:
                out[_XATTR_ACL_NAMES[index]] = ext_acl_to_xattr(value)
            elif index in _XATTR_PREFIX:
                out[_XATTR_PREFIX[index] + name.decode("utf-8", "surrogateescape")] = value
            elif index == _XATTR_INDEX_SYSTEM and name == b"data":
                system_data[0] = value  # inline data continuation, hidden by the kernel

    # -- data ----------------------------------------------------------------------------------

    def _inline_content(self, ino: _Inode) -> bytes:
        # fs/ext4/inline.c: the first 60 bytes in i_block, the rest in the system.data xattr
        # (which lives in the inode body).
        head = ino.i_block[: min(ino.size, _INLINE_DATA_SIZE)]
        if ino.size <= _INLINE_DATA_SIZE:
            return head
        tail = self._xattrs(ino)[1] or b""
        content = head + tail[: ino.size - _INLINE_DATA_SIZE]
        if len(content) != ino.size:
            raise _Corrupt(f"inline data of {len(content)} of {ino.size} bytes")
        return content

    def _load_extents(self, inum: int) -> list[_Extent]:
        ino = self._inode(inum)
        nblocks = -(-ino.size // self.block_size)
        if ino.flags & _EXTENTS_FL:
            extents: list[_Extent] = []
            self._walk_extents(ino.i_block, extents, 0)
            if len(extents) > 1:
                extents.sort(key=_by_logical)
        else:
            extents = self._walk_blockmap(ino.i_block, nblocks)
        # Clip to the file size and check order (overlaps mean corruption).
        out: list[_Extent] = []
        next_free = 0
        for ext in extents:
            if ext.logical >= nblocks:
                break
            if ext.logical < next_free:
                raise _Corrupt(f"overlapping extents at logical block {ext.logical}")
            if ext.physical + ext.length > self.block_count or ext.physical <= 0:
                raise _Corrupt(f"extent at block {ext.physical}+{ext.length} outside the volume")
            ext.length = min(ext.length, nblocks - ext.logical)
            next_free = ext.logical + ext.length
            out.append(ext)
        return out

    def _walk_extents(self, node: bytes, out: list[_Extent], depth: int) -> None:
        # ext4_extent_header / ext4_extent / ext4_extent_idx (the ext4 disk layout, "Extent Tree").
        magic, entries, _max, node_depth, _gen = _EXTENT_HEADER.unpack_from(node, 0)
        if magic != _EXTENT_MAGIC:
            raise _Corrupt(f"extent header magic {magic:#06x}, expected {_EXTENT_MAGIC:#06x}")
        if depth > 5 or 12 + 12 * entries > len(node):
            raise _Corrupt(f"extent node with {entries} entries at depth {depth} is invalid")
        if node_depth == 0:
            for i in range(entries):
                lblk, length, start_hi, start_lo = _EXTENT.unpack_from(node, 12 + 12 * i)
                unwritten = length > _EXTENT_INIT_MAX_LEN
                if unwritten:  # EXT_INIT_MAX_LEN: the top bit marks an unwritten extent
                    length -= _EXTENT_INIT_MAX_LEN
                if length:
                    out.append(_Extent(lblk, start_hi << 32 | start_lo, length, unwritten))
        else:
            for i in range(entries):
                _lblk, leaf_lo, leaf_hi, _unused = _EXTENT_IDX.unpack_from(node, 12 + 12 * i)
                self._walk_extents(self._meta_block(leaf_hi << 32 | leaf_lo), out, depth + 1)

    def _walk_blockmap(self, i_block: bytes, nblocks: int) -> list[_Extent]:
        # ext2/3 block maps: 12 direct pointers, then single, double and triple indirect blocks.
        # A zero pointer is a hole (its whole subtree); contiguous blocks merge into one extent,
        # so a sparse multi-GiB file stays a handful of runs.
        out: list[_Extent] = []
        per = self.block_size // 4
        ptr_struct = struct.Struct(f"<{per}I")

        def add(logical: int, physical: int) -> None:
            if out:
                last = out[-1]
                if (
                    last.logical + last.length == logical
                    and last.physical + last.length == physical
                ):
                    last.length += 1
                    return
            out.append(_Extent(logical, physical, 1))

        def walk(block: int, level: int, base: int) -> None:
            if block >= self.block_count:
                raise _Corrupt(f"indirect block {block} outside the volume")
            ptrs = ptr_struct.unpack(self._read(block * self.block_size, self.block_size))
            if level == 1:
                for i, ptr in enumerate(ptrs):
                    if base + i >= nblocks:
                        break
                    if ptr:
                        add(base + i, ptr)
                return
            span = per ** (level - 1)
            for i, ptr in enumerate(ptrs):
                if base + i * span >= nblocks:
                    break
                if ptr:
                    walk(ptr, level - 1, base + i * span)

        ptrs = struct.unpack("<15I", i_block)
        for i in range(min(12, nblocks)):
            if ptrs[i]:
                add(i, ptrs[i])
        base = 12
        for level in (1, 2, 3):
            if base >= nblocks:
                break
            if ptrs[11 + level]:
                walk(ptrs[11 + level], level, base)
            base += per**level
        return out

    def _runlist(self, ino: _Inode) -> list[tuple[int | None, int]]:
        """Block runs for RunlistStream: holes and unwritten extents as ``None`` (zeros)."""
        nblocks = -(-ino.size // self.block_size)
        runs: list[tuple[int | None, int]] = []
        pos = 0
        for ext in self._runs_cache(ino.inum):
            if ext.logical > pos:
                runs.append((None, ext.logical - pos))
            runs.append((None if ext.unwritten else ext.physical, ext.length))
            pos = ext.logical + ext.length
        if pos < nblocks:
            # A file ending in a hole reads zeros up to its size.
            runs.append((None, nblocks - pos))
        return runs

    def _open(self, inum: int) -> BinaryIO:
        ino = self._inode(inum)
        fmt = ino.mode & 0o170000
        if fmt not in (_stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK):
            raise _Corrupt(f"mode {ino.mode:#o} has no data to open")
        if ino.flags & _INLINE_DATA_FL:
            return io.BytesIO(self._inline_content(ino))
        if fmt == _stat.S_IFLNK and self._is_fast_symlink(ino):
            return io.BytesIO(ino.i_block[: ino.size])
        stream = RunlistReader(self._fh, self._runlist(ino), ino.size, self.block_size).as_binary()
        return stream

    def _content_pieces(self, inum: int) -> tuple[int, list[Piece]] | None:
        ino = self._inode(inum)
        if ino.mode & 0o170000 != _stat.S_IFREG or ino.flags & _INLINE_DATA_FL:
            return None
        size = ino.size
        if not size:
            return None
        bs = self.block_size
        if ino.flags & _EXTENTS_FL:
            # Most files: one extent in the inode itself, read here without the extent list
            # (the checks are _load_extents'; anything else takes the long way below).
            magic, entries, _max, depth, _gen = _EXTENT_HEADER.unpack_from(ino.i_block, 0)
            if magic == _EXTENT_MAGIC and entries == 1 and not depth:
                lblk, length, start_hi, start_lo = _EXTENT.unpack_from(ino.i_block, 12)
                physical = start_hi << 32 | start_lo
                if (
                    not lblk
                    and length <= _EXTENT_INIT_MAX_LEN
                    and length * bs >= size
                    and physical > 0
                    and physical + length <= self.block_count
                ):
                    return inum, [(physical * bs, size)]
        extents = self._runs_cache(inum)
        if len(extents) == 1:
            ext = extents[0]
            if ext.logical or ext.unwritten or ext.length * bs < size:
                return None  # holes, or zeros to add: the stream does that
            return inum, [(ext.physical * bs, size)]
        pieces: list[Piece] = []
        done = 0  # bytes of the file covered so far
        for ext in extents:
            if ext.logical * bs != done or ext.unwritten:
                return None
            n = min(ext.length * bs, size - done)
            pieces.append((ext.physical * bs, n))
            done += n
            if done >= size:
                return inum, pieces
        return None  # ends in a hole

    def _data_runs(self, inum: int) -> list[DataRun] | None:
        ino = self._inode(inum)
        if ino.mode & 0o170000 != _stat.S_IFREG:
            return None
        if ino.flags & _INLINE_DATA_FL:
            return [(0, ino.size)] if ino.size else []
        bs = self.block_size
        runs: list[DataRun] = []
        for ext in self._runs_cache(inum):
            if ext.unwritten:
                continue
            start = ext.logical * bs
            end = min((ext.logical + ext.length) * bs, ino.size)
            if end <= start:
                continue
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((start, end - start))
        return runs

    # -- directories ---------------------------------------------------------------------------

    def _listdir(self, inum: int) -> list[tuple[bytes, object]]:
        ino = self._inode(inum)
        if ino.mode & 0o170000 != _stat.S_IFDIR:
            raise _Corrupt(f"not a directory (mode {ino.mode:#o})")
        if ino.flags & _ENCRYPT_FL:
            # fscrypt: the kernel without the key shows encoded names and refuses to read
            # the files (ENOKEY); ciphertext must never pass for the guest's files.
            raise FilesystemError(
                f"inode {inum} is an encrypted directory (ext4 encryption, fscrypt): its "
                "names and files cannot be read without its key (--exclude it, or --lenient "
                "leaves it out)",
                obj=self._name,
            )
        out: list[tuple[bytes, object]] = []
        if ino.flags & _INLINE_DATA_FL:
            # fs/ext4/inline.c: i_block starts with the parent's inode number (no "." or ".."
            # entries are stored), then dir entries fill the rest of i_block and continue in
            # the system.data xattr.
            self._parse_dirents(ino.i_block, 4, _INLINE_DATA_SIZE, out)
            tail = self._xattrs(ino)[1]
            if tail:
                self._parse_dirents(tail, 0, len(tail), out)
            return out
        bs = self.block_size
        chunk_blocks = max(1, (1 << 20) // bs)
        # Linear scan of every block: htree (dir_index) interior nodes look like one empty
        # entry spanning the block (inode 0), as the kernel's readdir relies on.
        for ext in self._runs_cache(inum):
            if ext.unwritten:
                continue
            for first in range(0, ext.length, chunk_blocks):
                count = min(chunk_blocks, ext.length - first)
                data = self._read((ext.physical + first) * bs, count * bs)
                for b in range(count):
                    self._parse_dirents(data, b * bs, (b + 1) * bs, out)
        return out

    def _parse_dirents(
        self, buf: bytes, pos: int, end: int, out: list[tuple[bytes, object]]
    ) -> None:
        filetype = self._filetype
        inodes_count = self._inodes_count
        while pos + 8 <= end:
            if filetype:
                inum, rec_len, name_len, _ftype = _DIRENT.unpack_from(buf, pos)
            else:
                inum, rec_len, name_len = _DIRENT_OLD.unpack_from(buf, pos)
            if rec_len < 8 or rec_len & 3 or pos + rec_len > end or 8 + name_len > rec_len:
                raise _Corrupt(f"directory entry at byte {pos} has rec_len {rec_len}")
            if inum:
                name = buf[pos + 8 : pos + 8 + name_len]
                if name != b"." and name != b"..":
                    if inum > inodes_count:
                        raise _Corrupt(f"directory entry {name!r} points at inode {inum}")
                    out.append((name, inum))
            pos += rec_len

    # -- journal -------------------------------------------------------------------------------

    def _replay_journal(self) -> dict[int, tuple[int, bool]]:
        """Replay committed jbd2 transactions in memory, as the kernel does at mount.

        fs/jbd2/recovery.c: PASS_SCAN finds the last complete transaction, PASS_REVOKE
        collects revoke records, PASS_REPLAY maps each tagged block to its newest copy unless a
        revoke record of the same or a later transaction cancels it.

        Returns:
            filesystem block → (byte offset of its copy in the volume, escaped).
        """
        from dissect.extfs.c_jdb2 import c_jdb2  # only a journal needing recovery uses it

        jinum = int(self._sb.s_journal_inum)
        if not jinum:
            raise UnsupportedError(
                "needs journal recovery from an external journal device, which is not "
                "part of the image (booting the VM once, or e2fsck with the journal device, "
                "recovers it)",
                obj=self._name,
            )
        jino = self._inode(jinum)
        jmap = self._runs_cache(jinum)
        bs = self.block_size

        def jblock_offset(jblock: int) -> int:
            for ext in jmap:  # journals are a few extents: a linear scan is enough
                if ext.logical <= jblock < ext.logical + ext.length and not ext.unwritten:
                    return (ext.physical + jblock - ext.logical) * bs
            raise _Corrupt(f"journal block {jblock} is not mapped")

        def jread(jblock: int) -> bytes:
            return self._read(jblock_offset(jblock), bs)

        jsb = jread(0)
        magic, blocktype, _seq = struct.unpack_from(">III", jsb, 0)
        if magic != _JBD2_MAGIC or blocktype not in (3, 4):
            raise _Corrupt(f"journal superblock magic {magic:#x} type {blocktype}")
        j_bs, maxlen, first, sequence, start = struct.unpack_from(">IIIII", jsb, 12)
        if blocktype == 4:
            _fcompat, fincompat, _frocompat = struct.unpack_from(">III", jsb, 36)
        else:
            fincompat = 0
        if j_bs != bs or maxlen * bs > jino.size or first == 0 or first >= maxlen:
            raise _Corrupt(f"journal geometry: block size {j_bs}, {maxlen} blocks, first {first}")
        if fincompat & 0x20:  # JBD2_FEATURE_INCOMPAT_FAST_COMMIT
            raise UnsupportedError(
                "needs journal recovery with fast commits (fast_commit), which ova2img "
                "does not replay (booting the VM once, or e2fsck on a raw copy of the "
                "volume, recovers it)",
                obj=self._name,
            )
        if start == 0:
            return {}  # clean journal: nothing to replay
        is64 = bool(fincompat & c_jdb2.JBD2_FEATURE_INCOMPAT_64BIT)
        csum_v3 = bool(fincompat & c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V3)
        csum_v2 = bool(fincompat & c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V2)
        # journal_tag_bytes() (include/linux/jbd2.h)
        tag_bytes = 16 if csum_v3 else 12 + (2 if csum_v2 else 0) - (0 if is64 else 4)
        tail = 4 if (csum_v2 or csum_v3) else 0  # jbd2_journal_block_tail

        def wrap(block: int) -> int:
            return block - (maxlen - first) if block >= maxlen else block

        def tags(desc: bytes) -> list[tuple[int, int]]:
            """(fs block, flags) of each tag of a descriptor block."""
            out: list[tuple[int, int]] = []
            pos = 12
            while pos + tag_bytes <= bs - tail:
                if csum_v3:
                    lo, flags, hi, _csum = struct.unpack_from(">IIII", desc, pos)
                else:
                    lo, _csum16, flags = struct.unpack_from(">IHH", desc, pos)
                    hi = struct.unpack_from(">I", desc, pos + 8)[0] if is64 else 0
                out.append((lo | (hi << 32 if is64 else 0), flags))
                pos += tag_bytes
                if not flags & c_jdb2.JBD2_FLAG_SAME_UUID:
                    pos += 16
                if flags & c_jdb2.JBD2_FLAG_LAST_TAG:
                    break
            return out

        def walk(end_transaction: int | None) -> Iterator[tuple[int, int, int, bytes]]:
            """(block type, sequence, journal block, block) of the log, in order."""
            seq = sequence
            block = start
            for _ in range(maxlen):
                if end_transaction is not None and seq == end_transaction:
                    return
                data = jread(block)
                magic, btype, bseq = struct.unpack_from(">III", data, 0)
                if magic != c_jdb2.JBD2_MAGIC_NUMBER or bseq != seq:
                    return
                yield btype, bseq, block, data
                block = wrap(block + 1)
                if btype == c_jdb2.JBD2_DESCRIPTOR_BLOCK:
                    block = wrap(block + len(tags(data)))
                elif btype == c_jdb2.JBD2_COMMIT_BLOCK:
                    seq = (seq + 1) & 0xFFFFFFFF
                elif btype != c_jdb2.JBD2_REVOKE_BLOCK:
                    return

        # PASS_SCAN: the transactions up to the last commit block found.
        end_transaction = sequence
        for btype, bseq, _block, _data in walk(None):
            if btype == c_jdb2.JBD2_COMMIT_BLOCK:
                end_transaction = (bseq + 1) & 0xFFFFFFFF
        # PASS_REVOKE
        revoked: dict[int, int] = {}
        rec = 8 if is64 else 4
        for btype, bseq, _block, data in walk(end_transaction):
            if btype != c_jdb2.JBD2_REVOKE_BLOCK:
                continue
            (count,) = struct.unpack_from(">I", data, 12)
            if count > bs:
                raise _Corrupt(f"revoke block with r_count {count}")
            for pos in range(16, count, rec):
                target = struct.unpack_from(">Q" if is64 else ">I", data, pos)[0]
                if _tid_ge(bseq, revoked.get(target, bseq)):
                    revoked[target] = bseq
        # PASS_REPLAY
        overlay: dict[int, tuple[int, bool]] = {}
        for btype, bseq, block, data in walk(end_transaction):
            if btype != c_jdb2.JBD2_DESCRIPTOR_BLOCK:
                continue
            jblock = block
            for fs_block, flags in tags(data):
                jblock = wrap(jblock + 1)
                if fs_block in revoked and _tid_ge(revoked[fs_block], bseq):
                    continue
                if fs_block >= self.block_count:
                    raise _Corrupt(f"journal tag for block {fs_block} outside the volume")
                overlay[fs_block] = (
                    jblock_offset(jblock),
                    bool(flags & c_jdb2.JBD2_FLAG_ESCAPE),
                )
        return overlay


def _tid_ge(a: int, b: int) -> bool:
    """jbd2's tid_geq(): transaction ids compare modulo 2**32."""
    return ((a - b) & 0xFFFFFFFF) < 0x80000000


def _bad_geometry(fh: BinaryIO, volume_size: int) -> str | None:
    """What makes the superblock's geometry impossible, or ``None``.

    The checks ``ext4_fill_super`` (fs/ext4/super.c) makes before it mounts ("Invalid log block
    size", "bad geometry: block count … exceeds size of device", "first data block … is beyond
    end of filesystem", "inodes count not valid"), made on the raw fields before dissect sizes
    anything from them: a superblock claiming more than the volume holds is refused here.
    """
    fh.seek(_SB_OFFSET)
    sb = fh.read(1024)
    if len(sb) < 1024:
        return None  # the volume's size was checked before
    inodes, blocks_lo = struct.unpack_from("<II", sb, 0)
    first_data, log_bs = struct.unpack_from("<II", sb, 0x14)
    (blocks_per_group,) = _U32.unpack_from(sb, 0x20)
    (inodes_per_group,) = _U32.unpack_from(sb, 0x28)
    (incompat,) = _U32.unpack_from(sb, 0x60)
    blocks_hi = _U32.unpack_from(sb, 0x150)[0] if incompat & _INCOMPAT_64BIT else 0
    if log_bs > 6:  # EXT4_MAX_BLOCK_LOG_SIZE - EXT4_MIN_BLOCK_LOG_SIZE: 64 KiB blocks
        return f"invalid log block size {log_bs} (2^{10 + log_bs}-byte blocks; at most 64 KiB)"
    block_size = 1024 << log_bs
    blocks = blocks_lo | blocks_hi << 32
    if blocks * block_size > volume_size:
        return (
            f"block count {blocks} ({blocks * block_size} bytes) exceeds the volume "
            f"({volume_size} bytes)"
        )
    if first_data >= blocks:
        return (
            f"first data block {first_data} is beyond the end of the filesystem ({blocks} blocks)"
        )
    if blocks_per_group and inodes_per_group:
        groups = -(-(blocks - first_data) // blocks_per_group)
        if groups * inodes_per_group != inodes:
            return f"inodes count {inodes} is not {groups} groups of {inodes_per_group} inodes"
    return None
