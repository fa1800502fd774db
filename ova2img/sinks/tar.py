"""Streaming PAX tar writer for the assembled tree (a ``docker import`` rootfs tarball)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from ..assembly import TreeItem


def write_tar(items: Iterable[TreeItem], out: BinaryIO) -> None:
    """Write *items* (in the given order) as a PAX tar to *out*. See the module docs."""
    raise NotImplementedError
