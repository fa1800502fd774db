"""Find the volumes of a virtual disk: GPT, else MBR, else the whole disk.

Detection order (libblkid ``partitions/partitions.c``, Linux ``block/partitions/core.c``):
a GPT needs a protective or hybrid MBR (an 0xEE entry) and then wins over the MBR's other
entries; a DOS table needs ``0x55AA`` and sane entries and must not be a FAT/NTFS boot sector;
anything else is a disk without partition table, one volume numbered 0.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from .._stream import RangeReader
from ..disks.base import VirtualDisk
from ..errors import VolumeError
from .base import Volume
from .gpt import SIGNATURE, GPTTable, read_gpt
from .mbr import GPT_PROTECTIVE, SECTOR, MBRTable, looks_like_mbr, read_mbr

log = logging.getLogger("ova2img.volumes")


def disk_name(index: int, prefix: str = "sd") -> str:
    """Linux's name for the disk at *index*: 0 → ``sda``, 25 → ``sdz``, 26 → ``sdaa``
    (``sd_format_disk_name()`` in ``drivers/scsi/sd.c``)."""
    if index < 0:
        raise ValueError(f"negative disk index {index}")
    letters = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def partition_name(disk: str, number: int) -> str:
    """Linux's name for partition *number* of *disk*: ``sda1``, but ``nvme0n1p1`` when the
    disk's name ends in a digit (``disk_name()`` in ``block/partitions/core.c``)."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def _reader(disk: VirtualDisk) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        if offset >= disk.size or length <= 0:
            return b""
        length = min(length, disk.size - offset)
        try:
            disk.stream.seek(offset)
            chunks = []
            while length > 0:
                chunk = disk.stream.read(length)
                if not chunk:
                    break
                chunks.append(chunk)
                length -= len(chunk)
        except (OSError, ValueError, EOFError) as exc:
            raise VolumeError(
                f"{disk.name}: cannot read {length} bytes: {exc}", offset=offset
            ) from exc
        return b"".join(chunks)

    return read


def find_volumes(disk: VirtualDisk) -> list[Volume]:
    """The partitions of *disk* in Linux numbering order, or the whole disk as one volume
    (number 0, scheme ``none``) when it has no partition table.

    Raises:
        VolumeError: a malformed or inconsistent partition table (partitions past the disk's
            end or overlapping, a looping EBR chain, both GPT headers invalid, …).
    """
    name = disk_name(disk.index)
    if disk.size <= 0:
        log.warning("%s: the disk is empty; it holds no volume", name)
        return []
    read = _reader(disk)
    sector0 = read(0, SECTOR)
    disk_sectors = disk.size // SECTOR
    try:
        if len(sector0) == SECTOR and sector0[510:512] == b"\x55\xaa" and _has_protective(sector0):
            # Blocks of 4096 bytes when LBA 1 only says "EFI PART" at 4096 (4Kn disks).
            sector_size = 512
            if read(512, 8) != SIGNATURE and read(4096, 8) == SIGNATURE:
                sector_size = 4096
            gpt = read_gpt(read, disk.size, sector_size, name)
            others = sum(sector0[446 + 16 * i + 4] not in (0, GPT_PROTECTIVE) for i in range(4))
            if others:
                # Hybrid MBR: Linux (efi.c, is_pmbr_valid → GPT_MBR_HYBRID) and libblkid use
                # the GPT and ignore the MBR's other entries.
                log.info("%s: hybrid MBR; its %d other entries are ignored", name, others)
            volumes = _gpt_volumes(disk, name, gpt)
        else:
            reason = looks_like_mbr(sector0, disk_sectors)
            if reason is not None:
                # A 0x55AA sector that is neither a boot sector nor a sane table deserves a word.
                odd = sector0[510:512] == b"\x55\xaa" and "boot sector" not in reason
                log.log(
                    logging.WARNING if odd else logging.DEBUG,
                    "%s: no partition table (%s); using the whole disk",
                    name,
                    reason,
                )
                return [_whole_disk(disk, name)]
            volumes = _mbr_volumes(disk, name, read_mbr(read, disk_sectors, name))
    except VolumeError:
        raise
    except Exception as exc:  # dissect's cstruct on truncated/odd data
        raise VolumeError(f"{name}: cannot parse the partition table: {exc}", offset=0) from exc
    return volumes


def _has_protective(sector0: bytes) -> bool:
    # UEFI §5.2.3 / Linux is_pmbr_valid(): one of the four entries has type 0xEE.
    return any(sector0[446 + 16 * i + 4] == GPT_PROTECTIVE for i in range(4))


