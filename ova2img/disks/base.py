"""Data types and entry point of the disk layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from ..sources.base import DiskFile


@dataclass
class VirtualDisk:
    """A decoded virtual disk.

    Attributes:
        name: the disk file's name in the source.
        format: ``vmdk``, ``qcow2``, ``vhd``, ``vhdx``, ``vdi`` or ``raw``.
        subformat: e.g. ``streamOptimized``, ``monolithicSparse``, ``monolithicFlat``,
            ``twoGbMaxExtentSparse``; empty when the format has none.
        size: virtual size in bytes.
        stream: seekable stream of the virtual disk's bytes (reads past a sparse area give
            zeros; reads at or past ``size`` give ``b""``).
        index: position of the disk in the guest (0 = first disk, ``sda``).
    """

    name: str
    format: str
    subformat: str
    size: int
    stream: BinaryIO
    index: int = 0


def open_disk(disk: DiskFile, index: int = 0) -> VirtualDisk:
    """Detect the disk format by content and open it.

    Raises:
        DiskError: malformed image; UnsupportedError: a recognised but unsupported format.
    """
    from .detect import open_disk as _open_disk  # detect imports this module's VirtualDisk

    return _open_disk(disk, index)
