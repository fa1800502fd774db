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
        partuuid: ``PARTUUID=`` value as blkid prints it (GPT: the partition GUID, lowercase;
            MBR: ``%08x-%02x`` of the disk signature and the number, e.g. ``1f2e3d4c-0a`` for
            partition 10), or ``None`` (MBR whose signature is 0).
        partlabel: GPT partition name, or ``None``.
        content: what the volume's bytes say it holds, in blkid's ``TYPE`` names (``ext4``,
            ``swap``, ``LVM2_member``, ``xfs``, ``btrfs``, ``vfat``, ``crypto_LUKS``, … or
            ``unknown``), filled by the caller with :func:`ova2img.filesystems.probe`.
        extra: scheme details: ``pttype`` (``dos``/``gpt``), ``ptuuid`` (disk signature or
            disk GUID), ``bootable`` (MBR boot flag set), ``attributes`` (GPT attribute
            flags), ``gpt_header`` (``backup`` when the primary GPT was invalid).
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

    Partitions are named and numbered as Linux does (``sda1``…; MBR logicals from 5 in EBR
    chain order; GPT by entry slot), each with a stream over exactly its bytes. ``content`` is
    left ``"unknown"``: the caller fills it with :func:`ova2img.filesystems.probe` (a later
    layer). Problems that do not stop the walk are logged on ``ova2img.volumes``.

    Raises:
        VolumeError: a malformed or inconsistent partition table.
    """
    from .table import find_volumes as _find_volumes  # table imports Volume from here

    return _find_volumes(disk)
