"""An OVA: a tar archive (POSIX ustar or GNU) read in place, never extracted.

DSP0243 §5.3: the OVF descriptor is the first member, followed by the manifest (``.mf``), the
certificate, then the files it references. ovftool writes exactly that; VirtualBox writes
``.ovf``, ``.mf`` (when asked) then the disks. Readers are lenient here: the first ``.ovf`` member
is the descriptor wherever it is. Each member is indexed with the offset of its data in the OVA
and its size, and a disk is a :class:`~ova2img.sources.window.Window` of the OVA file.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError, UnsupportedError
from .base import DiskFile, Source
from .files import FileHandles, external_path, is_external, regular_file_size, safe_relative_name
from .manifest import ManifestCheck, coverage, parse_manifest
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
            # A GNU sparse member stores less than its size: it is refused when used anyway.
            if info.isreg() and not info.issparse() and end > file_size:
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
) -> tuple[str, bool, ManifestCheck | None]:
    """Start checking the OVA's manifest member: ``(Source.manifest status, certificate
    present, the check running)``.

    Raises:
        SourceError: a malformed manifest, or one that lists a file the OVA does not hold.
    """
    certificate = any(n.lower().endswith(".cert") for n in members)
    mf = next((m for m in members.values() if m.name.lower().endswith(".mf")), None)
    if mf is None:
        return "absent", certificate, None
    if not verify:
        return "skipped", certificate, None
    if mf.kind != "file":
        raise SourceError(f"manifest {mf.name!r} is not a regular file", obj=label)
    with window(mf) as mfh:
        digests = parse_manifest(mfh.read(MAX_OVF_SIZE), f"{label}:{mf.name}")

    def open_member(ref: str) -> BinaryIO:
        m = members.get(ref) or members.get(posixpath.normpath(ref))
        if m is None or m.kind != "file":
            raise SourceError(f"the manifest lists {ref!r}, not in the OVA", obj=label)
        return window(m)

    package = [m.name for m in members.values() if m.kind == "file"]
    status = coverage(digests, package, label)
    return "checking", certificate, ManifestCheck(digests, open_member, label, status)


def open_ova(
    path: Path, name: str, *, verify_manifest: bool = True, allow_external: bool = False
) -> Source:
    """Open an OVA in place.

    Args:
        path: the OVA.
        name: what the user called it.
        verify_manifest: check every digest of the ``.mf`` member (in a thread: see
            :attr:`Source.check <ova2img.sources.base.Source.check>`).
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
    try:
        members = index_tar(fh, file_size, name)

        def check(
            window: Callable[[Member], BinaryIO],
        ) -> tuple[str, bool, ManifestCheck | None]:
            return check_manifest(members, window, name, verify_manifest)

        return tar_source(
            fh, members, name, path.parent, check, allow_external=allow_external, kind="ova"
        )
    except BaseException:
        fh.close()
        raise


