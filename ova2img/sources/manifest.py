"""The OVF manifest (``.mf``, DSP0243 §5.1): a digest of every file of the package.

Lines look like ``SHA256(disk1.vmdk)= 3f…`` (ovftool, VirtualBox) or ``SHA256 (disk1.vmdk) = 3f…``
(the ``openssl dgst``/BSD style some scripts write); SHA1, SHA256 and SHA512 are accepted.

Design: each listed file is hashed once, sequentially, in a thread of its own that starts when
the source is opened (:class:`ManifestCheck`); what lists a file the package lacks fails at once.
The conversion reads disks at random (partition tables, inodes, directories, then file data in
path order), so hashing "as the bytes stream past" would need a coverage map and a final pass
over whatever was never read; one sequential pass over a file that is being read anyway is
simpler, and it reads each byte once from the page cache (SHA-256 runs at about the speed of a
page-cached read). Hashing and reading release the GIL, so the check overlaps with decoding on
a second core instead of coming before it: about a second of an 870 MB OVA's conversion.

Nothing built from an unchecked package is handed out: :meth:`Source.settle
<ova2img.sources.base.Source.settle>` waits for the check and raises its mismatch, and the API
layer calls it before it returns a guest, before a conversion's archive ends, and before any
other failure is reported (a mismatch explains a damaged disk better than its symptom does).
:func:`~ova2img.sources.open.open_source` settles before it returns unless asked not to.
From stdin the digests are computed while the archive is spooled, which is sequential.
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
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import SourceError

log = logging.getLogger("ova2img.sources")

MAX_MANIFEST_SIZE = 1024 * 1024
#: bytes hashed per call by :func:`hash_stream`
CHUNK = 8 * 1024 * 1024
#: bytes hashed per step of a :class:`ManifestCheck`: what a waiter may wait for before it
#: takes over (the thread runs at the lowest priority, slow on a busy machine); each step
#: takes the GIL twice, so smaller steps hash slower beside a busy interpreter (1 MiB steps
#: hashed 30 MB of the 25k OVA before its fork, 4 MiB steps 45 to 50 MB, 8 MiB 72 MB)
STEP = 4 * 1024 * 1024
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


class ManifestCheck:
    """The digests of a manifest, computed in a thread that starts at once.

    Every listed file is opened here, so a manifest that lists a file the package lacks fails
    now; the hashing goes on beside whatever the caller does next. The thread runs at the
    lowest CPU priority (it must not slow the conversion down); whoever waits for the result
    finishes the hashing itself, at its own priority, so a busy machine never starves it.

    Args:
        digests: the manifest's lines.
        open_file: opens a listed file by its name in the manifest.
        label: the package's name, for messages.
        status: what :meth:`result` returns when every digest matches (``verified`` or
            ``partial``, see :func:`coverage`).

    Raises:
        SourceError: a listed file is missing.
    """

    def __init__(
        self,
        digests: list[Digest],
        open_file: Callable[[str], BinaryIO],
        label: str,
        status: str,
    ) -> None:
        self._label = label
        self._status = status
        self._files: list[tuple[Digest, BinaryIO]] = []
        try:
            for d in digests:
                self._files.append((d, open_file(d.name)))
        except BaseException:
            self._close_files()
            raise
        self._lock = threading.Lock()  # one step at a time, by the thread or by the waiter
        self._next = 0  # the file being hashed
        self._hash: Any = None  # its digest so far
        self._offset = 0  # how far
        self._done = False
        self._claimed = False  # the waiter took over (or cancelled): the thread stops
        self._failure: SourceError | None = None
        self._thread = threading.Thread(target=self._run, name="ova2img-manifest", daemon=True)
        self._thread.start()

    def result(self) -> str:
        """Wait for the check to end, hashing what is left in this thread: the manifest's
        status.

        Raises:
            SourceError: a digest differs (naming the file, the expected and the actual
                digest), a listed file cannot be read, or the check was cancelled.
        """
        self._finish()
        if self._failure is not None:
            raise self._failure
        return self._status

    def prefer_mismatch(self, failure: BaseException) -> None:
        """After *failure* of what the caller did meanwhile: finish the check and raise its
        failure (a mismatch) instead, from *failure*: a damaged package explains a decoding
        error better than the error does. A Ctrl-C (not an :class:`Exception`) only cancels
        the check."""
        if not isinstance(failure, Exception):
            self.cancel()
            return
        self._finish()
        if self._failure is not None and self._failure is not failure:  # (not its own cause)
            raise self._failure from failure

    def cancel(self) -> None:
        """Stop hashing (after the step under way) and close the check's files: the source's
        files may be closed after this (the thread never reads again)."""
        self._claimed = True  # first: the thread stops taking the lock
        with self._lock:
            if not self._done:
                self._end(SourceError("the manifest check was cancelled", obj=self._label))

    def _finish(self) -> None:
        # (the thread, between steps or waiting for the lock, ends at its next look)
        self._claimed = True  # first: the thread stops taking the lock
        with self._lock:
            while self._step():
                pass

    def _run(self) -> None:
        _yield_cpu()
        while not self._claimed:
            with self._lock:
                if self._claimed or not self._step():
                    return

    def _step(self) -> bool:
        """Hash the next :data:`STEP` bytes (under the lock); ``False`` once all is done."""
        if self._done:
            return False
        if self._next == len(self._files):  # every digest matched (or none was listed)
            self._end(None)
            return False
        try:
            d, fh = self._files[self._next]
            if self._hash is None:
                self._hash = hashlib.new(d.algorithm)
            try:
                chunk = fh.read(STEP) if fh.seek(self._offset) == self._offset else b""
            except (OSError, ValueError) as err:  # an I/O error, or the source closed
                raise SourceError(
                    f"{d.name}: cannot read it to check its {d.label} digest: {err}",
                    obj=self._label,
                ) from err
            if chunk:
                self._hash.update(chunk)
                self._offset += len(chunk)
                return True
            check_digest(d, self._hash.hexdigest(), self._label)
            self._next += 1
            self._hash = None
            self._offset = 0
            return True
        except SourceError as err:
            self._end(err)
        except Exception as err:  # never lost in the thread: raised where the result is taken
            self._end(SourceError(f"manifest check failed: {err}", obj=self._label))
        return False

    def _end(self, failure: SourceError | None) -> None:
        self._failure = failure
        self._done = True
        self._close_files()

    def _close_files(self) -> None:
        for _, fh in self._files:
            with contextlib.suppress(Exception):
                fh.close()


def _yield_cpu() -> None:
    """Let the calling thread run only on a CPU nothing else wants (Linux ``SCHED_IDLE``):
    the check then fills the gaps of a conversion (its start-up, a core that waits) instead of
    taking a busy core from it, and still ends at full speed once the caller waits for it."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def check_digest(d: Digest, actual: str, label: str) -> None:
    """Raise :class:`SourceError` when ``actual`` is not the digest the manifest lists."""
    if actual != d.hexdigest:
        raise SourceError(
            f"{d.name}: {d.label} digest mismatch: the manifest says {d.hexdigest}, "
            f"the file has {actual} (corrupt or tampered; --no-manifest-check to skip)",
            obj=label,
        )
