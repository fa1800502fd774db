"""XFS (v4 and v5), read the way a read-only Linux mount shows it.

:mod:`dissect.xfs` validates the superblock and AG headers (``XFS(fh)``); everything else —
inodes, extent maps (in-inode and bmbt), directories, extended attributes, symlinks — is
decoded here from the raw big-endian on-disk structures, because the library has no xattr
API, returns stale disk bytes for unwritten extents, decodes pre-1970 legacy timestamps as
unsigned, and reads multi-extent remote symlinks wrong (see
/work/shared/design/dissect-gaps.md). References: the kernel's fs/xfs/libxfs/xfs_format.h,
xfs_da_format.h, xfs_inode_buf.c (``xfs_inode_from_disk``), xfs_dir2_*.c, xfs_attr_leaf.c,
xfs_attr_remote.c, xfs_symlink_remote.c, fs/xfs/xfs_xattr.c, xfs_acl.c, and the "XFS
Algorithms & Data Structures" book.

Handles are 64-bit XFS inode numbers (``int``), which are also ``st_ino``.
"""

from __future__ import annotations

import io
import logging
import stat as _stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, TypeVar
from uuid import UUID

from dissect.xfs import XFS
from dissect.xfs.exceptions import Error as DissectXfsError

from ..errors import FilesystemError, Ova2imgError, UnsupportedError
from ._posix_acl import ACL_GROUP, ACL_UNDEFINED_ID, ACL_USER, AclFormatError, xattr_acl
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

__all__ = ["XfsFilesystem"]

log = logging.getLogger("ova2img.filesystems")

_SB_MAGIC = 0x58465342  # "XFSB"
_SB = struct.Struct(">IIQQQ16sQQQQIIIIIHHHH12sBBBBBBBB")  # xfs_sb up to sb_imax_pct (128 bytes)

# sb_versionnum / sb_features2 / v5 feature bits (xfs_format.h).
_VERSION_NUMBITS = 0x000F
_VERSION2_FTYPE = 0x00000200
_INCOMPAT_FTYPE = 1 << 0
_INCOMPAT_NEEDSREPAIR = 1 << 4
# ftype, spinodes, meta_uuid, bigtime, needsrepair, nrext64, exchrange, parent: none of them
# changes how this reader finds inodes or data.
_INCOMPAT_KNOWN = (1 << 8) - 1

_DINODE_MAGIC = 0x494E  # "IN"
# struct xfs_dinode core (v1/v2: 100 bytes; v3 adds up to 176).
_DINODE = struct.Struct(">HHBBHIIIHH8s8s8s8sQQIIHBbIHHII")
_V3_TAIL = struct.Struct(">IQQQI12s8sQ16s")  # from di_crc (100) to di_uuid (160..176)
_DINODE_V2_LITERAL = 100
_DINODE_V3_LITERAL = 176

# di_format / di_aformat (enum xfs_dinode_fmt)
_FMT_DEV = 0
_FMT_LOCAL = 1
_FMT_EXTENTS = 2
_FMT_BTREE = 3

_DIFLAG_REALTIME = 1 << 0
_DIFLAG2_BIGTIME = 1 << 3
_DIFLAG2_NREXT64 = 1 << 4
_BIGTIME_EPOCH_OFFSET = 1 << 31  # XFS_BIGTIME_EPOCH_OFFSET: bigtime counts ns from 1901-12-13

_BMAP_MAGIC = 0x424D4150  # "BMAP"
_BMAP_CRC_MAGIC = 0x424D4133  # "BMA3"
_LBLOCK_LEN = 24  # xfs_btree_block, long pointers, v4
_LBLOCK_CRC_LEN = 72  # ... v5

# Directories (xfs_da_format.h).
_DIR2_BLOCK_MAGIC = 0x58443242  # XD2B
_DIR2_DATA_MAGIC = 0x58443244  # XD2D
_DIR3_BLOCK_MAGIC = 0x58444233  # XDB3
_DIR3_DATA_MAGIC = 0x58444433  # XDD3
_DIR2_DATA_HDR = 16
_DIR3_DATA_HDR = 64
_DIR2_DATA_FREE_TAG = 0xFFFF
_DIR2_LEAF_OFFSET = 32 << 30  # XFS_DIR2_LEAF_OFFSET: the data space ends at 32 GiB

# Attributes (xfs_da_format.h).
_ATTR_LEAF_MAGIC = 0xFBEE
_ATTR3_LEAF_MAGIC = 0x3BEE
_DA_NODE_MAGIC = 0xFEBE
_DA3_NODE_MAGIC = 0x3EBE
_ATTR_LEAF_HDR = 32
_ATTR3_LEAF_HDR = 80
_DA_NODE_HDR = 16
_DA3_NODE_HDR = 64
_ATTR3_RMT_MAGIC = 0x5841524D  # "XARM"
_ATTR3_RMT_HDR = 56
_ATTR_LOCAL = 1 << 0
_ATTR_ROOT = 1 << 1
_ATTR_SECURE = 1 << 2
_ATTR_PARENT = 1 << 3
_ATTR_INCOMPLETE = 1 << 7
_DA_MAXDEPTH = 5  # XFS_DA_NODE_MAXDEPTH

# fs/xfs/xfs_xattr.c xfs_xattr_put_listent: the ROOT-namespace ACL names become system.*.
_SGI_ACL = {
    b"SGI_ACL_FILE": "system.posix_acl_access",
    b"SGI_ACL_DEFAULT": "system.posix_acl_default",
}
_XFS_ACL_MAX_ENTRIES = 0xFFFF  # XFS_ACL_MAX_ENTRIES() for v5 (25 for v4, not enforced here)

