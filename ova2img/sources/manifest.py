"""The OVF manifest (``.mf``, DSP0243 §5.1): a digest of every file of the package.

Lines look like ``SHA256(disk1.vmdk)= 3f…`` (ovftool, VirtualBox) or ``SHA256 (disk1.vmdk) = 3f…``
(the ``openssl dgst``/BSD style some scripts write); SHA1, SHA256 and SHA512 are accepted.

Design: each listed file is hashed once, sequentially, when the source is opened — before any
disk is decoded. The conversion reads disks at random (partition tables, inodes, directories,
then file data in path order), so hashing "as the bytes stream past" during the conversion would
need a coverage map and a final pass over whatever was never read; one sequential pass over a
file that is about to be read anyway is simpler, and it reads each byte once from the page
cache (see ``benchmarks/bench_disks.py``: SHA256 runs at about the speed of a page-cached read).
From stdin the digests are computed while the archive is spooled, which is sequential.

While a long check runs (:data:`COMPANION_MIN_BYTES` or more to hash), the caller may have
other work done in a second thread: :data:`COMPANION`, set by the API layer, imports the
decoders the conversion is about to need. Hashing and reading release the GIL, so the two
overlap on two cores; the thread ends before the check returns, so nothing is decoded before
the digests are verified, and no thread is left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import SourceError

log = logging.getLogger("ova2img.sources")

MAX_MANIFEST_SIZE = 1024 * 1024
#: bytes hashed per call: the GIL is taken between calls, so a large chunk keeps the hash
#: going while the companion thread runs Python code
CHUNK = 8 * 1024 * 1024
#: work for a second thread while the digests are computed (best effort: its errors are
#: ignored), or ``None``
COMPANION: ContextVar[Callable[[], object] | None] = ContextVar(
    "ova2img_manifest_companion", default=None
)
#: the companion runs only when the check hashes at least this much (else it would add its
#: own time to a short check instead of hiding it)
COMPANION_MIN_BYTES = 32 * 1024 * 1024
ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_LINE_RE = re.compile(
    r"^(?P<algo>SHA1|SHA256|SHA512)\s*\((?P<name>.+)\)\s*=\s*(?P<digest>[0-9A-Fa-f]+)\s*$"
)


@dataclass(frozen=True)
class Digest:
    """One line of a manifest."""

    name: str
    algorithm: str  # hashlib name: sha1, sha256, sha512
    hexdigest: str  # lower case

    @property
    def label(self) -> str:
        """The algorithm as the manifest spells it."""
        return self.algorithm.upper()


def parse_manifest(data: bytes, label: str) -> list[Digest]:
    """Parse a manifest.

    Raises:
        SourceError: too large, not text, a line that is not a digest line, a digest of the
            wrong length, or a file listed twice.
    """
    if len(data) > MAX_MANIFEST_SIZE:
        raise SourceError(f"manifest of {len(data)} bytes is too large for one", obj=label)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"manifest is not UTF-8 text: {err}", obj=label) from err
    digests: list[Digest] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE_RE.match(line.strip())
        if m is None:
            raise SourceError(f"manifest line {number} not understood: {line.strip()!r}", obj=label)
        algorithm = ALGORITHMS[m.group("algo")]
        digest = m.group("digest").lower()
        if len(digest) != hashlib.new(algorithm).digest_size * 2:
            raise SourceError(
                f"manifest line {number}: {m.group('algo')} digest of {len(digest)} hex digits",
                obj=label,
            )
        name = m.group("name")
        if name in seen:
            raise SourceError(f"manifest lists {name!r} twice", obj=label)
        seen.add(name)
        digests.append(Digest(name, algorithm, digest))
    return digests


def coverage(digests: list[Digest], names: list[str], label: str) -> str:
    """``"verified"`` when the manifest lists every one of *names* (the package's files; the
    manifest and a certificate among them need no digest), else ``"partial"``, with a warning
    naming what it leaves out (their digests were not checked; ovftool warns about such a
    manifest too)."""
    listed = {posixpath.normpath(d.name) for d in digests}
    missing = [
        n
        for n in names
        if posixpath.normpath(n) not in listed and not n.lower().endswith((".mf", ".cert"))
    ]
    if not missing:
        return "verified"
    log.warning(
        "%s: the manifest does not list %s: %s not verified",
        label,
        ", ".join(missing),
        "it is" if len(missing) == 1 else "they are",
    )
    return "partial"


def hash_stream(fh: BinaryIO, algorithm: str) -> str:
    """Hex digest of everything ``fh`` reads from its start, read :data:`CHUNK` at a time."""
    h = hashlib.new(algorithm)
    fh.seek(0)
    while True:
        chunk = fh.read(CHUNK)
        if not chunk:
            break
        h.update(chunk)
    return h.hexdigest()


def verify_manifest(
    digests: list[Digest], open_file: Callable[[str], BinaryIO], label: str
) -> None:
    """Hash every listed file (opened with ``open_file``) and compare with the manifest.

    Raises:
        SourceError: a listed file is missing, or its digest differs (naming the file, the
            expected and the actual digest).
    """
    companion: threading.Thread | None = None
    try:
        for d in digests:
            fh = open_file(d.name)
            try:
                if companion is None:
                    companion = _start_companion(fh)
                actual = hash_stream(fh, d.algorithm)
            finally:
                fh.close()
            check_digest(d, actual, label)
    finally:
        if companion is not None:
            companion.join()


def _start_companion(fh: BinaryIO) -> threading.Thread | None:
    """Start :data:`COMPANION` in a thread when it is set and *fh* is long enough."""
    work = COMPANION.get()
    if work is None:
        return None
    try:
        size = fh.seek(0, os.SEEK_END)
    except OSError:
        return None
    if size < COMPANION_MIN_BYTES:
        return None

    def run() -> None:
        with contextlib.suppress(Exception):
            work()

    thread = threading.Thread(target=run, name="ova2img-manifest-companion", daemon=True)
    thread.start()
    return thread


def check_digest(d: Digest, actual: str, label: str) -> None:
    """Raise :class:`SourceError` when ``actual`` is not the digest the manifest lists."""
    if actual != d.hexdigest:
        raise SourceError(
            f"{d.name}: {d.label} digest mismatch: the manifest says {d.hexdigest}, "
            f"the file has {actual} (corrupt or tampered; --no-manifest-check to skip)",
            obj=label,
        )
