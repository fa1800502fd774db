"""``ova2img verify``: re-read a tarball and compare it with the source image, entry by entry,
in every property a faithful conversion keeps (shared/design/fidelity.md).

The tarball may be any POSIX/GNU tar (plain, gzip, bzip2, xz or zstd); what the conversion
left out on purpose (sockets, which tar cannot hold; ``--exclude``d paths when the same
patterns are given) is not a difference.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, cast

from .api import PathLike, guest_path
from .api import open_unsettled as open_guest
from .assembly import TreeItem
from .errors import Ova2imgError
from .filesystems.base import EntryType
from .sinks.tar import HARDLINKED_TYPES

_CHUNK = 1 << 20
_XATTR = "SCHILY.xattr."
_KIND = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.AREGTYPE: EntryType.FILE,
    tarfile.CONTTYPE: EntryType.FILE,
    tarfile.GNUTYPE_SPARSE: EntryType.FILE,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


class VerifyError(Ova2imgError):
    """The tarball cannot be read."""

    layer = "verify"


@dataclass
class _Member:
    kind: EntryType | None  # None: a hardlink
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str = ""
    link: bytes = b""
    device: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _path(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"./"):
        raw = raw[2:]
    return raw.strip(b"/") if raw not in (b".", b"./") else b""


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 1_000_000_000
    try:
        return int(Decimal(text) * 1_000_000_000)
    except InvalidOperation as exc:
        raise VerifyError(f"{member.name}: bad PAX mtime {text!r}") from exc


@contextmanager
def _open_tar(path: str) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        fileobj: BinaryIO = raw
        # Decompressed here rather than by tarfile's stream mode, which takes a cut-off
        # gzip stream for its end: these readers raise EOFError on a truncated one.
        if magic.startswith(b"\x28\xb5\x2f\xfd"):
            import zstandard

            fileobj = zstandard.ZstdDecompressor().stream_reader(raw)
        elif magic.startswith(b"\x1f\x8b"):
            import gzip

            fileobj = cast(BinaryIO, gzip.GzipFile(fileobj=raw))
        elif magic.startswith(b"BZh"):
            import bz2

            fileobj = cast(BinaryIO, bz2.BZ2File(raw))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            import lzma

            fileobj = cast(BinaryIO, lzma.LZMAFile(raw))  # noqa: SIM115 - closed with raw
        with tarfile.open(
            fileobj=fileobj, mode="r|", encoding="utf-8", errors="surrogateescape"
        ) as tf:
            yield tf


def read_tarball(path: str) -> dict[bytes, _Member]:
    """Every member of a tarball with its metadata and content digest."""
    members: dict[bytes, _Member] = {}
    try:
        with _open_tar(path) as tf:
            for m in tf:
                p = _path(m.name)
                rec = _Member(
                    kind=None if m.type == tarfile.LNKTYPE else _KIND.get(m.type),
                    mode=m.mode & 0o7777,
                    uid=m.uid,
                    gid=m.gid,
                    mtime_ns=_mtime_ns(m),
                    xattrs={
                        k[len(_XATTR) :]: v.encode("utf-8", "surrogateescape")
                        for k, v in m.pax_headers.items()
                        if k.startswith(_XATTR)
                    },
                )
                if m.type == tarfile.LNKTYPE:
                    rec.link = _path(m.linkname)
                elif m.type == tarfile.SYMTYPE:
                    rec.link = m.linkname.encode("utf-8", "surrogateescape")
                elif m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    rec.device = (m.devmajor, m.devminor)
                elif rec.kind is EntryType.FILE:
                    rec.size = m.size
                    digest = hashlib.sha256()
                    fobj = tf.extractfile(m)
                    if fobj is not None:
                        while chunk := fobj.read(_CHUNK):
                            digest.update(chunk)
                    rec.sha256 = digest.hexdigest()
                members[p] = rec
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise VerifyError(f"cannot read the tarball: {exc}", obj=path) from exc
    return members


def _digest(item: TreeItem) -> str:
    digest = hashlib.sha256()
    with item.open() as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _show(path: bytes) -> str:
    return "/" + os.fsdecode(path) if path else "/"


def compare_item(item: TreeItem, m: _Member) -> list[str]:
    """What differs between a guest entry and its tar member (not hardlinks)."""
    e = item.entry
    where = _show(item.path)
    if m.kind is not e.type:
        return [
            f"{where}: type {e.type.value} in the image, {m.kind and m.kind.value} in the tarball"
        ]
    out = []
    for what, mine, theirs in (
        ("mode", oct(e.mode), oct(m.mode)),
        ("uid", e.uid, m.uid),
        ("gid", e.gid, m.gid),
        ("mtime (ns)", e.mtime_ns, m.mtime_ns),
    ):
        if mine != theirs:
            out.append(f"{where}: {what} {mine} in the image, {theirs} in the tarball")
    if e.xattrs != m.xattrs:
        names = sorted(set(e.xattrs) ^ set(m.xattrs)) or sorted(
            k for k in e.xattrs if e.xattrs[k] != m.xattrs.get(k)
        )
        out.append(f"{where}: xattrs differ ({', '.join(names)})")
    if e.type is EntryType.SYMLINK and e.link_target != m.link:
        out.append(
            f"{where}: symlink target {e.link_target!r} in the image, {m.link!r} in the tarball"
        )
    if e.type in (EntryType.CHAR, EntryType.BLOCK) and (e.rdev_major, e.rdev_minor) != m.device:
        out.append(
            f"{where}: device {e.rdev_major},{e.rdev_minor} in the image, {m.device} in the tarball"
        )
    if e.type is EntryType.FILE:
        if e.size != m.size:
            out.append(f"{where}: size {e.size} in the image, {m.size} in the tarball")
        elif _digest(item) != m.sha256:
            out.append(f"{where}: content differs")
    return out


def verify(
    source: PathLike | Sequence[PathLike],
    tarball: PathLike,
    *,
    exclude: Iterable[str] = (),
    path: str | bytes | None = None,
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
) -> list[str]:
    """Compare a tarball with the guest tree of a VM image.

    Returns:
        One line per difference (empty: the tarball is faithful). Sockets, which no tar can
        hold, are expected to be missing.

    Raises:
        Ova2imgError: the image or the tarball cannot be read.
    """
    members = read_tarball(os.fspath(tarball))
    diffs: list[str] = []
    with open_guest(
        source,
        root=root,
        use_fstab=use_fstab,
        verify_manifest=verify_manifest,
        allow_external=allow_external,
    ) as guest:
        # Paths seen so far of each multiply-linked inode: a tar hardlink must point at one.
        seen_links: dict[tuple[int, int], set[bytes]] = {}
        for item in guest.walk(exclude=exclude, path=guest_path(guest, path)):
            m = members.pop(item.path, None)
            where = _show(item.path)
            if item.entry.type is EntryType.SOCKET:
                if m is not None:
                    diffs.append(f"{where}: a socket in the image, present in the tarball")
                continue
            if m is None:
                diffs.append(f"{where}: missing from the tarball")
                continue
            linked = item.entry.type is not EntryType.DIR and item.entry.nlink > 1
            earlier = seen_links.setdefault(item.link_key, set()) if linked else set()
            if m.kind is None:
                if m.link not in earlier:
                    diffs.append(
                        f"{where}: a hardlink to {_show(m.link)} in the tarball, which is not "
                        "the same inode in the image"
                    )
            else:
                if earlier and item.entry.type in HARDLINKED_TYPES:
                    # tar links every later name of a file or symlink to the first one
                    first = _show(min(earlier))
                    diffs.append(
                        f"{where}: a separate member in the tarball, a hardlink of {first} "
                        "in the image"
                    )
                diffs.extend(compare_item(item, m))
            if linked:
                earlier.add(item.path)
    for p in sorted(members):
        diffs.append(f"{_show(p)}: only in the tarball")
    return diffs


__all__ = ["VerifyError", "verify"]
