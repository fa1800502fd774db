"""The read-only, seekable stream shape every layer hands on: position bookkeeping over a
``pread(offset, length)`` that subclasses provide. Below every layer, like :mod:`.errors`."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO, cast


class PositionedReader(io.RawIOBase):
    """A read-only, seekable stream of ``size`` bytes built on :meth:`pread`.

    Subclasses implement :meth:`pread` (clamped to ``size``, never moving the position);
    ``read``/``readinto``/``seek``/``tell`` are derived from it here.
    """

    def __init__(self, size: int, label: str) -> None:
        super().__init__()
        self.size = size
        self.label = label
        self._pos = 0

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, without moving the position."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self.size + pos
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        self._pos = new
        return new

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def as_binary(self) -> BinaryIO:
        """This stream typed as the :class:`typing.BinaryIO` the layers pass around."""
        return cast(BinaryIO, self)


def pread_of(stream: BinaryIO) -> Callable[[int, int], bytes]:
    """A ``pread(offset, length)`` over *stream*: its own when it is a :class:`PositionedReader`
    (no seek, no buffering layer in between), else ``seek`` + ``read`` (foreign streams)."""
    if isinstance(stream, PositionedReader):
        return stream.pread

    def pread(offset: int, length: int) -> bytes:
        stream.seek(offset)
        return stream.read(length)

    return pread


class RangeReader(PositionedReader):
    """``size`` bytes of *parent* from ``start`` on (a partition of a disk, a file system's
    data area): reads go straight to the parent's :meth:`~PositionedReader.pread`."""

    def __init__(self, parent: BinaryIO, start: int, size: int, label: str = "") -> None:
        super().__init__(size, label or getattr(parent, "label", ""))
        self._parent_pread = pread_of(parent)
        self._start = start

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        return self._parent_pread(self._start + offset, length)
