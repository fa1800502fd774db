"""Filesystem layer: recognise what a volume holds and walk it as uniform :class:`Entry` objects."""

from __future__ import annotations

from .base import DataRun, Entry, EntryType, Filesystem
from .probe import open_filesystem, probe

__all__ = ["DataRun", "Entry", "EntryType", "Filesystem", "open_filesystem", "probe"]
