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

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .assembly import GuestFilesystem, Mount, TreeItem, apply_fstab, choose_root, walk_tree
from .disks import VirtualDisk, open_disk
from .errors import Ova2imgError, UnsupportedError
from .filesystems import open_filesystem, probe
from .sources import Source, open_source
from .volumes import Volume, find_volumes
from .volumes.lvm import assemble_lvm

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

    def walk(self, *, exclude: Iterable[str] = ()) -> Iterator[TreeItem]:
        """Every path of the assembled guest tree, depth-first, sorted, root first.

        Args:
            exclude: GNU-tar-style globs of paths to leave out (with their subtrees).
        """
        return walk_tree(self.mounts, exclude=exclude)

    def mount_for(self, path: bytes) -> tuple[Mount, bytes]:
        """The filesystem that holds *path* in the assembled tree and the path inside it."""
        norm = b"/" + b"/".join(p for p in path.split(b"/") if p and p != b".")
        best = b"/"
        for mp in self.mounts:
            if (norm == mp or norm.startswith(mp.rstrip(b"/") + b"/")) and len(mp) > len(best):
                best = mp
        rest = norm[len(best.rstrip(b"/")) :] or b"/"
        return self.mounts[best], rest

    def read_file(self, path: str | bytes, limit: int = 1 << 20) -> bytes:
        """Read (at most *limit* bytes of) a file of the guest by its absolute path.

        Raises:
            FileNotFoundError: no such file in the guest.
        """
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        g, inner = self.mount_for(raw)
        return g.fs.read_file(inner, limit)

    def inspect(self) -> dict[str, Any]:
        """A JSON-ready description: source → disks → volumes → filesystems → mounts."""
        fs_by_volume = {id(g.volume): g for g in self.filesystems}
        skipped = {id(s.volume): s.reason for s in self.skipped}
        disks = []
        for disk in self.disks:
            vols = []
            for v in self.volumes:
                if v.disk_index != disk.index:
                    continue
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
                        "mountpoints": [
                            mp.decode("utf-8", "surrogateescape") for mp in g.mountpoints
                        ],
                    }
                if id(v) in skipped:
                    entry["skipped"] = skipped[id(v)]
                vols.append(entry)
            disks.append(
                {
                    "name": disk.name,
                    "format": disk.format,
                    "subformat": disk.subformat,
                    "size": disk.size,
                    "volumes": vols,
                }
            )
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
        }

    def close(self) -> None:
        """Close every filesystem and the source's files."""
        for g in self.filesystems:
            g.fs.close()
        self.source.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        verify_manifest: check every digest of the OVA's/OVF's ``.mf`` before reading (a
            mismatch is a :class:`SourceError` naming the file).
        allow_external: let an OVF href, a VMDK extent or a backing file name a file outside
            the OVA/folder (absolute or ``..``); refused by default.

    Raises:
        Ova2imgError: the image cannot be read; the message says what and where.
    """
    src = open_source(
        _as_list(source), verify_manifest=verify_manifest, allow_external=allow_external
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
    except BaseException:
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
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
    on_progress: Callable[[int], None] | None = None,
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
        on_progress: called with the number of file-content bytes written so far.

    Returns:
        Counts of what was written and the warnings raised on the way (also logged on the
        ``ova2img`` logger).

    Raises:
        Ova2imgError: anything went wrong; no output file is left behind.
    """
    from .sinks.output import open_output
    from .sinks.tar import write_tar

    collector = _WarningCollector()
    log.addHandler(collector)
    try:
        with (
            open(
                source,
                root=root,
                use_fstab=use_fstab,
                verify_manifest=verify_manifest,
                allow_external=allow_external,
            ) as guest,
            open_output(os.fspath(output)) as out,
        ):
            stats = write_tar(
                guest.walk(exclude=exclude),
                out,
                on_warning=lambda message: log.warning("%s", message),
                on_progress=on_progress,
            )
    finally:
        log.removeHandler(collector)
    return ConversionResult(os.fspath(output), stats.entries, stats.data_bytes, collector.messages)


class _WarningCollector(logging.Handler):
    """Collects the warnings every layer logs (on ``ova2img.*``) during one conversion."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


__all__ = ["ConversionResult", "Guest", "Ova2imgError", "SkippedVolume", "convert", "open"]
