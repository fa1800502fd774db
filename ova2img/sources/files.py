"""Bare disk images given by path, and the rules for names a source may resolve."""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError
from .base import DiskFile, Source
from .window import Window


def safe_relative_name(name: str, *, context: str) -> str:
    """Check that ``name`` is a plain relative name and return it normalised.

    A descriptor or an OVF ``href`` may only name files of its own source: an absolute path, a
    ``..`` component, a backslash-rooted or drive path, or a NUL byte is refused, so nothing is
    ever read from elsewhere on the host. A leading ``./`` (``tar -C dir .``) is dropped.

    Raises:
        SourceError: the name is empty, absolute or escapes with ``..``.
    """
    if not name or "\x00" in name:
        raise SourceError(f"empty or invalid file name {name!r}", obj=context)
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise SourceError(
            f"absolute file name {name!r} refused: only names inside the source", obj=context
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any(".." in p.split("\\") for p in parts):
        raise SourceError(f"file name {name!r} escapes the source with '..': refused", obj=context)
    return posixpath.join(*parts)


class FileHandles:
    """The host files a source opened: one shared handle per path, closed with the source."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def window(self, path: Path, label: str) -> Window:
        """A new window over the whole of ``path`` (opened once, shared)."""
        fh = self._files.get(path)
        if fh is None:
            try:
                fh = path.open("rb")
            except OSError as err:
                raise SourceError(f"cannot open: {err.strerror or err}", obj=str(path)) from err
            self._files[path] = fh
        size = os.fstat(fh.fileno()).st_size
        return Window(fh, 0, size, label)

    def close(self) -> None:
        """Close every file opened."""
        while self._files:
            _, fh = self._files.popitem()
            fh.close()


def regular_file_size(path: Path, *, what: str) -> int:
    """Size of ``path``, which must be an existing regular file (or block device)."""
    try:
        st = path.stat()
    except OSError as err:
        raise SourceError(f"{what} not found: {err.strerror or err}", obj=str(path)) from err
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        with path.open("rb") as fh:
            return fh.seek(0, os.SEEK_END)
    if stat.S_ISDIR(st.st_mode):
        # a VM's folder: point at what in it can be converted
        found = sorted(
            p.name
            for pattern in (
                "*.ova",
                "*.ovf",
                "*.vmx",
                "*.box",
                "*.vmdk",
                "*.qcow2",
                "*.vhd*",
                "*.vdi",
                "*.img",
                "*.raw",
            )
            for p in path.glob(pattern)
        )[:4]
        hint = f"; give one of its files, e.g. {', '.join(found)}" if found else ""
        raise SourceError(f"{what} is a directory{hint}", obj=str(path))
    raise SourceError(f"{what} is not a regular file", obj=str(path))


def is_external(name: str) -> bool:
    """Whether ``name`` points outside its source (absolute, drive-rooted or with ``..``)."""
    try:
        safe_relative_name(name, context="")
    except SourceError:
        return bool(name) and "\x00" not in name
    return False


def external_path(directory: Path, name: str) -> Path:
    """The host path of an external ``name`` (``--allow-external-files``): absolute as is,
    relative to ``directory`` otherwise (a Windows separator is taken as ``/``)."""
    return directory / name.replace("\\", "/")


def directory_resolver(
    directory: Path, handles: FileHandles, context: str, *, allow_external: bool = False
) -> Callable[[str], BinaryIO]:
    """A ``DiskFile.resolve`` that opens files of ``directory`` by relative name only.

    With ``allow_external``, an absolute name or one with ``..`` is opened on the host too
    (relative to ``directory``); without it, such a name is a :class:`SourceError`.
    """

    def resolve(name: str) -> BinaryIO:
        if allow_external and is_external(name):
            path = external_path(directory, name)
            regular_file_size(path, what=f"external file {name!r} named by {context}")
            return handles.window(path, name).as_binary()
        rel = safe_relative_name(name, context=context)
        path = directory / rel
        regular_file_size(path, what=f"file {rel!r} named by {context}")
        return handles.window(path, f"{rel}").as_binary()

    return resolve


def host_disk_file(
    path: Path,
    name: str,
    handles: FileHandles,
    capacity: int | None = None,
    *,
    allow_external: bool = False,
) -> DiskFile:
    """A :class:`DiskFile` for a file on the host; ``resolve`` looks in the same directory."""
    size = regular_file_size(path, what="disk image")

    def open_() -> BinaryIO:
        return handles.window(path, name).as_binary()

    return DiskFile(
        name=name,
        size=size,
        open=open_,
        resolve=directory_resolver(path.parent, handles, name, allow_external=allow_external),
        capacity=capacity,
    )


def open_images(paths: list[str], *, allow_external: bool = False) -> Source:
    """Open one or several bare disk images, in disk order.

    Raises:
        SourceError: a path is missing, not a regular file, or ``-`` (stdin).
    """
    handles = FileHandles()
    try:
        disks: list[DiskFile] = []
        files: dict[str, int] = {}
        for name in paths:
            if name == "-":
                raise SourceError("stdin must be given alone, not with other sources", obj="-")
            path = Path(name)
            disk = host_disk_file(path, name, handles, allow_external=allow_external)
            if name in files:
                raise SourceError("the same image is given twice", obj=name)
            disks.append(disk)
            files[name] = disk.size
    except BaseException:
        handles.close()
        raise
    return Source(
        name=paths[0] if len(paths) == 1 else " ".join(paths),
        kind="images",
        disks=disks,
        files=files,
        _closers=[handles.close],
    )
