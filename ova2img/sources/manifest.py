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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import SourceError

MAX_MANIFEST_SIZE = 1024 * 1024
CHUNK = 1024 * 1024
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


def hash_stream(fh: BinaryIO, algorithm: str) -> str:
    """Hex digest of everything ``fh`` reads from its start, read in 1 MiB chunks."""
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
    for d in digests:
        fh = open_file(d.name)
        try:
            actual = hash_stream(fh, d.algorithm)
        finally:
            fh.close()
        check_digest(d, actual, label)


def check_digest(d: Digest, actual: str, label: str) -> None:
    """Raise :class:`SourceError` when ``actual`` is not the digest the manifest lists."""
    if actual != d.hexdigest:
        raise SourceError(
            f"{d.name}: {d.label} digest mismatch: the manifest says {d.hexdigest}, "
            f"the file has {actual} (corrupt or tampered; --no-manifest-check to skip)",
            obj=label,
        )
