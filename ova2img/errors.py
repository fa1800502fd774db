"""The one exception tree of ova2img.

Every error the library raises on purpose derives from :class:`Ova2imgError`. Each layer of the
pipeline (source → disk → volumes → filesystems → assembly → sinks) has its own subclass, so a
caller can tell *where* a conversion failed; :class:`UnsupportedError` marks content that was
recognised but is not handled (LUKS, md-raid, ZFS, NTFS, …).

Messages are one line: they name the layer's object, the offset when there is one, what was
expected versus what was found, and — where it helps — what the user can do about it.
"""

from __future__ import annotations


class Ova2imgError(Exception):
    """Base class of every error ova2img raises on purpose.

    The CLI prints ``str(err)`` on one line and exits with :attr:`exit_code`.
    """

    exit_code: int = 1
    layer: str = "ova2img"

    def __init__(self, message: str, *, offset: int | None = None, obj: str | None = None) -> None:
        self.message = message
        self.offset = offset
        self.obj = obj
        super().__init__(message)

    def __str__(self) -> str:
        parts = [f"{self.layer}: "]
        if self.obj:
            parts.append(f"{self.obj}: ")
        parts.append(self.message)
        if self.offset is not None:
            parts.append(f" (at offset {self.offset:#x})")
        # Keep it one line whatever the cause carried.
        return "".join(parts).replace("\n", " ")


class UsageError(Ova2imgError):
    """The caller asked for something contradictory or impossible (CLI exit code 2)."""

    exit_code = 2
    layer = "usage"


class SourceError(Ova2imgError):
    """The OVA/OVF packaging or a bare image file could not be read."""

    layer = "source"


class DiskError(Ova2imgError):
    """A virtual disk (VMDK, raw, …) is malformed or cannot be decoded."""

    layer = "disk"


class VolumeError(Ova2imgError):
    """A partition table or volume manager structure is malformed."""

    layer = "volume"


class FilesystemError(Ova2imgError):
    """A filesystem structure is malformed or inconsistent."""

    layer = "filesystem"


class AssemblyError(Ova2imgError):
    """The guest's tree could not be assembled (no root, unresolvable fstab entry, …)."""

    layer = "assembly"


class SinkError(Ova2imgError):
    """The output (tar file, stdout, Docker engine, image) could not be written."""

    layer = "output"


class UnsupportedError(Ova2imgError):
    """Content that was recognised but that ova2img does not handle (LUKS, md-raid, ZFS, …)."""

    layer = "unsupported"


class InterruptError(Ova2imgError):
    """The conversion was interrupted by SIGINT or SIGTERM (CLI exit code 130)."""

    exit_code = 130
    layer = "interrupted"
