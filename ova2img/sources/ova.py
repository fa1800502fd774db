"""An OVA: a tar archive (POSIX ustar or GNU) read in place, never extracted.

DSP0243 §5.3: the OVF descriptor is the first member, followed by the manifest (``.mf``), the
certificate, then the files it references. ovftool writes exactly that; VirtualBox writes
``.ovf``, ``.mf`` (when asked) then the disks. Readers are lenient here: the first ``.ovf`` member
is the descriptor wherever it is. Each member is indexed with the offset of its data in the OVA
and its size, and a disk is a :class:`~ova2img.sources.window.Window` of the OVA file.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError, UnsupportedError
from .base import Source
from .files import FileHandles, external_path, is_external, regular_file_size, safe_relative_name
from .manifest import parse_manifest
from .manifest import verify_manifest as verify_digests
from .ovf import MAX_OVF_SIZE, disk_files, parse_envelope
from .window import Window


@dataclass(frozen=True)
class Member:
    """A member of the OVA: where its data lies in the OVA file."""

    name: str
    offset: int
    size: int
    kind: str = "file"  # "file", "sparse" (GNU sparse: data not contiguous) or "other"


def index_tar(fh: BinaryIO, file_size: int, label: str) -> dict[str, Member]:
    """Index the members of the tar archive ``fh`` (``file_size`` bytes) without reading data.

    Raises:
        SourceError: not a tar archive, a member name that is absolute or escapes with ``..``,
            a duplicate name, or a member whose data runs past the end of the file
            (a truncated download).
    """
    members: dict[str, Member] = {}
    try:
        tf = tarfile.TarFile(fileobj=fh, mode="r")  # seeks over member data, never reads it
    except tarfile.TarError as err:
        raise SourceError(f"not a readable tar archive: {err}", obj=label) from err
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as err:
                raise SourceError(
                    f"tar archive is damaged after {len(members)} members: {err}", obj=label
                ) from err
            if info is None:
                break
            if info.isdir():
                continue
            name = safe_relative_name(info.name, context=f"{label}: member {info.name!r}")
            end = info.offset_data + info.size
            if info.isreg() and end > file_size:
                raise SourceError(
                    f"member {name!r} is truncated: {info.size} bytes expected, "
                    f"{max(0, file_size - info.offset_data)} present (incomplete download?)",
                    obj=label,
                    offset=info.offset_data,
                )
            if name in members:
                raise SourceError(f"member {name!r} appears twice in the archive", obj=label)
            kind = "sparse" if info.issparse() else "file" if info.isreg() else "other"
            members[name] = Member(name=name, offset=info.offset_data, size=info.size, kind=kind)
            # TarFile keeps every header in .members; an OVA has a handful, so that is harmless.
    return members


def check_manifest(
    members: dict[str, Member],
    window: Callable[[Member], BinaryIO],
    label: str,
    verify: bool,
) -> tuple[str, bool]:
    """Verify the OVA's manifest member: ``(Source.manifest status, certificate present)``.

    Raises:
        SourceError: a digest differs, or the manifest lists a file the OVA does not hold.
    """
    certificate = any(n.lower().endswith(".cert") for n in members)
    mf = next((m for m in members.values() if m.name.lower().endswith(".mf")), None)
    if mf is None:
        return "absent", certificate
    if not verify:
        return "skipped", certificate
    if mf.kind != "file":
        raise SourceError(f"manifest {mf.name!r} is not a regular file", obj=label)
    with window(mf) as mfh:
        digests = parse_manifest(mfh.read(MAX_OVF_SIZE), f"{label}:{mf.name}")

    def open_member(ref: str) -> BinaryIO:
        m = members.get(ref) or members.get(posixpath.normpath(ref))
        if m is None or m.kind != "file":
            raise SourceError(f"the manifest lists {ref!r}, not in the OVA", obj=label)
        return window(m)

    verify_digests(digests, open_member, label)
    return "verified", certificate


def open_ova(
    path: Path, name: str, *, verify_manifest: bool = True, allow_external: bool = False
) -> Source:
    """Open an OVA in place.

    Args:
        path: the OVA.
        name: what the user called it.
        verify_manifest: check every digest of the ``.mf`` member before anything is decoded.
        allow_external: let names with ``..`` or absolute names (an OVF href, a descriptor
            extent, a backing file) open files on the host, relative to the OVA's directory.

    Raises:
        SourceError: not a tar, truncated, no OVF descriptor, a referenced disk missing.
        UnsupportedError: a disk stored compressed, chunked, or as a GNU sparse member.
    """
    file_size = regular_file_size(path, what="OVA")
    try:
        fh = path.open("rb")
    except OSError as err:
        raise SourceError(f"cannot open: {err.strerror or err}", obj=name) from err
    handles = FileHandles()
    try:
        members = index_tar(fh, file_size, name)
        ovf = next(
            (m for m in members.values() if m.name.lower().endswith(".ovf") and m.kind == "file"),
            None,
        )
        if ovf is None:
            raise SourceError("no .ovf descriptor in the OVA", obj=name)
        if ovf.size > MAX_OVF_SIZE:
            raise SourceError(
                f"OVF descriptor {ovf.name!r} is {ovf.size} bytes, too large", obj=name
            )
        env = parse_envelope(os.pread(fh.fileno(), ovf.size, ovf.offset), f"{name}:{ovf.name}")

        def member(rel: str, context: str) -> Member:
            m = members.get(rel)
            if m is None:
                raise SourceError(f"{context}: no member {rel!r} in the OVA", obj=name)
            if m.kind == "sparse":
                raise UnsupportedError(f"member {rel!r} is a GNU sparse tar member", obj=name)
            if m.kind != "file":
                raise SourceError(f"member {rel!r} is not a regular file", obj=name)
            return m

        def window(m: Member) -> BinaryIO:
            return Window(fh, m.offset, m.size, f"{name}:{m.name}").as_binary()

        def resolve(ref: str) -> BinaryIO:
            if allow_external and is_external(ref):
                return host(ref)
            rel = safe_relative_name(ref, context=f"{name}: name {ref!r}")
            return window(member(rel, f"file {ref!r} named by a disk descriptor"))

        def host(ref: str) -> BinaryIO:
            target = external_path(path.parent, ref)
            regular_file_size(target, what=f"external file {ref!r}")
            return handles.window(target, ref).as_binary()

        def lookup(href: str) -> tuple[int, Callable[[], BinaryIO]]:
            if allow_external and is_external(href):
                target = external_path(path.parent, href)
                return regular_file_size(target, what=f"external file {href!r}"), lambda: host(href)
            m = member(href, "the OVF references a disk file that is missing")
            return m.size, lambda: window(m)

        status, certificate = check_manifest(members, window, name, verify_manifest)
        disks = disk_files(env, name, lookup, resolve, allow_external=allow_external)
    except BaseException:
        handles.close()
        fh.close()
        raise
    return Source(
        name=name,
        kind="ova",
        disks=disks,
        product=env.product,
        files={m.name: m.size for m in members.values()},
        manifest=status,
        certificate=certificate,
        _closers=[fh.close, handles.close],
    )
