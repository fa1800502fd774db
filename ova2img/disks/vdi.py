"""VirtualBox VDI (version 1.1), read with dissect's header struct and our own block map.

Layout (VirtualBox ``src/VBox/Storage/VDICore.h``): a 64-byte text pre-header, signature
``0xBEDA107F`` at 0x40, version 1.1, then ``VDIHEADER1PLUS``: ``offBlocks`` (the block map,
one little-endian int32 per block: ``-1`` free, ``-2`` zero, else the block's index in the data
area), ``offData``, ``cbDisk``, ``cbBlock`` and ``cbBlockExtra`` (bytes stored in front of each
block's data).

dissect's ``VDIStream._read`` reads a whole multi-block request from the first block's place
(``min(length, max(length, …))`` is always ``length``) and ignores ``cbBlockExtra``: when the
blocks are not stored in disk order the data is wrong, silently. Differencing VDIs (type 4) are
refused: their parent is found by UUID in the VirtualBox media registry.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from dissect.hypervisor.disk.c_vdi import c_vdi

from ..errors import DiskError, UnsupportedError
from .stream import DiskStream

VDI_SIGNATURE = 0xBEDA107F
BLOCK_FREE = -1
BLOCK_ZERO = -2
MAX_VIRTUAL_SIZE = 64 * 2**40
TYPE_NAMES = {1: "dynamic", 2: "fixed", 3: "undo", 4: "differencing"}


class VdiStream(DiskStream):
    """A VDI's virtual disk."""

    def __init__(self, fh: BinaryIO, file_size: int, name: str) -> None:
        fh.seek(0)
        head = fh.read(512)
        if len(head) < 512:
            raise DiskError(f"VDI of {file_size} bytes is shorter than its header", obj=name)
        signature, version = struct.unpack_from("<II", head, 0x40)
        if signature != VDI_SIGNATURE:
            raise DiskError(f"not a VDI (signature {signature:#x})", obj=name)
        if version >> 16 != 1:
            raise UnsupportedError(
                f"VDI header version {version >> 16}.{version & 0xFFFF}", obj=name
            )
        hdr = c_vdi.VDIHEADER1PLUS(head[0x48:])
        kind = int(hdr.u32Type)
        if kind not in (1, 2):
            what = TYPE_NAMES.get(kind, f"type {kind}")
            raise UnsupportedError(f"{what} VDI (its parent is named by UUID)", obj=name)
        size, block, extra, blocks = hdr.cbDisk, hdr.cbBlock, hdr.cbBlockExtra, hdr.cBlocks
        if size > MAX_VIRTUAL_SIZE:
            raise DiskError(f"VDI virtual size of {size} bytes is absurd", obj=name)
        if block < 512 or block & (block - 1) or block > 2**28:
            raise DiskError(f"VDI block size {block} is not a power of two", obj=name)
        if blocks * block < size:
            raise DiskError(f"VDI has {blocks} blocks of {block} bytes for {size} bytes", obj=name)
        if hdr.offBlocks + 4 * blocks > file_size:
            raise DiskError("VDI block map lies beyond the end of the file", obj=name)
        super().__init__(size, name)
        self.subformat = TYPE_NAMES[kind]
        self._fh = fh
        self._block = block
        self._extra = extra
        self._data = hdr.offData
        fh.seek(hdr.offBlocks)
        raw = fh.read(4 * blocks)  # bounded by the file size (checked above)
        self._map = memoryview(raw).cast("i")

    def _pread(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        while length > 0:
            index, within = divmod(offset, self._block)
            n = min(length, self._block - within)
            entry = self._map[index]
            if entry < 0:  # free or zero: no parent, so both read as zeros
                parts.append(bytes(n))
            else:
                where = self._data + entry * (self._block + self._extra) + self._extra + within
                self._fh.seek(where)
                parts.append(self._fh.read(n))
            offset += n
            length -= n
        return b"".join(parts)
