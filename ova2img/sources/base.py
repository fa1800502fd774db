"""Data types of the source layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from .manifest import ManifestCheck


@dataclass
class DiskFile:
    """One virtual disk file as the source delivers it (not yet decoded).

    Attributes:
        name: its name inside the source (OVA member name, or the path given by the user).
        size: size of the file in bytes (not the virtual disk size).
        open: returns a new seekable binary stream over the file's bytes (a window of the OVA
            for a member; never an extracted copy).
        resolve: opens another file of the same source by the (relative) name a descriptor
            uses for it; raises :class:`~ova2img.errors.SourceError` when there is none.
        capacity: the capacity the OVF envelope declares for this disk, if any.
    """

    name: str
    size: int
    open: Callable[[], BinaryIO]
    resolve: Callable[[str], BinaryIO]
    capacity: int | None = None


@dataclass
class Source:
    """A VM as delivered: its disks in order, and what the packaging says about it.

    Attributes:
        name: what the user passed (a path, or ``-``).
        kind: ``ova``, ``ovf``, ``images``, ``vmx`` (a VMware configuration), ``vmfs`` (a VM
            on a VMFS datastore image) or ``box`` (a Vagrant libvirt box).
        disks: the virtual disk files in disk order (first = the guest's first disk).
        product: OVF ProductSection fields (``product``, ``vendor``, ``version``, …), if any.
        files: every file of the packaging with its size (for ``inspect``).
        manifest: ``verified`` (every digest of the ``.mf`` checked, every file listed),
            ``partial`` (the digests listed are right, but some files are not listed: a
            warning names them), ``absent`` (no manifest)
            or ``skipped`` (``verify_manifest=False``); ``checking`` while :attr:`check` runs.
        certificate: a ``.cert`` is present (its signature is not checked).
        spooled: bytes of temporary space held for the source (an archive read from a pipe
            or a gzip'd box is spooled to an unnamed file in ``$TMPDIR``); 0 when read in place.
        check: the manifest's digests being computed in a thread, until :meth:`settle`.
    """

    name: str
    kind: str
    disks: list[DiskFile]
    product: dict[str, str] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    manifest: str = "absent"
    certificate: bool = False
    spooled: int = 0
    check: ManifestCheck | None = field(default=None, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def settle(self) -> None:
        """Wait for the manifest check, if one runs: then :attr:`manifest` is final.

        Raises:
            SourceError: a digest differs (again on every call), or a listed file cannot be
                read.
        """
        if self.check is not None:
            self.manifest = self.check.result()
            self.check = None

    def close(self) -> None:
        """Stop a manifest check still running, then close the files the source opened."""
        if self.check is not None:
            self.check.cancel()
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
