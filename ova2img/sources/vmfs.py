"""A VM on a VMware VMFS 5/6 datastore image, read through :mod:`dissect.vmfs`.

Addressed as ``datastore.img:/vm1/vm1.vmx`` (the VM's configuration: its disks as
:mod:`~ova2img.sources.vmx` orders them) or ``datastore.img:/vm1/vm1.vmdk`` (one disk). The
argument is split at the *last* ``:/`` whose left part is an existing file, so an image path
may itself hold ``:/``.

The datastore image is a VMFS LVM device (what an ESXi VMFS partition holds: the LVM header
at 1 MiB, then the volume; :class:`dissect.vmfs.lvm.LVM`), a bare VMFS volume, or a whole disk
(``dd`` of an ESXi disk) whose GPT or MBR has a VMFS partition, which is then used. A datastore
spanning several devices (extents) is not supported: one image is one device.

Names inside the datastore: a ``fileName`` or descriptor extent is relative to the directory
of the file naming it; an absolute ``/vmfs/volumes/<label or UUID>/…`` path (ESXi writes those
for disks in another folder) is taken inside this datastore when the label or UUID is its
own. Anything else (another datastore, ``..`` out of the root) is refused: with
``allow_external`` it would have to be a host path, which a datastore path never is.

:mod:`dissect.vmfs` raises its own exceptions (and ``struct``/``EOFError`` on damaged
metadata): they are caught here and raised again as :class:`~ova2img.errors.SourceError`, also
for reads made later through a disk's stream.
"""

from __future__ import annotations

import functools
import posixpath
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import SourceError, UnsupportedError
from .base import DiskFile, Source
from .files import regular_file_size
from .packed import _Readable
from .vmx import MAX_VMX_SIZE, parse_vmx, vmx_disks
from .window import Window

_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    struct.error,
    NotImplementedError,
)


@functools.cache
def _dissect_vmfs() -> tuple[Any, Any, tuple[type[BaseException], ...]]:
    """dissect.vmfs's ``lvm`` and ``vmfs`` modules and the errors its parsing raises, imported
    on first use: the package takes ~0.1 s to import, which a conversion of an OVA, a VMDK or
    anything but a VMFS datastore should not pay."""
    from dissect.vmfs import lvm, vmfs
    from dissect.vmfs.exception import Error as VmfsError

    return lvm, vmfs, (VmfsError, *_DECODE_ERRORS)


def _vmfs_errors() -> tuple[type[BaseException], ...]:
    return _dissect_vmfs()[2]


MAX_WALK_ENTRIES = 100_000
MAX_WALK_DEPTH = 16
# Extent and sidecar files of a disk: not disks of their own (VMware's naming).
_EXTENT_SUFFIXES = (
    "-flat.vmdk",
    "-delta.vmdk",
    "-sesparse.vmdk",
    "-ctk.vmdk",
    "-rdm.vmdk",
    "-rdmp.vmdk",
)


# GPT partition type of a VMFS datastore (ESXi partedUtil "vmfs"), and its MBR type.
VMFS_GPT_TYPE = uuid.UUID("aa31e02a-400f-11db-9590-000c2911d1b8").bytes_le
VMFS_MBR_TYPE = 0xFB


def _describe(err: BaseException) -> str:
    """What dissect reported, for a one-line message (no Python exception names: ``--debug``
    shows the chained traceback)."""
    text = str(err).replace("\n", " ").strip()
    if isinstance(err, KeyError) and text:
        return f"no entry {text}"
    if text:
        return text
    return "unexpected end of data" if isinstance(err, EOFError) else "malformed data"