def tar_source(
    fh: BinaryIO,
    members: dict[str, Member],
    name: str,
    base: Path,
    check: Callable[[Callable[[Member], BinaryIO]], tuple[str, bool, ManifestCheck | None]],
    *,
    allow_external: bool,
    kind: str,
) -> Source:
    """The :class:`Source` of a tar archive whose members lie in ``fh`` at ``members``.

    ``fh`` is the OVA itself, or the spool of an archive read from a pipe. The archive is an
    OVA (its first ``.ovf`` member is the descriptor) or a Vagrant box: ``box.ovf`` (provider
    ``virtualbox``, an OVF like any other) or ``metadata.json`` with ``box.img`` (provider
    ``libvirt``, a qcow2; newer boxes list several ``disks`` in ``metadata.json``).

    Args:
        fh: the file holding the members' bytes; closed with the source (and on error here).
        members: where each member's data lies in ``fh``.
        name: the source's name, for messages.
        base: the directory external names are relative to (``allow_external``).
        check: starts checking the manifest given a member opener: ``(Source.manifest,
            certificate, the check running or None)``.
        allow_external: as for :func:`open_ova`.
        kind: ``Source.kind``.
    """
    handles = FileHandles()
    pending: ManifestCheck | None = None
    try:

        def member(rel: str, context: str) -> Member:
            m = members.get(rel)
            if m is None:
                raise SourceError(f"{context}: no member {rel!r} in the archive", obj=name)
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
            target = external_path(base, ref)
            regular_file_size(target, what=f"external file {ref!r}")
            return handles.window(target, ref).as_binary()

        def lookup(href: str) -> tuple[int, Callable[[], BinaryIO]]:
            if allow_external and is_external(href):
                target = external_path(base, href)
                return regular_file_size(target, what=f"external file {href!r}"), lambda: host(href)
            m = member(href, "the OVF references a disk file that is missing")
            return m.size, lambda: window(m)

        ovf = next(
            (m for m in members.values() if m.name.lower().endswith(".ovf") and m.kind == "file"),
            None,
        )
        product: dict[str, str] = {}
        if ovf is not None:
            if ovf.size > MAX_OVF_SIZE:
                raise SourceError(
                    f"OVF descriptor {ovf.name!r} is {ovf.size} bytes, too large", obj=name
                )
            env = parse_envelope(os.pread(fh.fileno(), ovf.size, ovf.offset), f"{name}:{ovf.name}")
            status, certificate, pending = check(window)
            disks = disk_files(env, name, lookup, resolve, allow_external=allow_external)
            product = env.product
        elif "metadata.json" in members:
            status, certificate, pending = check(window)
            disks = box_disks(members, window, name, resolve)
            kind = "box"
        else:
            raise SourceError("no .ovf descriptor in the archive", obj=name)
    except BaseException as exc:
        try:
            if pending is not None:
                pending.prefer_mismatch(exc)
        finally:
            handles.close()
            fh.close()
        raise
    return Source(
        name=name,
        kind=kind,
        disks=disks,
        product=product,
        files={m.name: m.size for m in members.values()},
        manifest=status,
        certificate=certificate,
        check=pending,
        _closers=[fh.close, handles.close],
    )


MAX_METADATA_SIZE = 1024 * 1024


def box_disks(
    members: dict[str, Member],
    window: Callable[[Member], BinaryIO],
    name: str,
    resolve: Callable[[str], BinaryIO],
) -> list[DiskFile]:
    """The disks of a Vagrant ``libvirt`` box (no OVF): ``box.img``, or the ``disks`` that
    ``metadata.json`` lists (vagrant-libvirt ≥ 0.12: ``{"disks": [{"path": "box_1.img"}, …]}``),
    in that order.

    Raises:
        SourceError: ``metadata.json`` is not JSON, or names a disk the box does not hold.
        UnsupportedError: a provider whose box holds no disk image (``docker``, ``hyperv``…).
    """
    meta_member = members["metadata.json"]
    if meta_member.kind != "file" or meta_member.size > MAX_METADATA_SIZE:
        raise SourceError("metadata.json is not a small regular file", obj=name)
    with window(meta_member) as mfh:
        raw = mfh.read()
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise SourceError(f"metadata.json is not JSON: {err}", obj=name) from err
    if not isinstance(meta, dict):
        raise SourceError("metadata.json is not a JSON object", obj=name)
    paths: list[str] = []
    listed = meta.get("disks")
    if isinstance(listed, list) and listed:
        for d in listed:
            path = d.get("path") if isinstance(d, dict) else None
            if not isinstance(path, str):
                raise SourceError(f"metadata.json: disk entry {d!r} has no path", obj=name)
            paths.append(path)
    elif "box.img" in members:
        paths.append("box.img")
    else:
        provider = meta.get("provider", "?")
        raise UnsupportedError(
            f"a Vagrant box for provider {provider!r} without box.ovf or box.img", obj=name
        )
    disks: list[DiskFile] = []
    for path in paths:
        rel = safe_relative_name(path, context=f"{name}: metadata.json")
        m = members.get(rel)
        if m is None or m.kind != "file":
            raise SourceError(f"metadata.json names disk {rel!r}, not in the box", obj=name)

        def open_(m: Member = m) -> BinaryIO:
            return window(m)

        disks.append(DiskFile(name=rel, size=m.size, open=open_, resolve=resolve))
    return disks
