"""Recognise a volume's content by its magic bytes, and open the filesystems we read.

:func:`probe` names what a volume holds with the ``TYPE`` that ``blkid -p`` (libblkid 2.38,
``libblkid/src/superblocks/``) prints, checking candidates in libblkid's order
(``superblocks.c``, ``idinfos[]``) and stopping at the first match:

1. RAID and cache members, whose superblocks may sit at the *end* of the device so that a
   filesystem also shows at offset 0 (md 0.90 and 1.0 members hold a plain filesystem):
   ``linux_raid_member`` (0.90, 1.0, 1.1, 1.2), ``bcache``;
2. volume managers and encryption: ``LVM2_member``, ``crypto_LUKS``, ``BitLocker``;
3. ``vfat`` (before the others: FAT has no fixed magic), ``swsuspend``, ``swap``;
4. filesystems: ``xfs``, ``ext4dev``/``ext4``/``ext3``/``ext2``/``jbd``, ``iso9660``,
   ``zfs_member``, ``hfsplus``, ``ntfs``, ``ReFS``, ``squashfs``/``squashfs3``, ``btrfs``,
   ``VMFS_volume_member``, ``VMFS``, ``exfat``, ``apfs``;
5. otherwise ``unknown``.

Where libblkid validates more than a magic (FAT's BPB, XFS's geometry, LVM's label CRC, md's
version fields, ZFS's uberblock count), so do we, so that a stale signature in a reused
partition is not taken for content.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import BinaryIO

from ..errors import FilesystemError, UnsupportedError
from ..volumes.bootsector import is_exfat_boot_sector, is_fat_boot_sector, is_ntfs_boot_sector
from .base import Filesystem

#: what :func:`probe` may return for which ova2img has a reader
EXT_KINDS = frozenset({"ext2", "ext3", "ext4", "ext4dev"})
#: kinds that are not filesystems at all: callers skip them (swap, LVM PVs, journals, …)
NOT_FILESYSTEMS = frozenset({"swap", "swsuspend", "LVM2_member", "jbd", "bcache"})

_Read = Callable[[int, int], bytes]


def _reader(stream: BinaryIO) -> tuple[_Read, int]:
    try:
        size = stream.seek(0, io.SEEK_END)
    except (OSError, ValueError) as exc:
        raise FilesystemError(f"cannot size the volume: {exc}") from exc

    def read(offset: int, length: int) -> bytes:
        if offset < 0 or offset >= size:
            return b""
        try:
            stream.seek(offset)
            data = stream.read(min(length, size - offset))
        except (OSError, ValueError, EOFError) as exc:
            raise FilesystemError(f"cannot read {length} bytes: {exc}", offset=offset) from exc
        return data or b""

    return read, size


def _u16le(b: bytes, o: int) -> int:
    v: int = struct.unpack_from("<H", b, o)[0]
    return v


def _u32le(b: bytes, o: int) -> int:
    v: int = struct.unpack_from("<I", b, o)[0]
    return v


def _u64le(b: bytes, o: int) -> int:
    v: int = struct.unpack_from("<Q", b, o)[0]
    return v


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# --- RAID ---------------------------------------------------------------------------------

MD_MAGIC = 0xA92B4EFC
MD_RESERVED = 0x10000  # md 0.90: the superblock lives in the last 64 KiB-aligned 64 KiB


def _md(read: _Read, size: int) -> bool:
    """md superblocks (libblkid ``superblocks/linux_raid.c``): 0.90 and 1.0 at the end, 1.1
    at 0, 1.2 at 4 KiB; 1.x records its own offset in sectors (``super_offset``)."""
    if size > MD_RESERVED:
        off = (size & ~(MD_RESERVED - 1)) - MD_RESERVED
        sb = read(off, 8)
        if len(sb) == 8:
            for fmt in ("<II", ">II"):  # 0.90 is written in host byte order
                magic, major = struct.unpack(fmt, sb)
                if magic == MD_MAGIC and major == 0:
                    return True
        if _md1(read, (size & ~(0x1000 - 1)) - 0x2000):
            return True
    return _md1(read, 0) or _md1(read, 0x1000)


def _md1(read: _Read, off: int) -> bool:
    sb = read(off, 136)
    return (
        len(sb) == 136
        and _u32le(sb, 0) == MD_MAGIC
        and _u32le(sb, 4) == 1
        and _u64le(sb, 128) == off // 512
    )


BCACHE_MAGIC = bytes.fromhex("c68573f64e1a45ca8265f57f48ba6d81")


def _bcache(read: _Read, size: int) -> bool:
    # bcache-tools: struct cache_sb at 4 KiB, 16-byte magic at offset 24.
    return read(4096 + 24, 16) == BCACHE_MAGIC


# --- volume managers, encryption ------------------------------------------------------------


def _lvm_crc(data: bytes) -> int:
    # LVM2 lib/misc/crc.c: CRC-32 (reflected 0xEDB88320), initial 0xF597A6CF, no final XOR;
    # zlib inverts on the way in and out, so undo both.
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _lvm2(read: _Read, size: int) -> bool:
    """LVM2 label (LVM2 ``lib/label/label.h``): ``LABELONE`` at the start of one of the first
    four sectors, ``sector_xl`` naming that sector, a CRC over bytes 20..511, ``LVM2 001``."""
    head = read(0, 4 * 512)
    for sector in range(4):
        label = head[sector * 512 : (sector + 1) * 512]
        if len(label) < 512 or label[:8] != b"LABELONE":
            continue
        return (
            _u64le(label, 8) == sector
            and _lvm_crc(label[20:512]) == _u32le(label, 16)
            and label[24:32] == b"LVM2 001"
        )
    return False


LUKS2_SECONDARY = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000)


def _luks(read: _Read, size: int) -> bool:
    """LUKS1/LUKS2 (libblkid ``superblocks/luks.c``): ``LUKS\\xba\\xbe`` and version 1 or 2
    at 0; for LUKS2 a ``SKUL\\xba\\xbe`` secondary header at one of its fixed offsets also
    counts when the primary is damaged."""
    hdr = read(0, 8)
    if hdr[:6] == b"LUKS\xba\xbe" and hdr[6:8] in (b"\x00\x01", b"\x00\x02"):
        return True
    return any(read(off, 8) == b"SKUL\xba\xbe\x00\x02" for off in LUKS2_SECONDARY)


def _bitlocker(read: _Read, size: int) -> bool:
    # libblkid superblocks/bitlocker.c: Windows 7+ volumes carry "-FVE-FS-" as OEM id.
    return read(3, 8) == b"-FVE-FS-"


# --- vfat, swap -------------------------------------------------------------------------------


def _vfat(read: _Read, size: int) -> bool:
    return is_fat_boot_sector(read(0, 512))


SWAP_PAGES = (4096, 8192, 16384, 32768, 65536)  # libblkid swap.c: every page size Linux has


def _swap_kind(read: _Read, size: int) -> str | None:
    """``swap`` or ``swsuspend``: the signature is in the last 10 bytes of the first page
    (libblkid ``superblocks/swap.c``); ``SWAPSPACE2`` needs header version 1."""
    for page in SWAP_PAGES:
        tail = read(page - 10, 10)
        if tail == b"SWAPSPACE2":
            version = read(1024, 4)
            if len(version) == 4 and 1 in struct.unpack("<I", version) + struct.unpack(
                ">I", version
            ):
                return "swap"
        elif tail == b"SWAP-SPACE":
            return "swap"
        elif tail[:9] in (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND") or tail == b"LINHIB0001":
            return "swsuspend"
    return None


# --- filesystems ------------------------------------------------------------------------------


def _xfs(read: _Read, size: int) -> bool:
    """XFS superblock at 0 (``xfs_format.h`` ``struct xfs_sb``, big-endian) with the geometry
    checks of libblkid's ``xfs_verify_sb()``."""
    sb = read(0, 128)
    if len(sb) < 128 or sb[:4] != b"XFSB":
        return False
    blocksize = struct.unpack_from(">I", sb, 4)[0]
    agcount = struct.unpack_from(">I", sb, 88)[0]
    sectsize, inodesize = struct.unpack_from(">HH", sb, 102)
    blocklog, sectlog, inodelog = sb[120], sb[121], sb[122]
    return (
        agcount > 0
        and _is_pow2(blocksize)
        and 512 <= blocksize <= 65536
        and _is_pow2(sectsize)
        and 512 <= sectsize <= 32768
        and _is_pow2(inodesize)
        and 256 <= inodesize <= 2048
        and 1 << blocklog == blocksize
        and 1 << sectlog == sectsize
        and 1 << inodelog == inodesize
    )


