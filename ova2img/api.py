"""The public API: open a VM image to explore it, or convert it in one call.

Example::

    import ova2img

    with ova2img.open("appliance.ova") as guest:
        print(guest.root.fs.fstype, guest.read_file("/etc/os-release").decode())
        for item in guest.walk():
            ...

    ova2img.convert("appliance.ova", "rootfs.tar.gz")
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assembly import (
    GuestFilesystem,
    Mount,
    TreeItem,
    apply_fstab,
    choose_root,
    resolve_in_mounts,
    resolve_path,
    walk_tree,
)
from .disks import VirtualDisk, open_disk
from .errors import AssemblyError, Ova2imgError, UnsupportedError, UsageError
from .filesystems import EntryType, open_filesystem, probe
from .sources import Source, open_source
from .volumes import Volume, find_volumes
from .volumes.lvm import assemble_lvm

if TYPE_CHECKING:
    from .profile import IdMap
    from .report import Ledger

log = logging.getLogger("ova2img")

#: volume contents that hold no files and are skipped without a word
_SILENT = frozenset({"unknown", "swap", "extended"})

PathLike = str | os.PathLike[str]


@dataclass
class SkippedVolume:
    """A volume that holds something ova2img does not read, and why."""

    volume: Volume
    reason: str


@dataclass
class Guest:
    """An opened VM image: its disks, volumes, filesystems and the assembled tree.

    Use :func:`open` to get one; close it (or use ``with``) when done.
    """

    source: Source
    disks: list[VirtualDisk]
    volumes: list[Volume]
    filesystems: list[GuestFilesystem]
    skipped: list[SkippedVolume]
    root: GuestFilesystem
    mounts: dict[bytes, Mount] = field(default_factory=dict)

    def walk(
        self,
        *,
        exclude: Iterable[str] = (),
        path: str | bytes | None = None,
        lenient: bool = False,
    ) -> Iterator[TreeItem]:
        """Every path of the assembled guest tree, depth-first, sorted, root first.

        Args:
            exclude: GNU-tar-style globs of paths to leave out (with their subtrees).
            path: walk only this subtree of the guest (symlinks followed inside the guest);
                yielded paths are then relative to it.
            lenient: leave out, with a warning each, the entries that cannot be read (see
                :func:`ova2img.assembly.walk_tree`) instead of failing.

        Raises:
            FileNotFoundError: *path* does not exist in the guest.
            NotADirectoryError: *path* is not a directory.
        """
        start = self.resolve(path) if path is not None else b""
        if start and self.stat(start).entry.type is not EntryType.DIR:
            raise NotADirectoryError(f"{start.decode(errors='replace')}: not a directory")
        items = walk_tree(self.mounts, exclude=exclude, start=start, lenient=lenient)
        if self.source.check is None:
            return items
        return self._settled(items)

    def _settled(self, items: Iterator[TreeItem]) -> Iterator[TreeItem]:
        """*items*, then the end of the manifest check (a guest from :func:`open_unsettled`):
        an archive of a package whose digest differs fails before it ends."""
        yield from items
        self.source.settle()

    def resolve(self, path: str | bytes, *, follow: bool = True) -> bytes:
        """The canonical form of a guest path: relative to the guest root, without ``.``,
        ``..`` or symlinks, which are followed inside the guest (an absolute target restarts
        at the guest root, never the host's), across mount points.

        Args:
            follow: also follow a symlink in the last component.

        Raises:
            FileNotFoundError: a component does not exist, or symlinks loop (40 hops, as Linux).
        """
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        return resolve_path(self.mounts, raw, follow=follow)

    def _locate(self, resolved: bytes, asked: bytes) -> tuple[Mount, object]:
        try:
            return resolve_in_mounts(self.mounts, resolved)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{asked.decode(errors='replace')}: no such file or directory in the guest"
            ) from None

    def stat(self, path: str | bytes, *, follow: bool = True) -> TreeItem:
        """The entry at a guest path (``follow=False``: a symlink itself, like ``lstat``)."""
        resolved = self.resolve(path, follow=follow)
        mount, handle = self._locate(resolved, resolved)
        return TreeItem(resolved, mount.fs.stat(handle), mount.fs, mount.fs_id, handle)

    def listdir(self, path: str | bytes) -> list[TreeItem]:
        """The entries of a guest directory, sorted by name, with what mounts show on them.

        Raises:
            FileNotFoundError: no such directory.
        """
        top = self.stat(path)
        if top.entry.type is not EntryType.DIR:
            raise FileNotFoundError(f"{top.path.decode(errors='replace')}: not a directory")
        mount, handle = self._locate(top.path, top.path)
        prefix = top.path + b"/" if top.path else b""
        items = []
        for name, child in sorted(mount.fs.iterdir(handle), key=lambda nc: nc[0]):
            path = prefix + name
            if b"/" + path in self.mounts:  # a mount point shows the mounted root
                m, h = self.mounts[b"/" + path], self.mounts[b"/" + path].fs.root()
            else:
                m, h = mount, child
            items.append(TreeItem(path, m.fs.stat(h), m.fs, m.fs_id, h))
        return items

    def read_file(self, path: str | bytes, limit: int = 1 << 20) -> bytes:
        """Read (at most *limit* bytes of) a regular file of the guest by its path, following
        symlinks inside the guest.

        Raises:
            FileNotFoundError: no such regular file in the guest.
        """
        item = self.stat(path)
        if item.entry.type is not EntryType.FILE:
            raise FileNotFoundError(f"{item.path.decode(errors='replace')}: not a regular file")
        with item.open() as fh:
            return fh.read(limit)

    def inspect(self) -> dict[str, Any]:
        """A JSON-ready description: source → disks → partitions → LVM → filesystems → mounts,
        and the guest OS. Its shape is ``docs/inspect-schema.json`` (``"schema": 1``)."""
        fs_by_volume = {id(g.volume): g for g in self.filesystems}
        skipped = {id(s.volume): s.reason for s in self.skipped}

        def describe(v: Volume) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "name": v.name,
                "number": v.number,
                "offset": v.offset,
                "size": v.size,
                "scheme": v.scheme,
                "type": v.type,
                "partuuid": v.partuuid,
                "partlabel": v.partlabel,
                "content": v.content,
            }
            if v.scheme == "lvm":
                entry["lvm"] = {
                    "vg": v.extra.get("vg"),
                    "lv": v.extra.get("lv"),
                    "mapper": f"/dev/mapper/{v.extra.get('mapper')}",
                    "segments": int(v.extra.get("segments", "0")),
                }
            elif v.content == "LVM2_member":
                entry["lvm"] = {"vg": v.extra.get("vg"), "pv": True}
            g = fs_by_volume.get(id(v))
            if g is not None:
                entry["filesystem"] = {
                    "type": g.fs.fstype,
                    "uuid": g.fs.uuid,
                    "label": g.fs.label,
                    "mountpoints": [mp.decode("utf-8", "surrogateescape") for mp in g.mountpoints],
                }
            if id(v) in skipped:
                entry["skipped"] = skipped[id(v)]
            return entry

        disks = [
            {
                "name": disk.name,
                "format": disk.format,
                "subformat": disk.subformat,
                "size": disk.size,
                "volumes": [
                    describe(v)
                    for v in self.volumes
                    if v.disk_index == disk.index and v.scheme != "lvm"
                ],
            }
            for disk in self.disks
        ]
        groups: dict[str, dict[str, Any]] = {}
        for v in self.volumes:
            vg = v.extra.get("vg")
            if vg is None:
                continue
            group = groups.setdefault(vg, {"name": vg, "pvs": [], "lvs": []})
            if v.scheme == "lvm":
                group["lvs"].append(describe(v))
            else:
                group["pvs"].append(v.name)
        for s in self.skipped:  # refused LVs (snapshots, thin, …) are named in skipped
            if s.volume.scheme == "lvm" and "/" in s.volume.name:
                vg = s.volume.name.split("/", 1)[0]
                group = groups.setdefault(vg, {"name": vg, "pvs": [], "lvs": []})
                group["lvs"].append({"name": s.volume.name, "skipped": s.reason})
        return {
            "schema": 1,
            "source": {
                "name": self.source.name,
                "kind": self.source.kind,
                "product": dict(self.source.product),
                "manifest": self.source.manifest,
                "certificate": "present, not checked" if self.source.certificate else "absent",
            },
            "disks": disks,
            "volume_groups": list(groups.values()),
            "root": self.root.volume.name,
            "mounts": [
                {
                    "path": mp.decode("utf-8", "surrogateescape"),
                    "volume": m.name,
                    "fstype": m.fs.fstype,
                    "options": list(m.options),
                }
                for mp, m in sorted(self.mounts.items())
            ],
            "os": self.os_info(),
        }

    def os_info(self) -> dict[str, str | None]:
        """The guest OS: fields of ``/etc/os-release`` (or ``/usr/lib/os-release``) and the
        architecture of ``/bin/sh`` from its ELF header (``None`` where unknown)."""
        from .sinks.config import elf_platform

        fields: dict[str, str] = {}
        for candidate in ("/etc/os-release", "/usr/lib/os-release"):
            try:
                text = self.read_file(candidate, 64 << 10).decode("utf-8", "replace")
            except (FileNotFoundError, Ova2imgError):
                continue
            for line in text.splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key.isidentifier():
                    fields[key] = value.strip().strip("\"'")
            break
        try:
            platform = elf_platform(self.read_file("/bin/sh", 64))
        except (FileNotFoundError, Ova2imgError):
            platform = None
        return {
            "pretty_name": fields.get("PRETTY_NAME"),
            "id": fields.get("ID"),
            "version_id": fields.get("VERSION_ID"),
            "architecture": str(platform.architecture) if platform else None,
            "variant": platform.variant if platform else None,
        }

    def close(self) -> None:
        """Close every filesystem and the source's files."""
        for g in self.filesystems:
            g.fs.close()
        self.source.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # A manifest check still running (open_unsettled): a mismatch is what fails, also in
        # place of another failure it explains.
        try:
            check = self.source.check
            if check is not None:
                if exc is None:
                    self.source.settle()
                else:
                    check.prefer_mismatch(exc)
        finally:
            self.close()


def _refuse_source_as_output(source: PathLike | Sequence[PathLike], output: str) -> None:
    """Refuse an output that is one of the sources (its name, or a link to it): the
    finished tarball would be renamed over the input (GNU tar: "file is the archive; not
    dumped").

    Raises:
        UsageError: it is.
    """
    if output == "-":
        return
    for name in _as_list(source):
        if name == "-":
            continue
        with contextlib.suppress(OSError):  # a missing output or source: nothing to lose
            if Path(name).samefile(output):
                raise UsageError(
                    f"the output {output} is the source {name}: writing it would replace "
                    "the image being converted"
                )


def _as_list(source: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(source, str | os.PathLike):
        return [os.fspath(source)]
    return [os.fspath(s) for s in source]


def open(
    source: PathLike | Sequence[PathLike],
    *,
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
) -> Guest:
    """Open a VM image and assemble the guest's tree, without reading any file yet.

    Args:
        source: an ``.ova``, an ``.ovf`` with its files beside it, or one or several bare
            disk images (``.vmdk``, raw) of one guest, in disk order.
        root: which filesystem is the root (``UUID=…``, ``LABEL=…``, ``PARTUUID=…``, a
            volume name like ``sda2``) when it cannot be told from the guest's ``/etc/fstab``.
        use_fstab: mount what the root's ``/etc/fstab`` names (``False``: the root only).
        verify_manifest: check every digest of the OVA's/OVF's ``.mf`` (a mismatch is a
            :class:`SourceError` naming the file) before returning; the hashing runs beside
            the decoding.
        allow_external: let an OVF href, a VMDK extent or a backing file name a file outside
            the OVA/folder (absolute or ``..``); refused by default.

    Raises:
        Ova2imgError: the image cannot be read; the message says what and where.
    """
    guest = open_unsettled(
        source,
        root=root,
        use_fstab=use_fstab,
        verify_manifest=verify_manifest,
        allow_external=allow_external,
    )
    try:
        guest.source.settle()
    except BaseException:
        guest.close()
        raise
    return guest


def open_unsettled(
    source: PathLike | Sequence[PathLike],
    *,
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
) -> Guest:
    """:func:`open`, returning while the manifest's digests may still be computed (in a
    thread, beside the conversion: :class:`~ova2img.sources.manifest.ManifestCheck`).

    For a conversion: the guest's :meth:`~Guest.walk` raises a mismatch at its end (before
    an archive ends), and so does leaving the guest's ``with`` block, also in place of
    another failure (a mismatch explains a decoding error better). Nothing read before that
    may be trusted or handed out.
    """
    src = open_source(
        _as_list(source),
        verify_manifest=verify_manifest,
        allow_external=allow_external,
        settle=False,
    )
    try:
        disks = [open_disk(d, i) for i, d in enumerate(src.disks)]
        volumes: list[Volume] = []
        filesystems: list[GuestFilesystem] = []
        skipped: list[SkippedVolume] = []
        physical: list[Volume] = []
        for disk in disks:
            for volume in find_volumes(disk):
                volumes.append(volume)
                volume.content = probe(volume.stream)
                if volume.content == "LVM2_member":
                    physical.append(volume)
        logical: list[Volume] = []
        if physical:
            logical, refused = assemble_lvm(physical)
            for name, reason in refused:
                lv = Volume(name, physical[0].disk_index, 0, 0, 0, physical[0].stream, "lvm")
                skipped.append(SkippedVolume(lv, f"{name}: {reason}"))
            for volume in logical:
                volume.content = probe(volume.stream)
            volumes.extend(logical)
        for volume in volumes:
            if volume.content in _SILENT or volume.content == "LVM2_member":
                log.debug("%s: %s, skipped", volume.name, volume.content)
                continue
            try:
                fs = open_filesystem(volume.stream, volume.content, name=volume.name)
            except UnsupportedError as exc:
                skipped.append(SkippedVolume(volume, str(exc)))
                continue
            filesystems.append(GuestFilesystem(volume, fs))
        if not filesystems and skipped:
            # Nothing readable at all: the first refusal is the answer.
            raise UnsupportedError(skipped[0].reason.removeprefix("unsupported: "))
        chosen, view = choose_root(filesystems, root)
        for s in skipped:
            log.warning("%s", s.reason)
        mounts = apply_fstab(
            chosen,
            view,
            filesystems,
            use_fstab=use_fstab,
            unreadable=[f"{s.volume.name} ({s.volume.content})" for s in skipped],
        )
        return Guest(src, disks, volumes, filesystems, skipped, chosen, mounts)
    except BaseException as exc:
        try:
            if src.check is not None:
                src.check.prefer_mismatch(exc)
        finally:
            src.close()
        raise


@dataclass
class ConversionResult:
    """What :func:`convert` did."""

    output: str
    entries: int
    data_bytes: int
    warnings: list[str]


def convert(
    source: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    exclude: Iterable[str] = (),
    path: str | bytes | None = None,
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    profile: str | None = None,
    ops: Sequence[str] = (),
    no_ops: Sequence[str] = (),
    ids: str | None = None,
    devices: str = "keep",
    whiteouts: str = "keep",
    report: PathLike | None = None,
    lenient: bool = False,
) -> ConversionResult:
    """Convert a VM image into a ``docker import`` rootfs tarball.

    Args:
        source: see :func:`open`.
        output: a path (``.gz``/``.zst`` suffix compresses) or ``"-"`` for stdout. The file
            appears only when the conversion succeeded (written under a temporary name).
        exclude: GNU-tar-style globs of guest paths to leave out.
        root: see :func:`open`.
        use_fstab: see :func:`open`.
        verify_manifest: see :func:`open`.
        allow_external: see :func:`open`.
        path: convert only this subtree of the guest (its paths become relative to it).
        on_progress: called now and then with the file-content bytes and the entries
            written so far.
        profile: ``"container"`` applies every cleaning operation of
            :mod:`ova2img.profile` (machine-id, host keys, logs, caches, …) while streaming;
            ``None`` (the default) is a faithful copy.
        ops: operations to add to the profile.
        no_ops: operations to remove from the profile.
        ids: ``"remap"`` or ``"clamp"`` uids/gids above 65535 (for rootless engines),
            keeping ``/etc/passwd`` and ``/etc/group`` consistent; ``None`` keeps them.
        devices: ``"drop"`` leaves device nodes out.
        whiteouts: ``"rename"`` or ``"refuse"`` names starting with ``.wh.``.
        report: write a JSON ledger of what was kept, transformed or dropped.
        lenient: skip the files and directories that cannot be read (a damaged inode, extent
            tree or directory block), each with a warning, and end with a summary warning,
            instead of failing the whole conversion; a file whose content fails to read
            midway keeps its size, the rest written as zeros (with a warning). Damage to a
            superblock, the root directory, a partition table or a disk stays fatal.

    Returns:
        Counts of what was written and the warnings raised on the way (also logged on the
        ``ova2img`` logger).

    Raises:
        Ova2imgError: anything went wrong; no output file is left behind.
    """
    from .sinks.output import open_output
    from .sinks.tar import write_tar

    _refuse_source_as_output(source, os.fspath(output))
    if report is not None:
        from .report import check_report_path

        check_report_path(report)
    collector = _WarningCollector()
    log.addHandler(collector)
    try:
        with open_unsettled(
            source,
            root=root,
            use_fstab=use_fstab,
            verify_manifest=verify_manifest,
            allow_external=allow_external,
        ) as guest:
            items: Iterator[TreeItem] = guest.walk(
                exclude=exclude, path=guest_path(guest, path), lenient=lenient
            )
            ready = ReadyOptions(profile, ops, no_ops, ids, devices, whiteouts).plan(guest, path)
            ledger = ready.ledger() if report is not None else None
            items = ready.apply(guest, items, ledger)
            counter = _Counter(on_progress)
            with open_output(os.fspath(output)) as out:
                stats = write_tar(
                    counter.count(items),
                    out,
                    on_warning=lambda message: log.warning("%s", message),
                    on_progress=counter.data if on_progress else None,
                    # A second process reading content, except in lenient mode (whose items
                    # read their own content, to fill what fails with zeros).
                    workers=1 if lenient else 2,
                )
                if ledger is not None and report is not None:
                    # before the output is committed: a report that cannot be written fails
                    # the conversion and leaves no tarball behind either
                    ledger.write(report)
    finally:
        log.removeHandler(collector)
    return ConversionResult(os.fspath(output), stats.entries, stats.data_bytes, collector.messages)


@dataclass(frozen=True)
class ReadyPlan:
    """The container-ready options of one conversion, checked and planned before any output
    (:meth:`ReadyOptions.plan`); :meth:`apply` puts them on a walk of the guest. Used by
    :func:`convert` and by :mod:`ova2img.images` (which applies it to two walks: one to
    measure the layer, one to write it).

    Attributes:
        profile: the profile's name, for the report.
        ops: the operations, in :data:`ova2img.profile.OPERATIONS` order.
        ids: the id rewriting planned from the whole guest, or ``None``.
        devices: ``keep`` or ``drop``.
        whiteouts: ``keep``, ``rename`` or ``refuse``.
    """

    profile: str | None = None
    ops: tuple[str, ...] = ()
    ids: IdMap | None = None
    devices: str = "keep"
    whiteouts: str = "keep"

    def ledger(self) -> Ledger:
        """A fresh ledger for ``--report``."""
        from .report import Ledger

        return Ledger(profile=self.profile, operations=list(self.ops))

    def apply(
        self, guest: Guest, items: Iterator[TreeItem], ledger: Ledger | None = None
    ) -> Iterator[TreeItem]:
        """*items* with the operations applied (*items* itself when there are none), the
        changes recorded in *ledger* if given."""
        if not (
            self.ops or self.ids or self.devices != "keep" or self.whiteouts != "keep" or ledger
        ):
            return items
        from .profile import transform

        return transform(
            items,
            guest=guest,
            ops=self.ops,
            ids=self.ids,
            devices=self.devices,  # type: ignore[arg-type]
            whiteouts=self.whiteouts,  # type: ignore[arg-type]
            ledger=ledger,
        )


@dataclass(frozen=True)
class ReadyOptions:
    """The container-ready options of one conversion as the caller gave them (see
    :func:`convert`): checked by :meth:`check` before anything is read, planned on the guest
    by :meth:`plan`. Used by :func:`convert` and by :mod:`ova2img.images`."""

    profile: str | None = None
    ops: Sequence[str] = ()
    no_ops: Sequence[str] = ()
    ids: str | None = None
    devices: str = "keep"
    whiteouts: str = "keep"

    def check(self, path: str | bytes | None = None) -> list[str]:
        """Check the options without the guest (so that a usage error comes before any
        reading or connecting); returns the operations chosen.

        Raises:
            UsageError: an unknown profile, operation or mode; operations with *path*.
        """
        from .profile import select_operations

        chosen = select_operations(self.profile, self.ops, self.no_ops)
        if path is not None and chosen:
            raise UsageError("--profile/--op work on the whole guest, not with --path")
        if self.ids not in (None, "remap", "clamp"):
            raise UsageError(f"unknown id mode {self.ids!r}; known: remap, clamp")
        if self.devices not in ("keep", "drop"):
            raise UsageError(f"unknown devices mode {self.devices!r}; known: keep, drop")
        if self.whiteouts not in ("keep", "rename", "refuse"):
            raise UsageError(
                f"unknown whiteouts mode {self.whiteouts!r}; known: keep, rename, refuse"
            )
        return chosen

    def plan(self, guest: Guest, path: str | bytes | None = None) -> ReadyPlan:
        """:meth:`check`, then plan the options on *guest* (``ids`` walks the guest's
        metadata once).

        Raises:
            UsageError: see :meth:`check`.
            UnsupportedError: ``ids="remap"`` finds more big ids than free ones.
        """
        from .profile import plan_ids

        chosen = self.check(path)
        return ReadyPlan(
            profile=self.profile,
            ops=tuple(chosen),
            ids=plan_ids(guest, self.ids) if self.ids else None,  # type: ignore[arg-type]
            devices=self.devices,
            whiteouts=self.whiteouts,
        )


def guest_path(guest: Guest, path: str | bytes | None) -> bytes | None:
    """Resolve a user-given guest path up front, so a wrong one fails before any output.

    Raises:
        AssemblyError: no such path in the guest.
    """
    if path is None:
        return None
    try:
        resolved = guest.resolve(path)
        if guest.stat(resolved).entry.type is not EntryType.DIR:
            # a tree's root is a directory: a file there would become "./" in the tarball
            shown = path.decode(errors="replace") if isinstance(path, bytes) else path
            raise AssemblyError(f"--path {shown}: not a directory in the guest")
    except FileNotFoundError as exc:
        raise AssemblyError(str(exc)) from None
    return resolved


class _Counter:
    """Feeds a progress callback with (file bytes, entries) as the walk and the sink go."""

    def __init__(self, callback: Callable[[int, int], None] | None) -> None:
        self.callback = callback
        self.entries = 0
        self.bytes = 0

    def count(self, items: Iterator[TreeItem]) -> Iterator[TreeItem]:
        """*items*, counted on the way when there is a callback to feed."""
        return items if self.callback is None else self._counting(items)

    def _counting(self, items: Iterator[TreeItem]) -> Iterator[TreeItem]:
        for item in items:
            self.entries += 1
            if self.callback is not None and self.entries % 512 == 0:
                self.callback(self.bytes, self.entries)
            yield item
        if self.callback is not None:
            self.callback(self.bytes, self.entries)

    def data(self, done: int) -> None:
        self.bytes = done
        if self.callback is not None:
            self.callback(done, self.entries)


class _WarningCollector(logging.Handler):
    """Collects the warnings every layer logs (on ``ova2img.*``) during one conversion."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


__all__ = ["ConversionResult", "Guest", "Ova2imgError", "SkippedVolume", "convert", "open"]
