"""Real guests: a debootstrapped Debian in an ext4 on an MBR disk, as a streamOptimized OVA.

``debootstrap`` runs as root once per parameter set; its tree is cached as a tarball (GNU tar
with numeric owners, xattrs, ACLs; zstd when the ``zstd`` program is there) in
``$OVA2IMG_CACHE`` (default ``/var/cache/ova2img-tests``), keyed by a hash of the parameters, so
later runs only unpack it. The guest then goes through :func:`tests.support.images.disk_mbr_single`
(layout a: MBR, one ext4 holding ``/``, fstab by UUID), ``qemu-img`` and :func:`make_ova`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .images import BuiltDisk, disk_mbr_single, make_ova, to_vmdk
from .probes import populate_probes

__all__ = [
    "DEBIAN_MIRROR",
    "DebianGuest",
    "build_debian_guest",
    "cache_dir",
    "debian_guest",
    "debian_rootfs_tarball",
]

DEBIAN_MIRROR = "http://deb.debian.org/debian"
MiB = 1024 * 1024
_TAR_ARGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def cache_dir() -> Path:
    """``$OVA2IMG_CACHE`` or ``/var/cache/ova2img-tests``, created if missing."""
    path = Path(os.environ.get("OVA2IMG_CACHE", "/var/cache/ova2img-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compress_args() -> tuple[list[str], str]:
    if shutil.which("zstd"):
        return ["--zstd"], ".tar.zst"
    return [], ".tar"


def debian_rootfs_tarball(
    *,
    suite: str = "bookworm",
    variant: str = "minbase",
    include: tuple[str, ...] = ("make",),
    mirror: str = DEBIAN_MIRROR,
    arch: str = "amd64",
) -> Path:
    """The cached tarball of ``debootstrap --variant=VARIANT --include=… SUITE DIR MIRROR``.

    Built (as root) on first use; the cache key hashes every parameter.
    """
    params = {
        "suite": suite,
        "variant": variant,
        "include": sorted(include),
        "mirror": mirror,
        "arch": arch,
        "v": 1,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    zargs, ext = _compress_args()
    cache = cache_dir()
    out = cache / f"debian-{suite}-{variant}-{arch}-{key}{ext}"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="ova2img-debootstrap-", dir="/tmp") as tmp:
        target = Path(tmp) / "root"
        argv = ["debootstrap", f"--variant={variant}", f"--arch={arch}"]
        if include:
            argv.append("--include=" + ",".join(include))
        subprocess.run([*argv, suite, str(target), mirror], check=True, capture_output=True)
        partial = cache / f".{out.name}.{os.getpid()}.partial"
        subprocess.run(
            ["tar", *_TAR_ARGS, "--sparse", *zargs, "-C", str(target), "-cf", str(partial), "."],
            check=True,
            capture_output=True,
        )
        partial.replace(out)  # atomic: a concurrent or interrupted run never sees half a tar
    return out


@dataclass(frozen=True)
class DebianGuest:
    """A built Debian guest: the OVA and what went into it (for references)."""

    ova: Path
    vmdk: Path
    disk: BuiltDisk
    rootfs_tarball: Path
    seconds: dict[str, float]

    @property
    def raw(self) -> Path:
        """The raw disk image (for :func:`tests.support.reference.make_reference`)."""
        return self.disk.path


def debian_guest(
    workdir: Path,
    *,
    suite: str = "bookworm",
    probes: bool = True,
    fs_size: int = 512 * MiB,
    name: str = "debian",
) -> DebianGuest:
    """Build the Debian guest in ``workdir``: rootfs (cached), ext4 on MBR, VMDK, OVA.

    Args:
        workdir: an existing directory for every file (raw disk, ext4, VMDK, OVA).
        suite: Debian suite for debootstrap.
        probes: also plant the fidelity probes under ``/probes`` (``/etc`` untouched).
        fs_size: the ext4's size; the raw disk is 2 MiB larger.
        name: file-name stem and OVF appliance name.
    """
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    tarball = debian_rootfs_tarball(suite=suite)
    seconds["rootfs"] = time.monotonic() - t0

    def populate(root: Path) -> None:
        zargs, _ = _compress_args()
        subprocess.run(
            ["tar", *_TAR_ARGS, *zargs, "-xpf", str(tarball), "-C", str(root)],
            check=True,
            capture_output=True,
        )
        (root / "etc" / "hostname").write_text(f"{name}\n")
        if probes:
            st = os.stat(root)
            populate_probes(root, with_etc=False, mtime_ns=st.st_mtime_ns)

    t0 = time.monotonic()
    disk = disk_mbr_single(workdir, populate, name=name, fs_size=fs_size)
    seconds["disk"] = time.monotonic() - t0
    t0 = time.monotonic()
    vmdk = to_vmdk(disk.path, workdir / f"{name}.vmdk")
    ova = make_ova(workdir / f"{name}.ova", [vmdk], name)
    seconds["ova"] = time.monotonic() - t0
    return DebianGuest(ova=ova, vmdk=vmdk, disk=disk, rootfs_tarball=tarball, seconds=seconds)


def build_debian_guest(workdir: Path) -> Path:
    """The OVA of :func:`debian_guest` (Debian bookworm minbase + ``make`` + probes)."""
    return debian_guest(workdir).ova
