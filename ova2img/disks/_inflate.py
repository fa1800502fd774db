"""Raw deflate/zlib inflation for the disk formats, with an optional faster backend.

``pip install 'ova2img[fast]'`` brings ``isal`` (Intel ISA-L's inflate, about 2.5x zlib's speed
on VMDK grains; see benchmarks/run.py); without it, or with ``OVA2IMG_INFLATE=zlib`` in the
environment, the standard library's :mod:`zlib` does the same work. Both give the same bytes.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Protocol, cast


class Inflater(Protocol):
    """What :func:`decompressobj` returns (``zlib.Decompress`` or isal's equivalent)."""

    eof: bool

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        """Inflate *data*, at most ``max_length`` bytes out (0: all)."""
        ...


_impl: Any = zlib
BACKEND = "zlib"
#: the exceptions a backend raises on corrupt data
ERRORS: tuple[type[Exception], ...] = (zlib.error,)

if os.environ.get("OVA2IMG_INFLATE", "").lower() != "zlib":
    try:
        from isal import isal_zlib
    except ImportError:  # the optional extra is not installed: the stdlib it is
        pass
    else:
        _impl = isal_zlib
        BACKEND = "isal"
        ERRORS = (zlib.error, cast("type[Exception]", isal_zlib.error))


def decompressobj(wbits: int = 15) -> Inflater:
    """An inflater from the chosen backend: zlib format (RFC 1950) by default, raw deflate
    (RFC 1951) with a negative *wbits*, as :func:`zlib.decompressobj` takes it."""
    inflater: Inflater = _impl.decompressobj(wbits)
    return inflater


__all__ = ["BACKEND", "ERRORS", "Inflater", "decompressobj"]