_SYMLINK_MAGIC = 0x58534C4D  # "XSLM"
_SYMLINK_HDR = 56
_SYMLINK_MAXLEN = 1024  # XFS_SYMLINK_MAXLEN

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# The log (xfs_log_format.h): 512-byte blocks; a record header starts with the magic, then
# h_cycle; every other block starts with the cycle number (its own first word is kept in the
# header's h_cycle_data).
_BBSIZE = 512
_XLOG_MAGIC = 0xFEEDBABE
_XLOG_HEADER_CYCLE_SIZE = 32 * 1024
_XLOG_UNMOUNT_TRANS = 0x20
_LOG_WORDS = struct.Struct(">II")
#: how far back from the head a record header is looked for (a record is at most 256 KiB)
_LOG_SCAN_BLOCKS = 4096
_VERSION_LOGV2BIT = 0x0400
_U64 = struct.Struct(">Q")

_INODE_CACHE = 8192
_META_CACHE = 1024
_MAP_CACHE = 64

_T = TypeVar("_T")


class _Corrupt(Exception):  # noqa: N818 - internal, always re-raised as FilesystemError
    """Internal: a structure failed a sanity check (turned into FilesystemError at the API)."""


#: what decoding damaged structures raises, here or in dissect: a FilesystemError at the API
_DECODE_ERRORS = (_Corrupt, DissectXfsError, AclFormatError, *DECODE_ERRORS)


@dataclass(slots=True)
class _Extent:
    """A mapped stretch of a fork: logical block, physical (linear) block, count, unwritten."""

    logical: int
    physical: int
    length: int
    unwritten: bool = False


class _Inode:
    """The fields of one raw inode the adapter needs, decoded once."""

    __slots__ = (
        "aformat",
        "anextents",
        "atime_ns",
        "ctime_ns",
        "flags",
        "forkoff",
        "format",
        "gid",
        "inum",
        "literal",
        "mode",
        "mtime_ns",
        "nextents",
        "nlink",
        "raw",
        "size",
        "uid",
    )
    aformat: int
    anextents: int
    atime_ns: int
    ctime_ns: int
    flags: int
    forkoff: int
    format: int
    gid: int
    inum: int
    literal: int
    mode: int
    mtime_ns: int
    nextents: int
    nlink: int
    raw: bytes
    size: int
    uid: int

    def __init__(self, inum: int, raw: bytes, v5: bool) -> None:
        (
            magic,
            mode,
            version,
            fmt,
            onlink,
            uid,
            gid,
            nlink,
            _projid_lo,
            _projid_hi,
            big_nextents,
            atime,
            mtime,
            ctime,
            size,
            _nblocks,
            _extsize,
            nextents32,
            anextents16,
            forkoff,
            aformat,
            _dmevmask,
            _dmstate,
            flags,
            _gen,
            _next_unlinked,
        ) = _DINODE.unpack_from(raw, 0)
        if magic != _DINODE_MAGIC:
            raise _Corrupt(f"inode magic {magic:#06x}, expected {_DINODE_MAGIC:#06x}")
        if version not in (1, 2, 3) or (version == 3) != v5:
            raise _Corrupt(f"inode version {version} on a v{5 if v5 else 4} filesystem")
        flags2 = 0
        if version == 3:
            fields = _V3_TAIL.unpack_from(raw, 100)
            flags2 = fields[3]
            di_ino = fields[7]
            if di_ino != inum:
                raise _Corrupt(f"inode records number {di_ino}")
            self.literal = _DINODE_V3_LITERAL
        else:
            self.literal = _DINODE_V2_LITERAL
        self.inum = inum
        self.raw = raw
        self.mode = mode
        self.format = fmt
        self.aformat = aformat
        self.forkoff = forkoff * 8  # di_forkoff counts 8-byte units
        self.flags = flags
        self.uid = uid if uid != NO_ID else OVERFLOW_ID
        self.gid = gid if gid != NO_ID else OVERFLOW_ID
        # xfs_inode_from_disk: v1 inodes keep a 16-bit link count in di_onlink.
        self.nlink = onlink if version == 1 else nlink
        self.size = size
        # nrext64 (XFS_DIFLAG2_NREXT64): 64-bit data / 32-bit attr extent counts, stored where
        # v3 had padding and where di_nextents / di_anextents were.
        if flags2 & _DIFLAG2_NREXT64:
            self.nextents = _U64.unpack(big_nextents)[0]
            self.anextents = nextents32
        else:
            self.nextents = nextents32
            self.anextents = anextents16
        bigtime = bool(flags2 & _DIFLAG2_BIGTIME)
        self.atime_ns = _time_ns(atime, bigtime)
        self.mtime_ns = _time_ns(mtime, bigtime)
        self.ctime_ns = _time_ns(ctime, bigtime)

    def fork(self, attr: bool) -> bytes:
        """The bytes of the data fork or the attribute fork inside the inode."""
        end = len(self.raw)
        if attr:
            if not self.forkoff:
                return b""
            return self.raw[self.literal + self.forkoff : end]
        if self.forkoff:
            end = self.literal + self.forkoff
        return self.raw[self.literal : end]


def _time_ns(raw: bytes, bigtime: bool) -> int:
    if bigtime:
        # xfs_inode_decode_bigtime: unsigned ns since -(2^31) s.
        value: int = _U64.unpack(raw)[0]
        return value - _BIGTIME_EPOCH_OFFSET * 1_000_000_000
    # struct xfs_legacy_timestamp: signed 32-bit seconds, then nanoseconds.
    seconds: int
    nsec: int
    seconds, nsec = struct.unpack(">iI", raw)
    return seconds * NS_PER_S + (nsec if nsec < NS_PER_S else 0)


