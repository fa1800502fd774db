"""A read-only window onto a byte range of a shared file, read in place with ``os.pread``."""

from __future__ import annotations

import os
from typing import BinaryIO

from .._stream import PositionedReader


class Window(PositionedReader):
    """A seekable, read-only view of ``size`` bytes of a shared file starting at ``start``.

    Several windows share one open file (an OVA member is a window of the OVA); reads use
    ``os.pread``, so windows never disturb each other's position. Closing a window does not close
    the shared file: the :class:`~ova2img.sources.base.Source` that opened it does. Reading a
    window whose source was closed raises :class:`ValueError` (never reads a reused descriptor).
    """

    def __init__(self, file: BinaryIO, start: int, size: int, label: str) -> None:
        super().__init__(size, label)
        self._file = file
        self._fd = file.fileno()
        self._start = start

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` of the window, without moving the position."""
        if self.closed or self._file.closed:
            raise ValueError(f"{self.label}: I/O on a closed source")
        length = max(0, min(length, self.size - offset))
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
