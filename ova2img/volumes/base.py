"""Data types and entry point of the volume layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from ..disks.base import VirtualDisk


@dataclass
class Volume:
    """A stretch of a disk that may hold a filesystem (a partition, a whole disk, an LV).

    Attributes:
        name: how Linux names it: ``sda1``, ``sda5``, ``vdb`` (whole disk), later ``vg/lv``.
        disk_index: which disk of the guest it is on (0 = ``sda``).
        number: Linux partition number (logical MBR partitions start at 5), 0 for a whole disk.
        offset: byte offset on the disk.
        size: size in bytes.
        stream: seekable stream over exactly the volume's bytes.
        scheme: ``mbr``, ``gpt`` or ``none`` (no partition table).
        type: partition type as text (MBR ``0x83``, GPT type GUID), or ``""``.
        partuuid: ``PARTUUID=`` value as blkid prints it (GPT: the partition GUID; MBR:
            ``<disk signature>-<2-digit number>``), or ``None``.
        partlabel: GPT partition name, or ``None``.
        content: what the volume's first bytes say it holds (``ext4``, ``swap``, ``lvm2``,
            ``xfs``, ``btrfs``, ``vfat``, ``luks``, ``extended``, … or ``unknown``), filled
            by :func:`ova2img.filesystems.probe`.
    """

    name: str
    disk_index: int
    number: int
    offset: int
    size: int
    stream: BinaryIO
    scheme: str = "none"
    type: str = ""
    partuuid: str | None = None
    partlabel: str | None = None
    content: str = "unknown"
    extra: dict[str, str] = field(default_factory=dict)


def find_volumes(disk: VirtualDisk) -> list[Volume]:
    """The partitions of *disk* in Linux numbering order, or the whole disk as one volume when
    it has no partition table. Extended MBR containers are not returned (only what they hold).

    Raises:
        VolumeError: a malformed or inconsistent partition table.
    """
    raise NotImplementedError
