"""Assembly layer: find the guest's root filesystem, apply its /etc/fstab, and walk the one
tree the guest would see, in a deterministic order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from .filesystems.base import DataRun, Entry, Filesystem


@dataclass(slots=True)
class TreeItem:
    """One path of the assembled guest tree.

    Attributes:
        path: path relative to the guest root as raw bytes, without leading ``/``; ``b""`` is
            the root directory itself. Components never are ``.``/``..`` nor contain NUL.
        entry: its metadata.
        fs: the filesystem it lives on.
        fs_id: a small integer naming that filesystem within this tree (hardlink identity is
            ``(fs_id, entry.inode)``).
        handle: the adapter's handle, for :meth:`open` and :meth:`data_runs`.
    """

    path: bytes
    entry: Entry
    fs: Filesystem
    fs_id: int
    handle: object

    def open(self) -> BinaryIO:
        """A stream over a regular file's content."""
        return self.fs.open(self.handle)

    def data_runs(self) -> list[DataRun] | None:
        """Data stretches of a regular file (``None``: treat as dense)."""
        return self.fs.data_runs(self.handle)

    @property
    def link_key(self) -> tuple[int, int]:
        """Hardlink identity: the same key means the same inode."""
        return (self.fs_id, self.entry.inode)
