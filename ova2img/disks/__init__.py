"""Disk layer: decode a virtual disk file (VMDK of every subformat, raw) into one seekable
stream of its virtual size.
"""

from __future__ import annotations

from .base import VirtualDisk, open_disk

__all__ = ["VirtualDisk", "open_disk"]
