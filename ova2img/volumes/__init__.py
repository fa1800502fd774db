"""Volume layer: partition tables (MBR, GPT) and — later — LVM2, turning each virtual disk into
the volumes that may hold filesystems.
"""

from __future__ import annotations

from .base import Volume, find_volumes

__all__ = ["Volume", "find_volumes"]