# ext2/3/4 feature bits (e2fsprogs lib/ext2fs/ext2_fs.h) and libblkid superblocks/ext.c's sets.
EXT_MAGIC = 0xEF53
EXT3_COMPAT_HAS_JOURNAL = 0x0004
EXT3_INCOMPAT_RECOVER = 0x0004
EXT3_INCOMPAT_JOURNAL_DEV = 0x0008
EXT2_INCOMPAT_FILETYPE = 0x0002
EXT2_INCOMPAT_META_BG = 0x0010
EXT2_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
EXT2_INCOMPAT_SUPP = EXT2_INCOMPAT_FILETYPE | EXT2_INCOMPAT_META_BG
EXT3_INCOMPAT_SUPP = EXT2_INCOMPAT_SUPP | EXT3_INCOMPAT_RECOVER
EXT2_FLAGS_TEST_FILESYS = 0x0004


def _ext_kind(read: _Read, size: int) -> str | None:
    """ext2/ext3/ext4/ext4dev/jbd as libblkid tells them apart (``superblocks/ext.c``):
    ``jbd`` is an external journal; ext2 has no journal and only ext2 features; ext3 has a
    journal and only ext3 features; anything else with the magic is ext4 (``ext4dev`` when
    the test-filesystem flag is set)."""
    sb = read(1024, 1024)
    if len(sb) < 1024 or _u16le(sb, 56) != EXT_MAGIC:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    # No superblock checksum check: libblkid 2.38 takes an ext4 whose metadata_csum does not
    # match (the ext reader then reports the damage instead of the volume going unnoticed).
    if incompat & EXT3_INCOMPAT_JOURNAL_DEV:
        return "jbd"
    has_journal = bool(compat & EXT3_COMPAT_HAS_JOURNAL)
    if not has_journal and not (ro_compat & ~EXT2_RO_COMPAT_SUPP or incompat & ~EXT2_INCOMPAT_SUPP):
        return "ext2"
    if has_journal and not (ro_compat & ~EXT2_RO_COMPAT_SUPP or incompat & ~EXT3_INCOMPAT_SUPP):
        return "ext3"
    if _u32le(sb, 0x160) & EXT2_FLAGS_TEST_FILESYS:
        return "ext4dev"
    return "ext4"


