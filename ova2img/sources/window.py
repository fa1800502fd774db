"""A read-only window onto a byte range of a shared file, read in place with ``os.pread``."""

from __future__ import annotations

import io
import os
from typing import BinaryIO, cast


class Window(io.RawIOBase):
    """A seekable, read-only view of ``size`` bytes of a shared file starting at ``start``.

    Several windows share one open file (an OVA member is a window of the OVA); reads use
    ``os.pread``, so windows never disturb each other's position. Closing a window does not close
    the shared file: the :class:`~ova2img.sources.base.Source` that opened it does. Reading a
    window whose source was closed raises :class:`ValueError` (never reads a reused descriptor).
    """

    def __init__(self, file: BinaryIO, start: int, size: int, label: str) -> None:
        super().__init__()
        self._file = file
        self._fd = file.fileno()
        self._start = start
        self._size = size
        self._pos = 0
        self.label = label

    @property
    def size(self) -> int:
        """Size of the window in bytes."""
        return self._size

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
            new = self._size + pos
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        self._pos = new
        return new

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` of the window, without moving the position."""
        if self.closed or self._file.closed:
            raise ValueError(f"{self.label}: I/O on a closed source")
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return b""
        chunks: list[bytes] = []
        pos = self._start + offset
        while length > 0:
            chunk = os.pread(self._fd, length, pos)
            if not chunk:  # the file shrank under us: return what there is
                break
            chunks.append(chunk)
            pos += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
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
        """This window typed as the :class:`typing.BinaryIO` the layers pass around."""
        return cast(BinaryIO, self)
