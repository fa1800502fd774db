"""MBR (DOS) partition tables: primaries, the extended container and its EBR chain.

The on-disk structures come from dissect.volume (``c_mbr``); the walk is ours, because
``dissect.volume.disk.schemes.mbr.MBR`` numbers logical partitions after the slot of the EBR
entry (3, 4, … instead of Linux's 5, 6, …) and follows EBR chains without loop detection.
Semantics follow Linux ``block/partitions/msdos.c`` (``msdos_partition``, ``parse_extended``)
and libblkid ``partitions/dos.c``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dissect.volume.disk.schemes.mbr import c_mbr

from ..errors import VolumeError
from .bootsector import is_filesystem_boot_sector

log = logging.getLogger("ova2img.volumes")

SECTOR = 512
#: ``read(offset, length) -> bytes`` on the disk (short at the disk's end)
Reader = Callable[[int, int], bytes]
#: partition types of an extended container (DOS 0x05, Win98 LBA 0x0f, Linux 0x85),
#: as Linux's ``is_extended_partition()``
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
#: the type of a GPT protective (or hybrid) MBR entry
GPT_PROTECTIVE = 0xEE
#: more logical partitions than this is a corrupt chain (Linux stops at 256 minors)
MAX_LOGICAL = 128


@dataclass(frozen=True)
class MBRPartition:
    """One data partition of a DOS partition table, in sectors of 512 bytes.

    Attributes:
        number: Linux number (primaries 1-4 by slot, logicals 5, 6, … in chain order).
        start: first sector, absolute.
        sectors: length in sectors.
        type: the partition type byte.
        bootable: the boot flag was 0x80.
        logical: it lives in the extended container.
    """

    number: int
    start: int
    sectors: int
    type: int
    bootable: bool
    logical: bool


@dataclass(frozen=True)
class MBRTable:
    """A parsed DOS partition table.

    Attributes:
        signature: the 32-bit disk signature at offset 440 (blkid's ``PTUUID``).
        partitions: the data partitions in Linux numbering order (no extended container).
        extended: ``(start, sectors)`` of the extended container, or ``None``.
        protective: the table has a GPT protective (0xEE) entry.
    """

    signature: int
    partitions: list[MBRPartition]
    extended: tuple[int, int] | None
    protective: bool


def _parse_sector(data: bytes) -> Any:
    return c_mbr.mbr_s(data)


def looks_like_mbr(sector: bytes, disk_sectors: int) -> str | None:
    """Why *sector* (the disk's first 512 bytes) is not a DOS partition table, or ``None`` if
    it is one.

    A FAT/NTFS boot sector also ends in ``0x55AA``; like libblkid (``dos.c``), a valid
    filesystem boot sector wins, then every entry's boot flag must be 0x00 or 0x80 (Linux
    ``msdos.c`` rejects the table otherwise), and an empty table is no table.
    """
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return "no 0x55AA signature at offset 510"
    kind = is_filesystem_boot_sector(sector)
    if kind is not None:
        return f"sector 0 is a {kind} boot sector"
    mbr = _parse_sector(sector[:SECTOR])
    used = 0
    for slot, entry in enumerate(mbr.part, 1):
        if entry.bootable not in (0x00, 0x80):
            return f"entry {slot} has boot flag {entry.bootable:#04x} (expected 0x00 or 0x80)"
        if entry.type != 0 and entry.sector_size != 0:
            used += 1
            if entry.sector_ofs >= disk_sectors and entry.type != GPT_PROTECTIVE:
                return (
                    f"entry {slot} starts at sector {entry.sector_ofs}, past the disk's "
                    f"{disk_sectors} sectors"
                )
    if used == 0:
        return "every partition entry is empty"
    return None


def read_mbr(read: Reader, disk_sectors: int, disk: str) -> MBRTable:
    """Parse the DOS partition table at sector 0 and walk the EBR chain.

    Args:
        read: ``read(offset, length) -> bytes`` on the disk.
        disk_sectors: the disk's size in sectors.
        disk: the disk's name for messages.

    Raises:
        VolumeError: a loop or an over-long EBR chain, an EBR without signature, a logical
            partition outside its extended container, two extended containers.
    """
    mbr = _parse_sector(read(0, SECTOR))
    partitions: list[MBRPartition] = []
    extended: tuple[int, int] | None = None
    protective = False
    for slot, entry in enumerate(mbr.part, 1):
        # Empty slots: type 0 or no sectors (libfdisk shows neither; Linux skips size 0).
        if entry.sector_size == 0 or entry.type == 0:
            continue
        if entry.type == GPT_PROTECTIVE:
            protective = True
        if entry.sector_ofs + entry.sector_size > disk_sectors and entry.type != GPT_PROTECTIVE:
            # Checked before the EBR chain is walked, so a truncated disk is named as such.
            what = "the extended partition" if entry.type in EXTENDED_TYPES else "partition"
            raise VolumeError(
                f"{disk}: {what} {slot} (bytes {entry.sector_ofs * SECTOR}.."
                f"{(entry.sector_ofs + entry.sector_size) * SECTOR - 1}) extends past the end "
                f"of the disk ({disk_sectors * SECTOR} bytes)",
                offset=entry.sector_ofs * SECTOR,
            )
        if entry.type in EXTENDED_TYPES:
            if extended is not None:
                raise VolumeError(
                    f"{disk}: a second extended partition in slot {slot} (at sector "
                    f"{entry.sector_ofs}); only one is allowed",
                    offset=446 + 16 * (slot - 1),
                )
            extended = (entry.sector_ofs, entry.sector_size)
            continue
        partitions.append(
            MBRPartition(
                number=slot,
                start=entry.sector_ofs,
                sectors=entry.sector_size,
                type=entry.type,
                bootable=entry.bootable == 0x80,
                logical=False,
            )
        )
    if extended is not None:
        partitions.extend(_walk_ebr_chain(read, extended, disk))
    return MBRTable(
        signature=mbr.vol_no, partitions=partitions, extended=extended, protective=protective
    )


def _walk_ebr_chain(read: Reader, extended: tuple[int, int], disk: str) -> list[MBRPartition]:
    """The logical partitions of the extended container, numbered 5, 6, … in chain order.

    Each EBR holds one data entry (start relative to this EBR) and one link entry (start
    relative to the extended container's first sector); Linux ``parse_extended()`` also takes
    extra data entries in slots 3-4 when they fit in the container.
    """
    first, first_size = extended
    this, this_size = first, first_size
    number = 5
    seen: set[int] = set()
    logicals: list[MBRPartition] = []
    while True:
        if this in seen:
            raise VolumeError(
                f"{disk}: the EBR chain loops back to sector {this}", offset=this * SECTOR
            )
        seen.add(this)
        data = read(this * SECTOR, SECTOR)
        if len(data) < SECTOR:
            raise VolumeError(
                f"{disk}: EBR at sector {this} is past the end of the disk", offset=this * SECTOR
            )
        if data[510:512] != b"\x55\xaa":
            # Linux stops the chain quietly here; an empty container (just created by
            # fdisk) has a zeroed first EBR.
            if this != first:
                log.warning("%s: EBR at sector %d has no 0x55AA signature; chain ends", disk, this)
            break
        ebr = _parse_sector(data)
        link: tuple[int, int] | None = None
        for slot, entry in enumerate(ebr.part):
            if entry.sector_size == 0:
                continue
            if entry.type in EXTENDED_TYPES:
                if link is None:
                    link = (entry.sector_ofs, entry.sector_size)
                continue
            if entry.type == 0:
                continue
            if entry.sector_ofs == 0:
                raise VolumeError(
                    f"{disk}: logical partition {number} starts on its own EBR (sector {this})",
                    offset=this * SECTOR,
                )
            start = this + entry.sector_ofs
            if slot >= 2 and (
                entry.sector_ofs + entry.sector_size > this_size
                or start < first
                or start + entry.sector_size > first + first_size
            ):
                # Linux: "the 3rd and 4th entries sometimes contain random garbage".
                continue
            if start < first or start + entry.sector_size > first + first_size:
                raise VolumeError(
                    f"{disk}: logical partition {number} (sectors {start}..."
                    f"{start + entry.sector_size - 1}) lies outside its extended partition "
                    f"(sectors {first}...{first + first_size - 1})",
                    offset=this * SECTOR,
                )
            if len(logicals) >= MAX_LOGICAL:
                raise VolumeError(
                    f"{disk}: more than {MAX_LOGICAL} logical partitions: the EBR chain is corrupt",
                    offset=this * SECTOR,
                )
            logicals.append(
                MBRPartition(
                    number=number,
                    start=start,
                    sectors=entry.sector_size,
                    type=entry.type,
                    bootable=entry.bootable == 0x80,
                    logical=True,
                )
            )
            number += 1
        if link is None:
            break
        # The link is relative to the extended container's first sector.
        this, this_size = first + link[0], link[1]
        if len(seen) > MAX_LOGICAL + 1:
            raise VolumeError(
                f"{disk}: the EBR chain has more than {MAX_LOGICAL} links", offset=this * SECTOR
            )
    return logicals
