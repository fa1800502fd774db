"""Disk images built with the real tools: ext filesystems, partitioned disks, VMDKs and OVAs.

Everything is written under the directory the caller names (``tmp_path``); nothing is kept in
memory. Run as root (``mke2fs -d`` can copy device nodes and owners only as root; the fix-up
mount needs a loop device).

What ``mke2fs -d`` of e2fsprogs 1.47.0 carries (checked on this machine, and re-checked on every
build by :func:`build_ext_image`'s fix-up pass, which counts what it had to repair):

* carried: file types (also fifos, sockets, char/block devices with their numbers), mode with
  setuid/setgid/sticky, uid/gid (also 32-bit), hardlinks, sparse holes, symlinks of any length,
  every xattr namespace (``user.``, ``trusted.``, ``security.capability``) and POSIX ACLs (as
  their ``system.posix_acl_*`` xattrs), 255-byte and non-UTF-8 names, pre-1970 times (seconds);
* dropped: nanoseconds (times are whole seconds), times after 2038-01-19 (the 32-bit seconds
  wrap: 2100-01-01 becomes 1963-11-25; the epoch bits of ``i_*time_extra`` stay 0), and the
  root directory's mtime (it gets mke2fs's time);
* never built: htree directory indexes (``e2fsck -fyD`` builds them afterwards).

So :func:`build_ext_image` runs ``mke2fs -d``, then (``fixup=True``) loop-mounts the image
read-write and re-applies times with ``utimensat`` (and anything else that differs), then runs
``e2fsck -fyD`` and checks the result with ``e2fsck -fn``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

from .probes import DEFAULT_MTIME_NS
from .reference import loop_device, mounted

__all__ = [
    "BuiltDisk",
    "DiskLayout",
    "ExtImage",
    "MiB",
    "Partition",
    "PlacedPartition",
    "build_disk",
    "build_ext_image",
    "disk_gpt_bios",
    "disk_mbr_boot_logical",
    "disk_mbr_single",
    "disk_whole",
    "fstab_text",
    "make_ova",
    "mounted_image",
    "ovf_envelope",
    "qemu_virtual_size",
    "to_vmdk",
]

MiB = 1024 * 1024
SECTOR = 512

Populate = Callable[[Path], None]


def _run(argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None = None) -> str:
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=full_env, check=False
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc.stdout


# --------------------------------------------------------------------------------------------
# ext2/3/4 filesystem images


@dataclass(frozen=True)
class ExtImage:
    """A filesystem image in a file.

    Attributes:
        path: the image file.
        size: its size in bytes (the filesystem fills it).
        fstype: ``ext2``, ``ext3`` or ``ext4``.
        uuid: the filesystem UUID (``UUID=`` in fstab).
        label: the volume label, if any.
        block_size: from ``dumpe2fs -h``.
        fixups: what the fix-up mount had to repair after ``mke2fs -d``, per property
            (``mtime``, ``mode``, ``owner``, ``xattr``), counted in paths.
    """

    path: Path
    size: int
    fstype: str
    uuid: str
    label: str | None
    block_size: int
    fixups: dict[str, int] = field(default_factory=dict)


def _xattrs(path: Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }


def _sync_tree(src: Path, dst: Path) -> dict[str, int]:
    """Make ``dst`` (a mounted image) match ``src`` (the staging dir) in metadata."""
    fixes = {"mtime": 0, "mode": 0, "owner": 0, "xattr": 0}
    paths: list[Path] = [Path()]
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        paths.extend(rel / n for n in dirnames + filenames)
    for rel in paths:
        s, d = src / rel, dst / rel
        ss, ds = os.lstat(s), os.lstat(d)
        if stat.S_IFMT(ss.st_mode) != stat.S_IFMT(ds.st_mode):
            raise RuntimeError(f"mke2fs -d turned {rel} from {ss.st_mode:o} into {ds.st_mode:o}")
        changed_owner = False
        if (ss.st_uid, ss.st_gid) != (ds.st_uid, ds.st_gid):
            os.chown(d, ss.st_uid, ss.st_gid, follow_symlinks=False)  # clears setuid & caps
            fixes["owner"] += 1
            changed_owner = True
        if not stat.S_ISLNK(ss.st_mode) and (changed_owner or ss.st_mode != ds.st_mode):
            if stat.S_IMODE(ss.st_mode) != stat.S_IMODE(ds.st_mode):
                fixes["mode"] += 1
            os.chmod(d, stat.S_IMODE(ss.st_mode))
        sx, dx = _xattrs(s), _xattrs(d)
        if sx != dx:
            fixes["xattr"] += 1
            for name, value in sx.items():
                if dx.get(name) != value or changed_owner:
                    os.setxattr(d, name, value, follow_symlinks=False)
        elif changed_owner:
            for name, value in sx.items():
                os.setxattr(d, name, value, follow_symlinks=False)
    # Times last, after every other change (chmod/setxattr only touch ctime, but be safe).
    for rel in paths:
        s, d = src / rel, dst / rel
        ss, ds = os.lstat(s), os.lstat(d)
        if ss.st_mtime_ns != ds.st_mtime_ns:
            fixes["mtime"] += 1
            os.utime(d, ns=(ss.st_atime_ns, ss.st_mtime_ns), follow_symlinks=False)
    return fixes


def _set_ctimes(image: Path, stage: Path, ctime: int, env: Mapping[str, str]) -> None:
    """``debugfs -w``: ``sif PATH ctime|atime @N`` for every path of the staging tree."""
    lines = [
        b"sif %s %s @%d" % (p, f, ctime)
        for p in (b'"/"', b'"/lost+found"')
        for f in (b"ctime", b"atime")
    ]
    for dirpath, dirnames, filenames in os.walk(os.fsencode(stage)):
        rel = os.path.relpath(dirpath, os.fsencode(stage))
        for n in dirnames + filenames:
            p = b"/" + os.path.normpath(os.path.join(rel, n))
            if b'"' in p or b"\n" in p:
                raise ValueError(f"debugfs cannot quote {p!r}")
            lines.append(b'sif "%s" ctime @%d' % (p, ctime))
            lines.append(b'sif "%s" atime @%d' % (p, ctime))
    with tempfile.NamedTemporaryFile(prefix="ova2img-debugfs-", dir="/tmp") as script:
        script.write(b"\n".join(lines) + b"\n")
        script.flush()
        out = subprocess.run(
            ["debugfs", "-w", "-f", script.name, os.fspath(image)],
            capture_output=True,
            env={**os.environ, **env},
            check=True,
        )
    # debugfs exits 0 even when a request fails; it reports on stderr.
    errors = [line for line in out.stderr.splitlines() if b"debugfs 1." not in line and line]
    if errors:
        raise RuntimeError(f"debugfs sif failed on {image}: {errors[:3]!r}")


def build_ext_image(
    path: Path,
    size: int,
    populate: Populate | None,
    *,
    fstype: Literal["ext2", "ext3", "ext4"] = "ext4",
    mkfs_args: Sequence[str] = (),
    uuid: str | None = None,
    label: str | None = None,
    hash_seed: str | None = None,
    fake_time: int | None = None,
    fixup: bool = True,
    ctime_atime: int | None = None,
    staging: Path | None = None,
) -> ExtImage:
    """Make an ext2/3/4 filesystem image file populated by ``populate``.

    Args:
        path: the image file to create (replaced if it exists).
        size: bytes; a multiple of 1 KiB.
        populate: called with the staging directory (mode 0755, owned by root) to fill it;
            ``None`` for an empty filesystem.
        fstype: ``mke2fs -t``.
        mkfs_args: extra ``mke2fs`` arguments (e.g. ``("-b", "1024")``).
        uuid: ``mke2fs -U`` (default: random).
        label: ``mke2fs -L``.
        hash_seed: ``mke2fs -E hash_seed=`` (htree hashes; fix it for reproducible images).
        fake_time: seconds since the epoch for mke2fs/e2fsck's own timestamps
            (``E2FSPROGS_FAKE_TIME``, ``E2FSCK_TIME``): the root and ``lost+found`` mtimes and
            the superblock times. Only reproducible with ``fixup=False`` (a mount writes times).
        fixup: loop-mount read-write after ``mke2fs -d`` to re-apply what it drops
            (nanoseconds, post-2038 times, the root's mtime). Needed for the fidelity probes.
        ctime_atime: set every inode's ctime and atime to this (seconds) with
            ``debugfs -w`` afterwards: ``mke2fs -d`` copies the staging tree's ctimes (which
            no one can choose) and atimes (which walking the tree changes).
        staging: use (and keep) this empty directory as the staging tree instead of a
            temporary one next to ``path``.

    Returns:
        The image's description, with the UUID read back by ``blkid``.
    """
    if size % 1024:
        raise ValueError(f"size {size} is not a multiple of 1 KiB")
    env: dict[str, str] = {"MKE2FS_CONFIG": "/etc/mke2fs.conf"}
    if fake_time is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(fake_time)
        env["E2FSCK_TIME"] = str(fake_time)
    own_staging = staging is None
    stage = staging or Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    os.chmod(stage, 0o755)
    os.chown(stage, 0, 0)
    try:
        if populate is not None:
            populate(stage)
        path.unlink(missing_ok=True)
        argv: list[str] = ["mke2fs", "-q", "-F", "-t", fstype]
        if uuid:
            argv += ["-U", uuid]
        if label:
            argv += ["-L", label]
        if hash_seed:
            argv += ["-E", f"hash_seed={hash_seed}"]
        argv += [*mkfs_args, "-d", os.fspath(stage), os.fspath(path), f"{size // 1024}k"]
        _run(argv, env)
        fixes: dict[str, int] = {}
        if fixup:
            with contextlib.ExitStack() as stack:
                mnt = Path(tempfile.mkdtemp(prefix="ova2img-fix-", dir="/tmp"))
                stack.callback(mnt.rmdir)
                dev = stack.enter_context(loop_device(path, read_only=False))
                stack.enter_context(mounted(dev, mnt, options="rw"))
                fixes = _sync_tree(stage, mnt)
        if ctime_atime is not None:
            _set_ctimes(path, stage, ctime_atime, env)
        # -D: rebuild (index) every directory, so big ones become htrees (mke2fs -d never
        # builds one). Exit status 1 = "file system was modified", expected here.
        proc = subprocess.run(
            ["e2fsck", "-fyD", os.fspath(path)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=False,
        )
        if proc.returncode not in (0, 1):
            raise subprocess.CalledProcessError(
                proc.returncode, proc.args, proc.stdout, proc.stderr
            )
        _run(["e2fsck", "-fn", path], env)  # now it must be clean
    finally:
        if own_staging:
            shutil.rmtree(stage)
    found_uuid = _run(["blkid", "-p", "-o", "value", "-s", "UUID", path]).strip()
    block_size = int(re.search(r"Block size:\s+(\d+)", _run(["dumpe2fs", "-h", path])).group(1))  # type: ignore[union-attr]
    return ExtImage(
        path=path,
        size=size,
        fstype=fstype,
        uuid=found_uuid,
        label=label,
        block_size=block_size,
        fixups={k: v for k, v in fixes.items() if v},
    )


# --------------------------------------------------------------------------------------------
# partitioned disks

_MBR_TYPES = {"linux": "83", "extended": "5", "efi": "ef", "lvm": "8e", "swap": "82"}
_GPT_TYPES = {"linux": "8300", "bios_boot": "ef02", "efi": "ef00", "lvm": "8e00", "swap": "8200"}


@dataclass(frozen=True)
class Partition:
    """One partition of a :class:`DiskLayout`.

    Attributes:
        size: bytes (a multiple of 1 MiB), or ``None`` for the rest of the disk (or of the
            extended partition).
        type: ``linux``, ``extended`` (MBR), ``bios_boot`` (GPT), ``efi``, ``lvm``, ``swap``,
            or a raw sfdisk/sgdisk type code.
        image: a filesystem image to copy in at the partition's start.
        mountpoint: where the guest mounts it (for :meth:`BuiltDisk.mounts`).
        logical: MBR: a logical partition inside the preceding extended one (sda5, …).
        bootable: MBR active flag.
        name: GPT partition name.
        partuuid: GPT partition GUID (default: random).
    """

    size: int | None
    type: str = "linux"
    image: ExtImage | Path | None = None
    mountpoint: str | None = None
    logical: bool = False
    bootable: bool = False
    name: str | None = None
    partuuid: str | None = None


@dataclass(frozen=True)
class DiskLayout:
    """A disk: partition table kind, partitions in table order, total size, identity.

    ``table="none"`` means a filesystem on the whole disk: exactly one partition, whose image
    is the disk (``size`` is then the image size, rounded up to 1 MiB).
    """

    table: Literal["mbr", "gpt", "none"]
    partitions: tuple[Partition, ...]
    size: int
    disk_id: str | None = None  # MBR: 0x-prefixed 32-bit label-id; GPT: disk GUID


@dataclass(frozen=True)
class PlacedPartition:
    """A partition as written: number (1-4 primary, 5+ logical), byte range, identity."""

    number: int
    start: int
    size: int
    type: str
    partuuid: str | None
    spec: Partition

    @property
    def fs_uuid(self) -> str | None:
        """The filesystem UUID of the image copied in, if it is an :class:`ExtImage`."""
        return self.spec.image.uuid if isinstance(self.spec.image, ExtImage) else None


@dataclass(frozen=True)
class BuiltDisk:
    """A raw disk image written by :func:`build_disk` (or a ``disk_*`` layout helper)."""

    path: Path
    size: int
    table: Literal["mbr", "gpt", "none"]
    disk_id: str | None
    partitions: tuple[PlacedPartition, ...]

    def mounts(self) -> list[tuple[str, int, int]]:
        """``(mount point, byte offset, size)`` of each mounted partition, for make_reference."""
        return [
            (p.spec.mountpoint, p.start, p.size)
            for p in self.partitions
            if p.spec.mountpoint is not None
        ]

    def partition(self, number: int) -> PlacedPartition:
        """The partition numbered ``number`` (as the kernel would: sda5 is 5)."""
        for p in self.partitions:
            if p.number == number:
                return p
        raise KeyError(number)


def _image_path(image: ExtImage | Path | None) -> Path | None:
    return image.path if isinstance(image, ExtImage) else image


def _copy_into(image: Path, disk: Path, offset: int) -> None:
    # conv=sparse: skip writing zero blocks, so the raw disk stays sparse on the host.
    _run(
        [
            "dd",
            f"if={image}",
            f"of={disk}",
            "bs=1M",
            f"seek={offset}",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )


def build_disk(path: Path, layout: DiskLayout) -> BuiltDisk:
    """Write a raw disk: the partition table (sfdisk for MBR, sgdisk for GPT), then each
    partition's image with ``dd conv=notrunc,sparse`` at the offset ``sfdisk --json`` reports.

    Raises:
        ValueError: an image does not fit its partition, or the layout is inconsistent.
    """
    path.unlink(missing_ok=True)
    if layout.table == "none":
        if len(layout.partitions) != 1 or layout.partitions[0].image is None:
            raise ValueError("a disk without a partition table holds exactly one image")
        spec = layout.partitions[0]
        img = _image_path(spec.image)
        assert img is not None
        _run(["cp", "--sparse=always", img, path])
        size = max(layout.size, img.stat().st_size)
        os.truncate(path, size)
        placed = PlacedPartition(0, 0, img.stat().st_size, "none", None, spec)
        return BuiltDisk(path, size, "none", None, (placed,))

    with path.open("wb") as f:
        f.truncate(layout.size)
    if layout.table == "mbr":
        lines = ["label: dos", "unit: sectors"]
        if layout.disk_id:
            lines.append(f"label-id: {layout.disk_id}")
        lines.append("")
        for part in layout.partitions:
            fields = []
            if part.size is not None:
                fields.append(f"size={part.size // SECTOR}")
            fields.append(f"type={_MBR_TYPES.get(part.type, part.type)}")
            if part.bootable:
                fields.append("bootable")
            lines.append(", ".join(fields))
        # sfdisk (util-linux): lines after an extended partition become logical partitions.
        _run(["sh", "-c", 'printf "%s\\n" "$@" | sfdisk -q "$0"', path, *lines])
    else:
        argv: list[str] = ["sgdisk", "-o"]
        if layout.disk_id:
            argv += ["-U", layout.disk_id]
        for i, part in enumerate(layout.partitions, 1):
            end = f"+{part.size // 1024}K" if part.size is not None else "0"
            argv += ["-n", f"{i}:0:{end}", "-t", f"{i}:{_GPT_TYPES.get(part.type, part.type)}"]
            if part.name:
                argv += ["-c", f"{i}:{part.name}"]
            if part.partuuid:
                argv += ["-u", f"{i}:{part.partuuid}"]
        _run([*argv, path])

    table = json.loads(_run(["sfdisk", "--json", path]))["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    listed = table["partitions"]
    if len(listed) != len(layout.partitions):
        raise ValueError(
            f"sfdisk made {len(listed)} partitions, layout has {len(layout.partitions)}"
        )
    disk_id = table.get("id")
    placed_list = []
    for spec, entry in zip(layout.partitions, listed, strict=True):
        number = int(re.search(r"(\d+)$", entry["node"]).group(1))  # type: ignore[union-attr]
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        partuuid: str | None
        if layout.table == "mbr":
            partuuid = f"{int(disk_id, 16):08x}-{number:02x}"  # as blkid/udev say PARTUUID
        else:
            partuuid = entry.get("uuid", "").lower() or None
        img = _image_path(spec.image)
        if img is not None:
            if img.stat().st_size > psize:
                raise ValueError(f"{img} ({img.stat().st_size} B) exceeds partition {number}")
            _copy_into(img, path, start)
        placed_list.append(PlacedPartition(number, start, psize, entry["type"], partuuid, spec))
    return BuiltDisk(path, layout.size, layout.table, disk_id, tuple(placed_list))


def fstab_text(entries: Sequence[tuple[str, str, str, str]]) -> str:
    """``/etc/fstab`` from ``(spec, mount point, type, options)``; pass 1 for /, 2 otherwise."""
    lines = ["# /etc/fstab: static file system information (written by the ova2img test support)"]
    for spec, point, fstype, options in entries:
        lines.append(f"{spec}\t{point}\t{fstype}\t{options}\t0\t{1 if point == '/' else 2}")
    return "\n".join(lines) + "\n"


def _with_fstab(
    populate: Populate | None,
    fstab: str,
    mkdirs: Sequence[str] = (),
    mtime_ns: int = DEFAULT_MTIME_NS,
) -> Populate:
    def run(root: Path) -> None:
        if populate is not None:
            populate(root)
        for d in mkdirs:
            target = root / d.lstrip("/")
            if not target.exists():
                target.mkdir(parents=True, mode=0o755)
                os.utime(target, ns=(mtime_ns, mtime_ns))
        etc = root / "etc"
        new_etc = not etc.exists()
        etc.mkdir(exist_ok=True)
        f = etc / "fstab"
        f.write_text(fstab)
        os.chmod(f, 0o644)
        os.utime(f, ns=(mtime_ns, mtime_ns))
        if new_etc or mkdirs:
            os.utime(etc, ns=(mtime_ns, mtime_ns))
            os.utime(root, ns=(mtime_ns, mtime_ns))

    return run


def _root_image(
    workdir: Path,
    name: str,
    fs_size: int,
    populate: Populate | None,
    fstab: str,
    mkdirs: Sequence[str] = (),
    **kwargs: Any,
) -> ExtImage:
    return build_ext_image(
        workdir / f"{name}-root.ext4",
        fs_size,
        _with_fstab(populate, fstab, mkdirs),
        **kwargs,
    )


def disk_mbr_single(
    workdir: Path,
    populate: Populate | None,
    *,
    name: str = "mbr",
    fs_size: int = 32 * MiB,
    root_uuid: str | None = None,
    **ext_kwargs: Any,
) -> BuiltDisk:
    """Layout (a): MBR, one primary ext4 partition (sda1) holding ``/``, fstab by UUID."""
    root_uuid = root_uuid or str(uuidlib.uuid4())
    fstab = fstab_text([(f"UUID={root_uuid}", "/", "ext4", "errors=remount-ro")])
    root = _root_image(workdir, name, fs_size, populate, fstab, uuid=root_uuid, **ext_kwargs)
    layout = DiskLayout(
        "mbr",
        (Partition(None, image=root, mountpoint="/", bootable=True),),
        size=fs_size + 2 * MiB,
        disk_id="0x0a2a0001",
    )
    return build_disk(workdir / f"{name}.raw", layout)


def disk_gpt_bios(
    workdir: Path,
    populate: Populate | None,
    *,
    name: str = "gpt",
    fs_size: int = 32 * MiB,
    root_uuid: str | None = None,
    **ext_kwargs: Any,
) -> BuiltDisk:
    """Layout (b): GPT with a 1 MiB BIOS boot partition (sda1) and an ext4 root (sda2)."""
    root_uuid = root_uuid or str(uuidlib.uuid4())
    fstab = fstab_text([(f"UUID={root_uuid}", "/", "ext4", "defaults")])
    root = _root_image(workdir, name, fs_size, populate, fstab, uuid=root_uuid, **ext_kwargs)
    layout = DiskLayout(
        "gpt",
        (
            Partition(MiB, "bios_boot", name="BIOS boot"),
            Partition(fs_size, image=root, mountpoint="/", name="root"),
        ),
        size=fs_size + 4 * MiB,  # 1 MiB alignment gap + BIOS boot + backup GPT at the end
        disk_id="0a2a0002-0000-4000-8000-000000000002",
    )
    return build_disk(workdir / f"{name}.raw", layout)


def disk_whole(
    workdir: Path,
    populate: Populate | None,
    *,
    name: str = "whole",
    fs_size: int = 32 * MiB,
    root_uuid: str | None = None,
    **ext_kwargs: Any,
) -> BuiltDisk:
    """Layout (c): no partition table, ext4 on the whole disk."""
    root_uuid = root_uuid or str(uuidlib.uuid4())
    fstab = fstab_text([(f"UUID={root_uuid}", "/", "ext4", "defaults")])
    root = _root_image(workdir, name, fs_size, populate, fstab, uuid=root_uuid, **ext_kwargs)
    layout = DiskLayout("none", (Partition(None, image=root, mountpoint="/"),), size=fs_size)
    return build_disk(workdir / f"{name}.raw", layout)


def _default_boot(root: Path) -> None:
    (root / "grub").mkdir(mode=0o755)
    (root / "grub" / "grub.cfg").write_text("set timeout=0\n# ova2img test /boot\n")
    (root / "vmlinuz-0.0.0-test").write_bytes(b"not a kernel\n" * 64)
    (root / "config-0.0.0-test").write_text("CONFIG_EXT4_FS=y\n")
    for p in [root / "grub" / "grub.cfg", root / "grub", *root.iterdir()]:
        os.utime(p, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))


def disk_mbr_boot_logical(
    workdir: Path,
    populate: Populate | None,
    *,
    populate_boot: Populate | None = _default_boot,
    name: str = "bootlog",
    fs_size: int = 32 * MiB,
    boot_size: int = 8 * MiB,
    root_uuid: str | None = None,
    boot_uuid: str | None = None,
    **ext_kwargs: Any,
) -> BuiltDisk:
    """Layout (d): MBR, primary ext2 ``/boot`` (sda1, 1 KiB blocks), an extended partition
    (sda2) and the ext4 root in a logical partition (sda5); fstab names both by UUID."""
    root_uuid = root_uuid or str(uuidlib.uuid4())
    boot_uuid = boot_uuid or str(uuidlib.uuid4())
    fstab = fstab_text(
        [
            (f"UUID={root_uuid}", "/", "ext4", "errors=remount-ro"),
            (f"UUID={boot_uuid}", "/boot", "ext2", "defaults"),
        ]
    )
    boot = build_ext_image(
        workdir / f"{name}-boot.ext2",
        boot_size,
        populate_boot,
        fstype="ext2",
        mkfs_args=("-b", "1024"),
        uuid=boot_uuid,
    )
    root = _root_image(
        workdir, name, fs_size, populate, fstab, mkdirs=("/boot",), uuid=root_uuid, **ext_kwargs
    )
    layout = DiskLayout(
        "mbr",
        (
            Partition(boot_size, image=boot, mountpoint="/boot", bootable=True),
            Partition(None, "extended"),
            Partition(fs_size, image=root, mountpoint="/", logical=True),
        ),
        size=boot_size + fs_size + 4 * MiB,
        disk_id="0x0a2a0004",
    )
    return build_disk(workdir / f"{name}.raw", layout)


# --------------------------------------------------------------------------------------------
# VMDK and OVA


def qemu_virtual_size(image: Path) -> int:
    """The virtual size of any qemu-readable image (``qemu-img info --output=json``)."""
    return int(json.loads(_run(["qemu-img", "info", "--output=json", image]))["virtual-size"])


# qemu-img writes the CID as "%x": 1 to 8 hex digits (block/vmdk.c desc_template).
_CID = re.compile(rb"\bCID=[0-9a-f]{1,8}\b")


def to_vmdk(
    raw: Path,
    out: Path,
    subformat: str = "streamOptimized",
    *,
    fixed_cid: int | None = None,
) -> Path:
    """``qemu-img convert -f raw -O vmdk -o subformat=…``; return ``out``.

    ``fixed_cid`` replaces the random content ID qemu-img writes into the descriptor
    (``CID=%x``) with 8 digits, to make the file reproducible; no offset moves (in a sparse
    VMDK, a shorter CID's missing digits come out of the descriptor's NUL padding).
    """
    out.unlink(missing_ok=True)
    _run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, out]
    )
    if fixed_cid is not None:
        # The descriptor is plain text in the first grains of a sparse/streamOptimized VMDK
        # (VMDK spec 1.1 §"The Descriptor File"); qemu puts it at sector 1.
        with out.open("r+b") as f:
            head = f.read(64 * 1024)
            m = _CID.search(head)
            if m is not None:
                cid = f"CID={fixed_cid:08x}".encode()
                rest = head[m.end() :]
                grow = len(cid) - len(m.group(0))
                if grow and head.startswith(b"KDMV"):
                    # An embedded descriptor lives in a fixed, NUL-padded area (descriptorSize
                    # sectors from descriptorOffset): take the extra bytes from its padding.
                    pad = rest.find(b"\0" * grow)
                    assert pad >= 0, "no padding after the VMDK descriptor"
                    rest = rest[:pad] + rest[pad + grow :]
                f.seek(0)
                f.write(head[: m.start()] + cid + rest)  # a descriptor file may grow: fine
    return out


_OVF_NS = 'xmlns="http://schemas.dmtf.org/ovf/envelope/1"'
_NAMESPACES = (
    'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
    'CIM_ResourceAllocationSettingData" '
    'xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)
_VMDK_FORMAT = {
    "streamOptimized": "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    "monolithicSparse": "http://www.vmware.com/interfaces/specifications/vmdk.html#sparse",
}


@dataclass(frozen=True)
class _OvfDisk:
    href: str
    file_size: int
    capacity: int
    fmt: str


def _capacity(style: str, capacity: int) -> tuple[str, str]:
    if style == "ovftool":
        # ovftool states capacity in the largest binary unit that divides it.
        for shift in (30, 20):
            if capacity % (1 << shift) == 0:
                return str(capacity >> shift), f"byte * 2^{shift}"
    return str(capacity), "byte"


def ovf_envelope(
    name: str,
    disks: Sequence[tuple[str, int, int, str]],
    *,
    style: Literal["virtualbox", "ovftool"] = "virtualbox",
) -> str:
    """An OVF 1.0 envelope for ``disks`` = ``(file name, file size, capacity, vmdk subformat)``.

    VirtualBox style: a SATA controller (``AHCI``, ResourceType 20), capacities in bytes.
    ovftool style: an LSI Logic SCSI controller (ResourceType 6), capacities in
    ``byte * 2^30``/``2^20``, VMware ``vmx-*`` system type.
    """
    ds = [
        _OvfDisk(href, fsize, cap, _VMDK_FORMAT.get(sub, _VMDK_FORMAT["streamOptimized"]))
        for href, fsize, cap, sub in disks
    ]
    refs = "\n".join(
        f'    <File ovf:href={quoteattr(d.href)} ovf:id="file{i}" ovf:size="{d.file_size}"/>'
        for i, d in enumerate(ds, 1)
    )
    disk_lines = []
    for i, d in enumerate(ds, 1):
        cap, unit = _capacity(style, d.capacity)
        unit_attr = f' ovf:capacityAllocationUnits="{unit}"' if style == "ovftool" else ""
        disk_lines.append(
            f'    <Disk ovf:capacity="{cap}"{unit_attr} ovf:diskId="vmdisk{i}" '
            f'ovf:fileRef="file{i}" ovf:format="{d.fmt}"/>'
        )
    if style == "virtualbox":
        ctrl = ("sataController0", "SATA Controller", "AHCI", "20")
        system_type = "virtualbox-2.2"
    else:
        ctrl = ("SCSI Controller 0", "SCSI Controller", "lsilogic", "6")
        system_type = "vmx-13"
    items = [
        _item(
            "1",
            "Virtual CPU",
            "1 virtual CPU",
            "3",
            extra="<rasd:VirtualQuantity>1</rasd:VirtualQuantity>",
        ),
        _item(
            "2",
            "Memory",
            "512 MB of memory",
            "4",
            extra="<rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>"
            "<rasd:VirtualQuantity>512</rasd:VirtualQuantity>",
        ),
        _item(
            "3",
            ctrl[0],
            ctrl[1],
            ctrl[3],
            extra=f"<rasd:ResourceSubType>{ctrl[2]}</rasd:ResourceSubType>"
            "<rasd:Address>0</rasd:Address>",
        ),
    ]
    for i, _ in enumerate(ds, 1):
        items.append(
            _item(
                str(3 + i),
                f"disk{i}",
                "Disk Image",
                "17",
                extra=f"<rasd:AddressOnParent>{i - 1}</rasd:AddressOnParent>"
                f"<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>"
                "<rasd:Parent>3</rasd:Parent>",
            )
        )
    hw = "\n".join(items)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by the ova2img test support ({style} style)-->
<Envelope ovf:version="1.0" xml:lang="en-US" {_OVF_NS} {_NAMESPACES}>
  <References>
{refs}
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
{chr(10).join(disk_lines)}
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={quoteattr(name)}>
    <Info>A virtual machine</Info>
    <ProductSection>
      <Info>Meta-information about the installed software</Info>
      <Product>{escape(name)}</Product>
      <Vendor>ova2img tests</Vendor>
      <Version>1.0</Version>
    </ProductSection>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>{system_type}</vssd:VirtualSystemType>
      </System>
{hw}
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _item(instance: str, element: str, caption: str, rtype: str, *, extra: str = "") -> str:
    return (
        "      <Item>\n"
        f"        <rasd:Caption>{escape(caption)}</rasd:Caption>\n"
        f"        <rasd:Description>{escape(caption)}</rasd:Description>\n"
        f"        <rasd:ElementName>{escape(element)}</rasd:ElementName>\n"
        f"        <rasd:InstanceID>{instance}</rasd:InstanceID>\n"
        f"        <rasd:ResourceType>{rtype}</rasd:ResourceType>\n"
        f"        {extra}\n"
        "      </Item>"
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _vmdk_subformat(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(64 * 1024)
    m = re.search(rb'createType="(\w+)"', head)
    return m.group(1).decode() if m else "streamOptimized"


def make_ova(
    out: Path,
    disks: Sequence[Path],
    name: str,
    *,
    style: Literal["virtualbox", "ovftool"] = "virtualbox",
    manifest: bool = True,
    mtime: int | None = None,
) -> Path:
    """Write an OVA: ``{name}.ovf``, optionally ``{name}.mf``, then ``{name}-disk{i}.vmdk``.

    The OVF comes first in the tar (OVF 1.0 §5.3: "the OVF descriptor shall be the first
    file"), then the manifest, then the disks in order; GNU tar ``--format=ustar`` as
    VirtualBox and ovftool write. Manifest lines: VirtualBox writes ``SHA256 (f) = hex``,
    ovftool ``SHA256(f)= hex``.

    Args:
        out: the ``.ova`` to write.
        disks: VMDK files, in disk order.
        name: the appliance name (file names and ``VirtualSystem ovf:id``).
        style: ``virtualbox`` or ``ovftool`` (controller, units, manifest format).
        manifest: also write the ``.mf``.
        mtime: a fixed mtime (seconds) for the tar members, for reproducible OVAs.
    """
    with tempfile.TemporaryDirectory(prefix=".ova-", dir=out.parent) as tmp:
        stage = Path(tmp)
        members: list[str] = []
        entries = []
        for i, disk in enumerate(disks, 1):
            href = f"{name}-disk{i}.vmdk"
            try:
                os.link(disk, stage / href)
            except OSError:
                shutil.copyfile(disk, stage / href)
            entries.append(
                (href, disk.stat().st_size, qemu_virtual_size(disk), _vmdk_subformat(disk))
            )
        ovf = stage / f"{name}.ovf"
        ovf.write_text(ovf_envelope(name, entries, style=style), encoding="utf-8")
        members.append(ovf.name)
        if manifest:
            mf = stage / f"{name}.mf"
            fmt = "SHA256 ({}) = {}" if style == "virtualbox" else "SHA256({})= {}"
            lines = [
                fmt.format(n, _sha256_file(stage / n)) for n in [ovf.name, *(e[0] for e in entries)]
            ]
            mf.write_text("\n".join(lines) + "\n")
            members.append(mf.name)
        members.extend(e[0] for e in entries)
        argv = ["tar", "--format=ustar", "--owner=0", "--group=0", "--numeric-owner"]
        if mtime is not None:
            argv.append(f"--mtime=@{mtime}")
        for m in members:
            os.chmod(stage / m, 0o644)
        out.unlink(missing_ok=True)
        _run([*argv, "-C", stage, "-cf", out, "--", *members])
    return out


@contextlib.contextmanager
def mounted_image(
    image: Path, offset: int = 0, size: int | None = None, *, rw: bool = False
) -> Iterator[Path]:
    """Loop-mount ``image[offset:offset+size]`` on a fresh directory (for tests peeking in)."""
    with contextlib.ExitStack() as stack:
        mnt = Path(tempfile.mkdtemp(prefix="ova2img-mnt-", dir="/tmp"))
        stack.callback(mnt.rmdir)
        dev = stack.enter_context(loop_device(image, offset, size, read_only=not rw))
        stack.enter_context(mounted(dev, mnt, options="rw" if rw else "ro"))
        yield mnt
