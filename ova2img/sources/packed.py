"""OVF files stored gzip-compressed (``ovf:compression="gzip"``) or split in chunks
(``ovf:chunkSize``), DSP0243 §7.2-7.3, read as one seekable stream without extracting anything.

A chunked file ``disk.vmdk`` is stored as ``disk.vmdk.000000000``, ``disk.vmdk.000000001``, …
(each ``chunkSize`` bytes but the last): :class:`Concat` lays them end to end.

A gzip file is scanned once when opened (to learn its size). Every ``interval`` bytes of output
the scan keeps a checkpoint: a copy of the ``zlib`` decompressor (its 32 KiB window and state),
the compressed offset and at most 16 KiB of pending input. A read restarts from the nearest
checkpoint before it. At most :data:`MAX_CHECKPOINTS` are kept: when there would be more, every
other one is dropped and the interval doubles — so memory stays under about
``MAX_CHECKPOINTS * 64 KiB`` (4 MiB) whatever the size, plus :data:`CACHE_BLOCKS` MiB of inflated
blocks, and a random read inflates at most ``interval`` bytes (16 MiB up to 1 GiB of output;
``size / 64`` beyond).
"""

from __future__ import annotations

import bisect
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

from .._stream import PositionedReader
from ..errors import SourceError

INPUT_CHUNK = 16 * 1024
OUTPUT_STEP = 1024 * 1024
BLOCK = 1024 * 1024
CACHE_BLOCKS = 16
FIRST_INTERVAL = 16 * 1024 * 1024
MAX_CHECKPOINTS = 64


class _Readable(PositionedReader):
    """A :class:`~ova2img._stream.PositionedReader` whose subclasses set ``size`` (and
    ``label``) and give ``_pread``, called with ranges already clamped to the size."""

    def __init__(self) -> None:
        super().__init__(0, "")

    def _pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return self._pread(offset, length) if length else b""


class Concat(_Readable):
    """Several streams laid end to end (the chunks of an ``ovf:chunkSize`` file)."""

    def __init__(self, parts: list[tuple[BinaryIO, int]]) -> None:
        super().__init__()
        self._parts = parts
        self._starts: list[int] = []
        total = 0
        for _, size in parts:
            self._starts.append(total)
            total += size
        self.size = total

    def _pread(self, offset: int, length: int) -> bytes:
        out: list[bytes] = []
        i = bisect.bisect_right(self._starts, offset) - 1
        while length > 0 and i < len(self._parts):
            fh, size = self._parts[i]
            within = offset - self._starts[i]
            n = min(length, size - within)
            fh.seek(within)
            data = fh.read(n)
            if len(data) != n:
                raise SourceError(f"chunk {i} is short: {len(data)} of {n} bytes")
            out.append(data)
            offset += n
            length -= n
            i += 1
        return b"".join(out)


@dataclass
class _Cursor:
    dobj: Any
    in_off: int
    out_off: int
    pending: bytes = b""

    def copy(self) -> _Cursor:
        return _Cursor(self.dobj.copy(), self.in_off, self.out_off, self.pending)


class GzipStream(_Readable):
    """The decompressed bytes of a gzip file (one or several members), seekable."""

    def __init__(self, fh: BinaryIO, csize: int, label: str) -> None:
        super().__init__()
        self._fh = fh
        self._csize = csize
        self.label = label
        self.interval = FIRST_INTERVAL
        self._checkpoints: list[_Cursor] = []
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        cur = self._start()
        self._checkpoints.append(cur.copy())
        next_mark = self.interval
        while True:
            if not self._step(cur):
                break
            if cur.out_off >= next_mark:
                self._checkpoints.append(cur.copy())
                if len(self._checkpoints) > MAX_CHECKPOINTS:
                    self._checkpoints = self._checkpoints[::2]
                    self.interval *= 2
                next_mark = cur.out_off + self.interval
        self.size = cur.out_off

    def _start(self) -> _Cursor:
        return _Cursor(zlib.decompressobj(16 + zlib.MAX_WBITS), 0, 0)

    def _step(self, cur: _Cursor) -> bytes | None:
        """Inflate up to 1 MiB more; ``None`` at the end of the file."""
        try:
            if not cur.pending:
                if cur.dobj.eof:
                    if cur.in_off >= self._csize:
                        return None
                    cur.dobj = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
                self._fh.seek(cur.in_off)
                cur.pending = self._fh.read(min(INPUT_CHUNK, self._csize - cur.in_off))
                cur.in_off += len(cur.pending)
                if not cur.pending:
                    if not cur.dobj.eof:
                        raise SourceError("gzip data is truncated", obj=self.label)
                    return None
            data: bytes = cur.dobj.decompress(cur.pending, OUTPUT_STEP)
        except zlib.error as err:
            raise SourceError(
                f"gzip data is corrupt: {err}", obj=self.label, offset=cur.in_off
            ) from err
        cur.pending = cur.dobj.unconsumed_tail
        if cur.dobj.eof:
            unused = cur.dobj.unused_data
            cur.in_off -= len(unused)  # the next member starts there
            cur.pending = b""
            if unused.strip(b"\0") == b"" and cur.in_off + len(unused) >= self._csize:
                cur.in_off = self._csize  # zero padding after the last member
        cur.out_off += len(data)
        return data

    def _block(self, index: int) -> bytes:
        cached = self._blocks.get(index)
        if cached is not None:
            self._blocks.move_to_end(index)
            return cached
        start = index * BLOCK
        marks = [c.out_off for c in self._checkpoints]
        cur = self._checkpoints[bisect.bisect_right(marks, start) - 1].copy()
        parts: list[bytes] = []
        while cur.out_off < start + BLOCK:
            before = cur.out_off
            data = self._step(cur)
            if data is None:
                break
            lo, hi = max(start, before), min(start + BLOCK, cur.out_off)
            if hi > lo:
                parts.append(data[lo - before : hi - before])
        block = b"".join(parts)
        self._blocks[index] = block
        if len(self._blocks) > CACHE_BLOCKS:
            self._blocks.popitem(last=False)
        return block

    def _pread(self, offset: int, length: int) -> bytes:
        out: list[bytes] = []
        while length > 0:
            index, within = divmod(offset, BLOCK)
            block = self._block(index)[within : within + length]
            if not block:
                break
            out.append(block)
            offset += len(block)
            length -= len(block)
        return b"".join(out)


class View(_Readable):
    """Another independent position over a shared stream (a :class:`GzipStream` is scanned once
    and shared by every ``DiskFile.open``)."""

    def __init__(self, inner: _Readable) -> None:
        super().__init__()
        self._inner = inner
        self.size = inner.size

    def _pread(self, offset: int, length: int) -> bytes:
        return self._inner._pread(offset, length)