def vmfs_partition(fh: BinaryIO) -> tuple[int, int] | None:
    """``(offset, size)`` of the first VMFS partition of a whole-disk image (GPT, UEFI spec
    §5.3, with 512- or 4096-byte sectors; else an MBR primary of type ``0xfb``), or ``None``."""
    for sector in (512, 4096):
        fh.seek(sector)
        header = fh.read(92)
        if len(header) < 92 or header[:8] != b"EFI PART":
            continue
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        if entry_size < 128 or count > 1024:
            return None
        fh.seek(entries_lba * sector)
        table = fh.read(count * entry_size)
        for i in range(len(table) // entry_size):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16] == VMFS_GPT_TYPE:
                first, last = struct.unpack_from("<QQ", entry, 32)
                return first * sector, (last - first + 1) * sector
        return None
    fh.seek(0)
    mbr = fh.read(512)
    if len(mbr) == 512 and mbr[510:512] == b"\x55\xaa":
        for i in range(4):
            entry = mbr[446 + 16 * i : 462 + 16 * i]
            if entry[4] == VMFS_MBR_TYPE:
                start, sectors = struct.unpack_from("<II", entry, 8)
                return start * 512, sectors * 512
    return None


def split_vmfs_path(arg: str) -> tuple[Path, str] | None:
    """``(image, path inside)`` for ``image:/path``, or ``None`` when ``arg`` is no such thing.

    The split is at the last ``:/`` whose left part is an existing regular file.
    """
    at = arg.rfind(":/")
    while at > 0:
        image = Path(arg[:at])
        if image.is_file() or image.is_block_device():
            return image, posixpath.normpath("/" + arg[at + 2 :])
        at = arg.rfind(":/", 0, at)
    return None


class _Guarded(_Readable):
    """A VMFS file's stream whose dissect errors become :class:`SourceError`."""

    def __init__(self, inner: BinaryIO, size: int, label: str) -> None:
        super().__init__()
        self._inner = inner
        self.size = size
        self.label = label

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            self._inner.seek(offset)
            data: bytes = self._inner.read(length)
        except _vmfs_errors() as err:
            raise SourceError(
                f"VMFS read failed: {_describe(err)}", obj=self.label, offset=offset
            ) from err
        return data


class Datastore:
    """An opened VMFS datastore image."""

    def __init__(self, image: Path) -> None:
        self.label = str(image)
        regular_file_size(image, what="VMFS datastore image")
        try:
            self._fh: BinaryIO = image.open("rb")
        except OSError as err:
            raise SourceError(f"cannot open: {err.strerror or err}", obj=str(image)) from err
        try:
            self.fs = self._open()
            self.name = str(self.fs.label or "")
            self.uuid = str(self.fs.uuid)
        except BaseException:
            self._fh.close()
            raise

    def _open(self) -> Any:
        errors: list[str] = []
        fs = self._try(self._fh, errors)
        if fs is not None:
            return fs
        part = vmfs_partition(self._fh)
        if part is not None:  # a whole ESXi disk: the datastore is its VMFS partition
            window = Window(self._fh, part[0], part[1], f"{self.label}@{part[0]}").as_binary()
            errors.clear()
            fs = self._try(window, errors)
            if fs is not None:
                return fs
        raise SourceError(f"not a VMFS datastore image ({'; '.join(errors)})", obj=self.label)

    def _try(self, fh: BinaryIO, errors: list[str]) -> Any:
        """A VMFS on ``fh``: an LVM device (an ESXi VMFS partition) or a bare volume."""
        try:
            lvm, vmfs, _ = _dissect_vmfs()
            volumes = lvm.LVM(fh).volumes
            if len(volumes) != 1:
                raise UnsupportedError(
                    f"the VMFS LVM device holds {len(volumes)} volumes; one is supported",
                    obj=self.label,
                )
            return vmfs.VMFS(volumes[0].open())
        except UnsupportedError:
            raise
        except _vmfs_errors() as err:
            errors.append(f"LVM: {_describe(err)}")
        try:
            return _dissect_vmfs()[1].VMFS(fh)
        except _vmfs_errors() as err:
            errors.append(f"VMFS: {_describe(err)}")
        return None

    def close(self) -> None:
        """Close the image."""
        self._fh.close()

    def inside(self, ref: str, directory: str = "/") -> str | None:
        """``ref`` (named by a file in ``directory``) as a path of this datastore, or ``None``
        when it is elsewhere.

        A relative name is relative to ``directory`` and may use ``..`` as long as it stays on
        the datastore (a linked clone names ``../base/base.vmdk``). An absolute
        ``/vmfs/volumes/<label or UUID>/rest`` is ``/rest`` when the label or UUID is this
        datastore's; any other absolute path is outside.
        """
        ref = ref.replace("\\", "/")
        if ref.startswith("/"):
            parts = [p for p in ref.split("/") if p not in ("", ".")]
            if parts[:2] != ["vmfs", "volumes"] or len(parts) < 4:
                return None
            if parts[2] not in (self.name, self.uuid):
                return None
            parts = parts[3:]
        else:
            parts = [p for p in f"{directory}/{ref}".split("/") if p not in ("", ".")]
        resolved: list[str] = []
        for part in parts:
            if part == "..":
                if not resolved:
                    return None
                resolved.pop()
            else:
                resolved.append(part)
        return "/" + "/".join(resolved)

    def get(self, path: str) -> Any:
        """The file descriptor at ``path``.

        Raises:
            SourceError: no such file.
        """
        try:
            return self.fs.get(path)
        except _vmfs_errors() as err:
            raise SourceError(f"no file {path!r} on the datastore", obj=self.label) from err

    def open_file(self, path: str) -> tuple[int, Callable[[], BinaryIO]]:
        """Size and opener of the regular file at ``path``.

        Raises:
            SourceError: missing, or a directory; UnsupportedError: a raw device mapping.
        """
        fd = self.get(path)
        try:
            if fd.is_rdm():
                raise UnsupportedError(
                    f"{path} is a raw device mapping: its data is on a LUN, not in the datastore",
                    obj=self.label,
                )
            if not fd.is_file():
                raise SourceError(f"{path} is not a regular file", obj=self.label)
            size = int(fd.size)
        except _vmfs_errors() as err:
            raise SourceError(f"{path}: {_describe(err)}", obj=self.label) from err
        label = f"{self.label}:{path}"

        def opener() -> BinaryIO:
            try:
                inner = fd.open()
            except _vmfs_errors() as err:
                raise SourceError(f"{_describe(err)}", obj=label) from err
            return _Guarded(inner, size, label).as_binary()

        return size, opener

    def read_small(self, path: str, limit: int) -> bytes:
        """The bytes of a small file (a ``.vmx``, a descriptor)."""
        size, opener = self.open_file(path)
        if size > limit:
            raise SourceError(f"{path} is {size} bytes, too large", obj=self.label)
        with opener() as fh:
            return fh.read()

    def walk(self) -> Iterator[tuple[str, int, bool]]:
        """``(path, size, is_dir)`` of every file on the datastore but VMFS's own metadata
        (``.sf`` system files, ``.sdd.sf``), depth first in name order."""
        count = 0

        def visit(path: str, fd: Any, depth: int) -> Iterator[tuple[str, int, bool]]:
            nonlocal count
            try:
                entries = sorted(fd.listdir().items())
            except _vmfs_errors() as err:
                raise SourceError(
                    f"cannot list {path!r}: {_describe(err)}", obj=self.label
                ) from err
            for name, entry in entries:
                if name in (".", ".."):
                    continue
                count += 1
                if count > MAX_WALK_ENTRIES:
                    raise SourceError(f"more than {MAX_WALK_ENTRIES} files", obj=self.label)
                child = entry.fd
                full = posixpath.join(path, name)
                try:
                    if child.is_system():
                        continue
                    is_dir = bool(child.is_dir())
                    size = int(child.size)
                except _vmfs_errors() as err:
                    raise SourceError(f"{full}: {_describe(err)}", obj=self.label) from err
                yield full, size, is_dir
                if is_dir and depth < MAX_WALK_DEPTH:
                    yield from visit(full, child, depth + 1)

        yield from visit("/", self.get("/"), 0)


def list_vmfs_vms(path: str | Path) -> list[str]:
    """The VMs and disks on a datastore image: every ``.vmx``, and every ``.vmdk`` that is a
    disk (not an extent or sidecar: ``-flat``, ``-delta``, ``-sesparse``, ``-ctk``, ``-rdm``,
    ``-rdmp``), as paths inside the datastore (``/vm1/vm1.vmx``), in name order.

    Raises:
        SourceError: not a VMFS datastore image.
    """
    store = Datastore(Path(path))
    try:
        found: list[str] = []
        for file, _, is_dir in store.walk():
            low = file.lower()
            if is_dir:
                continue
            if low.endswith(".vmx") or (
                low.endswith(".vmdk") and not low.endswith(_EXTENT_SUFFIXES)
            ):
                found.append(file)
        return found
    finally:
        store.close()


def open_vmfs(image: Path, inner: str, name: str, *, allow_external: bool = False) -> Source:
    """Open the VM ``.vmx`` or the disk ``.vmdk`` at ``inner`` on the datastore ``image``.

    ``allow_external`` changes nothing: a name outside the datastore is never a host file.

    Raises:
        SourceError: not a datastore, no such file, a disk named outside the datastore.
        UnsupportedError: a raw device mapping, a spanned datastore.
    """
    store = Datastore(image)
    try:

        def resolver(directory: str, context: str) -> Callable[[str], BinaryIO]:
            def resolve(ref: str) -> BinaryIO:
                target = store.inside(ref, directory)
                if target is None:
                    raise SourceError(
                        f"{context} names {ref!r}, outside this datastore "
                        f"({store.name}, {store.uuid})",
                        obj=name,
                    )
                return store.open_file(target)[1]()

            return resolve

        def disk(path: str) -> DiskFile:
            size, opener = store.open_file(path)
            return DiskFile(
                name=path,
                size=size,
                open=opener,
                resolve=resolver(posixpath.dirname(path), path),
            )

        product: dict[str, str] = {}
        if inner.lower().endswith(".vmx"):
            config = parse_vmx(store.read_small(inner, MAX_VMX_SIZE), f"{name}")
            devices = vmx_disks(config)
            if not devices:
                raise SourceError("the .vmx names no disk", obj=name)
            directory = posixpath.dirname(inner)
            disks: list[DiskFile] = []
            for dev in devices:
                ref = dev.file_name.replace("\\", "/")
                target = store.inside(ref, directory)
                if target is None:
                    hint = " (another datastore: give its image)" if ref.startswith("/") else ""
                    raise SourceError(
                        f"{dev.device}.fileName {dev.file_name!r} is outside this datastore{hint}",
                        obj=name,
                    )
                disks.append(disk(target))
            if "displayname" in config:
                product["product"] = config["displayname"]
        else:
            disks = [disk(inner)]
        files = {path: size for path, size, is_dir in store.walk() if not is_dir}
    except BaseException:
        store.close()
        raise
    return Source(
        name=name,
        kind="vmfs",
        disks=disks,
        product=product,
        files=files,
        _closers=[store.close],
    )
