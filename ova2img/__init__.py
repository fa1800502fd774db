"""ova2img: turn VM images (OVA, VMDK, …) into faithful container rootfs tarballs, in pure
Python, without root, loop devices or mounts.

The public API is :func:`open` (explore an image) and :func:`convert` (write a ``docker
import`` tarball); every error is an :class:`Ova2imgError`.
"""

from __future__ import annotations

from ._imports import defer_package_inits, load_uncompiled

defer_package_inits()  # before any dissect import: see ova2img/_imports.py
load_uncompiled()

from ._version import __version__  # noqa: E402
from .api import ConversionResult, Guest, SkippedVolume, convert, open  # noqa: E402
from .errors import (  # noqa: E402
    AssemblyError,
    DiskError,
    FilesystemError,
    InterruptError,
    Ova2imgError,
    SinkError,
    SourceError,
    UnsupportedError,
    UsageError,
    VolumeError,
)

__all__ = [
    "AssemblyError",
    "ConversionResult",
    "DiskError",
    "FilesystemError",
    "Guest",
    "InterruptError",
    "Ova2imgError",
    "SinkError",
    "SkippedVolume",
    "SourceError",
    "UnsupportedError",
    "UsageError",
    "VolumeError",
    "__version__",
    "convert",
    "open",
]
