"""Tell a virtual disk's format by its bytes (never by its name) and open it."""

from __future__ import annotations

import struct
from typing import BinaryIO

from ..errors import DiskError, UnsupportedError
from ..sources.base import DiskFile
from .base import VirtualDisk
from .stream import DiskStream, RawStream
from .vmdk import (
    COWD_MAGIC,
    DESCRIPTOR_MAGIC,
    SESPARSE_MAGIC,
    VMDK_MAGIC,
    Resolver,
    open_vmdk,
)

SECTOR = 512
QCOW2_MAGIC = b"QFI\xfb"
MAX_BACKING_DEPTH = 16

_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)  # VDI header signature at offset 0x40


def _unsupported_format(head: bytes) -> str | None:
    """Name of a known format this layer does not decode, or ``None``."""
    if head.startswith(b"QED\x00"):
        return "QED"
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
    """The format of a disk file by its bytes: ``vmdk``, ``qcow2``, ``vhd``, ``vhdx``, ``vdi``
    or ``raw`` (anything not recognised).

    A fixed VHD has its footer (``conectix``) only in the last sector; a dynamic one also has a
    copy at offset 0.

    Raises:
        UnsupportedError: a recognised format that is not decoded (QED, Parallels, compressed).
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
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if (
        head.startswith(b"conectix")
        or tail.startswith(b"conectix")
        or tail[1:].startswith(b"conectix")
    ):
        return "vhd"
    if head[0x40:0x44] == _VDI_SIGNATURE:
        return "vdi"
    other = _unsupported_format(head)
    if other is not None:
        hint = "decompress it first" if "compressed" in other else "convert it with qemu-img"
        raise UnsupportedError(f"{other} disk image: {hint}")
    return "raw"


def _size_of(fh: BinaryIO) -> int:
    size = fh.seek(0, 2)
    fh.seek(0)
    return size


def open_image(
    fh: BinaryIO, size: int, name: str, resolve: Resolver, depth: int = 0, fmt: str | None = None
) -> tuple[str, str, DiskStream]:
    """Decode the disk file ``fh`` (``size`` bytes): ``(format, subformat, stream)``.

    Args:
        fh: the disk file's bytes.
        size: its size.
        name: its name, for messages.
        resolve: opens other files of the same source (extents, backing files).
        depth: how many backing links led here (a loop guard).
        fmt: the format a parent declared for this file (a qcow2 backing format); ``raw`` is
            taken as declared, anything else must match the content.

    Raises:
        DiskError: malformed image; UnsupportedError: recognised but not decoded.
    """
    if size == 0:
        raise DiskError("empty disk file", obj=name)
    try:
        kind = "raw" if fmt == "raw" else sniff(fh, size)
    except UnsupportedError as err:
        raise UnsupportedError(err.message, obj=name) from err
    if fmt is not None and fmt not in (kind, "raw") and not (fmt == "vpc" and kind == "vhd"):
        raise DiskError(f"declared as {fmt} but its content is {kind}", obj=name)

    def open_backing(backing: str, declared: str | None) -> DiskStream:
        # qemu block.c: the backing file name is relative to the image that names it.
        if depth >= MAX_BACKING_DEPTH:
            raise DiskError(f"more than {MAX_BACKING_DEPTH} backing files (a loop?)", obj=name)
        bfh = resolve(backing)
        _, _, stream = open_image(
            bfh, _size_of(bfh), backing, resolve, depth + 1, declared.lower() if declared else None
        )
        return stream

    if kind == "vmdk":
        vmdk = open_vmdk(fh, name, resolve)
        return "vmdk", vmdk.subformat, vmdk
    # The other formats' modules are imported when met (each parses its dissect structure
    # definitions at import: tens of milliseconds a conversion of a VMDK need not pay).
    if kind == "qcow2":
        from .qcow2 import open_qcow2

        return "qcow2", "", open_qcow2(fh, size, name, open_backing)
    if kind == "vhd":
        from .microsoft import open_vhd

        subformat, stream = open_vhd(fh, size, name)
        return "vhd", subformat, stream
    if kind == "vhdx":
        from .microsoft import open_vhdx

        subformat, stream = open_vhdx(fh, size, name)
        return "vhdx", subformat, stream
    if kind == "vdi":
        from .vdi import VdiStream

        vdi = VdiStream(fh, size, name)
        return "vdi", vdi.subformat, vdi
    return "raw", "", RawStream(fh, size, name)


def open_disk(disk: DiskFile, index: int = 0) -> VirtualDisk:
    """Detect the disk format by content and open it.

    Raises:
        DiskError: malformed image; UnsupportedError: a recognised but unsupported format.
    """
    fh = disk.open()
    fmt, subformat, stream = open_image(fh, disk.size, disk.name, disk.resolve)
    return VirtualDisk(
        name=disk.name,
        format=fmt,
        subformat=subformat,
        size=stream.size,
        stream=stream.as_binary(),
        index=index,
    )
