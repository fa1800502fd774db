"""The reference tarball, made the way root would: loop devices, ``mount -o ro``, GNU tar.

This is the ground truth of ``/work/shared/design/fidelity.md``. The kernel here does not scan
partitions on loop devices and has no device-mapper, so each filesystem gets its own read-only
loop device over its byte range (``losetup --read-only --offset --sizelimit``).

Everything set up is torn down in ``finally`` (also when mount or tar fails), innermost first;
mount directories have unique names under ``/tmp``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "REFERENCE_TAR_ARGS",
    "loop_device",
    "loops_backing",
    "make_reference",
    "mounted",
]

REFERENCE_TAR_ARGS: tuple[str, ...] = (
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
)
"""GNU tar options of the reference, exactly as fidelity.md gives them."""


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True)


@contextlib.contextmanager
def loop_device(
    backing: Path, offset: int = 0, size: int | None = None, *, read_only: bool = True
) -> Iterator[str]:
    """Attach ``backing[offset:offset+size]`` to a free loop device; detach it on exit."""
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    dev = _run([*argv, os.fspath(backing)]).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


@contextlib.contextmanager
def mounted(
    device: str, target: Path, *, options: str = "ro", fstype: str | None = None
) -> Iterator[Path]:
    """``mount -o options device target``; ``umount`` on exit."""
    argv = ["mount", "-o", options]
    if fstype:
        argv += ["-t", fstype]
    _run([*argv, device, os.fspath(target)])
    try:
        yield target
    finally:
        subprocess.run(["umount", os.fspath(target)], check=True, capture_output=True)


def loops_backing(path: Path) -> list[str]:
    """Loop devices currently attached to ``path`` (``losetup -j``): for leak checks."""
    out = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME", "-j", os.fspath(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def make_reference(
    disk_raw: Path,
    out_tar: Path,
    mounts: Sequence[tuple[str, int, int]],
) -> list[str]:
    """Make root's reference tarball of the guest on ``disk_raw``.

    Args:
        disk_raw: a raw disk image (or a bare filesystem image).
        out_tar: where GNU tar writes the reference (POSIX/PAX format: GNU tar 1.34 switches
            to it for ``--xattrs``; sparse files as GNU sparse 1.0).
        mounts: ``(mount point inside the root, byte offset, size)`` for each filesystem;
            ``/`` must be one of them. They are mounted in nesting order (by path depth), so
            ``/boot/efi`` goes over ``/boot``; each mount point must exist in the filesystem
            below it (it is read-only).

    Returns:
        tar's warnings (stderr lines), e.g. ``tar: ./probes/socket: socket ignored``.

    Raises:
        subprocess.CalledProcessError: losetup, mount or tar failed (tar exit status 2;
            status 1, "some files differ", cannot happen on a read-only mount).
        ValueError: no ``/`` in ``mounts`` or a mount point given twice.
    """
    order = sorted(mounts, key=lambda m: (m[0].rstrip("/").count("/"), m[0]))
    points = [m[0].rstrip("/") or "/" for m in order]
    if "/" not in points:
        raise ValueError(f"no root filesystem in {mounts!r}")
    if len(set(points)) != len(points):
        raise ValueError(f"a mount point appears twice in {mounts!r}")
    mnt = Path(tempfile.mkdtemp(prefix="ova2img-ref-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            for point, (_, offset, size) in zip(points, order, strict=True):
                target = mnt / point.lstrip("/")
                if not target.is_dir():
                    raise FileNotFoundError(f"mount point {point} is not a directory in the guest")
                dev = stack.enter_context(loop_device(disk_raw, offset, size))
                # Plain `ro`: what root gets. A clean ext4 mounts without replaying the journal.
                stack.enter_context(mounted(dev, target, options="ro"))
            proc = subprocess.run(
                ["tar", *REFERENCE_TAR_ARGS, "-C", os.fspath(mnt), "-cf", os.fspath(out_tar), "."],
                check=False,
                capture_output=True,
                text=True,
                errors="surrogateescape",
            )
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(
                    proc.returncode, proc.args, proc.stdout, proc.stderr
                )
            return [line for line in proc.stderr.splitlines() if line]
    finally:
        mnt.rmdir()
