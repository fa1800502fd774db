"""An OVA: a tar archive (POSIX ustar or GNU) read in place, never extracted.

DSP0243 §5.3: the OVF descriptor is the first member, followed by the manifest (``.mf``), the
certificate, then the files it references. ovftool writes exactly that; VirtualBox writes
``.ovf``, ``.mf`` (when asked) then the disks. Readers are lenient here: the first ``.ovf`` member
is the descriptor wherever it is. Each member is indexed with the offset of its data in the OVA
and its size, and a disk is a :class:`~ova2img.sources.window.Window` of the OVA file.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError, UnsupportedError
from .base import Source
from .files import regular_file_size, safe_relative_name
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


def open_ova(path: Path, name: str) -> Source:
    """Open an OVA in place.

    Raises:
        SourceError: not a tar, truncated, no OVF descriptor, a referenced disk missing.
        UnsupportedError: a disk stored compressed, chunked, or as a GNU sparse member.
    """
    file_size = regular_file_size(path, what="OVA")
    try:
        fh = path.open("rb")
    except OSError as err:
        raise SourceError(f"cannot open: {err.strerror or err}", obj=name) from err
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
            rel = safe_relative_name(ref, context=f"{name}: name {ref!r}")
            return window(member(rel, f"file {ref!r} named by a disk descriptor"))

        def lookup(href: str) -> tuple[int, Callable[[], BinaryIO]]:
            m = member(href, "the OVF references a disk file that is missing")
            return m.size, lambda: window(m)

        disks = disk_files(env, name, lookup, resolve)
    except BaseException:
        fh.close()
        raise
    return Source(
        name=name,
        kind="ova",
        disks=disks,
        product=env.product,
        files={m.name: m.size for m in members.values()},
        _closers=[fh.close],
    )
