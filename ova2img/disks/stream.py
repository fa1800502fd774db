"""The seekable stream every disk format hands to the volume layer."""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO, cast

from .._stream import PositionedReader
from ..errors import DiskError, Ova2imgError

# What a dissect parser raises on bad bytes; wrapped into DiskError at the read boundary.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    struct.error,
    IndexError,
    KeyError,
    EOFError,
    ValueError,
    OSError,
    NotImplementedError,
)


def describe(err: BaseException) -> str:
    """What went wrong, for a one-line message, without the Python exception's name (the CLI
    promises no Python internals on stderr; ``--debug`` shows the chained traceback)."""
    text = str(err).replace("\n", " ").strip()
    if isinstance(err, KeyError) and text:
        return f"no entry {text}"
    if text:
        return text
    if isinstance(err, EOFError):
        return "unexpected end of data"
    if isinstance(err, zlib.error):
        return "corrupt compressed data"
    return "malformed data"


class DiskStream(PositionedReader):
    """A read-only, seekable stream of ``size`` bytes; subclasses implement :meth:`_pread`.

    Every read returns exactly ``min(n, size - position)`` bytes (zeros where the image is
    sparse) or raises :class:`DiskError` naming the disk and the offset; a short read from the
    format (a truncated image file) is an error, never silently short data.
    """

    def _pread(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (both within the disk)."""
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` without moving the position (clamped to the disk)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            data = self._pread(offset, length)
        except Ova2imgError:
            raise
        except DECODE_ERRORS as err:
            raise DiskError(
                f"cannot decode {length} bytes: {describe(err)}",
                obj=self.label,
                offset=offset,
            ) from err
        if len(data) != length:
            raise DiskError(
                f"short read: {len(data)} of {length} bytes (is the image file truncated?)",
                obj=self.label,
                offset=offset,
            )
        return data


class RawStream(DiskStream):
    """A raw image: the file's bytes as they are."""

    def __init__(self, fh: BinaryIO, size: int, label: str) -> None:
        super().__init__(size, label)
        self._fh = fh

    def _pread(self, offset: int, length: int) -> bytes:
        self._fh.seek(offset)
        return self._fh.read(length)


class ForeignStream(DiskStream):
    """A dissect stream (``seek``/``read``) behind our clamped, error-wrapping interface."""

    def __init__(self, inner: BinaryIO, size: int, label: str) -> None:
        super().__init__(size, label)
        self._inner = inner

    def _pread(self, offset: int, length: int) -> bytes:
        self._inner.seek(offset)
        return self._inner.read(length)


class BackingView(io.RawIOBase):
    """A backing (parent) disk seen by a child of ``size`` bytes: zeros past the parent's end.

    qemu reads the part of an overlay that lies beyond a shorter backing file as zeros
    (``block/io.c``, ``bdrv_co_preadv_part`` on a short backing node); dissect would return a
    short read there.
    """

    def __init__(self, parent: DiskStream, size: int) -> None:
        super().__init__()
        self.parent = parent
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        size = max(0, min(size, self.size - self._pos))
        data = self.parent.pread(self._pos, size)
        if len(data) < size:
            data += bytes(size - len(data))
        self._pos += size
        return data

    def read_sectors(self, sector: int, count: int) -> bytes:
        """Sector interface (what a VHDX/VMDK child calls on its parent)."""
        self.seek(sector * 512)
        return self.read(count * 512)

    def as_binary(self) -> BinaryIO:
        """This view typed as a :class:`typing.BinaryIO`."""
        return cast(BinaryIO, self)
