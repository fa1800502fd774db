"""Open whatever the user passed as SOURCE: an OVA, an OVF with its files, or bare disk images."""

from __future__ import annotations

from .base import Source


def open_source(paths: list[str]) -> Source:
    """Open one OVA/OVF, or several bare disk images of one guest in disk order.

    Formats are detected by content (a POSIX/GNU tar → OVA; XML with an OVF Envelope → OVF;
    anything else is a bare disk image handed to the disk layer).

    Raises:
        SourceError: unreadable file, malformed OVA/OVF, missing referenced file.
    """
    raise NotImplementedError
