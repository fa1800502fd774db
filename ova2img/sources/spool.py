"""An OVA (or a Vagrant box, or a bare disk image) read from a pipe: ``ova2img convert -``.

A pipe cannot seek, and the disk layer reads at random, so what needs random access is spooled
to one temporary file in ``$TMPDIR`` that has no name: :func:`tempfile.TemporaryFile` opens it
with ``O_TMPFILE`` (or unlinks it right after creating it where that is missing), so nothing is
left behind even when the process is killed. The spool is kept as compact as possible:

- Members are copied as they are: a streamOptimized VMDK, a gzip'd OVF member
  (``ovf:compression="gzip"``), a qcow2 with compressed clusters stay compressed and are decoded
  on access exactly as inside an OVA file.
- Every member is written *sparse*: each member starts on a 4 KiB boundary of the spool and each
  4 KiB block of zeros is skipped with a seek (a hole), so a raw or flat disk costs only its
  non-zero data.
- When the OVF descriptor comes first (DSP0243 §5.3; ovftool and VirtualBox write it first), a
  file that the OVF references but that is no disk (an ISO image for a CD-ROM, an nvram) is
  only hashed, not spooled.

Temporary space (``Source.spooled``, the spool's allocated bytes, measured by
``tests/sources/test_stdin.py``): a streamOptimized OVA costs about its own size (its members,
each rounded up to 4 KiB, minus its zero blocks: ``fixtures/demo.ova``, 1,198,080 bytes, spools
to 1,085,440 bytes, as the VMDK's zero padding and the tar's end blocks become holes or are not
stored); a raw-disk OVA costs about the data allocated in its disks (a 64 MiB raw disk holding
5 MiB of data spools to 5 MiB plus 4 KiB for the OVF). The members are never inflated.

The manifest is verified while spooling, in the same pass: the ``.mf`` normally precedes the
disks, so each member is hashed with the algorithm the manifest lists for it and a mismatch
stops the read right after that member. A ``.mf`` that comes after some members is handled too:
until it is seen, members are hashed speculatively with SHA-256 (what ovftool 4 and VirtualBox
write by default); a member the manifest lists with SHA-1 or SHA-512 is then hashed again from
the spool (page-cached, as it was just written). A member that is not spooled (an ISO) is hashed
with all three while the manifest is unknown.

Speed (``benchmarks/bench_disks.py 128`` on 2 cores, pipe from ``cat``): about 170 MiB/s for
a raw-disk OVA with no manifest (SHA-256 and the zero-block scan are the cost), 140 MiB/s for a
streamOptimized one; the conversion then reads the spool like an OVA file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import SourceError, UnsupportedError
from .base import DiskFile, Source
from .files import FileHandles, external_path, regular_file_size, safe_relative_name
from .manifest import (
    ALGORITHMS,
    MAX_MANIFEST_SIZE,
    Digest,
    check_digest,
    coverage,
    hash_stream,
    parse_manifest,
)
from .ova import Member, tar_source
from .ovf import MAX_OVF_SIZE, parse_envelope
from .window import Window

BLOCK = 4096
CHUNK = 1024 * 1024
SPECULATIVE = ("sha256",)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CHUNK = bytes(CHUNK)


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (to sniff the format): ``head`` then the
    rest of ``inner``."""

    def __init__(self, head: bytes, inner: BinaryIO) -> None:
        super().__init__()
        self._head = head
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            memoryview(buffer)[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._inner.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


def _read_exactly(fh: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the stream (a pipe returns short reads)."""
    parts: list[bytes] = []
    while size > 0:
        data = fh.read(size)
        if not data:
            break
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


class Spool:
    """The temporary file holding the spooled members, written sparse.

    Attributes:
        file: the unnamed temporary file (``O_TMPFILE``, or unlinked at once).
        end: where the next member may start (the end of the last one).
    """

    def __init__(self) -> None:
        try:
            self.file = cast(BinaryIO, tempfile.TemporaryFile(prefix="ova2img-spool-"))  # noqa: SIM115 (closed by the Source)
        except OSError as err:
            raise SourceError(
                f"cannot create the spool file in {tempfile.gettempdir()}: {err.strerror or err}",
                obj="-",
            ) from err
        self._fd = self.file.fileno()
        self.end = 0

    def append(
        self, reader: BinaryIO, size: int, hashes: list[hashlib._Hash], label: str, store: bool
    ) -> int:
        """Copy ``size`` bytes of ``reader`` to the spool (when ``store``), updating ``hashes``;
        return the offset they start at.

        Raises:
            SourceError: the stream ended early (naming ``label`` and how much was read), or
                the spool cannot be written (``$TMPDIR`` full).
        """
        start = -(-self.end // BLOCK) * BLOCK
        pos = start
        remaining = size
        want = 0
        try:
            while remaining > 0:
                want = min(CHUNK, remaining)
                chunk = reader.read(want)
                if not chunk:
                    raise EOFError
                for h in hashes:
                    h.update(chunk)
                if store:
                    self._write_sparse(pos, chunk)
                pos += len(chunk)
                remaining -= len(chunk)
        except (EOFError, tarfile.ReadError, zlib.error, gzip.BadGzipFile) as err:
            raise SourceError(
                f"{label} is truncated: {size} bytes expected, the stream ended within its "
                f"first {pos - start + want} bytes ({err or 'end of data'})",
                obj="-",
            ) from err
        except OSError as err:
            raise SourceError(
                f"cannot spool {label} to {tempfile.gettempdir()}: {err.strerror or err}",
                obj="-",
            ) from err
        if store:
            self.end = pos
            if os.fstat(self._fd).st_size < pos:
                os.ftruncate(self._fd, pos)  # trailing zero blocks: a hole up to the end
        return start

    def _write_sparse(self, pos: int, chunk: bytes) -> None:
        """Write ``chunk`` at ``pos``, leaving every all-zero 4 KiB block (aligned in the
        spool) as a hole."""
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            return
        view = memoryview(chunk)
        n = len(chunk)
        i = 0
        while i < n:
            # Blocks are aligned on the spool's offsets; the first may be partial.
            j = min(n, i + BLOCK - (pos + i) % BLOCK)
            if view[i:j] == _ZERO_BLOCK[: j - i]:
                i = j
                continue
            k = j  # extend the run of non-zero blocks
            while k < n:
                nxt = min(n, k + BLOCK)
                if view[k:nxt] == _ZERO_BLOCK[: nxt - k]:
                    break
                k = nxt
            data = view[i:k]
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], pos + i + written)
            i = k

    @property
    def allocated(self) -> int:
        """Bytes of temporary space the spool occupies (its allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def window(self, offset: int, size: int, label: str) -> BinaryIO:
        """A window over spooled bytes."""
        return Window(self.file, offset, size, label).as_binary()


def _unneeded(ovf_data: bytes | None, label: str) -> set[str]:
    """Files the OVF references that are no disk (an ISO, an nvram): hashed, not spooled.

    Anything named like a disk file (``.vmdk``…) is kept: a descriptor may name it as an extent.
    """
    if ovf_data is None:
        return set()
    env = parse_envelope(ovf_data, label)
    disk_refs = {d.file_ref for d in env.disks}
    names: set[str] = set()
    for f in env.files.values():
        if f.id in disk_refs or f.chunk_size:
            continue
        if f.href.lower().endswith((".vmdk", ".img", ".raw", ".qcow2", ".vhd", ".vhdx", ".vdi")):
            continue
        names.add(posixpath.normpath(f.href))
    return names


def open_stream(
    stream: BinaryIO,
    name: str,
    *,
    verify_manifest: bool = True,
    allow_external: bool = False,
    base: Path | None = None,
) -> Source:
    """Open an OVA, a Vagrant box (tar or tar.gz) or a bare disk image read sequentially from
    ``stream`` (a pipe), spooling to an unnamed temporary file what needs random access.

    Args:
        stream: the bytes, read once from the start, never seeked.
        name: the source's name (``-``, or the path of a gzip'd box).
        verify_manifest: check the ``.mf`` digests (while spooling).
        allow_external: let references leave the archive (relative to ``base``).
        base: the directory external names are relative to (default: the working directory).

    Raises:
        SourceError: the stream ends inside a member (naming it), a digest differs, not an OVA.
        UnsupportedError: an OVF descriptor alone on a pipe (its files cannot follow it), or
            a compressed stream that is no tar archive.
    """
    base = base if base is not None else Path.cwd()
    spool = Spool()
    try:
        head = _read_exactly(stream, 512)
        tar_in: BinaryIO | None = None
        if head.startswith(b"\x1f\x8b"):  # gzip (RFC 1952): a .box is a .tar.gz
            gz = cast(BinaryIO, gzip.GzipFile(fileobj=_Prefixed(head, stream), mode="rb"))
            try:
                inner = _read_exactly(gz, 512)
            except (OSError, EOFError, zlib.error) as err:
                raise SourceError(f"gzip data is corrupt: {err}", obj=name) from err
            if inner[257:262] != b"ustar":
                raise UnsupportedError("a gzip-compressed stream that is no tar archive", obj=name)
            tar_in = cast(BinaryIO, _Prefixed(inner, gz))
        elif head[257:262] == b"ustar":
            tar_in = cast(BinaryIO, _Prefixed(head, stream))
        if tar_in is None:
            text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
            if text.startswith(b"<") and b"Envelope" in head:
                raise UnsupportedError(
                    "an OVF descriptor on stdin: its disk files cannot follow it; "
                    "pipe an OVA, or give the .ovf path",
                    obj=name,
                )
            return _image(
                spool, cast(BinaryIO, _Prefixed(head, stream)), name, allow_external, base
            )
        return _tar(spool, tar_in, name, verify_manifest, allow_external, base)
    except BaseException:
        spool.file.close()
        raise


def _image(spool: Spool, stream: BinaryIO, name: str, allow_external: bool, base: Path) -> Source:
    """A bare disk image from a pipe: spooled whole, sparse."""
    size = 0
    while True:
        start = spool.end
        chunk = _read_exactly(stream, CHUNK)
        if not chunk:
            break
        spool._write_sparse(start, chunk)
        spool.end = start + len(chunk)
        size += len(chunk)
    if os.fstat(spool.file.fileno()).st_size < size:
        os.ftruncate(spool.file.fileno(), size)
    if size == 0:
        raise SourceError("nothing to read on stdin", obj=name)
    handles = FileHandles()

    def resolve(ref: str) -> BinaryIO:
        # An image on a pipe has no directory: only --allow-external-files lets it name files.
        if allow_external:
            target = external_path(base, ref)
            regular_file_size(target, what=f"file {ref!r} named by {name}")
            return handles.window(target, ref).as_binary()
        raise SourceError(
            f"the image names another file {ref!r}: an image on stdin has no directory "
            "(--allow-external-files reads it from the working directory)",
            obj=name,
        )

    disk = DiskFile(name=name, size=size, open=lambda: spool.window(0, size, name), resolve=resolve)
    return Source(
        name=name,
        kind="images",
        disks=[disk],
        files={name: size},
        spooled=spool.allocated,
        _closers=[spool.file.close, handles.close],
    )


def _tar(
    spool: Spool,
    stream: BinaryIO,
    name: str,
    verify: bool,
    allow_external: bool,
    base: Path,
) -> Source:
    """Spool the members of a tar stream, verifying the manifest on the way."""
    members: dict[str, Member] = {}
    computed: dict[str, dict[str, str]] = {}
    digests: dict[str, Digest] | None = None
    manifest_seen = False
    certificate = False
    ovf_data: bytes | None = None
    skip: set[str] = set()
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (a with block follows)
    except tarfile.TarError as err:
        raise SourceError(f"not a readable tar stream: {err}", obj=name) from err
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as err:
                raise SourceError(
                    f"tar stream is damaged or truncated after {len(members)} members: {err}",
                    obj=name,
                ) from err
            if info is None:
                break
            if info.isdir():
                continue
            mname = safe_relative_name(info.name, context=f"{name}: member {info.name!r}")
            if mname in members:
                raise SourceError(f"member {mname!r} appears twice in the archive", obj=name)
            if not info.isreg():
                members[mname] = Member(name=mname, offset=0, size=0, kind="other")
                continue
            lower = mname.lower()
            small = lower.endswith((".ovf", ".mf")) or mname == "metadata.json"
            if small and info.size > MAX_OVF_SIZE:
                raise SourceError(f"member {mname!r} is {info.size} bytes, too large", obj=name)
            algorithms: set[str] = set()
            if verify:
                if digests is None:
                    algorithms = set(SPECULATIVE)
                    if mname in skip:  # not spooled: cannot be hashed again later
                        algorithms = set(ALGORITHMS.values())
                elif mname in digests:
                    algorithms = {digests[mname].algorithm}
            hashes = {a: hashlib.new(a) for a in algorithms}
            reader = tf.extractfile(info)
            assert reader is not None  # a regular file
            store = mname not in skip
            with reader:
                offset = spool.append(
                    cast(BinaryIO, reader),
                    info.size,
                    list(hashes.values()),
                    f"member {mname!r}",
                    store,
                )
            # A GNU sparse member is expanded by tarfile: in the spool it is a plain file.
            members[mname] = Member(
                name=mname, offset=offset, size=info.size, kind="file" if store else "skipped"
            )
            computed[mname] = {a: h.hexdigest() for a, h in hashes.items()}
            if lower.endswith(".cert"):
                certificate = True
            if lower.endswith(".ovf") and ovf_data is None and not members.keys() - {mname}:
                # The descriptor first (DSP0243 §5.3): files that are no disk need no spooling.
                ovf_data = os.pread(spool.file.fileno(), info.size, offset)
                skip = _unneeded(ovf_data, f"{name}:{mname}")
            if lower.endswith(".mf") and not manifest_seen:
                manifest_seen = True
                if verify:
                    if info.size > MAX_MANIFEST_SIZE:
                        raise SourceError(f"manifest {mname!r} is too large", obj=name)
                    data = os.pread(spool.file.fileno(), info.size, offset)
                    parsed = parse_manifest(data, f"{name}:{mname}")
                    digests = {posixpath.normpath(d.name): d for d in parsed}
                    for done in list(members):
                        if done in digests:
                            _check(digests[done], members[done], computed, spool, name)
            elif digests is not None and mname in digests:
                _check(digests[mname], members[mname], computed, spool, name)
    if digests is not None:
        for ref in digests:
            if ref not in members or members[ref].kind == "other":
                raise SourceError(f"the manifest lists {ref!r}, not in the archive", obj=name)
    status = "absent"
    if manifest_seen:
        status = "skipped"
        if verify and digests is not None:
            package = [n for n, m in members.items() if m.kind == "file"]
            status = coverage(list(digests.values()), package, name)
    spooled = {k: m for k, m in members.items() if m.kind != "skipped"}

    def check(window: Callable[[Member], BinaryIO]) -> tuple[str, bool, None]:
        return status, certificate, None  # checked while spooled

    source = tar_source(
        spool.file, spooled, name, base, check, allow_external=allow_external, kind="ova"
    )
    source.files = {m.name: m.size for m in members.values()}
    source.spooled = spool.allocated
    return source


def _check(
    d: Digest, m: Member, computed: dict[str, dict[str, str]], spool: Spool, label: str
) -> None:
    """Compare a member's digest, hashing it again from the spool when it was not hashed with
    the manifest's algorithm while spooled."""
    actual = computed.get(m.name, {}).get(d.algorithm)
    if actual is None:
        if m.kind != "file":
            raise SourceError(f"{m.name}: cannot check its {d.label} digest (not kept)", obj=label)
        with spool.window(m.offset, m.size, m.name) as fh:
            actual = hash_stream(fh, d.algorithm)
    check_digest(d, actual, label)
