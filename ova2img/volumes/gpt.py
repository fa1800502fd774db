"""GUID partition tables (UEFI 2.10 §5.3), primary header first, backup header as fallback.

The on-disk structures come from dissect.volume (``c_gpt``); the checks and the walk are ours,
because ``dissect.volume.disk.schemes.gpt.GPT`` makes every partition one sector short
(``last_lba - first_lba`` without ``+ 1``), verifies no CRC, never reads the backup header,
skips entries by ``first_lba == 0`` instead of an all-zero type GUID, and lists a hybrid MBR's
entries beside the GPT's.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from dissect.volume.disk.schemes.gpt import c_gpt

from ..errors import VolumeError
from .mbr import Reader

log = logging.getLogger("ova2img.volumes")

SIGNATURE = b"EFI PART"
HEADER_MIN = 92  # UEFI §5.3.2: HeaderSize must be at least 92 bytes
ENTRY_MIN = 128  # §5.3.2: SizeOfPartitionEntry is 128 * 2**n
MAX_ARRAY_BYTES = 4 << 20  # bound the memory a corrupt NumberOfPartitionEntries can ask for
ZERO_GUID = b"\x00" * 16


@dataclass(frozen=True)
class GPTPartition:
    """One used GPT entry, in logical blocks.

    Attributes:
        number: Linux number: the entry's index in the array + 1 (gaps kept).
        first_lba, last_lba: inclusive range.
        type_guid, guid: lowercase GUID text.
        name: the partition name (UTF-16LE, up to the first NUL).
        attributes: the 64-bit attribute flags.
    """

    number: int
    first_lba: int
    last_lba: int
    type_guid: str
    guid: str
    name: str
    attributes: int


@dataclass(frozen=True)
class GPTTable:
    """A parsed GUID partition table.

    Attributes:
        sector_size: logical block size in bytes (512 or 4096).
        disk_guid: lowercase disk GUID (blkid's ``PTUUID``).
        first_usable, last_usable: the usable LBA range from the header used.
        partitions: used entries in array order.
        used_backup: the primary header or array was bad and the backup was used.
    """

    sector_size: int
    disk_guid: str
    first_usable: int
    last_usable: int
    partitions: list[GPTPartition]
    used_backup: bool


def _guid(raw: bytes) -> str:
    return str(UUID(bytes_le=bytes(raw)))


def has_gpt_signature(read: Reader, sector_size: int) -> bool:
    """Whether LBA 1 (for blocks of *sector_size*) starts with ``EFI PART``."""
    return read(sector_size, 8) == SIGNATURE


def _check_header(
    read: Reader, lba: int, sector_size: int, last_lba: int
) -> tuple[Any, bytes] | str:
    """The header at *lba* and its entry array, or the reason it is invalid (the checks of
    Linux ``is_gpt_valid()`` and libblkid ``get_gpt_header()``)."""
    raw = read(lba * sector_size, sector_size)
    if len(raw) < sector_size:
        return f"LBA {lba} is past the end of the disk"
    if raw[:8] != SIGNATURE:
        return f"no 'EFI PART' signature at LBA {lba} (found {raw[:8]!r})"
    hdr = c_gpt.GPT_HEADER(raw[:512])
    if not HEADER_MIN <= hdr.header_size <= sector_size:
        return f"header size {hdr.header_size} at LBA {lba} not within {HEADER_MIN}..{sector_size}"
    # §5.3.2: HeaderCRC32 is computed over HeaderSize bytes with the CRC field zeroed.
    body = raw[:16] + b"\x00\x00\x00\x00" + raw[20 : hdr.header_size]
    crc = zlib.crc32(body)
    if crc != hdr.crc32:
        return f"header CRC at LBA {lba} is {crc:#010x}, header says {hdr.crc32:#010x}"
    if hdr.current_lba != lba:
        return f"header at LBA {lba} says it is at LBA {hdr.current_lba}"
    if hdr.first_usable_lba > hdr.last_usable_lba:
        return f"first usable LBA {hdr.first_usable_lba} > last usable LBA {hdr.last_usable_lba}"
    if hdr.last_usable_lba > last_lba:
        return f"last usable LBA {hdr.last_usable_lba} is past the disk's last LBA {last_lba}"
    esize = hdr.partition_entry_size
    if esize < ENTRY_MIN or esize % ENTRY_MIN or (esize // ENTRY_MIN) & (esize // ENTRY_MIN - 1):
        return f"partition entry size {esize} is not 128 * 2**n"
    array_bytes = hdr.partition_table_count * esize
    if array_bytes > MAX_ARRAY_BYTES:
        return f"partition array of {hdr.partition_table_count} x {esize} bytes is too large"
    array = read(hdr.lba_partition_array * sector_size, array_bytes)
    if len(array) < array_bytes:
        return f"partition array at LBA {hdr.lba_partition_array} runs past the end of the disk"
    crc = zlib.crc32(array)
    if crc != hdr.partition_table_crc:
        return (
            f"partition array CRC is {crc:#010x}, header at LBA {lba} says "
            f"{hdr.partition_table_crc:#010x}"
        )
    return hdr, array


def read_gpt(read: Reader, disk_size: int, sector_size: int, disk: str) -> GPTTable:
    """Read the GPT: the primary header at LBA 1, or — when it or its array is invalid — the
    backup header at the disk's last LBA, as libblkid, libfdisk and sgdisk do (Linux itself
    only does so with the ``gpt`` boot option).

    Raises:
        VolumeError: both headers invalid (naming both reasons).
    """
    last_lba = disk_size // sector_size - 1
    primary = _check_header(read, 1, sector_size, last_lba)
    used_backup = False
    if isinstance(primary, str):
        backup = _check_header(read, last_lba, sector_size, last_lba)
        if isinstance(backup, str):
            raise VolumeError(
                f"{disk}: no valid GPT: primary: {primary}; backup: {backup}",
                offset=sector_size,
            )
        log.warning("%s: primary GPT is invalid (%s); using the backup GPT", disk, primary)
        hdr, array = backup
        used_backup = True
    else:
        hdr, array = primary
        alt = _check_header(read, hdr.backup_lba, sector_size, last_lba)
        if isinstance(alt, str):
            log.warning("%s: backup GPT is invalid (%s); using the primary GPT", disk, alt)
    esize: int = hdr.partition_entry_size
    partitions: list[GPTPartition] = []
    for index in range(hdr.partition_table_count):
        raw = array[index * esize : index * esize + 128]
        # §5.3.3: an entry whose PartitionTypeGUID is all zeros is unused.
        if raw[:16] == ZERO_GUID:
            continue
        entry = c_gpt.GPT_PARTITION(raw)
        name = bytes(entry.name).decode("utf-16-le", "replace").split("\x00", 1)[0]
        partitions.append(
            GPTPartition(
                number=index + 1,
                first_lba=entry.first_lba,
                last_lba=entry.last_lba,
                type_guid=_guid(entry.type_guid),
                guid=_guid(entry.partition_guid),
                name=name,
                attributes=entry.attribute_flags,
            )
        )
    return GPTTable(
        sector_size=sector_size,
        disk_guid=_guid(hdr.guid),
        first_usable=hdr.first_usable_lba,
        last_usable=hdr.last_usable_lba,
        partitions=partitions,
        used_backup=used_backup,
    )
