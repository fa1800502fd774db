"""qcow2 (versions 2 and 3) through :mod:`dissect.hypervisor.disk.qcow2`, with its gaps fixed.

Specification: qemu ``docs/interop/qcow2.txt``. What this adapter adds to dissect's ``QCow2``:

- The header is checked against the file size before dissect allocates the L1 table from it.
- The backing file is opened through the source's resolver (a name relative to the image;
  absolute or ``..`` names only with ``allow_external``), decoded by content or by the backing
  format the header names, and read as zeros past its end, as qemu does. dissect would open
  ``fh.name``'s neighbour by path and wrap any backing file starting with ``QFI\\xfb`` again.
- zstd-compressed clusters (``compression_type`` 1) are inflated with the ``zstandard`` module
  when dissect's ``backports.zstd`` is missing.
- The L2 table cache is bounded in bytes (dissect keeps 128 tables, 1 GiB with 2 MiB clusters).
- Extended L2 entries (subclusters) are refused: dissect reads the subcluster bitmap from the
  wrong word (``count_contiguous_subclusters``) and loops without end on such images.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any, BinaryIO

from dissect.hypervisor.disk import qcow2 as _qcow2

from ..errors import DiskError, Ova2imgError, UnsupportedError
from . import _inflate
from .detect import QCOW2_MAGIC
from .stream import DECODE_ERRORS, BackingView, DiskStream, ForeignStream, describe

try:
    import zstandard as _zstandard
except ImportError:  # pragma: no cover - zstandard is a test dependency
    _zstandard = None  # type: ignore[assignment]

# dissect refuses a zstd image in QCow2.__init__ unless ``backports.zstd`` imported; this
# adapter inflates zstd clusters itself with ``zstandard``, so lift that refusal.
_DISSECT_ZSTD: bool = _qcow2.HAS_ZSTD
if not _DISSECT_ZSTD and _zstandard is not None:
    _qcow2.HAS_ZSTD = True

MAX_VIRTUAL_SIZE = 64 * 2**40
L2_CACHE_BYTES = 4 * 2**20  # L2 tables kept decoded, at most (at least two tables)
CLUSTER_CACHE_BYTES = 4 * 2**20  # inflated compressed clusters kept (at least two)

# Incompatible feature bits (qcow2.txt, header bytes 72-79).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# name, declared backing format (upper case) or None → the decoded backing disk.
OpenBacking = Callable[[str, str | None], DiskStream]


def check_header(head: bytes, file_size: int, name: str) -> None:
    """Check a qcow2 header against the file before dissect reads tables from it.

    Raises:
        DiskError: a field is absurd or points outside the file.
        UnsupportedError: encryption, extended L2 entries, unknown incompatible features.
    """
    if len(head) < 72:
        raise DiskError(f"qcow2 file of {file_size} bytes is shorter than its header", obj=name)
    (magic, version, bf_offset, bf_size, cluster_bits, size, crypt, l1_size, l1_offset) = (
        struct.unpack_from(">4sIQIIQIIQ", head)
    )
    if magic != QCOW2_MAGIC:
        raise DiskError(f"not a qcow2 image (magic {magic!r})", obj=name)
    if version not in (2, 3):
        raise UnsupportedError(f"qcow2 version {version}", obj=name)
    if not 9 <= cluster_bits <= 21:
        raise DiskError(
            f"qcow2 cluster size 2^{cluster_bits} is out of range (2^9..2^21)", obj=name
        )
    if crypt:
        raise UnsupportedError(f"encrypted qcow2 image (crypt_method {crypt})", obj=name)
    if size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"qcow2 virtual size of {size} bytes is absurd", obj=name)
    incompat = struct.unpack_from(">Q", head, 72)[0] if version == 3 and len(head) >= 80 else 0
    if incompat & INCOMPAT_EXTL2:
        raise UnsupportedError("qcow2 with extended L2 entries (subclusters)", obj=name)
    if incompat & ~INCOMPAT_KNOWN:
        raise UnsupportedError(f"qcow2 incompatible features {incompat:#x}", obj=name)
    cluster = 1 << cluster_bits
    per_l1 = cluster * (cluster // 8)
    needed = (size + per_l1 - 1) // per_l1
    if l1_size < needed:
        raise DiskError(
            f"L1 table of {l1_size} entries cannot map {size} bytes ({needed} needed)", obj=name
        )
    if l1_size and (l1_offset % cluster or l1_offset + 8 * l1_size > file_size):
        raise DiskError(
            f"L1 table at {l1_offset:#x} ({l1_size} entries) lies beyond the "
            f"end of the {file_size}-byte file or is not cluster aligned",
            obj=name,
        )
    if bf_offset and (bf_size == 0 or bf_size > 1023 or bf_offset + bf_size > file_size):
        raise DiskError(
            f"backing file name of {bf_size} bytes at {bf_offset:#x} is invalid", obj=name
        )


class _Stream(_qcow2.QCow2Stream):  # type: ignore[misc]
    """dissect's stream, with inflated clusters cached (a compressed cloud image holds a dozen
    small files per 64 KiB cluster, each read inflated it again: 3x the time of a VMDK),
    deflate through the faster backend of :mod:`._inflate`, and zstd clusters inflated by
    ``zstandard`` when needed."""

    def __init__(self, qcow2: Any) -> None:
        super().__init__(qcow2)
        self._clusters: OrderedDict[int, bytes] = OrderedDict()
        self._cache_clusters = max(2, CLUSTER_CACHE_BYTES // qcow2.cluster_size)

    def _read_compressed(self, cluster_descriptor: int, offset: int, length: int) -> bytes:
        key = cluster_descriptor & self.qcow2.cluster_offset_mask
        cluster = self._clusters.get(key)
        if cluster is None:
            start = offset - (offset & (self.qcow2.cluster_size - 1))
            cluster = super()._read_compressed(cluster_descriptor, start, self.qcow2.cluster_size)
            self._clusters[key] = cluster
            if len(self._clusters) > self._cache_clusters:
                self._clusters.popitem(last=False)
        else:
            self._clusters.move_to_end(key)
        within = offset & (self.qcow2.cluster_size - 1)
        return cluster[within : within + length]

    def _decompress(self, buf: bytes) -> bytes:
        csize = self.qcow2.cluster_size
        if self.qcow2.compression_type == 0:
            # Raw deflate, window 4 KiB (qcow2.txt "Compressed Clusters Descriptor").
            try:
                data: bytes = _inflate.decompressobj(-12).decompress(buf, csize)
            except _inflate.ERRORS as err:
                raise DiskError(
                    f"compressed cluster does not inflate: {err}",
                    obj=getattr(self, "label", "qcow2"),
                ) from err
        elif self.qcow2.compression_type == 1 and not _DISSECT_ZSTD and _zstandard is not None:
            # The cluster is one zstd frame followed by padding to the sector (qcow2.c
            # qcow2_zstd_decompress stops at the frame's end).
            data = _zstandard.ZstdDecompressor().decompressobj().decompress(buf)[:csize]
        else:
            data = super()._decompress(buf)
        if len(data) != csize:
            raise DiskError(
                f"compressed cluster inflates to {len(data)} bytes, expected {csize}",
                obj=getattr(self, "label", "qcow2"),
            )
        return data


def open_qcow2(fh: BinaryIO, file_size: int, name: str, open_backing: OpenBacking) -> DiskStream:
    """Open a qcow2 image; its backing file (if any) is opened with ``open_backing``.

    Raises:
        DiskError: malformed header or tables, missing backing file.
        UnsupportedError: encryption, subclusters, external data files, zstd without a module.
    """
    fh.seek(0)
    check_header(fh.read(112), file_size, name)
    fh.seek(0)
    try:
        q: Any = _qcow2.QCow2(fh, allow_no_backing_file=True, allow_no_data_file=True)
    except Ova2imgError:
        raise
    except RuntimeError as err:  # "zstandard module not available"
        if _zstandard is None:
            raise UnsupportedError(
                "zstd-compressed qcow2 needs the zstandard module", obj=name
            ) from err
        raise DiskError(f"cannot open qcow2: {err}", obj=name) from err
    except (*DECODE_ERRORS, _qcow2.Error) as err:
        raise DiskError(f"cannot open qcow2: {describe(err)}", obj=name) from err
    if q.needs_data_file:
        raise UnsupportedError(f"qcow2 with an external data file {q.image_data_file!r}", obj=name)
    tables = max(2, L2_CACHE_BYTES // q.cluster_size)
    q.l2_table = lru_cache(tables)(_qcow2.QCow2.l2_table.__get__(q))
    if q.needs_backing_file:
        backing_name: str = q.auto_backing_file
        parent = open_backing(backing_name, q.backing_format)
        q.backing_file = BackingView(parent, q.size)
    stream = _Stream(q)
    stream.label = name
    return ForeignStream(stream, q.size, name)