def _iso9660(read: _Read, size: int) -> bool:
    # ECMA-119 §8.1: volume descriptors from sector 16 (32 KiB), "CD001" at byte 1.
    return read(0x8001, 5) == b"CD001"


ZFS_UBERBLOCK_MAGIC = 0x00BAB10C
ZFS_LABEL = 256 * 1024
ZFS_WANT = 4  # libblkid zfs.c: at least 4 uberblocks for a positive match


def _zfs(read: _Read, size: int) -> bool:
    """ZFS vdev labels L0, L1 (start) and L2, L3 (end), 256 KiB each; their second half is
    an array of 1 KiB uberblocks starting with magic 0x00bab10c in either byte order."""
    if size < 4 * ZFS_LABEL:
        return False
    found = 0
    for label in (0, ZFS_LABEL, size - 2 * ZFS_LABEL, size - ZFS_LABEL):
        ring = read(label + 128 * 1024, 128 * 1024)
        for off in range(0, len(ring) - 7, 1024):
            raw = ring[off : off + 8]
            if ZFS_UBERBLOCK_MAGIC in (struct.unpack("<Q", raw)[0], struct.unpack(">Q", raw)[0]):
                found += 1
        if found >= ZFS_WANT:
            return True
    return False


def _hfsplus(read: _Read, size: int) -> bool:
    # Apple TN1150: volume header at 1024, signature "H+" (version 4) or "HX" (version 5).
    hdr = read(1024, 4)
    return hdr in (b"H+\x00\x04", b"HX\x00\x05")


def _ntfs(read: _Read, size: int) -> bool:
    return is_ntfs_boot_sector(read(0, 512))


def _refs(read: _Read, size: int) -> bool:
    # libblkid superblocks/refs.c: "ReFS" OEM id at 3 and the "FSRS" identifier at 16.
    head = read(0, 20)
    return head[3:11] == b"ReFS\x00\x00\x00\x00" and head[16:20] == b"FSRS"


def _squashfs_kind(read: _Read, size: int) -> str | None:
    # squashfs-tools squashfs_fs.h: "hsqs" (little-endian) at 0, s_major at 28.
    head = read(0, 30)
    if len(head) < 30:
        return None
    if head[:4] == b"hsqs":
        return "squashfs" if _u16le(head, 28) >= 4 else "squashfs3"
    if head[:4] == b"sqsh":  # big-endian: only squashfs 3 and older were ever written so
        return "squashfs3"
    return None


def _btrfs(read: _Read, size: int) -> bool:
    # btrfs superblock at 64 KiB, magic at +0x40.
    return read(0x10040, 8) == b"_BHRfS_M"


def _vmfs_volume(read: _Read, size: int) -> bool:
    # libblkid superblocks/vmfs.c: LVM header magic 0xc001d00d at 1 MiB.
    return read(0x100000, 4) == b"\x0d\xd0\x01\xc0"


def _vmfs(read: _Read, size: int) -> bool:
    # libblkid superblocks/vmfs.c: FS3 superblock magic 0x2fabf15e at 0x1300000.
    return read(0x1300000, 4) == b"\x5e\xf1\xab\x2f"


def _exfat(read: _Read, size: int) -> bool:
    return is_exfat_boot_sector(read(0, 512))


def _apfs(read: _Read, size: int) -> bool:
    # Apple File System Reference: container superblock, "NXSB" at 32 of block 0.
    return read(32, 4) == b"NXSB"


