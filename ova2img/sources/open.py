"""Open whatever the user passed as SOURCE: an OVA, an OVF with its files, or bare disk images."""

from __future__ import annotations

import gzip
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError, UsageError
from .base import Source
from .files import open_images, regular_file_size
from .ova import open_ova
from .ovf import open_ovf

# .spool (stdin, Vagrant boxes), .vmfs (datastore images) and .vmx are imported where used:
# an OVA or a disk image needs none of them (about 10 ms of start-up, uuid and platform too).


def sniff(path: Path) -> str:
    """Tell ``ova``, ``tgz``, ``ovf``, ``vmx``, ``vmfs`` or ``image`` from the bytes of
    ``path`` (not its name).

    A tar archive has ``ustar`` at offset 257 (POSIX ``ustar\\0``, GNU ``ustar  \\0``); an OVF is
    XML whose root element is an ``Envelope``; anything else goes to the disk layer.
    """
    regular_file_size(path, what="source")
    with path.open("rb") as fh:
        head = fh.read(4096)
        # VMFS LVM device: its header (magic 0xC001D00D) at 1 MiB, or at 2 MiB on a whole
        # data disk whose VMFS partition starts at 1 MiB (ESXi's layout); a bare VMFS volume:
        # the FS3 descriptor (magic 0x2FABF15E) at 2 MiB (dissect.vmfs c_vmfs).
        at_1m = os.pread(fh.fileno(), 4, 1 << 20)
        at_2m = os.pread(fh.fileno(), 4, 2 << 20)
    lvm_magic, fs3_magic = struct.pack("<I", 0xC001D00D), struct.pack("<I", 0x2FABF15E)
    if at_1m == lvm_magic or at_2m in (lvm_magic, fs3_magic):
        return "vmfs"
    if head[257:262] == b"ustar":
        return "ova"
    if head.startswith(b"\x1f\x8b") and _gzip_head(path)[257:262] == b"ustar":
        return "tgz"  # a gzip'd tar: a Vagrant .box
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<") and b"Envelope" in head:
        return "ovf"
    from .vmx import looks_like_vmx

    if looks_like_vmx(head):
        return "vmx"
    return "image"


def _gzip_head(path: Path) -> bytes:
    """The first 512 inflated bytes of a gzip file (``b""`` when it is corrupt)."""
    try:
        with gzip.open(path, "rb") as gz:
            return gz.read(512)
    except (OSError, EOFError, zlib.error):
        return b""


def open_source(
    paths: list[str],
    *,
    verify_manifest: bool = True,
    allow_external: bool = False,
    stdin: BinaryIO | None = None,
    settle: bool = True,
) -> Source:
    """Open one OVA/OVF/Vagrant box/``.vmx``, a VM on a VMFS datastore, stdin, or several bare
    disk images of one guest in disk order.

    Formats are detected by content (a POSIX/GNU tar → OVA or Vagrant box; a gzip'd tar → a
    Vagrant box, spooled; XML with an OVF Envelope → OVF; ``key = "value"`` lines → ``.vmx``;
    anything else is a bare disk image handed to the disk layer). A single
    ``IMAGE:/dir/vm.vmx`` (or ``IMAGE:/dir/disk.vmdk``) whose ``IMAGE`` is an existing VMFS
    datastore image opens that VM on it (:mod:`ova2img.sources.vmfs`); a datastore image alone
    is an error that lists the VMs on it.

    Args:
        paths: the source(s) as the user gave them.
        verify_manifest: when the OVA/OVF has a ``.mf`` manifest, hash every file it lists
            and raise :class:`SourceError` on a mismatch (CLI: ``--no-manifest-check`` passes
            ``False``; then ``Source.manifest`` is ``skipped``).
        allow_external: let a reference that leaves the source (an absolute path or one with
            ``..`` in an OVF href, a VMDK descriptor extent, a qcow2 backing file) open that
            file on the host, relative to the directory of the image/OVA/OVF naming it (CLI:
            ``--allow-external-files``). Without it such a reference is a :class:`SourceError`.
        stdin: the stream ``-`` reads (default ``sys.stdin.buffer``): an OVA, a Vagrant box
            (tar or tar.gz) or one bare disk image, read once, sequentially; what needs random
            access is spooled to an unnamed file in ``$TMPDIR`` (see
            :mod:`ova2img.sources.spool`; ``Source.spooled`` tells how much).
        settle: wait for the manifest check before returning. ``False``: it may still run
            in a thread (:attr:`Source.check <ova2img.sources.base.Source.check>`), and the
            caller must call :meth:`Source.settle <ova2img.sources.base.Source.settle>`
            before it trusts anything read from the source.

    Raises:
        SourceError: unreadable file, malformed OVA/OVF, missing referenced file.
    """
    if not paths:
        raise SourceError("no source given")
    if "-" in paths:
        from .spool import open_stream

        if len(paths) > 1:
            raise UsageError("stdin must be given alone, not with other sources")
        return open_stream(
            stdin if stdin is not None else sys.stdin.buffer,
            "-",
            verify_manifest=verify_manifest,
            allow_external=allow_external,
        )
    if len(paths) == 1 and not Path(paths[0]).exists():
        from .vmfs import open_vmfs, split_vmfs_path

        split = split_vmfs_path(paths[0])
        if split is not None:
            return open_vmfs(split[0], split[1], paths[0], allow_external=allow_external)
    kinds = [sniff(Path(p)) for p in paths]
    if len(paths) > 1:
        for p, kind in zip(paths, kinds, strict=True):
            if kind != "image":
                raise UsageError(
                    f"{p}: an {kind.upper()} must be given alone, not with other sources"
                )
        return open_images(paths, allow_external=allow_external)
    options = {"verify_manifest": verify_manifest, "allow_external": allow_external}
    if kinds[0] in ("ova", "ovf"):
        opener = open_ova if kinds[0] == "ova" else open_ovf
        source = opener(Path(paths[0]), paths[0], **options)
        if settle:
            try:
                source.settle()
            except BaseException:
                source.close()
                raise
        return source
    if kinds[0] == "vmfs":
        from .vmfs import list_vmfs_vms

        found = list_vmfs_vms(paths[0])
        listed = ", ".join(found[:5]) + (", …" if len(found) > 5 else "") if found else "nothing"
        raise SourceError(
            f"a VMFS datastore image: name a VM or disk on it as {paths[0]}:/DIR/VM.vmx "
            f"(it holds {listed})",
            obj=paths[0],
        )
    if kinds[0] == "vmx":
        from .vmx import open_vmx

        return open_vmx(Path(paths[0]), paths[0], allow_external=allow_external)
    if kinds[0] == "tgz":
        from .spool import open_stream

        with Path(paths[0]).open("rb") as fh:
            return open_stream(fh, paths[0], base=Path(paths[0]).parent, **options)
    return open_images(paths, allow_external=allow_external)
