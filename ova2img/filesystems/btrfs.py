"""btrfs, read the way a read-only Linux mount shows it, subvolumes included.

Built over :mod:`dissect.btrfs`: ``Btrfs`` parses the superblock and maps logical addresses to
the device through the chunk tree (``ChunkStream``, DUP/RAID profiles on one device), and
``decode_extent`` inflates zlib/lzo/zstd extents. B-tree nodes, inodes, directories, xattrs and
file extents are decoded here from the raw items: the library has no xattr API, decodes times
before 1970 as huge unsigned numbers and parses every key through cstruct (slow); see
/work/shared/design/dissect-gaps.md. References: the kernel's fs/btrfs/ (``inode.c``
``btrfs_read_locked_inode``, ``btrfs_lookup_dentry``, ``new_simple_dir``, ``xattr.c``,
``super.c`` ``mount_subvol``) and https://btrfs.readthedocs.io/en/latest/dev/On-disk-format.html.

A :class:`BtrfsFilesystem` is one *view*: the tree of one subvolume as a mount with
``subvol=``/``subvolid=`` shows it, nested subvolumes included (they are on the same mount).
Handles are :class:`BtrfsHandle` ``(tree, inode)`` pairs; ``Entry.inode`` is
``(tree << 40) | inode`` so that inode numbers stay unique across the subvolumes of a view.
"""

from __future__ import annotations

import io
import logging
import stat as _stat
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, NamedTuple, TypeVar
from uuid import UUID

from dissect.btrfs import Btrfs
from dissect.btrfs.exceptions import Error as DissectBtrfsError
from dissect.btrfs.stream import decode_extent
from dissect.util.stream import AlignedStream

from .._stream import pread_of
from ..errors import FilesystemError, Ova2imgError, UnsupportedError
from ._posix_acl import AclFormatError, xattr_acl
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
)

__all__ = ["BtrfsFilesystem", "BtrfsHandle"]

log = logging.getLogger("ova2img.filesystems")

_SB_OFFSET = 0x10000
_MAGIC = b"_BHRfS_M"
# BTRFS_BLOCK_GROUP_RAID0 | RAID10 | RAID5 | RAID6: profiles that stripe a chunk's bytes
_STRIPED = (1 << 3) | (1 << 6) | (1 << 7) | (1 << 8)

# Object ids and key types (fs/btrfs/ uapi btrfs_tree.h).
_ROOT_TREE_DIR_OBJECTID = 6
_FS_TREE_OBJECTID = 5
_FIRST_FREE_OBJECTID = 256
_LAST_FREE_OBJECTID = (1 << 64) - 256
_EMPTY_SUBVOL_DIR_OBJECTID = 2
_INODE_ITEM = 1
_INODE_REF = 12
_XATTR_ITEM = 24
_DIR_ITEM = 84
_DIR_INDEX = 96
_EXTENT_DATA = 108
_ROOT_ITEM = 132
_ROOT_BACKREF = 144
_ROOT_REF = 156
_MAX64 = (1 << 64) - 1

_FILE_EXTENT_INLINE = 0
_FILE_EXTENT_REG = 1
_FILE_EXTENT_PREALLOC = 2
_COMPRESS_NONE = 0
_COMPRESS_MAX = 3  # zstd

# Incompat feature bits (btrfs_tree.h BTRFS_FEATURE_INCOMPAT_*). Everything up to RAID1C34 and
# SIMPLE_QUOTA keeps the classic layout read here; these change where data or trees are found.
_INCOMPAT_METADATA_UUID = 0x400
_INCOMPAT_REFUSED = {
    0x1000: "zoned",
    0x2000: "extent-tree-v2",
    0x4000: "raid-stripe-tree",
}
_INCOMPAT_KNOWN = 0x1FFFF

_HEADER = struct.Struct("<32s16sQQ16sQQIB")  # struct btrfs_header, 101 bytes
_KEY_PTR = struct.Struct("<QBQQQ")  # struct btrfs_key_ptr: key, blockptr, generation
_ITEM = struct.Struct("<QBQII")  # struct btrfs_item: key, offset, size
# struct btrfs_inode_item (160 bytes): generation, transid, size, nbytes, block_group, nlink,
# uid, gid, mode, rdev, flags, sequence, reserved[4], then atime/ctime/mtime/otime as
# struct btrfs_timespec {__le64 sec; __le32 nsec}. The kernel reads sec into a time64_t: it is
# signed (dissect 1.10 reads it unsigned, so times before 1970 come out near 2**64).
_INODE = struct.Struct("<QQQQQIIIIQQQ32xqIqIqIqI")
_ROOT_ITEM_FIELDS = struct.Struct("<QQQQQQQIQBQBB")  # from offset 160 of struct btrfs_root_item
_DIR_ITEM_HDR = struct.Struct("<QBQQHHB")  # struct btrfs_dir_item: location, transid, lens, type
_ROOT_REF_HDR = struct.Struct("<QQH")  # struct btrfs_root_ref: dirid, sequence, name_len
_INODE_REF_HDR = struct.Struct("<QH")  # struct btrfs_inode_ref: index, name_len
_FILE_EXTENT_HDR = struct.Struct("<QQBBHB")  # generation, ram_bytes, compression, enc, other, type
_FILE_EXTENT_REG_TAIL = struct.Struct("<QQQQ")  # disk_bytenr, disk_num_bytes, offset, num_bytes
_ACL_ENTRY = struct.Struct("<HHI")

_POSIX_ACL_NAMES = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
_INO_BITS = 40

_NODE_CACHE = 1024
_INODE_CACHE = 8192
_EXTENTS_CACHE = 64
_INFLATED_CACHE = 8

_T = TypeVar("_T")


class _Corrupt(Exception):  # noqa: N818 - internal, always re-raised as FilesystemError
    """Internal: a structure failed a sanity check (turned into FilesystemError at the API)."""


#: what decoding damaged structures raises, here or in dissect: a FilesystemError at the API
_DECODE_ERRORS = (_Corrupt, DissectBtrfsError, AclFormatError, OSError, *DECODE_ERRORS)


class BtrfsHandle(NamedTuple):
    """An inode of a view: the id of the subvolume tree it lives in and its inode number.

    ``stub_parent`` is non-zero only for the empty placeholder directory the kernel shows where
    a snapshot holds the directory entry of a subvolume it does not own (inode number 2, see
    ``new_simple_dir`` in fs/btrfs/inode.c): it names the directory (in ``tree``) holding that
    entry, and ``ino`` is then the id of the subvolume the entry points at.
    """

    tree: int
    ino: int
    stub_parent: int = 0


