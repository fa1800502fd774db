"""Tell a virtual disk's format by its bytes (never by its name) and open it."""

from __future__ import annotations

import struct
from typing import BinaryIO

from ..errors import DiskError, UnsupportedError
from ..sources.base import DiskFile
from .base import VirtualDisk
from .stream import RawStream
from .vmdk import COWD_MAGIC, DESCRIPTOR_MAGIC, SESPARSE_MAGIC, VMDK_MAGIC, open_vmdk

SECTOR = 512

# Formats recognised but not decoded yet: (name, test on the first and last sectors).
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)  # VDI header signature at offset 0x40


def _unsupported_format(head: bytes, tail: bytes) -> str | None:
    """Name of a known format this layer does not decode yet, or ``None``."""
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"QED\x00"):
        return "QED"
    if head.startswith(b"vhdxfile"):
        return "VHDX"
    # VHD: a dynamic disk starts with a copy of its footer; a fixed one has it only at the end.
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "VHD"
    if head[0x40:0x44] == _VDI_SIGNATURE:
        return "VDI"
    if head.startswith((b"WithoutFreeSpace", b"WithouFreSpacExt")):
        return "Parallels"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed file"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz-compressed file"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd-compressed file"
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return "bzip2-compressed file"
    return None


def sniff(fh: BinaryIO, size: int) -> str:
    """``vmdk`` for a VMDK sparse extent or descriptor, ``raw`` for anything not recognised.

    Raises:
        UnsupportedError: a recognised format that is not decoded yet (qcow2, VHD, VHDX, VDI…).
    """
    fh.seek(0)
    head = fh.read(SECTOR)
    tail = b""
    if size >= 2 * SECTOR:
        fh.seek(size - SECTOR)
        tail = fh.read(SECTOR)
    fh.seek(0)
    if head.startswith((VMDK_MAGIC, COWD_MAGIC, SESPARSE_MAGIC, DESCRIPTOR_MAGIC)):
        return "vmdk"
    other = _unsupported_format(head, tail)
    if other is not None:
        hint = "decompress it first" if "compressed" in other else "needs the [sources] issue"
        raise UnsupportedError(f"{other} disk image: {hint}")
    return "raw"


def open_disk(disk: DiskFile, index: int = 0) -> VirtualDisk:
    """Detect the disk format by content and open it.

    Raises:
        DiskError: malformed image; UnsupportedError: a recognised but unsupported format.
    """
    fh = disk.open()
    if disk.size == 0:
        raise DiskError("empty disk file", obj=disk.name)
    try:
        kind = sniff(fh, disk.size)
    except UnsupportedError as err:
        raise UnsupportedError(err.message, obj=disk.name) from err
    if kind == "vmdk":
        vmdk = open_vmdk(fh, disk.name, disk.resolve)
        return VirtualDisk(
            name=disk.name,
            format="vmdk",
            subformat=vmdk.subformat,
            size=vmdk.size,
            stream=vmdk.as_binary(),
            index=index,
        )
    raw = RawStream(fh, disk.size, disk.name)
    return VirtualDisk(
        name=disk.name,
        format="raw",
        subformat="",
        size=disk.size,
        stream=raw.as_binary(),
        index=index,
    )