def _named(kind: str, check: Callable[[_Read, int], bool]) -> Callable[[_Read, int], str | None]:
    def run(read: _Read, size: int) -> str | None:
        return kind if check(read, size) else None

    return run


#: libblkid's probing order (superblocks.c idinfos[]), restricted to what we recognise
_PROBES: tuple[Callable[[_Read, int], str | None], ...] = (
    _named("linux_raid_member", _md),
    _named("bcache", _bcache),
    _named("LVM2_member", _lvm2),
    _named("crypto_LUKS", _luks),
    _named("BitLocker", _bitlocker),
    _named("vfat", _vfat),
    _swap_kind,
    _named("xfs", _xfs),
    _ext_kind,
    _named("iso9660", _iso9660),
    _named("zfs_member", _zfs),
    _named("hfsplus", _hfsplus),
    _named("ntfs", _ntfs),
    _named("ReFS", _refs),
    _squashfs_kind,
    _named("btrfs", _btrfs),
    _named("VMFS_volume_member", _vmfs_volume),
    _named("VMFS", _vmfs),
    _named("exfat", _exfat),
    _named("apfs", _apfs),
)


def probe(stream: BinaryIO) -> str:
    """Name what a volume holds, as ``blkid -p -o value -s TYPE`` would.

    Returns one of ``ext2``, ``ext3``, ``ext4``, ``ext4dev``, ``jbd``, ``xfs``, ``btrfs``,
    ``vfat``, ``swap``, ``swsuspend``, ``LVM2_member``, ``crypto_LUKS``, ``BitLocker``,
    ``linux_raid_member``, ``zfs_member``, ``bcache``, ``ntfs``, ``exfat``, ``ReFS``,
    ``iso9660``, ``squashfs``, ``squashfs3``, ``hfsplus``, ``apfs``, ``VMFS_volume_member``,
    ``VMFS`` — blkid's ``TYPE`` names — or ``unknown``. The order is libblkid's (see the
    module docstring): RAID members first, because an md 0.90/1.0 member also shows the
    filesystem it mirrors at offset 0.

    Raises:
        FilesystemError: the stream cannot be read.
    """
    read, size = _reader(stream)
    for check in _PROBES:
        kind = check(read, size)
        if kind is not None:
            return kind
    return "unknown"


_REFUSED = {
    "crypto_LUKS": "holds LUKS encryption; ova2img cannot read encrypted volumes — decrypt "
    "the disk first",
    "BitLocker": "holds BitLocker encryption; ova2img cannot read encrypted volumes — decrypt "
    "the disk first",
    "linux_raid_member": "is a Linux md-raid member; ova2img cannot assemble md arrays — "
    "copy the assembled array into a plain disk image first",
    "zfs_member": "is a ZFS pool member; ova2img cannot read ZFS",
    "VMFS_volume_member": "is a VMFS datastore extent, not a guest filesystem — give "
    "ova2img the virtual disks stored in it",
    "VMFS": "is a VMFS datastore, not a guest filesystem — give ova2img the virtual disks "
    "stored in it",
}


def open_filesystem(stream: BinaryIO, kind: str, *, name: str = "") -> Filesystem:
    """Open a filesystem of a kind :func:`probe` returned.

    ext2/3/4, XFS, btrfs and vfat are read by the adapters in this package; every other kind is
    refused with a one-line :class:`UnsupportedError` naming the volume and what it holds.
    Swap, LVM2 PVs, external journals and bcache devices are not filesystems: callers skip
    them, and asking to open one is refused too.

    Raises:
        UnsupportedError: a kind ova2img cannot read (naming it); FilesystemError: malformed.
    """
    who = name or "the volume"
    if kind in EXT_KINDS:
        from .ext import ExtFilesystem  # lazy: dissect.extfs only when there is ext to read

        return ExtFilesystem(stream, name=name)
    if kind == "btrfs":
        from .btrfs import BtrfsFilesystem  # lazy: dissect.btrfs only when there is btrfs

        return BtrfsFilesystem(stream, name=name)
    if kind == "xfs":
        from .xfs import XfsFilesystem  # lazy: dissect.xfs only when there is XFS to read

        return XfsFilesystem(stream, name=name)
    if kind == "vfat":
        from .vfat import VfatFilesystem  # lazy: dissect.fat only when there is FAT to read

        return VfatFilesystem(stream, name=name)
    if kind in _REFUSED:
        raise UnsupportedError(f"{who} {_REFUSED[kind]}")
    if kind in NOT_FILESYSTEMS:
        raise UnsupportedError(f"{who} holds {kind}, which is not a filesystem: nothing to open")
    if kind == "unknown":
        raise UnsupportedError(f"{who} holds no filesystem signature ova2img knows")
    raise UnsupportedError(f"{who} holds a {kind} filesystem; ova2img cannot read {kind}")