@dataclass(slots=True)
class _Inode:
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    ctime_ns: int
    mtime_ns: int
    #: the raw XATTR_ITEMs, read in the same pass as the INODE_ITEM (they follow it in the tree)
    xattr_items: tuple[bytes, ...] = ()


@dataclass(slots=True)
class _Extent:
    """A stretch of a file: ``file_offset``/``length`` in the file; where its bytes come from.

    ``kind`` is ``reg`` (on disk; compressed or not), ``inline`` (bytes in ``inline``), or
    ``zero`` (a hole extent or a preallocated, unwritten one: reads as zeros, holds no data).
    """

    file_offset: int
    length: int
    kind: str
    compression: int = _COMPRESS_NONE
    disk_bytenr: int = 0
    disk_num_bytes: int = 0
    extent_offset: int = 0
    ram_bytes: int = 0
    inline: bytes = b""


class _Node(NamedTuple):
    level: int
    keys: list[tuple[int, int, int]]
    # level > 0: child block pointers; level 0: (data offset, data size) in ``raw``
    refs: list[int] | list[tuple[int, int]]
    raw: bytes


class _Core:
    """What every view of one filesystem shares: the parsed superblock, caches, the trees."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.name = name
        try:
            size = stream.seek(0, io.SEEK_END)
            if size < _SB_OFFSET + 4096:
                raise FilesystemError(
                    f"volume of {size} bytes is too small for a btrfs superblock",
                    offset=_SB_OFFSET,
                    obj=name,
                )
            stream.seek(_SB_OFFSET + 0x40)
            magic = stream.read(8)
        except OSError as exc:
            raise FilesystemError(f"cannot read the superblock: {exc}", obj=name) from exc
        if magic != _MAGIC:
            raise FilesystemError(
                f"bad btrfs superblock magic {magic!r}, expected {_MAGIC!r}",
                offset=_SB_OFFSET + 0x40,
                obj=name,
            )
        self._refuse_multi_device(stream, name)  # one device: stripe 0 of a chunk is ours
        problem = _bad_chunk_tree(stream)
        if problem:
            raise FilesystemError(
                f"invalid chunk or root tree: {problem}", offset=_SB_OFFSET, obj=name
            )
        try:
            btrfs: Any = Btrfs(stream)
        except (DissectBtrfsError, EOFError, KeyError, ValueError, struct.error) as exc:
            # dissect raises on a missing stripe device (multi-device filesystems) too.
            self._refuse_multi_device(stream, name)
            raise FilesystemError(
                f"invalid btrfs superblock or chunk tree: {exc}", offset=_SB_OFFSET, obj=name
            ) from exc
        self.btrfs = btrfs
        sb = btrfs.sb
        if int(sb.num_devices) != 1:
            raise UnsupportedError(
                f"btrfs filesystem spans {int(sb.num_devices)} devices; ova2img reads "
                "single-device btrfs only",
                obj=name,
            )
        incompat = int(sb.incompat_flags)
        for bit, what in _INCOMPAT_REFUSED.items():
            if incompat & bit:
                raise UnsupportedError(f"btrfs feature {what} is not supported", obj=name)
        if incompat & ~_INCOMPAT_KNOWN:
            raise UnsupportedError(
                f"unknown btrfs incompat features {incompat & ~_INCOMPAT_KNOWN:#x}", obj=name
            )
        self.fsid = bytes(sb.fsid)
        # Tree blocks carry metadata_uuid when the METADATA_UUID feature changed the fsid.
        self.meta_fsid = (
            bytes(sb.metadata_uuid) if incompat & _INCOMPAT_METADATA_UUID else self.fsid
        )
        self.node_size = int(sb.nodesize)
        self.sector_size = int(sb.sectorsize)
        self.root_tree = int(sb.root)
        #: a log tree is left by fsync()s after the last commit (an unclean shutdown); a
        #: kernel mount replays it, ova2img reads the last committed state.
        self.log_tree_pending = bool(int(sb.log_root))
        if self.log_tree_pending:
            log.warning(
                "%s: btrfs log tree not replayed (unclean shutdown): files fsync()ed after the "
                "last commit show their committed state",
                name,
            )
        self.uuid = str(UUID(bytes=self.fsid))
        label = bytes(sb.label).split(b"\0", 1)[0]
        self.label = label.decode("utf-8", "surrogateescape") or None
        self._logical: BinaryIO = btrfs._logical_fh
        # Chunks whose first stripe holds the chunk's bytes in one piece (SINGLE, DUP, the
        # RAID1 kinds): logical -> physical is an offset, read with one pread of the device.
        # dissect's ChunkStream reads in aligned 64 KiB blocks, a whole block for every small
        # file; striped profiles (RAID0/10/5/6) still go through it.
        self._linear: list[tuple[int, int, int, Callable[[int, int], bytes]]] = []
        for chunk in btrfs._logical_fh.chunks:
            stripe = chunk.stripes[0] if chunk.stripes else None
            if int(chunk.type) & _STRIPED or stripe is None or stripe.fh is None:
                continue
            self._linear.append((chunk.offset, chunk.length, stripe.offset, pread_of(stripe.fh)))
        self._linear_starts = [c[0] for c in self._linear]

        self.node: Callable[[int], _Node] = lru_cache(_NODE_CACHE)(self._load_node)
        self.inode: Callable[[int, int], _Inode] = lru_cache(_INODE_CACHE)(self._load_inode)
        self.tree_root: Callable[[int], int] = lru_cache(256)(self._load_tree_root)
        self.extents: Callable[[int, int], list[_Extent]] = lru_cache(_EXTENTS_CACHE)(
            self._load_extents
        )
        self._inflated: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()

    @staticmethod
    def _refuse_multi_device(stream: BinaryIO, name: str) -> None:
        # struct btrfs_super_block: num_devices (le64) at 0x88.
        stream.seek(_SB_OFFSET + 0x88)
        raw = stream.read(8)
        if len(raw) == 8:
            (ndev,) = struct.unpack("<Q", raw)
            if ndev > 1:
                raise UnsupportedError(
                    f"btrfs filesystem spans {ndev} devices; ova2img reads single-device "
                    "btrfs only",
                    obj=name,
                )

    # -- raw access ----------------------------------------------------------------------------

    def read_logical(self, address: int, length: int) -> bytes:
        i = bisect_right(self._linear_starts, address) - 1
        if i >= 0:
            start, size, physical, pread = self._linear[i]
            if address + length <= start + size:
                data = pread(physical + address - start, length)
                if len(data) != length:
                    raise _Corrupt(f"short read of {length} bytes at logical {address:#x}")
                return bytes(data)
        self._logical.seek(address)
        data = self._logical.read(length)
        if len(data) != length:
            raise _Corrupt(f"short read of {length} bytes at logical {address:#x}")
        return bytes(data)

    def _load_node(self, address: int) -> _Node:
        raw = self.read_logical(address, self.node_size)
        _csum, fsid, bytenr, _flags, _ctu, _gen, _owner, nritems, level = _HEADER.unpack_from(raw)
        if bytenr != address or fsid != self.meta_fsid:
            raise _Corrupt(f"tree block at {address:#x} has a foreign header (bytenr {bytenr:#x})")
        hdr = _HEADER.size
        keys: list[tuple[int, int, int]] = []
        if level:
            if hdr + nritems * _KEY_PTR.size > len(raw) or level > 7:
                raise _Corrupt(f"tree node at {address:#x}: {nritems} items at level {level}")
            ptrs: list[int] = []
            for oid, typ, off, ptr, _g in _KEY_PTR.iter_unpack(raw[hdr : hdr + nritems * 33]):
                keys.append((oid, typ, off))
                ptrs.append(ptr)
            return _Node(level, keys, ptrs, raw)
        if hdr + nritems * _ITEM.size > len(raw):
            raise _Corrupt(f"tree leaf at {address:#x} claims {nritems} items")
        spans: list[tuple[int, int]] = []
        for oid, typ, off, doff, dsize in _ITEM.iter_unpack(raw[hdr : hdr + nritems * 25]):
            if hdr + doff + dsize > len(raw):
                raise _Corrupt(f"tree leaf at {address:#x}: item data overruns the block")
            keys.append((oid, typ, off))
            spans.append((hdr + doff, dsize))
        return _Node(0, keys, spans, raw)

    def items(
        self, root: int, lo: tuple[int, int, int], hi: tuple[int, int, int]
    ) -> Iterator[tuple[tuple[int, int, int], bytes]]:
        """Every ``(key, data)`` of the tree at *root* with ``lo <= key <= hi``, in key order.

        Iterative (the path from the root is a list): a recursive generator passed every item
        up through each level, a fifth of the time of a conversion of small files.
        """
        path: list[tuple[_Node, int]] = []  # internal nodes above, and the child taken in each
        node: _Node | None = self.node(root)
        while True:
            # Down to the leaf that may hold lo (in a subtree right of lo: the leftmost).
            while node is not None and node.level:
                if len(path) >= 8:
                    raise _Corrupt("tree deeper than 8 levels")
                keys = node.keys
                # The child at i holds keys in [keys[i], keys[i+1]).
                i = max(bisect_right(keys, lo) - 1, 0)
                if i >= len(keys):
                    node = None  # an empty node: nothing below it
                    break
                if keys[i] > hi:
                    return
                path.append((node, i))
                child = node.refs[i]
                assert isinstance(child, int)
                node = self.node(child)
            if node is not None:
                keys = node.keys
                raw = node.raw
                for j in range(bisect_left(keys, lo), len(keys)):
                    key = keys[j]
                    if key > hi:
                        return
                    span = node.refs[j]
                    assert isinstance(span, tuple)
                    yield key, raw[span[0] : span[0] + span[1]]
            # On to the next subtree to the right.
            while path:
                parent, i = path.pop()
                i += 1
                if i < len(parent.keys):
                    if parent.keys[i] > hi:
                        return
                    path.append((parent, i))
                    child = parent.refs[i]
                    assert isinstance(child, int)
                    node = self.node(child)
                    break
            else:
                return

    def first(self, root: int, objectid: int, typ: int) -> tuple[tuple[int, int, int], bytes]:
        for item in self.items(root, (objectid, typ, 0), (objectid, typ, _MAX64)):
            return item
        raise KeyError((objectid, typ))

    # -- subvolumes ----------------------------------------------------------------------------

    def _load_tree_root(self, tree: int) -> int:
        """Logical address of the root node of subvolume *tree* (its ROOT_ITEM's bytenr)."""
        try:
            _key, data = self.first(self.root_tree, tree, _ROOT_ITEM)
        except KeyError:
            raise _Corrupt(f"no subvolume with id {tree}") from None
        if len(data) < 160 + _ROOT_ITEM_FIELDS.size:
            raise _Corrupt(f"ROOT_ITEM of subvolume {tree} is {len(data)} bytes")
        _gen, root_dirid, bytenr, *_rest = _ROOT_ITEM_FIELDS.unpack_from(data, 160)
        if root_dirid != _FIRST_FREE_OBJECTID:
            raise _Corrupt(f"subvolume {tree} has root directory {root_dirid}, expected 256")
        return int(bytenr)

    def subvolume_ids(self) -> list[int]:
        """Ids of the subvolumes a mount can reach (5 and every linked one), ascending."""
        ids = [_FS_TREE_OBJECTID]
        for (oid, _t, _o), _data in self.items(
            self.root_tree,
            (_FIRST_FREE_OBJECTID, _ROOT_BACKREF, 0),
            (_LAST_FREE_OBJECTID, _ROOT_BACKREF, _MAX64),
        ):
            if _t == _ROOT_BACKREF and (not ids or ids[-1] != oid) and self.reachable(oid):
                ids.append(oid)
        return ids

    def backref(self, tree: int) -> tuple[int, int, bytes] | None:
        """``(parent tree, directory inode, name)`` linking subvolume *tree*, or ``None``."""
        for (_oid, _t, parent), data in self.items(
            self.root_tree, (tree, _ROOT_BACKREF, 0), (tree, _ROOT_BACKREF, _MAX64)
        ):
            dirid, _seq, name_len = _ROOT_REF_HDR.unpack_from(data)
            return parent, dirid, data[18 : 18 + name_len]
        return None

    def reachable(self, tree: int) -> bool:
        """Whether subvolume *tree* is linked, through its parents, to the top level."""
        seen = set()
        while tree != _FS_TREE_OBJECTID:
            if tree in seen:
                return False
            seen.add(tree)
            ref = self.backref(tree)
            if ref is None:
                return False
            tree = ref[0]
        return True

    def has_root_ref(self, parent: int, child: int, dirid: int, name: bytes) -> bool:
        """fixup_tree_root_location(): a ROOT_REF (parent, child) naming this dir entry."""
        for _key, data in self.items(
            self.root_tree, (parent, _ROOT_REF, child), (parent, _ROOT_REF, child)
        ):
            ref_dirid, _seq, name_len = _ROOT_REF_HDR.unpack_from(data)
            return bool(ref_dirid == dirid and data[18 : 18 + name_len] == name)
        return False

    def default_subvolume(self) -> int:
        """get_default_root() (fs/btrfs/super.c): the "default" dir item of the root tree dir,
        or the top level when there is none."""
        for _key, data in self.items(
            self.root_tree,
            (_ROOT_TREE_DIR_OBJECTID, _DIR_ITEM, 0),
            (_ROOT_TREE_DIR_OBJECTID, _DIR_ITEM, _MAX64),
        ):
            for location, _typ, name, _value in _dir_items(data):
                if name == b"default":
                    return location[0] or _FS_TREE_OBJECTID
        return _FS_TREE_OBJECTID

    # -- inodes ----------------------------------------------------------------------------------

    def _load_inode(self, tree: int, ino: int) -> _Inode:
        # One pass over the inode's items from INODE_ITEM to its XATTR_ITEMs (between them only
        # its INODE_REF/EXTREF names), instead of one tree search for each kind.
        root = self.tree_root(tree)
        inode: _Inode | None = None
        xattr_items: list[bytes] = []
        for (_o, typ, _off), data in self.items(
            root, (ino, _INODE_ITEM, 0), (ino, _XATTR_ITEM, _MAX64)
        ):
            if typ == _XATTR_ITEM:
                xattr_items.append(data)
            elif typ == _INODE_ITEM and inode is None:
                if len(data) < _INODE.size:
                    raise _Corrupt(f"inode item of {len(data)} bytes")
                f = _INODE.unpack_from(data)
                size, nlink, uid, gid, mode, rdev = f[2], f[5], f[6], f[7], f[8], f[9]
                if uid == NO_ID or gid == NO_ID:
                    uid = uid if uid != NO_ID else OVERFLOW_ID
                    gid = gid if gid != NO_ID else OVERFLOW_ID
                atime_ns = f[12] * NS_PER_S + (f[13] if f[13] < NS_PER_S else 0)
                ctime_ns = f[14] * NS_PER_S + (f[15] if f[15] < NS_PER_S else 0)
                mtime_ns = f[16] * NS_PER_S + (f[17] if f[17] < NS_PER_S else 0)
                inode = _Inode(mode, uid, gid, size, nlink, rdev, atime_ns, ctime_ns, mtime_ns)
        if inode is None:
            raise _Corrupt("no inode item")
        if xattr_items:
            inode.xattr_items = tuple(xattr_items)
        return inode

    def xattrs(self, tree: int, ino: int) -> dict[str, bytes]:
        """Every XATTR_ITEM of an inode (key offset = name hash; colliding names share an item).

        btrfs_listxattr() lists every stored name unfiltered. POSIX ACLs are stored in the
        kernel's version-2 xattr format already (``posix_acl_to_xattr`` in btrfs_set_acl);
        getxattr() re-encodes them through ``posix_acl_from_xattr``, which we mirror.
        """
        out: dict[str, bytes] = {}
        for data in self.inode(tree, ino).xattr_items:
            for _loc, _typ, raw_name, value in _dir_items(data):
                name = raw_name.decode("utf-8", "surrogateescape")
                out[name] = _normalise_acl(value) if name in _POSIX_ACL_NAMES else value
        return out

    # -- file data -------------------------------------------------------------------------------

    def _load_extents(self, tree: int, ino: int) -> list[_Extent]:
        """The EXTENT_DATA items of a file, in order, clipped to its size; gaps are holes.

        NO_HOLES filesystems omit hole extents; others store them as REG with disk_bytenr 0.
        """
        inode = self.inode(tree, ino)
        size = inode.size
        out: list[_Extent] = []
        pos = 0
        root = self.tree_root(tree)
        for (_o, _t, off), data in self.items(
            root, (ino, _EXTENT_DATA, 0), (ino, _EXTENT_DATA, _MAX64)
        ):
            if off >= size:
                break  # fallocate --keep-size past the end: not part of the file
            if off < pos:
                raise _Corrupt(f"file extent at {off} overlaps the previous one (ends {pos})")
            if len(data) < _FILE_EXTENT_HDR.size:
                raise _Corrupt(f"file extent item of {len(data)} bytes")
            _gen, ram_bytes, compression, encryption, other, etype = _FILE_EXTENT_HDR.unpack_from(
                data
            )
            if encryption or other:
                raise UnsupportedError(
                    f"btrfs file extent encryption {encryption}/encoding {other} at offset {off}",
                    obj=self.name,
                )
            if compression > _COMPRESS_MAX:
                raise _Corrupt(f"unknown compression {compression} at offset {off}")
            if etype == _FILE_EXTENT_INLINE:
                ext = _Extent(off, ram_bytes, "inline", compression, ram_bytes=ram_bytes)
                ext.inline = bytes(data[_FILE_EXTENT_HDR.size :])
            elif etype in (_FILE_EXTENT_REG, _FILE_EXTENT_PREALLOC):
                if len(data) < 53:
                    raise _Corrupt(f"file extent item of {len(data)} bytes at offset {off}")
                bytenr, disk_num, ext_off, num = _FILE_EXTENT_REG_TAIL.unpack_from(data, 21)
                if etype == _FILE_EXTENT_PREALLOC or bytenr == 0:
                    # Preallocated (unwritten) extents and explicit holes read as zeros.
                    ext = _Extent(off, num, "zero")
                else:
                    ext = _Extent(
                        off, num, "reg", compression, bytenr, disk_num, ext_off, ram_bytes
                    )
            else:
                raise _Corrupt(f"unknown file extent type {etype} at offset {off}")
            ext.length = min(ext.length, size - off)
            if ext.length <= 0:
                continue
            out.append(ext)
            pos = off + ext.length
        return out

    def inflate(self, ext: _Extent) -> bytes:
        """The decompressed bytes of a compressed extent (a few recent ones cached)."""
        key = (ext.disk_bytenr, ext.disk_num_bytes, ext.compression)
        hit = self._inflated.get(key)
        if hit is not None:
            self._inflated.move_to_end(key)
            return hit
        if ext.kind == "inline":
            raw = ext.inline
        else:
            raw = self.read_logical(ext.disk_bytenr, ext.disk_num_bytes)
        try:
            data = decode_extent(raw, ext.compression, 0, self.sector_size)
        except (zlib.error, ValueError, EOFError, IndexError, RuntimeError) as exc:
            raise _Corrupt(f"cannot decompress extent at {ext.disk_bytenr:#x}: {exc}") from exc
        except Exception as exc:  # zstd raises its own ZstdError
            if type(exc).__name__ == "ZstdError":
                raise _Corrupt(f"cannot decompress extent at {ext.disk_bytenr:#x}: {exc}") from exc
            raise
        data = bytes(data)
        if ext.kind == "reg":
            self._inflated[key] = data
            if len(self._inflated) > _INFLATED_CACHE:
                self._inflated.popitem(last=False)
        return data


def _dir_items(data: bytes) -> Iterator[tuple[tuple[int, int, int], int, bytes, bytes]]:
    """``(location key, file type, name, data)`` of each btrfs_dir_item packed in an item."""
    pos = 0
    hdr = _DIR_ITEM_HDR.size
    while pos < len(data):
        if pos + hdr > len(data):
            raise _Corrupt(f"dir item truncated at byte {pos}")
        oid, typ, off, _transid, data_len, name_len, ftype = _DIR_ITEM_HDR.unpack_from(data, pos)
        end = pos + hdr + name_len + data_len
        if end > len(data):
            raise _Corrupt(f"dir item at byte {pos} overruns its item")
        name = data[pos + hdr : pos + hdr + name_len]
        value = data[pos + hdr + name_len : end]
        yield (oid, typ, off), ftype, bytes(name), bytes(value)
        pos = end


def _normalise_acl(value: bytes) -> bytes:
    """posix_acl_from_xattr() + posix_acl_to_xattr(): version 2, ids undefined where unused."""
    if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size:
        raise AclFormatError(f"POSIX ACL xattr of {len(value)} bytes")
    (version,) = struct.unpack_from("<I", value)
    if version != 2:
        raise AclFormatError(f"POSIX ACL xattr version {version}, expected 2")
    return xattr_acl(list(_ACL_ENTRY.iter_unpack(value[4:])))


class _ExtentStream(AlignedStream):  # type: ignore[misc]
    """A file's content over its extents: holes and preallocated extents read as zeros."""

    def __init__(self, core: _Core, extents: list[_Extent], size: int) -> None:
        super().__init__(size, core.sector_size)
        self._core = core
        self._extents = extents
        self._starts = [e.file_offset for e in extents]

    def _read(self, offset: int, length: int) -> bytes:
        # Reads happen after open() returned, outside BtrfsFilesystem._wrap: internal errors
        # (a corrupt or undecodable extent, a missing zstd module) must still leave the
        # adapter as FilesystemError.
        try:
            return self._read_extents(offset, length)
        except (_Corrupt, DissectBtrfsError) as exc:
            raise FilesystemError(
                f"reading {length} bytes at offset {offset}: {exc}", obj=self._core.name
            ) from exc

    def _read_extents(self, offset: int, length: int) -> bytes:
        return _read_extents(self._core, self._extents, self._starts, self.size, offset, length)


def _read_extents(
    core: _Core, extents: list[_Extent], starts: list[int], size: int, offset: int, length: int
) -> bytes:
    """*length* bytes at *offset* of a file of *size* bytes with these *extents* (whose
    file offsets are *starts*): holes and preallocated extents read as zeros."""
    end = min(offset + length, size)
    out = bytearray()
    pos = offset
    i = max(bisect_right(starts, pos) - 1, 0)
    while pos < end:
        ext = extents[i] if i < len(extents) else None
        if ext is None or pos < ext.file_offset:
            # A hole (implied with NO_HOLES, or past the last extent).
            stop = end if ext is None else min(end, ext.file_offset)
            out += bytes(stop - pos)
            pos = stop
            continue
        ext_end = ext.file_offset + ext.length
        if pos >= ext_end:
            i += 1
            continue
        stop = min(end, ext_end)
        rel = pos - ext.file_offset
        n = stop - pos
        if ext.kind == "zero":
            out += bytes(n)
        elif ext.kind == "inline":
            data = core.inflate(ext) if ext.compression else ext.inline
            chunk = data[rel : rel + n]
            out += chunk + bytes(n - len(chunk))
        elif ext.compression:
            # The file extent's offset counts in the decompressed data (btrfs_file_extent_item).
            data = core.inflate(ext)
            chunk = data[ext.extent_offset + rel : ext.extent_offset + rel + n]
            out += chunk + bytes(n - len(chunk))
        else:
            out += core.read_logical(ext.disk_bytenr + ext.extent_offset + rel, n)
        pos = stop
        i += 1
    return bytes(out)


class BtrfsFilesystem(Filesystem):
    """A read-only view of a single-device btrfs filesystem, as the Linux kernel shows it.

    The object returned by the constructor is the default view (the subvolume that
    ``btrfs subvolume get-default`` names, what a mount without ``subvol=`` shows);
    :meth:`mount` returns the views of other subvolumes, sharing the parsed filesystem.

    Args:
        stream: the volume (seekable).
        name: how error messages name this filesystem (e.g. the partition).

    Raises:
        FilesystemError: not btrfs, or malformed.
        UnsupportedError: several devices, or features that move trees or data elsewhere
            (zoned, extent-tree-v2, raid-stripe-tree, unknown incompat bits).
    """

    fstype = "btrfs"

    def __init__(self, stream: BinaryIO, *, name: str = "") -> None:
        self._name = name or "btrfs"
        core = _Core(stream, self._name)
        self._core = core
        self.uuid = core.uuid
        self.label = core.label
        self._subvol = self._wrap(core.default_subvolume, "the default subvolume")
        self._wrap(lambda: core.tree_root(self._subvol), f"default subvolume {self._subvol}")

    @classmethod
    def _view(cls, core: _Core, subvol: int, name: str) -> BtrfsFilesystem:
        view = cls.__new__(cls)
        view._name = name
        view._core = core
        view.uuid = core.uuid
        view.label = core.label
        view._subvol = subvol
        return view

    # -- identity --------------------------------------------------------------------------------

    @property
    def subvolume_id(self) -> int:
        """The id of the subvolume at the root of this view (5 is the top level)."""
        return self._subvol

    @property
    def log_tree_pending(self) -> bool:
        """Whether the filesystem holds an unreplayed log tree (an unclean shutdown after
        fsync()); a kernel mount would replay it, ova2img shows the last committed state."""
        return self._core.log_tree_pending

    def subvolume_path(self) -> str:
        """The path of this view's subvolume from the top level (``""`` for the top level)."""
        return self._wrap(lambda: self._path_of(self._subvol), f"subvolume {self._subvol}")

    # -- views -----------------------------------------------------------------------------------

    def mount(self, options: Sequence[str]) -> BtrfsFilesystem:
        """The view of ``mount -o subvol=PATH`` / ``subvolid=N`` (other options are ignored).

        As ``mount_subvol`` (fs/btrfs/super.c): ``subvol=`` is a path from the top-level
        subvolume (a leading ``/`` is optional, symlinks are followed) that must end at a
        subvolume root; ``subvolid=0`` means the top level (5); with both, they must agree;
        with neither, the default subvolume.

        Raises:
            FilesystemError: the path or id names no subvolume, or the two disagree.
        """
        path: str | None = None
        subvolid: int | None = None
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "subvol":
                path = value
            elif key == "subvolid":
                try:
                    subvolid = int(value, 0)
                except ValueError:
                    raise FilesystemError(f"invalid mount option {opt!r}", obj=self._name) from None
                subvolid = subvolid or _FS_TREE_OBJECTID
        if path is None and subvolid is None:
            return self._view(self._core, self._core_default(), self._name)
        by_path = self._resolve_subvol_path(path) if path is not None else None
        if subvolid is not None:
            ok = self._wrap(lambda: self._core.reachable(subvolid), f"subvolume {subvolid}")
            if not ok:
                raise FilesystemError(
                    f"subvolid={subvolid}: no such subvolume linked from the top level",
                    obj=self._name,
                )
            if by_path is not None and by_path != subvolid:
                raise FilesystemError(
                    f"subvol={path} is subvolume {by_path}, which does not match "
                    f"subvolid={subvolid}",
                    obj=self._name,
                )
        target = by_path if by_path is not None else subvolid
        assert target is not None
        return self._view(self._core, target, self._name)

    def root_candidates(self) -> Iterator[Filesystem]:
        """The default view, then every other subvolume reachable from the top level, by id."""
        default = self._core_default()
        yield self._view(self._core, default, self._name)
        for sid in self._wrap(self._core.subvolume_ids, "the subvolume list"):
            if sid != default:
                yield self._view(self._core, sid, self._name)

    def subvolumes(self) -> list[tuple[int, str]]:
        """``(id, path from the top level)`` of every reachable subvolume, by id."""

        def run() -> list[tuple[int, str]]:
            return [(sid, self._path_of(sid)) for sid in self._core.subvolume_ids()]

        return self._wrap(run, "the subvolume list")

    def _core_default(self) -> int:
        return self._wrap(self._core.default_subvolume, "the default subvolume")

    def _resolve_subvol_path(self, path: str) -> int:
        top = self._view(self._core, _FS_TREE_OBJECTID, self._name)
        raw = path.encode("utf-8", "surrogateescape")
        try:
            handle = top.lookup(b"/" + raw)
        except FileNotFoundError:
            raise FilesystemError(f"subvol={path}: no such path", obj=self._name) from None
        assert isinstance(handle, BtrfsHandle)
        # is_subvolume_inode(): the path must end at the root directory of a subvolume.
        if handle.stub_parent or handle.ino != _FIRST_FREE_OBJECTID:
            raise FilesystemError(f"subvol={path} is not a subvolume", obj=self._name)
        return handle.tree

    def _path_of(self, tree: int) -> str:
        parts: list[bytes] = []
        seen: set[int] = set()
        core = self._core
        while tree != _FS_TREE_OBJECTID:
            if tree in seen:
                raise _Corrupt(f"subvolume {tree} is its own ancestor")
            seen.add(tree)
            ref = core.backref(tree)
            if ref is None:
                raise _Corrupt(f"subvolume {tree} is not linked to the top level")
            parent, dirid, name = ref
            parts.append(name)
            parts.extend(reversed(self._dir_path(parent, dirid)))
            tree = parent
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def _dir_path(self, tree: int, ino: int) -> list[bytes]:
        names: list[bytes] = []
        root = self._core.tree_root(tree)
        for _ in range(4096):
            if ino == _FIRST_FREE_OBJECTID:
                return list(reversed(names))
            for (_o, _t, parent), data in self._core.items(
                root, (ino, _INODE_REF, 0), (ino, _INODE_REF, _MAX64)
            ):
                _index, name_len = _INODE_REF_HDR.unpack_from(data)
                names.append(bytes(data[10 : 10 + name_len]))
                ino = parent
                break
            else:
                raise _Corrupt(f"directory {ino} of subvolume {tree} has no parent reference")
        raise _Corrupt(f"directory {ino} of subvolume {tree} nests too deep")

    # -- Filesystem API --------------------------------------------------------------------------

    def root(self) -> object:
        """The root directory of this view's subvolume."""
        return BtrfsHandle(self._subvol, _FIRST_FREE_OBJECTID)

    def stat(self, handle: object) -> Entry:
        """Metadata of the inode, as ``lstat``/``listxattr``/``readlink`` show it."""
        return self._on_handle(self._stat, handle)

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        """``(name, handle)`` of a directory's entries (DIR_INDEX order), without . and ..;
        entries of nested subvolumes lead into their trees."""
        return iter(self._on_handle(self._listdir, handle))

    def open(self, handle: object) -> BinaryIO:
        """A seekable stream over the content of a regular file (or a symlink's target)."""
        return self._on_handle(self._open, handle)

    def content_pieces(self, handle: object) -> tuple[int, list[Piece]] | None:
        """A regular file whose plain (uncompressed, not inline) extents cover it without a
        gap: ``(token, [(logical address, length), …])``; the token is the subvolume and inode
        (``tree << 64 | inode``)."""
        return self._on_handle(self._content_pieces, handle)

    def read_piece(self, token: int, offset: int, length: int) -> bytes:
        """*length* bytes at logical address *offset*, a piece of the content of the file that
        *token* names."""
        try:
            return self._core.read_logical(offset, length)
        except Ova2imgError:
            raise
        except _DECODE_ERRORS as exc:
            tree, ino = divmod(token, 1 << 64)
            what = self._what(BtrfsHandle(tree, ino))
            raise FilesystemError(f"{what}: {exc}", obj=self._name) from exc

    def read_content(self, handle: object) -> bytes | None:
        """A regular file without holes: its content straight from its extents (inline and
        compressed ones too), without a stream object."""
        return self._on_handle(self._read_content, handle)

    def data_runs(self, handle: object) -> list[DataRun] | None:
        """Byte ranges of a file that hold data (regular, compressed and inline extents),
        merged and clipped to the size; holes and preallocated extents are not data."""
        return self._on_handle(self._data_runs, handle)

    # -- internals -------------------------------------------------------------------------------

    def _handle(self, handle: object) -> BtrfsHandle:
        if not isinstance(handle, BtrfsHandle):
            raise FilesystemError(f"not a btrfs handle: {handle!r}", obj=self._name)
        return handle

    @staticmethod
    def _what(h: BtrfsHandle) -> str:
        return f"subvolume {h.tree} inode {h.ino}"

    def _on_handle(self, func: Callable[[BtrfsHandle], _T], handle: object) -> _T:
        """``func(handle)``, a decoding failure raised as :class:`FilesystemError` naming the
        subvolume and inode."""
        h = handle if type(handle) is BtrfsHandle else self._handle(handle)
        return decode_guarded(func, h, _DECODE_ERRORS, self._what, self._name)

    def _wrap(self, func: Callable[[], _T], context: str) -> _T:
        try:
            return func()
        except Ova2imgError:
            raise
        except _DECODE_ERRORS as exc:
            raise FilesystemError(f"{context}: {exc}", obj=self._name) from exc

    def _stat(self, h: BtrfsHandle) -> Entry:
        core = self._core
        if h.stub_parent:
            # new_simple_dir() (fs/btrfs/inode.c): a read-only empty directory, inode 2, mode
            # 0755, owner and atime of the directory holding it, no xattrs. Its mtime/ctime are
            # the time of the lookup; we use the parent's, which is at least deterministic.
            parent = core.inode(h.tree, h.stub_parent)
            return Entry(
                type=EntryType.DIR,
                mode=0o755,
                uid=parent.uid,
                gid=parent.gid,
                size=0,
                mtime_ns=parent.mtime_ns,
                atime_ns=parent.atime_ns,
                ctime_ns=parent.ctime_ns,
                nlink=1,
                inode=(h.ino << _INO_BITS) | _EMPTY_SUBVOL_DIR_OBJECTID,
            )
        ino = core.inode(h.tree, h.ino)
        etype = EntryType.from_mode(ino.mode)
        if etype is None:
            raise _Corrupt(f"invalid file type in mode {ino.mode:#o}")
        entry = Entry(
            type=etype,
            mode=ino.mode & 0o7777,
            uid=ino.uid,
            gid=ino.gid,
            size=ino.size,
            mtime_ns=ino.mtime_ns,
            atime_ns=ino.atime_ns,
            ctime_ns=ino.ctime_ns,
            nlink=ino.nlink,
            inode=_inode_number(h.tree, h.ino),
        )
        if etype is EntryType.CHAR or etype is EntryType.BLOCK:
            # btrfs_read_locked_inode → init_special_inode(inode, mode, rdev): the le64 is the
            # kernel's internal dev_t (MKDEV: major << 20 | minor) truncated to 32 bits.
            dev = ino.rdev & 0xFFFFFFFF
            entry.rdev_major, entry.rdev_minor = dev >> 20, dev & 0xFFFFF
        elif etype is EntryType.SYMLINK:
            with self._open(h) as fh:
                entry.link_target = bytes(fh.read())
            if len(entry.link_target) != ino.size:
                raise _Corrupt(f"symlink target of {len(entry.link_target)} of {ino.size} bytes")
        entry.xattrs = core.xattrs(h.tree, h.ino)
        return entry

    def _listdir(self, h: BtrfsHandle) -> list[tuple[bytes, object]]:
        if h.stub_parent:
            return []
        core = self._core
        ino = core.inode(h.tree, h.ino)
        if ino.mode & 0o170000 != _stat.S_IFDIR:
            raise _Corrupt(f"not a directory (mode {ino.mode:#o})")
        out: list[tuple[bytes, object]] = []
        root = core.tree_root(h.tree)
        # DIR_INDEX items (one entry each, offset = index ≥ 2), as btrfs_real_readdir() reads.
        for _key, data in core.items(root, (h.ino, _DIR_INDEX, 2), (h.ino, _DIR_INDEX, _MAX64)):
            for (oid, typ, _off), _ftype, name, _value in _dir_items(data):
                if typ == _INODE_ITEM:
                    out.append((name, BtrfsHandle(h.tree, oid)))
                elif typ == _ROOT_ITEM:
                    # A nested subvolume. btrfs_lookup_dentry → fixup_tree_root_location():
                    # only a ROOT_REF from this tree for this entry leads into it; otherwise
                    # (a snapshot copied the entry of a subvolume it does not own) the kernel
                    # shows an empty placeholder directory.
                    if core.has_root_ref(h.tree, oid, h.ino, name):
                        out.append((name, BtrfsHandle(oid, _FIRST_FREE_OBJECTID)))
                    else:
                        out.append((name, BtrfsHandle(h.tree, oid, stub_parent=h.ino)))
                else:
                    raise _Corrupt(f"directory entry {name!r} points at key type {typ}")
        return out

    def _open(self, h: BtrfsHandle) -> BinaryIO:
        if h.stub_parent:
            raise _Corrupt("a subvolume placeholder has no data")
        core = self._core
        ino = core.inode(h.tree, h.ino)
        fmt = ino.mode & 0o170000
        if fmt not in (_stat.S_IFREG, _stat.S_IFLNK):
            raise _Corrupt(f"mode {ino.mode:#o} has no data to open")
        stream: BinaryIO = _ExtentStream(core, core.extents(h.tree, h.ino), ino.size)
        return stream

    def _read_content(self, h: BtrfsHandle) -> bytes | None:
        if h.stub_parent:
            return None
        core = self._core
        ino = core.inode(h.tree, h.ino)
        if ino.mode & 0o170000 != _stat.S_IFREG:
            return None
        size = ino.size
        extents = core.extents(h.tree, h.ino)
        pos = 0
        for ext in extents:
            if pos >= size:
                break
            if ext.kind == "zero" or ext.file_offset > pos:
                return None  # a hole or a preallocated stretch: a sparse member, maybe
            pos = max(pos, ext.file_offset + ext.length)
        if pos < size:
            return None  # ends in a hole
        return _read_extents(core, extents, [e.file_offset for e in extents], size, 0, size)

    def _content_pieces(self, h: BtrfsHandle) -> tuple[int, list[Piece]] | None:
        if h.stub_parent:
            return None
        core = self._core
        ino = core.inode(h.tree, h.ino)
        size = ino.size
        if ino.mode & 0o170000 != _stat.S_IFREG or not size:
            return None
        pieces: list[Piece] = []
        done = 0  # bytes of the file covered so far
        for ext in core.extents(h.tree, h.ino):
            if ext.kind != "reg" or ext.compression or ext.file_offset != done:
                return None  # holes, inline or compressed data: read_content() or open()
            n = min(ext.length, size - done)
            pieces.append((ext.disk_bytenr + ext.extent_offset, n))
            done += n
            if done >= size:
                return h.tree << 64 | h.ino, pieces
        return None  # ends in a hole

    def _data_runs(self, h: BtrfsHandle) -> list[DataRun] | None:
        if h.stub_parent:
            return None
        ino = self._core.inode(h.tree, h.ino)
        if ino.mode & 0o170000 != _stat.S_IFREG:
            return None
        runs: list[DataRun] = []
        for ext in self._core.extents(h.tree, h.ino):
            if ext.kind == "zero":
                continue
            start, end = ext.file_offset, ext.file_offset + ext.length
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((start, end - start))
        return runs


def _inode_number(tree: int, ino: int) -> int:
    """Unique within a view: inode numbers repeat across subvolumes (each starts at 256)."""
    if ino >> _INO_BITS:
        return (tree << 64) | ino | (1 << 127)  # never met in practice; still unique
    return (tree << _INO_BITS) | ino


_CHUNK = struct.Struct("<QQQQIIIHH")  # struct btrfs_chunk, 48 bytes; then num_stripes stripes
_STRIPE = struct.Struct("<QQ16s")  # struct btrfs_stripe: devid, offset, dev_uuid
_DISK_KEY = struct.Struct("<QBQ")
_CHUNK_ITEM_KEY = 228


def _bad_chunk_tree(stream: BinaryIO) -> str | None:
    """What is wrong with the chunk tree or the root tree, checked before dissect walks them
    (both, when it opens a filesystem), or ``None``.

    dissect's B-tree search loops forever on a node with no items and descends forever into a
    node that points at itself. So every node of those two trees is checked here first, as the
    kernel does (fs/btrfs/disk-io.c ``btrfs_validate_extent_buffer``, tree-checker.c): its
    header names its own address and the filesystem, levels go down by one, the items fit the
    block, no block is visited twice. The chunk tree lives in SYSTEM chunks, which the
    superblock's ``sys_chunk_array`` maps; the root tree in chunks the chunk tree maps.
    """
    stream.seek(_SB_OFFSET)
    sb = stream.read(4096)
    if len(sb) < 0x32B + 2048:
        return "superblock is truncated"
    fsid = sb[0x20:0x30]
    (root, chunk_root) = struct.unpack_from("<QQ", sb, 0x50)
    (nodesize,) = struct.unpack_from("<I", sb, 0x94)
    (array_size,) = struct.unpack_from("<I", sb, 0xA0)
    root_level, chunk_level = sb[0xC6], sb[0xC7]
    if sb[0xBC] & 0x400:  # INCOMPAT_METADATA_UUID: tree blocks carry metadata_uuid
        fsid = sb[0x30B:0x31B]
    if not 4096 <= nodesize <= 65536 or nodesize & (nodesize - 1):
        return f"node size {nodesize}"
    if array_size > 2048 or chunk_level > 7 or root_level > 7:
        return f"sys_chunk_array of {array_size} bytes, tree levels {chunk_level}/{root_level}"
    size = stream.seek(0, io.SEEK_END)
    # logical start -> (length, physical) of each chunk, from stripe 0 (one device)
    maps: list[tuple[int, int, int]] = []

    def add_chunk(data: bytes, pos: int, end: int, logical: int) -> int | str:
        if pos + _CHUNK.size > end:
            return "a chunk item is truncated"
        length, _owner, _slen, _type, _a, _w, _ss, stripes, _sub = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        if not stripes or pos + stripes * _STRIPE.size > end:
            return f"a chunk item with {stripes} stripes"
        _devid, physical, _uuid = _STRIPE.unpack_from(data, pos)
        maps.append((logical, length, physical))
        return int(pos + stripes * _STRIPE.size)

    array = sb[0x32B : 0x32B + array_size]
    pos = 0
    while pos < array_size:
        if pos + _DISK_KEY.size > array_size:
            return "sys_chunk_array ends inside an entry"
        _oid, ktype, logical = _DISK_KEY.unpack_from(array, pos)
        if ktype != _CHUNK_ITEM_KEY:
            return f"sys_chunk_array entry of type {ktype}"
        got = add_chunk(array, pos + _DISK_KEY.size, array_size, logical)
        if isinstance(got, str):
            return got
        pos = got

    def physical_of(logical: int) -> int | None:
        for start, length, physical in maps:
            if start <= logical and logical + nodesize <= start + length:
                return physical + logical - start
        return None

    seen: set[int] = set()

    def walk(top: int, top_level: int, chunks: bool) -> str | None:
        todo = [(top, top_level)]
        while todo:
            address, want_level = todo.pop()
            if address in seen or len(seen) > 4096:
                return f"tree block {address:#x} is reached twice (a loop), or the tree is absurd"
            seen.add(address)
            at = physical_of(address)
            if at is None or at + nodesize > size:
                return f"tree block {address:#x} is not in a chunk on this volume"
            stream.seek(at)
            raw = stream.read(nodesize)
            _c, bfsid, bytenr, _f, _ctu, _gen, _own, nritems, level = _HEADER.unpack_from(raw)
            if bytenr != address or bfsid != fsid or level != want_level:
                return (
                    f"tree block {address:#x} has a foreign header (bytenr {bytenr:#x}, level "
                    f"{level}, expected {want_level})"
                )
            per = _KEY_PTR.size if level else _ITEM.size
            if not nritems or _HEADER.size + nritems * per > nodesize:
                return f"tree block {address:#x} holds {nritems} items"
            body = raw[_HEADER.size : _HEADER.size + nritems * per]
            if level:
                todo += [(ptr, level - 1) for _o, _t, _k, ptr, _g in _KEY_PTR.iter_unpack(body)]
                continue
            for _o, ktype, koff, doff, dsize in _ITEM.iter_unpack(body):
                if _HEADER.size + doff + dsize > nodesize:
                    return f"tree leaf {address:#x}: an item's data overruns the block"
                if chunks and ktype == _CHUNK_ITEM_KEY:
                    d = _HEADER.size + doff
                    got = add_chunk(raw, d, d + dsize, koff)
                    if isinstance(got, str):
                        return f"tree leaf {address:#x}: {got}"
        return None

    return walk(chunk_root, chunk_level, True) or walk(root, root_level, False)
