"""Reading a file's content from its block runs on the volume, for the filesystem adapters."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import BinaryIO

from .._stream import PositionedReader, pread_of
from ..errors import FilesystemError


class RunlistReader(PositionedReader):
    """A file's content from a list of block runs on its volume: ``(block, count)`` with
    ``block`` ``None`` for a hole (reads as zeros). The runs cover at least ``size`` bytes.

    What dissect's ``RunlistStream`` does, without its aligned buffering: every read is one
    ``pread`` per run it touches, so a small file costs one read of the volume.
    """

    def __init__(
        self,
        volume: BinaryIO,
        runs: Sequence[tuple[int | None, int]],
        size: int,
        block_size: int,
        label: str = "",
    ) -> None:
        super().__init__(size, label)
        self._pread_volume = pread_of(volume)
        self._block_size = block_size
        self._runs = list(runs)
        starts: list[int] = []
        pos = 0
        for _, count in runs:
            starts.append(pos)
            pos += count * block_size
        self._starts = starts
        self._covered = pos

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        bs = self._block_size
        end = offset + length
        i = bisect.bisect_right(self._starts, offset) - 1
        parts: list[bytes] = []
        while offset < end:
            if i >= len(self._runs) or offset >= self._covered:
                # The runs end before the size: what the kernel reads there is zeros.
                parts.append(bytes(end - offset))
                break
            block, count = self._runs[i]
            run_end = self._starts[i] + count * bs
            n = min(end, run_end) - offset
            if n > 0:
                if block is None:
                    parts.append(bytes(n))
                else:
                    at = block * bs + offset - self._starts[i]
                    data = self._pread_volume(at, n)
                    if len(data) != n:
                        raise FilesystemError(
                            f"file data at byte {at} of the volume lies beyond its end",
                            obj=self.label or None,
                            offset=at,
                        )
                    parts.append(data)
                offset += n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)