def _bmbt_rec(raw: bytes, pos: int) -> tuple[int, int, int, bool]:
    """xfs_bmbt_rec: 1-bit unwritten flag, 54-bit startoff, 52-bit startblock, 21-bit count."""
    l0, l1 = struct.unpack_from(">QQ", raw, pos)
    return (
        (l0 >> 9) & ((1 << 54) - 1),
        ((l0 & 0x1FF) << 43) | (l1 >> 21),
        l1 & ((1 << 21) - 1),
        bool(l0 >> 63),
    )


def _xfs_acl_to_xattr(value: bytes) -> bytes:
    """Convert XFS's on-disk ACL (``struct xfs_acl``) to the kernel's version-2 xattr format.

    fs/xfs/libxfs/xfs_format.h: ``__be32 acl_cnt`` then ``acl_cnt`` entries of
    ``__be32 ae_tag, __be32 ae_id, __be16 ae_perm, __be16 ae_pad``; ``xfs_acl_from_disk``
    (fs/xfs/xfs_acl.c) keeps ``ae_id`` only for ACL_USER / ACL_GROUP.

    Raises:
        AclFormatError: a count that does not match the size.
    """
    if len(value) < 4:
        raise AclFormatError(f"XFS ACL of {len(value)} bytes is shorter than its header")
    (count,) = _U32.unpack_from(value, 0)
    if count > _XFS_ACL_MAX_ENTRIES or 4 + 12 * count != len(value):
        raise AclFormatError(f"XFS ACL of {len(value)} bytes claims {count} entries")
    entries: list[tuple[int, int, int]] = []
    for i in range(count):
        tag, ident, perm, _pad = struct.unpack_from(">IIHH", value, 4 + 12 * i)
        entries.append((tag, perm, ident if tag in (ACL_USER, ACL_GROUP) else ACL_UNDEFINED_ID))
    return xattr_acl(entries)


