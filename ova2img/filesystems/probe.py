"""Recognise a volume's content by its magic bytes, and open the filesystems we read."""

from __future__ import annotations

from typing import BinaryIO

from .base import Filesystem


def probe(stream: BinaryIO) -> str:
    """Name what the first bytes of a volume hold.

    Returns one of ``ext2``, ``ext3``, ``ext4``, ``xfs``, ``btrfs``, ``vfat``, ``swap``,
    ``lvm2``, ``luks``, ``linux_raid_member``, ``zfs_member``, ``ntfs``, ``iso9660``,
    ``squashfs``, ``crypto_BitLocker``, ``unknown``… (blkid's names).
    """
    raise NotImplementedError


def open_filesystem(stream: BinaryIO, kind: str, *, name: str = "") -> Filesystem:
    """Open a filesystem of a kind :func:`probe` returned.

    Raises:
        UnsupportedError: a kind ova2img cannot read (naming it); FilesystemError: malformed.
    """
    raise NotImplementedError
