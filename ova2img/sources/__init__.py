"""Source layer: where the disks of a VM come from (OVA tar read in place, OVF, bare images).

Contract with the disk layer: a :class:`Source` hands out :class:`DiskFile` objects in disk
order. A disk file is a window onto bytes (a member of the OVA, or a file) plus a resolver that
opens *other* files of the same source by the name a descriptor uses (a VMDK descriptor's
extents), so nothing is ever looked up beside the OVA on the host.
"""

from __future__ import annotations

from .base import DiskFile, Source
from .open import open_source

__all__ = ["DiskFile", "Source", "open_source"]