def _whole_disk(disk: VirtualDisk, name: str) -> Volume:
    return Volume(
        name=name,
        disk_index=disk.index,
        number=0,
        offset=0,
        size=disk.size,
        stream=RangeReader(disk.stream, 0, disk.size).as_binary(),
        scheme="none",
    )


def _check_ranges(name: str, disk_size: int, ranges: list[tuple[str, int, int]], what: str) -> None:
    """Every ``(label, offset, size)`` inside the disk and no two overlapping (sfdisk and
    sgdisk refuse such tables too)."""
    for label, offset, size in ranges:
        if offset + size > disk_size:
            raise VolumeError(
                f"{name}: {label} (bytes {offset}..{offset + size - 1}) extends past the end of "
                f"the disk ({disk_size} bytes)",
                offset=offset,
            )
    ordered = sorted(ranges, key=lambda r: (r[1], r[1] + r[2]))
    for (la, oa, sa), (lb, ob, sb) in itertools.pairwise(ordered):
        if ob < oa + sa:
            raise VolumeError(
                f"{name}: {la} (bytes {oa}..{oa + sa - 1}) and {lb} (bytes {ob}..{ob + sb - 1}) "
                f"overlap in the {what}",
                offset=ob,
            )


def _mbr_volumes(disk: VirtualDisk, name: str, table: MBRTable) -> list[Volume]:
    ranges: list[tuple[str, int, int]] = []
    for p in table.partitions:
        if p.start == 0:
            raise VolumeError(
                f"{name}: partition {p.number} starts at sector 0, on the partition table itself",
                offset=0,
            )
        ranges.append((f"partition {p.number}", p.start * SECTOR, p.sectors * SECTOR))
    primaries = [r for r, p in zip(ranges, table.partitions, strict=True) if not p.logical]
    if table.extended is not None:
        start, sectors = table.extended
        # The extended container must fit and must not overlap a primary; logicals are
        # checked against it while walking the EBR chain.
        _check_ranges(
            name,
            disk.size,
            [*primaries, ("the extended partition", start * SECTOR, sectors * SECTOR)],
            "MBR",
        )
    _check_ranges(name, disk.size, ranges, "MBR")
    ptuuid = f"{table.signature:08x}"
    volumes = []
    for p in table.partitions:
        offset, size = p.start * SECTOR, p.sectors * SECTOR
        extra = {"pttype": "dos", "ptuuid": ptuuid}
        if p.bootable:
            extra["bootable"] = "1"
        volumes.append(
            Volume(
                name=partition_name(name, p.number),
                disk_index=disk.index,
                number=p.number,
                offset=offset,
                size=size,
                stream=RangeReader(disk.stream, offset, size).as_binary(),
                scheme="mbr",
                type=f"{p.type:#04x}",
                # libblkid dos.c: PARTUUID is "%08x-%02x" of the disk signature and the
                # partition number (hex: partition 10 is "-0a"); none when the signature is 0.
                partuuid=f"{table.signature:08x}-{p.number:02x}" if table.signature else None,
                extra=extra,
            )
        )
    return volumes


def _gpt_volumes(disk: VirtualDisk, name: str, table: GPTTable) -> list[Volume]:
    ss = table.sector_size
    ranges = []
    for p in table.partitions:
        if p.last_lba < p.first_lba:
            raise VolumeError(
                f"{name}: GPT partition {p.number} ends (LBA {p.last_lba}) before it starts "
                f"(LBA {p.first_lba})",
                offset=p.first_lba * ss,
            )
        if p.first_lba < table.first_usable or p.last_lba > table.last_usable:
            log.warning(
                "%s: GPT partition %d (LBA %d..%d) is outside the usable LBAs %d..%d",
                name, p.number, p.first_lba, p.last_lba, table.first_usable, table.last_usable,
            )  # fmt: skip
        # UEFI §5.3.3: EndingLBA is inclusive, hence + 1 (dissect forgets it).
        ranges.append(
            (f"partition {p.number}", p.first_lba * ss, (p.last_lba - p.first_lba + 1) * ss)
        )
    _check_ranges(name, disk.size, ranges, "GPT")
    volumes = []
    for p, (_, offset, size) in zip(table.partitions, ranges, strict=True):
        extra = {"pttype": "gpt", "ptuuid": table.disk_guid, "attributes": f"{p.attributes:#x}"}
        if table.used_backup:
            extra["gpt_header"] = "backup"
        volumes.append(
            Volume(
                name=partition_name(name, p.number),
                disk_index=disk.index,
                number=p.number,
                offset=offset,
                size=size,
                stream=RangeReader(disk.stream, offset, size).as_binary(),
                scheme="gpt",
                type=p.type_guid,
                partuuid=p.guid,
                partlabel=p.name or None,
                extra=extra,
            )
        )
    return volumes
