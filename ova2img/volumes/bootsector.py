"""Recognise a filesystem boot sector (FAT, NTFS, exFAT) that carries the ``0x55AA`` signature.

A FAT or NTFS volume written straight onto a disk (no partition table) ends its first sector
with ``0x55AA`` exactly like an MBR does. Like libblkid (``partitions/dos.c`` asks
``blkid_probe_is_vfat()``/``_is_ntfs()``/``_is_exfat()`` before it believes in a DOS table), the
volume layer checks for those boot sectors first. The FAT check is libblkid's
``fat_valid_superblock()`` (``superblocks/vfat.c``), so :func:`ova2img.filesystems.probe` reuses
it rather than keeping a second copy.
"""

from __future__ import annotations

import struct

# libblkid superblocks/vfat.c: the magic strings of a FAT boot sector and where they sit.
_FAT_MAGICS: tuple[tuple[int, bytes], ...] = (
    (0x52, b"MSWIN"),
    (0x52, b"FAT32   "),
    (0x36, b"MSDOS"),
    (0x36, b"FAT16   "),
    (0x36, b"FAT12   "),
    (0x36, b"FAT     "),
)
_FAT12_MAX = 0xFF4
_FAT16_MAX = 0xFFF4
_FAT32_MAX = 0x0FFFFFF6


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def fat_magic(sector: bytes) -> bytes | None:
    """The FAT magic blkid would match in *sector* (the first 512 bytes of a volume), or
    ``None``: a magic string, else a jump instruction (``0xEB``/``0xE9``), else ``0x55AA``
    (libblkid ``vfat`` idinfo, in its order)."""
    if len(sector) < 512:
        return None
    for offset, magic in _FAT_MAGICS:
        if sector[offset : offset + len(magic)] == magic:
            return magic
    if sector[0] in (0xEB, 0xE9):
        return sector[:1]
    if sector[510:512] == b"\x55\xaa":
        return b"\x55\xaa"
    return None


def is_fat_boot_sector(sector: bytes) -> bool:
    """Whether *sector* is a valid FAT12/16/32 boot sector, checked as libblkid's
    ``fat_valid_superblock()`` does (not merely a ``0x55AA`` signature).

    Args:
        sector: at least the first 512 bytes of the volume.
    """
    magic = fat_magic(sector)
    if magic is None:
        return False
    if len(magic) <= 2:
        # A magic-less FAT must still carry 0x55AA ("old floppies have a valid MBR
        # signature"), and JFS/HPFS put a FAT-like pseudo boot sector in front of themselves.
        if sector[510:512] != b"\x55\xaa":
            return False
        if sector[0x36:0x3E] in (b"JFS     ", b"HPFS    "):
            return False
    # BIOS parameter block (Microsoft FAT specification, "BPB structure").
    bpb: tuple[int, ...] = struct.unpack_from("<HBHBHHBH", sector, 11)
    sector_size, cluster_size, reserved, fats, dir_entries, sectors16, media, fat16_length = bpb
    total_sectors32: int = struct.unpack_from("<I", sector, 32)[0]
    fat32_length: int = struct.unpack_from("<I", sector, 36)[0]
    if not fats or not reserved:
        return False
    if not (media >= 0xF8 or media == 0xF0):
        return False
    if not _is_power_of_2(cluster_size):
        return False
    if not _is_power_of_2(sector_size) or not 512 <= sector_size <= 4096:
        return False
    sect_count = sectors16 or total_sectors32
    fat_length = fat16_length or fat32_length
    fat_size = fat_length * fats
    dir_size = (dir_entries * 32 + sector_size - 1) // sector_size
    cluster_count = (sect_count - (reserved + fat_size + dir_size)) // cluster_size
    if not fat16_length and fat32_length:
        max_count = _FAT32_MAX
    else:
        max_count = _FAT16_MAX if cluster_count > _FAT12_MAX else _FAT12_MAX
    return cluster_count <= max_count


def is_ntfs_boot_sector(sector: bytes) -> bool:
    """Whether *sector* is an NTFS boot sector (OEM id ``NTFS    `` at 3 and a sane BPB, as
    libblkid ``superblocks/ntfs.c`` checks)."""
    if len(sector) < 512 or sector[3:11] != b"NTFS    ":
        return False
    sector_size = struct.unpack_from("<H", sector, 11)[0]
    sectors_per_cluster = sector[13]
    if not _is_power_of_2(sector_size) or not 256 <= sector_size <= 4096:
        return False
    # Since Windows 8 a cluster > 128 sectors is stored as a negative power of two.
    if sectors_per_cluster > 0x80:
        sectors_per_cluster = 1 << (256 - sectors_per_cluster)
    if not _is_power_of_2(sectors_per_cluster):
        return False
    # The BPB fields NTFS leaves zero (reserved sectors, FATs, root entries, small sector count,
    # sectors per FAT) must be zero.
    unused: tuple[int, ...] = struct.unpack_from("<HBHHxH", sector, 14)
    return unused == (0, 0, 0, 0, 0)


def is_exfat_boot_sector(sector: bytes) -> bool:
    """Whether *sector* is an exFAT boot sector (``EXFAT   `` at 3, exFAT spec §3.1.2)."""
    return len(sector) >= 512 and sector[3:11] == b"EXFAT   "


def is_filesystem_boot_sector(sector: bytes) -> str | None:
    """The kind of filesystem boot sector *sector* is (``vfat``, ``ntfs``, ``exfat``,
    ``BitLocker``), or ``None`` when it is none of them (and may be an MBR)."""
    if is_ntfs_boot_sector(sector):
        return "ntfs"
    if is_exfat_boot_sector(sector):
        return "exfat"
    if sector[3:11] == b"-FVE-FS-":
        return "BitLocker"
    if is_fat_boot_sector(sector):
        return "vfat"
    return None
