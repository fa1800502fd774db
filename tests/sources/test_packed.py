"""The seekable gzip reader: checkpoints, their bound, and random reads."""

from __future__ import annotations

import gzip
import io
import random

import pytest

from ova2img.errors import SourceError
from ova2img.sources import packed


def test_gzip_checkpoints_bounded_and_random_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed, "FIRST_INTERVAL", 64 * 1024)
    monkeypatch.setattr(packed, "MAX_CHECKPOINTS", 4)
    monkeypatch.setattr(packed, "BLOCK", 8192)
    rnd = random.Random(3)
    data = b"".join(rnd.randbytes(500) + bytes(rnd.randrange(0, 30_000)) for _ in range(200))
    blob = gzip.compress(data, compresslevel=6, mtime=0)
    gz = packed.GzipStream(io.BytesIO(blob), len(blob), "t.gz")
    assert gz.size == len(data)
    assert len(gz._checkpoints) <= 4
    assert gz.interval > 64 * 1024  # doubled at least once to stay within the bound
    view = packed.View(gz)
    for _ in range(200):
        off = rnd.randrange(0, len(data))
        n = rnd.randrange(0, 40_000)
        view.seek(off)
        assert view.read(n) == data[off : off + n]


def test_gzip_truncated_and_corrupt() -> None:
    blob = gzip.compress(random.Random(1).randbytes(100_000), mtime=0)
    with pytest.raises(SourceError, match="truncated"):
        packed.GzipStream(io.BytesIO(blob[:-5000]), len(blob) - 5000, "t.gz")
    bad = bytearray(blob)
    bad[5000] ^= 0xFF
    with pytest.raises(SourceError, match="corrupt"):
        packed.GzipStream(io.BytesIO(bytes(bad)), len(bad), "t.gz")
