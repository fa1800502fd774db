"""Open whatever the user passed as SOURCE: an OVA, an OVF with its files, or bare disk images."""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError
from .base import Source
from .files import open_images, regular_file_size
from .ova import open_ova
from .ovf import open_ovf


def sniff(path: Path) -> str:
    """Tell ``ova``, ``ovf`` or ``image`` from the first bytes of ``path`` (not its name).

    A tar archive has ``ustar`` at offset 257 (POSIX ``ustar\\0``, GNU ``ustar  \\0``); an OVF is
    XML whose root element is an ``Envelope``; anything else goes to the disk layer.
    """
    regular_file_size(path, what="source")
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head[257:262] == b"ustar":
        return "ova"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<") and b"Envelope" in head:
        return "ovf"
    return "image"


def open_source(
    paths: list[str], *, verify_manifest: bool = True, allow_external: bool = False
) -> Source:
    """Open one OVA/OVF, or several bare disk images of one guest in disk order.

    Formats are detected by content (a POSIX/GNU tar → OVA; XML with an OVF Envelope → OVF;
    anything else is a bare disk image handed to the disk layer).

    Args:
        paths: the source(s) as the user gave them.
        verify_manifest: when the OVA/OVF has a ``.mf`` manifest, hash every file it lists
            before returning and raise :class:`SourceError` on a mismatch (CLI:
            ``--no-manifest-check`` passes ``False``; then ``Source.manifest`` is ``skipped``).
        allow_external: let a reference that leaves the source (an absolute path or one with
            ``..`` in an OVF href, a VMDK descriptor extent, a qcow2 backing file) open that
            file on the host, relative to the directory of the image/OVA/OVF naming it (CLI:
            ``--allow-external-files``). Without it such a reference is a :class:`SourceError`.

    Raises:
        SourceError: unreadable file, malformed OVA/OVF, missing referenced file.
    """
    if not paths:
        raise SourceError("no source given")
    if "-" in paths:
        raise SourceError("reading from stdin needs the [sources] issue", obj="-")
    kinds = [sniff(Path(p)) for p in paths]
    if len(paths) > 1:
        for p, kind in zip(paths, kinds, strict=True):
            if kind != "image":
                raise SourceError(
                    f"an {kind.upper()} must be given alone, not with other sources", obj=p
                )
        return open_images(paths, allow_external=allow_external)
    options = {"verify_manifest": verify_manifest, "allow_external": allow_external}
    if kinds[0] == "ova":
        return open_ova(Path(paths[0]), paths[0], **options)
    if kinds[0] == "ovf":
        return open_ovf(Path(paths[0]), paths[0], **options)
    return open_images(paths, allow_external=allow_external)