class XfsFilesystem(Filesystem):
    """A read-only view of an XFS filesystem (v4 or v5), as the Linux kernel shows it.

    Args:
        stream: the volume (seekable).
        name: how error messages name this filesystem (e.g. the partition).

    Raises:
        FilesystemError: not XFS, or a malformed superblock.
        UnsupportedError: a filesystem flagged as needing repair, or unknown incompat features.
    """

    fstype = "xfs"

    def __init__(self, stream: BinaryIO, *, name: str = "") -> None:
        self._name = name or "xfs"
        self._fh = stream
        try:
            self._size = stream.seek(0, io.SEEK_END)
            stream.seek(0)
            sb = stream.read(512)
        except OSError as exc:
            raise FilesystemError(f"cannot read the superblock: {exc}", obj=self._name) from exc
        if len(sb) < 512:
            raise FilesystemError(
                f"volume of {self._size} bytes is too small for an XFS superblock",
                offset=0,
                obj=self._name,
            )
        fields = _SB.unpack_from(sb, 0)
        if fields[0] != _SB_MAGIC:
            raise FilesystemError(
                f"bad XFS superblock magic {fields[0]:#010x}, expected {_SB_MAGIC:#010x}",
                offset=0,
                obj=self._name,
            )
        try:
            XFS(stream)  # validates the superblock and the first AGI, parses the root inode
        except (DissectXfsError, EOFError, struct.error, ValueError, KeyError) as exc:
            raise FilesystemError(
                f"invalid XFS superblock: {exc}", offset=0, obj=self._name
            ) from exc
        self.block_size: int = fields[1]
        self.block_count: int = fields[2]
        self._rootino: int = fields[7]
        self._agblocks: int = fields[11]
        self._agcount: int = fields[12]
        versionnum: int = fields[15]
        self._inode_size: int = fields[17]
        self._inopblock: int = fields[18]
        self._blocklog: int = fields[20]
        self._inopblog: int = fields[23]
        self._agblklog: int = fields[24]
        (dirblklog,) = struct.unpack_from(">B", sb, 192)
        (features2,) = _U32.unpack_from(sb, 200)
        (incompat,) = _U32.unpack_from(sb, 216)
        self.version = versionnum & _VERSION_NUMBITS
        self._v5 = self.version == 5
        if not self._v5:
            incompat = 0
        if (
            self.block_size != 1 << self._blocklog
            or self._inode_size != 1 << fields[22]
            or self._inopblock != 1 << self._inopblog
            or self._agblocks > 1 << self._agblklog
            or self.version not in (4, 5)
        ):
            raise FilesystemError("inconsistent XFS superblock geometry", offset=0, obj=self._name)
        if incompat & _INCOMPAT_NEEDSREPAIR:
            raise UnsupportedError(
                "XFS filesystem is flagged as needing xfs_repair", offset=0, obj=self._name
            )
        unknown = incompat & ~_INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedError(
                f"unknown XFS incompat features {unknown:#x}", offset=0, obj=self._name
            )
        self._ftype = bool(incompat & _INCOMPAT_FTYPE) or bool(features2 & _VERSION2_FTYPE)
        self._dirblksize = self.block_size << dirblklog
        # blkid (superblocks/xfs.c) prints sb_uuid, not sb_meta_uuid, and sb_fname as label.
        self.uuid = str(UUID(bytes=fields[5]))
        label = fields[19].split(b"\0", 1)[0]
        self.label = label.decode("utf-8", "surrogateescape") or None
        self._inum_bits = self._agblklog + self._inopblog

        self._meta_block: Callable[[int], bytes] = lru_cache(_META_CACHE)(self._read_meta_block)
        self._inode: Callable[[int], _Inode] = lru_cache(_INODE_CACHE)(self._load_inode)
        #: the internal log's last record is not an unmount record: an unclean shutdown left
        #: changes in the log, which a kernel mount replays and ova2img does not (``None``:
        #: an external log, or the log could not be read)
        self.log_pending: bool | None = None
        try:
            self.log_pending = self._log_pending(
                fields[6], fields[14], bool(versionnum & _VERSION_LOGV2BIT) or self._v5
            )
        except (Ova2imgError, *_DECODE_ERRORS) as exc:
            log.debug("%s: XFS log not checked: %s", self._name, exc)
        if self.log_pending:
            log.warning(
                "%s: XFS log not replayed (unclean shutdown): changes logged after the last "
                "checkpoint are missing, files may show an older state",
                self._name,
            )
        self._map_cache: Callable[[int, bool], list[_Extent]] = lru_cache(_MAP_CACHE)(
            self._load_map
        )

    # -- Filesystem API ------------------------------------------------------------------------

    def root(self) -> object:
        """The root directory's inode number (``sb_rootino``)."""
        return self._rootino

    def stat(self, handle: object) -> Entry:
        """Metadata of the inode, as ``lstat``/``listxattr``/``readlink`` show it."""
        return self._on_inode(self._stat, handle)

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        """``(name, inode number)`` of a directory's entries, without ``.`` and ``..``."""
        return iter(self._on_inode(self._listdir, handle))

    def open(self, handle: object) -> BinaryIO:
        """A seekable stream over the content of a regular file; unwritten extents are zeros."""
        return self._on_inode(self._open, handle)

    def content_pieces(self, handle: object) -> tuple[int, list[Piece]] | None:
        """A regular file whose written extents cover it from block 0 without a gap (most
        files): ``(inode number, [(volume offset, length), …])``, each piece one read of the
        volume."""
        return self._on_inode(self._content_pieces, handle)

    def read_piece(self, token: int, offset: int, length: int) -> bytes:
        """*length* bytes of the volume at *offset*, a piece of inode *token*'s content."""
        return decode_guarded(
            lambda _: self._read(offset, length), token, _DECODE_ERRORS, inode_label, self._name
        )

    def data_runs(self, handle: object) -> list[DataRun] | None:
        """Byte ranges of a regular file that hold data, merged, sorted, clipped to its size.

        Holes and unwritten (fallocated) extents are not data, as ``SEEK_DATA`` reports on a
        clean read-only mount.
        """
        return self._on_inode(self._data_runs, handle)

    # -- internals: errors ---------------------------------------------------------------------

    def _inum(self, handle: object) -> int:
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise FilesystemError(f"not an XFS inode handle: {handle!r}", obj=self._name)
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
        if offset < 0 or offset + length > self._size:
            raise _Corrupt(f"read of {length} bytes at {offset:#x} beyond the volume end")
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise _Corrupt(f"short read at {offset:#x}: {len(data)} of {length} bytes")
        return bytes(data)

    def _linear(self, fsblock: int) -> int:
        """XFS_FSB_TO_DADDR in blocks: an fsblock is ``agno << agblklog | agbno``."""
        agno = fsblock >> self._agblklog
        agbno = fsblock & ((1 << self._agblklog) - 1)
        if agno >= self._agcount or agbno >= self._agblocks:
            raise _Corrupt(f"fs block {fsblock:#x} (AG {agno} block {agbno}) outside the volume")
        return agno * self._agblocks + agbno

    def _log_pending(self, logstart: int, logblocks: int, logv2: bool) -> bool | None:
        """Whether the internal log needs recovery, found as xlog_find_tail() does: the head
        is where the cycle numbers stamped in each 512-byte log block drop
        (xlog_find_head), and a clean log's last record before it is a lone unmount record
        (xlog_check_unmount_rec). ``None`` when it cannot tell."""
        if not logstart or not logblocks:
            return None  # an external log device: not part of the image
        base = self._linear(logstart) * self.block_size
        count = logblocks * self.block_size // _BBSIZE
        if base + count * _BBSIZE > self._size:
            return None

        def block(i: int) -> bytes:
            return self._read(base + i * _BBSIZE, _BBSIZE)

        def cycle(data: bytes) -> int:
            # A record header holds its cycle in h_cycle; every other block starts with it.
            magic, at4 = _LOG_WORDS.unpack_from(data, 0)
            return int(at4 if magic == _XLOG_MAGIC else magic)

        first, last = cycle(block(0)), cycle(block(count - 1))
        head = 0  # one cycle all through: the log wrapped at its end
        if first != last:  # xlog_find_cycle_start: the first block of the last cycle
            lo, hi = 0, count - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if cycle(block(mid)) == last:
                    hi = mid
                else:
                    lo = mid
            head = hi
        # xlog_rseek_logrec_hdr: the last record header before the head
        at = head
        for _ in range(min(count, _LOG_SCAN_BLOCKS)):
            at = (at - 1) % count
            header = block(at)
            if _U32.unpack_from(header, 0)[0] == _XLOG_MAGIC:
                break
        else:
            return None
        version, length = struct.unpack_from(">II", header, 8)
        (ops,) = _U32.unpack_from(header, 40)
        (h_size,) = _U32.unpack_from(header, 320)
        hblks = 1
        if logv2 and version & 2 and h_size > _XLOG_HEADER_CYCLE_SIZE:
            hblks = -(-h_size // _XLOG_HEADER_CYCLE_SIZE)
        after = (at + hblks + -(-length // _BBSIZE)) % count
        if after == head % count and ops == 1:
            op = block((at + hblks) % count)
            if op[9] & _XLOG_UNMOUNT_TRANS:  # xlog_op_header.oh_flags
                return False
        return True

    def _read_meta_block(self, block: int) -> bytes:
        if block < 0 or block >= self.block_count:
            raise _Corrupt(f"block {block} outside 0..{self.block_count - 1}")
        return self._read(block * self.block_size, self.block_size)

    def _load_inode(self, inum: int) -> _Inode:
        # XFS_INO_TO_AGNO / XFS_INO_TO_AGBNO / XFS_INO_TO_OFFSET
        agno = inum >> self._inum_bits
        agino = inum & ((1 << self._inum_bits) - 1)
        agbno = agino >> self._inopblog
        index = agino & (self._inopblock - 1)
        if agno >= self._agcount or agbno >= self._agblocks or inum <= 0:
            raise _Corrupt("inode number outside the filesystem")
        block = self._meta_block(agno * self._agblocks + agbno)
        off = index * self._inode_size
        return _Inode(inum, block[off : off + self._inode_size], self._v5)

    # -- extent maps ---------------------------------------------------------------------------

    def _load_map(self, inum: int, attr: bool) -> list[_Extent]:
        ino = self._inode(inum)
        fmt = ino.aformat if attr else ino.format
        count = ino.anextents if attr else ino.nextents
        fork = ino.fork(attr)
        out: list[_Extent] = []
        if fmt == _FMT_EXTENTS:
            if 16 * count > len(fork):
                raise _Corrupt(f"{count} extents do not fit a {len(fork)}-byte fork")
            for i in range(count):
                self._add_extent(fork, 16 * i, out)
        elif fmt == _FMT_BTREE:
            # xfs_bmdr_block root in the fork: level, numrecs, keys, then pointers at
            # 4 + maxrecs * 8 where maxrecs = (forksize - 4) / 16 (xfs_bmdr_maxrecs).
            level, numrecs = struct.unpack_from(">HH", fork, 0)
            maxrecs = (len(fork) - 4) // 16
            if level == 0 or numrecs > maxrecs:
                raise _Corrupt(f"bmbt root with level {level}, {numrecs} records")
            ptrs = struct.unpack_from(f">{numrecs}Q", fork, 4 + maxrecs * 8)
            for ptr in ptrs:
                self._walk_bmbt(ptr, level - 1, out)
            if len(out) != count:
                raise _Corrupt(f"bmbt holds {len(out)} extents, the inode says {count}")
        else:
            raise _Corrupt(f"fork format {fmt} has no extent map")
        out.sort(key=lambda e: e.logical)
        next_free = 0
        for ext in out:
            if ext.logical < next_free:
                raise _Corrupt(f"overlapping extents at logical block {ext.logical}")
            next_free = ext.logical + ext.length
        return out

    def _add_extent(self, raw: bytes, pos: int, out: list[_Extent]) -> None:
        startoff, startblock, count, unwritten = _bmbt_rec(raw, pos)
        if count == 0:
            raise _Corrupt(f"zero-length extent at logical block {startoff}")
        physical = self._linear(startblock)
        if physical + count > self.block_count:
            raise _Corrupt(f"extent at block {physical}+{count} outside the volume")
        out.append(_Extent(startoff, physical, count, unwritten))

    def _walk_bmbt(self, fsblock: int, level: int, out: list[_Extent]) -> None:
        # struct xfs_btree_block, long form (bmbt): magic, level, numrecs, siblings (+ v5 CRC
        # header); leaves hold xfs_bmbt_rec, nodes keys then pointers at hdr + maxrecs * 8.
        if level > 10:
            raise _Corrupt("bmbt deeper than 10 levels")
        block = self._meta_block(self._linear(fsblock))
        magic, blevel, numrecs = struct.unpack_from(">IHH", block, 0)
        want = _BMAP_CRC_MAGIC if self._v5 else _BMAP_MAGIC
        if magic != want or blevel != level:
            raise _Corrupt(
                f"bmbt block {fsblock:#x}: magic {magic:#x} level {blevel}, expected "
                f"{want:#x} level {level}"
            )
        hdr = _LBLOCK_CRC_LEN if self._v5 else _LBLOCK_LEN
        if level == 0:
            if hdr + 16 * numrecs > len(block):
                raise _Corrupt(f"bmbt leaf {fsblock:#x} with {numrecs} records")
            for i in range(numrecs):
                self._add_extent(block, hdr + 16 * i, out)
            return
        maxrecs = (len(block) - hdr) // 16
        if numrecs > maxrecs:
            raise _Corrupt(f"bmbt node {fsblock:#x} with {numrecs} records")
        for ptr in struct.unpack_from(f">{numrecs}Q", block, hdr + maxrecs * 8):
            self._walk_bmbt(ptr, level - 1, out)

    def _read_logical(self, extents: list[_Extent], lblock: int, count: int) -> bytes:
        """Read *count* fork blocks from logical block *lblock*; holes (and unwritten) → zeros."""
        bs = self.block_size
        buf = bytearray(count * bs)
        end = lblock + count
        for ext in extents:
            lo = max(ext.logical, lblock)
            hi = min(ext.logical + ext.length, end)
            if lo >= hi or ext.unwritten:
                continue
            data = self._read((ext.physical + lo - ext.logical) * bs, (hi - lo) * bs)
            buf[(lo - lblock) * bs : (hi - lblock) * bs] = data
        return bytes(buf)

    def _mapped(self, extents: list[_Extent], lblock: int, count: int) -> bool:
        return any(
            ext.logical < lblock + count and lblock < ext.logical + ext.length and not ext.unwritten
            for ext in extents
        )

    # -- stat ----------------------------------------------------------------------------------

    def _stat(self, inum: int) -> Entry:
        ino = self._inode(inum)
        entry = inode_entry(ino, inum)
        if entry is None:
            raise _Corrupt(f"invalid file type in mode {ino.mode:#o}")
        etype = entry.type
        if etype in (EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO, EntryType.SOCKET):
            if etype in (EntryType.CHAR, EntryType.BLOCK):
                if ino.format != _FMT_DEV:
                    raise _Corrupt(f"device inode in fork format {ino.format}")
                # xfs_dinode_get_rdev + xfs_to_linux_dev_t: a 32-bit "sysv" dev_t in the data
                # fork, major in bits 18..31 (9 bits kept), minor in bits 0..17.
                (dev,) = _U32.unpack_from(ino.fork(False), 0)
                entry.rdev_major = (dev >> 18) & 0x1FF
                entry.rdev_minor = dev & 0x3FFFF
        elif etype is EntryType.SYMLINK:
            entry.link_target = self._symlink_target(ino)
        entry.xattrs = self._xattrs(ino)
        return entry

    def _symlink_target(self, ino: _Inode) -> bytes:
        if ino.size <= 0 or ino.size > _SYMLINK_MAXLEN:
            raise _Corrupt(f"symlink of {ino.size} bytes")
        if ino.format == _FMT_LOCAL:
            fork = ino.fork(False)
            if ino.size > len(fork):
                raise _Corrupt(f"local symlink of {ino.size} bytes in a {len(fork)}-byte fork")
            return fork[: ino.size]
        # xfs_readlink_bmap (xfs_symlink.c): map the first xfs_symlink_blocks() blocks; each
        # mapping (extent) is one buffer, which on v5 starts with an xfs_dsymlink_hdr whose
        # sl_offset / sl_bytes place its chunk in the target.
        bs = self.block_size
        space = bs - (_SYMLINK_HDR if self._v5 else 0)
        nblocks = -(-ino.size // space)
        out = bytearray()
        for ext in self._map_cache(ino.inum, False):
            if ext.logical >= nblocks or len(out) >= ino.size:
                break
            count = min(ext.length, nblocks - ext.logical)
            buf = self._read(ext.physical * bs, count * bs)
            want = min(ino.size - len(out), count * bs - (_SYMLINK_HDR if self._v5 else 0))
            if self._v5:
                magic, offset, nbytes = struct.unpack_from(">III", buf, 0)
                if magic != _SYMLINK_MAGIC or offset != len(out) or nbytes < want:
                    raise _Corrupt(
                        f"remote symlink block: magic {magic:#x} offset {offset} bytes "
                        f"{nbytes}, expected {_SYMLINK_MAGIC:#x} offset {len(out)}"
                    )
                out += buf[_SYMLINK_HDR : _SYMLINK_HDR + want]
            else:
                out += buf[:want]
        if len(out) != ino.size:
            raise _Corrupt(f"symlink target {len(out)} of {ino.size} bytes")
        return bytes(out)

    # -- xattrs --------------------------------------------------------------------------------

    def _xattrs(self, ino: _Inode) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if not ino.forkoff:
            return out
        if ino.aformat == _FMT_LOCAL:
            # xfs_attr_sf_hdr: totsize (be16), count, pad; entries namelen, valuelen, flags,
            # then name and value (xfs_attr_shortform.h).
            fork = ino.fork(True)
            totsize, count = struct.unpack_from(">HB", fork, 0)
            if totsize > len(fork):
                raise _Corrupt(f"shortform attributes of {totsize} bytes overrun the fork")
            pos = 4
            for _ in range(count):
                if pos + 3 > totsize:
                    raise _Corrupt("shortform attribute entry overruns its header")
                namelen, valuelen, flags = fork[pos], fork[pos + 1], fork[pos + 2]
                end = pos + 3 + namelen + valuelen
                if end > totsize:
                    raise _Corrupt("shortform attribute overruns the fork")
                name = fork[pos + 3 : pos + 3 + namelen]
                self._add_xattr(out, flags, name, fork[pos + 3 + namelen : end])
                pos = end
        elif ino.aformat in (_FMT_EXTENTS, _FMT_BTREE):
            if ino.anextents == 0 and ino.aformat == _FMT_EXTENTS:
                return out
            extents = self._map_cache(ino.inum, True)
            self._attr_block(ino, extents, 0, 0, out, set())
        else:
            raise _Corrupt(f"attribute fork format {ino.aformat}")
        return out

    def _attr_block(
        self,
        ino: _Inode,
        extents: list[_Extent],
        lblock: int,
        depth: int,
        out: dict[str, bytes],
        seen: set[int],
    ) -> None:
        """Visit attr dabtree block *lblock*: a node recurses, a leaf adds its attributes."""
        if depth > _DA_MAXDEPTH or lblock in seen:
            raise _Corrupt(f"attribute tree loops or is deeper than {_DA_MAXDEPTH}")
        seen.add(lblock)
        block = self._read_logical(extents, lblock, 1)
        # xfs_da_blkinfo / xfs_da3_blkinfo: forw, back, magic (be16), pad
        (magic,) = _U16.unpack_from(block, 8)
        if magic in (_DA_NODE_MAGIC, _DA3_NODE_MAGIC):
            if (magic == _DA3_NODE_MAGIC) != self._v5:
                raise _Corrupt(f"attribute node magic {magic:#x} on a v{self.version} fs")
            hdr = _DA3_NODE_HDR if self._v5 else _DA_NODE_HDR
            count, _level = struct.unpack_from(">HH", block, hdr - (8 if self._v5 else 4))
            if hdr + 8 * count > len(block):
                raise _Corrupt(f"attribute node block {lblock} with {count} entries")
            for i in range(count):
                # xfs_da_node_entry: hashval, before (child block)
                (before,) = _U32.unpack_from(block, hdr + 8 * i + 4)
                self._attr_block(ino, extents, before, depth + 1, out, seen)
            return
        if magic not in (_ATTR_LEAF_MAGIC, _ATTR3_LEAF_MAGIC) or (
            (magic == _ATTR3_LEAF_MAGIC) != self._v5
        ):
            raise _Corrupt(f"attribute block {lblock} has magic {magic:#06x}")
        hdr = _ATTR3_LEAF_HDR if self._v5 else _ATTR_LEAF_HDR
        (count,) = _U16.unpack_from(block, 56 if self._v5 else 12)
        if hdr + 8 * count > len(block):
            raise _Corrupt(f"attribute leaf block {lblock} with {count} entries")
        bs = len(block)
        for i in range(count):
            # xfs_attr_leaf_entry: hashval, nameidx, flags, pad
            _hash, nameidx, flags = struct.unpack_from(">IHB", block, hdr + 8 * i)
            if flags & _ATTR_INCOMPLETE:
                continue  # half-set attribute, invisible (xfs_attr3_leaf_list_int)
            if flags & _ATTR_LOCAL:
                # xfs_attr_leaf_name_local: valuelen (be16), namelen, nameval[]
                valuelen, namelen = struct.unpack_from(">HB", block, nameidx)
                start = nameidx + 3
                if start + namelen + valuelen > bs:
                    raise _Corrupt(f"local attribute at {nameidx} overruns block {lblock}")
                name = block[start : start + namelen]
                value = block[start + namelen : start + namelen + valuelen]
            else:
                # xfs_attr_leaf_name_remote: valueblk, valuelen, namelen, name[]
                valueblk, valuelen, namelen = struct.unpack_from(">IIB", block, nameidx)
                start = nameidx + 9
                if start + namelen > bs:
                    raise _Corrupt(f"remote attribute at {nameidx} overruns block {lblock}")
                name = block[start : start + namelen]
                if not self._wanted_xattr(flags, name):
                    continue
                value = self._remote_value(ino, extents, valueblk, valuelen)
            self._add_xattr(out, flags, name, value)

    def _remote_value(self, ino: _Inode, extents: list[_Extent], lblock: int, length: int) -> bytes:
        # xfs_attr_rmtval_copyout (xfs_attr_remote.c): on v5 every block of a remote value
        # starts with an xfs_attr3_rmt_hdr (magic, offset, bytes, …); v4 values are contiguous.
        if length > 1 << 16:  # XATTR_SIZE_MAX
            raise _Corrupt(f"remote attribute value of {length} bytes")
        bs = self.block_size
        space = bs - (_ATTR3_RMT_HDR if self._v5 else 0)
        nblocks = -(-length // space)
        if not self._mapped(extents, lblock, nblocks):
            raise _Corrupt(f"remote attribute value at attr block {lblock} is not mapped")
        data = self._read_logical(extents, lblock, nblocks)
        if not self._v5:
            return data[:length]
        out = bytearray()
        for i in range(nblocks):
            blk = data[i * bs : (i + 1) * bs]
            want = min(space, length - len(out))
            magic, offset, nbytes = struct.unpack_from(">III", blk, 0)
            if magic != _ATTR3_RMT_MAGIC or offset != len(out) or nbytes != want:
                raise _Corrupt(
                    f"remote attribute block {lblock + i}: magic {magic:#x} offset {offset} "
                    f"bytes {nbytes}, expected {_ATTR3_RMT_MAGIC:#x} offset {len(out)} bytes {want}"
                )
            out += blk[_ATTR3_RMT_HDR : _ATTR3_RMT_HDR + want]
        return bytes(out)

    @staticmethod
    def _wanted_xattr(flags: int, name: bytes) -> bool:
        return not flags & (_ATTR_PARENT | _ATTR_INCOMPLETE)

    def _add_xattr(self, out: dict[str, bytes], flags: int, name: bytes, value: bytes) -> None:
        # fs/xfs/xfs_xattr.c xfs_xattr_put_listent: ROOT → trusted. (SGI_ACL_FILE / _DEFAULT
        # also as system.posix_acl_access / _default), SECURE → security., none → user.;
        # parent pointers (XFS_ATTR_PARENT) are never listed.
        if not self._wanted_xattr(flags, name):
            return
        if flags & _ATTR_ROOT:
            if name in _SGI_ACL:
                # Listed twice by the kernel: converted under system.*, and (to
                # CAP_SYS_ADMIN) raw under trusted.* as well — put_listent does not return
                # after the ACL case; getfattr/tar as root see both (checked on Linux 6.18).
                out[_SGI_ACL[name]] = _xfs_acl_to_xattr(value)
            prefix = "trusted."
        elif flags & _ATTR_SECURE:
            prefix = "security."
        else:
            prefix = "user."
        out[prefix + name.decode("utf-8", "surrogateescape")] = value

    # -- directories ---------------------------------------------------------------------------

    def _listdir(self, inum: int) -> list[tuple[bytes, object]]:
        ino = self._inode(inum)
        if ino.mode & 0o170000 != _stat.S_IFDIR:
            raise _Corrupt(f"not a directory (mode {ino.mode:#o})")
        out: list[tuple[bytes, object]] = []
        if ino.format == _FMT_LOCAL:
            self._parse_shortform_dir(ino, out)
            return out
        if ino.format not in (_FMT_EXTENTS, _FMT_BTREE):
            raise _Corrupt(f"directory in fork format {ino.format}")
        extents = self._map_cache(inum, False)
        fsb_per_dirblk = self._dirblksize // self.block_size
        leaf_lblock = _DIR2_LEAF_OFFSET // self.block_size
        # Every mapped directory block of the data space (below XFS_DIR2_LEAF_OFFSET) holds
        # entries; blocks freed after deletions are holes (xfs_dir2_leaf_getdents skips them).
        dirblocks: set[int] = set()
        for ext in extents:
            lo = ext.logical
            hi = min(ext.logical + ext.length, leaf_lblock)
            if lo < hi:
                dirblocks.update(range(lo // fsb_per_dirblk, (hi - 1) // fsb_per_dirblk + 1))
        for d in sorted(dirblocks):
            data = self._read_logical(extents, d * fsb_per_dirblk, fsb_per_dirblk)
            self._parse_dir_data(data, d, out)
        return out

    def _parse_shortform_dir(self, ino: _Inode, out: list[tuple[bytes, object]]) -> None:
        # xfs_dir2_sf_hdr: count, i8count, parent (4 or 8 bytes); entries: namelen,
        # offset[2], name, [ftype], inumber (4 or 8 bytes) (xfs_da_format.h).
        fork = ino.fork(False)[: ino.size]
        count, i8count = fork[0], fork[1]
        isize = 8 if i8count else 4
        pos = 2 + isize
        for _ in range(count):
            if pos >= len(fork):
                raise _Corrupt("shortform directory entry overruns the fork")
            namelen = fork[pos]
            name = fork[pos + 3 : pos + 3 + namelen]
            pos += 3 + namelen + (1 if self._ftype else 0)
            if pos + isize > len(fork) or namelen == 0:
                raise _Corrupt("shortform directory entry overruns the fork")
            child = int.from_bytes(fork[pos : pos + isize], "big")
            pos += isize
            out.append((name, child))

    def _parse_dir_data(self, data: bytes, d: int, out: list[tuple[bytes, object]]) -> None:
        (magic,) = _U32.unpack_from(data, 0)
        if self._v5:
            if magic not in (_DIR3_BLOCK_MAGIC, _DIR3_DATA_MAGIC):
                raise _Corrupt(f"directory block {d} has magic {magic:#x}")
            pos = _DIR3_DATA_HDR
            is_block = magic == _DIR3_BLOCK_MAGIC
        else:
            if magic not in (_DIR2_BLOCK_MAGIC, _DIR2_DATA_MAGIC):
                raise _Corrupt(f"directory block {d} has magic {magic:#x}")
            pos = _DIR2_DATA_HDR
            is_block = magic == _DIR2_BLOCK_MAGIC
        end = len(data)
        if is_block:
            # xfs_dir2_block_tail (count, stale) at the end, the leaf array before it.
            (count,) = _U32.unpack_from(data, end - 8)
            end -= 8 + 8 * count
            if end < pos:
                raise _Corrupt(f"directory block {d} with {count} leaf entries")
        extra = 1 if self._ftype else 0
        while pos < end:
            (tag,) = _U16.unpack_from(data, pos)
            if tag == _DIR2_DATA_FREE_TAG:
                # xfs_dir2_data_unused: freetag, length, …, tag
                (length,) = _U16.unpack_from(data, pos + 2)
                if length < 8 or length & 7 or pos + length > end:
                    raise _Corrupt(f"free space of {length} bytes at {pos} in dir block {d}")
                pos += length
                continue
            # xfs_dir2_data_entry: inumber (be64), namelen, name, [ftype], tag (be16); 8-aligned
            (child,) = _U64.unpack_from(data, pos)
            namelen = data[pos + 8]
            size = (8 + 1 + namelen + extra + 2 + 7) & ~7
            if namelen == 0 or pos + size > end:
                raise _Corrupt(f"directory entry at {pos} in dir block {d} overruns the block")
            name = data[pos + 9 : pos + 9 + namelen]
            if name != b"." and name != b"..":
                out.append((name, child))
            pos += size

    # -- data ----------------------------------------------------------------------------------

    def _check_regular(self, ino: _Inode) -> None:
        if ino.flags & _DIFLAG_REALTIME:
            raise UnsupportedError(
                f"inode {ino.inum}: data on the XFS realtime device is not supported",
                obj=self._name,
            )

    def _open(self, inum: int) -> BinaryIO:
        ino = self._inode(inum)
        fmt = ino.mode & 0o170000
        if fmt not in (_stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK):
            raise _Corrupt(f"mode {ino.mode:#o} has no data to open")
        if fmt == _stat.S_IFLNK:
            return io.BytesIO(self._symlink_target(ino))
        if ino.format == _FMT_LOCAL:
            return io.BytesIO(ino.fork(False)[: ino.size])
        self._check_regular(ino)
        bs = self.block_size
        nblocks = -(-ino.size // bs)
        runs: list[tuple[int | None, int]] = []
        pos = 0
        for ext in self._map_cache(inum, False):
            if ext.logical >= nblocks:
                break
            if ext.logical > pos:
                runs.append((None, ext.logical - pos))
            length = min(ext.length, nblocks - ext.logical)
            # Unwritten (preallocated) extents read as zeros (XFS_EXT_UNWRITTEN).
            runs.append((None if ext.unwritten else ext.physical, length))
            pos = ext.logical + length
        if pos < nblocks:
            runs.append((None, nblocks - pos))
        stream = RunlistReader(self._fh, runs, ino.size, bs).as_binary()
        return stream

    def _content_pieces(self, inum: int) -> tuple[int, list[Piece]] | None:
        ino = self._inode(inum)
        size = ino.size
        if ino.mode & 0o170000 != _stat.S_IFREG or ino.format == _FMT_LOCAL or not size:
            return None
        self._check_regular(ino)
        extents = self._map_cache(inum, False)
        bs = self.block_size
        pieces: list[Piece] = []
        done = 0  # bytes of the file covered so far
        for ext in extents:
            if ext.logical * bs != done or ext.unwritten:
                return None  # holes, or zeros to add: the stream does that
            n = min(ext.length * bs, size - done)
            pieces.append((ext.physical * bs, n))
            done += n
            if done >= size:
                return inum, pieces
        return None  # no extents, or ends in a hole

    def _data_runs(self, inum: int) -> list[DataRun] | None:
        ino = self._inode(inum)
        if ino.mode & 0o170000 != _stat.S_IFREG:
            return None
        if ino.format == _FMT_LOCAL:
            return [(0, ino.size)] if ino.size else []
        self._check_regular(ino)
        bs = self.block_size
        runs: list[DataRun] = []
        for ext in self._map_cache(inum, False):
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
