"""Guests on XFS, btrfs and vfat (the "[filesystems]" acceptance cases), and root's reference.

Four layouts, each made with the real tools and populated through the kernel:

* :func:`debian_efi` — GPT: BIOS boot, a FAT32 ESP at ``/boot/efi`` (``umask=0077``), ext4 root.
* :func:`rhel_lvm` — GPT: BIOS boot, xfs ``/boot``, an LVM PV with xfs ``root`` and ``var``
  and ext4 ``home`` LVs (and swap); fstab names everything by UUID.
* :func:`opensuse_btrfs` — GPT: BIOS boot, one btrfs with ``@`` as ``/``, ``@home`` as
  ``/home`` and a nested subvolume ``@/srv/nested``; the default subvolume is the top level.
* :func:`fedora_btrfs` — GPT: ESP (``umask=0077,shortname=winnt``), ext4 ``/boot``, btrfs with
  ``root``/``home`` subvolumes written with ``compress=zstd:1``.

xfs and btrfs are made by ``mkfs.xfs``/``mkfs.btrfs`` on sparse files and populated through a
read-write kernel loop mount (``btrfs subvolume create`` for subvolumes), so every probe is
made by real syscalls. FAT is made by ``mkfs.vfat`` + ``mcopy -s -m`` (this kernel has no vfat
driver).

The reference (:func:`make_reference_mounts`) is GNU tar over a mounted tree, as
``shared/design/fidelity.md`` says. For vfat the kernel cannot mount the ESP, so the tree at
``/boot/efi`` is *derived*: a tmpfs holding exactly what a vfat mount with the fstab options
would show (content; mode ``0777 & ~fmask``/``~dmask``; owner 0:0; mtime = the FAT's stored
local time read as UTC; the root directory's times 0, as ``fat_read_root`` in fs/fat/inode.c
sets them), bind-mounted at ``mnt/boot/efi`` before tar runs. The stored FAT times are computed
from the source tree (FAT keeps 2-second mtimes: ``mtools`` rounds down) and checked against
:func:`fat32_short_entries`, a tiny FAT32 directory reader independent of ova2img's adapter.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .images import (
    DiskLayout,
    ExtImage,
    Partition,
    _with_fstab,
    build_disk,
    build_ext_image,
    fstab_text,
)
from .lvm import LVSpec, PVSpec, create_vg, unique_vg
from .probes import DEFAULT_MTIME_NS, populate_probes
from .reference import REFERENCE_TAR_ARGS, loop_device, mounted

__all__ = [
    "EspImage",
    "FsGuest",
    "FsImage",
    "RefMount",
    "build_btrfs_image",
    "build_esp",
    "build_xfs_image",
    "debian_efi",
    "fat32_short_entries",
    "fedora_btrfs",
    "make_reference_mounts",
    "opensuse_btrfs",
    "rhel_lvm",
    "stage_vfat_view",
]

MiB = 1 << 20
Populate = Callable[[Path], None]

#: mtools writes local times: UTC here, so the FAT holds UTC (what a mount without tz= shows
#: on a UTC machine, and what the adapter assumes).
MTOOLS_ENV = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}


def _run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def _sparse_file(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def _set_times(root: Path, mtime_ns: int = DEFAULT_MTIME_NS) -> None:
    """Every path under ``root`` and ``root`` itself get ``mtime_ns``, children first."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath) / name, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        os.utime(dirpath, ns=(mtime_ns, mtime_ns))


# --------------------------------------------------------------------------------------------
# xfs and btrfs images, populated through a read-write kernel mount


@dataclass(frozen=True)
class FsImage:
    """A filesystem image file: its type, UUID and (btrfs) what the builder recorded."""

    path: Path
    size: int
    fstype: str
    uuid: str
    label: str | None = None
    notes: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _rw_mount(image: Path, fstype: str, options: str = "") -> Iterator[Path]:
    with contextlib.ExitStack() as stack:
        mnt = Path(tempfile.mkdtemp(prefix=f"ova2img-{fstype}-", dir="/tmp"))
        stack.callback(mnt.rmdir)
        dev = stack.enter_context(loop_device(image, read_only=False))
        opts = ",".join(o for o in ("rw", options) if o)
        stack.enter_context(mounted(dev, mnt, options=opts, fstype=fstype))
        yield mnt
        os.sync()


def build_xfs_image(
    path: Path, populate: Populate, *, fs_uuid: str, size: int = 300 * MiB, label: str = ""
) -> FsImage:
    """``mkfs.xfs`` (xfsprogs 6.1 wants >= 300 MiB: a sparse file), populated on a rw mount."""
    _sparse_file(path, size)
    argv = ["mkfs.xfs", "-q", "-f", "-m", f"uuid={fs_uuid}"]
    if label:
        argv += ["-L", label]
    _run(*argv, path)
    with _rw_mount(path, "xfs") as mnt:
        populate(mnt)
    found = _run("blkid", "-p", "-o", "value", "-s", "UUID", path).strip()
    if found != fs_uuid:
        raise RuntimeError(f"{path}: blkid says UUID {found}, mkfs.xfs was given {fs_uuid}")
    return FsImage(path, size, "xfs", fs_uuid, label or None)


def build_btrfs_image(
    path: Path,
    build: Callable[[Path], dict[str, int] | None],
    *,
    fs_uuid: str,
    size: int = 160 * MiB,
    label: str = "",
    options: str = "",
) -> FsImage:
    """``mkfs.btrfs`` on a sparse file; ``build(mnt)`` makes subvolumes and files on a rw mount
    of the top level with ``options`` (e.g. ``compress=zstd:1``) and may return notes."""
    _sparse_file(path, size)
    argv = ["mkfs.btrfs", "-q", "-f", "-U", fs_uuid]
    if label:
        argv += ["-L", label]
    _run(*argv, path)
    with _rw_mount(path, "btrfs", options) as mnt:
        notes = build(mnt) or {}
        _run("btrfs", "filesystem", "sync", mnt)
    return FsImage(path, size, "btrfs", fs_uuid, label or None, notes)


def _compressed_extents(path: Path) -> int:
    """Extents ``filefrag -v`` flags ``encoded`` (btrfs: compressed) in a file."""
    return sum("encoded" in line for line in _run("filefrag", "-v", path).splitlines())


def _compressible(n: int, seed: int) -> bytes:
    line = f"ova2img compressible line {seed} " * 3 + "\n"
    return (line.encode() * (n // len(line) + 1))[:n]


# --------------------------------------------------------------------------------------------
# FAT32 ESP: mkfs.vfat + mcopy, the stored times read back, the kernel's view derived


@dataclass(frozen=True)
class EspImage:
    """A FAT32 ESP image and what was copied into it.

    Attributes:
        path: the image file.
        size: bytes.
        uuid: the volume serial as blkid and fstab write it (``XXXX-XXXX``).
        source: the tree copied in with ``mcopy -s -m`` (kept: the reference is derived from it).
        mtimes: path relative to the ESP root (``EFI/debian/grub.cfg``) → stored mtime, seconds
            (the FAT's local time read as UTC), for every file and directory but the root.
    """

    path: Path
    size: int
    uuid: str
    source: Path
    mtimes: dict[str, int]


def _fat_datetime(date: int, time: int) -> int:
    # FAT date: bits 15-9 year since 1980, 8-5 month, 4-0 day; time: 15-11 hours, 10-5
    # minutes, 4-0 seconds / 2 (Microsoft FAT specification, "Date and Time Formats").
    return calendar.timegm(
        (
            1980 + (date >> 9),
            (date >> 5) & 0xF,
            date & 0x1F,
            time >> 11,
            (time >> 5) & 0x3F,
            (time & 0x1F) * 2,
            0,
            0,
            0,
        )
    )


def fat32_short_entries(image: Path, offset: int = 0) -> dict[str, tuple[bool, int]]:
    """A tiny FAT32 reader, independent of ova2img: every short directory entry's path (8.3
    names, upper case as stored) → ``(is_directory, stored mtime in seconds read as UTC)``.

    Only what a freshly made ESP needs: long-name slots, deleted entries, the volume label and
    ``.``/``..`` are skipped; cluster chains end at an entry >= 0x0FFFFFF8.
    """
    with image.open("rb") as f:

        def read(pos: int, n: int) -> bytes:
            f.seek(offset + pos)
            return f.read(n)

        bs = read(0, 512)
        bps, spc, reserved, nfats = struct.unpack_from("<HBHB", bs, 11)
        if struct.unpack_from("<H", bs, 22)[0] != 0:
            raise ValueError(f"{image}: not FAT32 (16-bit FAT size is not 0)")
        fat_sectors, root_cluster = struct.unpack_from("<I4xI", bs, 36)
        fat_pos = reserved * bps
        data_pos = fat_pos + nfats * fat_sectors * bps
        csize = spc * bps

        def chain_bytes(cluster: int) -> bytes:
            out = bytearray()
            seen = 0
            while 2 <= cluster < 0x0FFFFFF8:
                out += read(data_pos + (cluster - 2) * csize, csize)
                cluster = struct.unpack("<I", read(fat_pos + 4 * cluster, 4))[0] & 0x0FFFFFFF
                seen += 1
                if seen > 1 << 20:
                    raise ValueError(f"{image}: cluster chain loop")
            return bytes(out)

        found: dict[str, tuple[bool, int]] = {}

        def walk(cluster: int, prefix: str) -> None:
            data = chain_bytes(cluster)
            for i in range(0, len(data), 32):
                e = data[i : i + 32]
                if e[0] == 0:
                    return
                attr = e[11]
                if e[0] == 0xE5 or attr == 0x0F or attr & 0x08:
                    continue
                raw = e[:11]
                if raw[:1] == b".":
                    continue
                if raw[0] == 0x05:  # a name starting with 0xE5 is stored as 0x05
                    raw = b"\xe5" + raw[1:]
                base, ext = raw[:8].rstrip(b" "), raw[8:].rstrip(b" ")
                name = (base + (b"." + ext if ext else b"")).decode("cp437")
                time, date = struct.unpack_from("<HH", e, 22)
                hi, lo = struct.unpack_from("<H", e, 20)[0], struct.unpack_from("<H", e, 26)[0]
                path = prefix + name
                is_dir = bool(attr & 0x10)
                found[path] = (is_dir, _fat_datetime(date, time))
                if is_dir:
                    walk((hi << 16) | lo, path + "/")

        walk(root_cluster, "")
    return found


def build_esp(path: Path, populate: Populate, *, serial: str, size: int = 100 * MiB) -> EspImage:
    """A FAT32 ESP: ``mkfs.vfat -F 32 -i SERIAL``, then ``mcopy -s -m`` of the tree ``populate``
    makes (8.3 names only, so the independent reader can name every entry).

    The stored mtimes are computed from the source (rounded down to even seconds: FAT's
    2-second resolution; ``mcopy -m`` also stamps directories with their source mtime) and
    must equal what :func:`fat32_short_entries` reads back, or this raises ``RuntimeError``.
    """
    src = path.with_name(path.name + ".src")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    populate(src)
    _sparse_file(path, size)
    _run("mkfs.vfat", "-F", "32", "-i", serial, path)
    names = sorted(p.name for p in src.iterdir())
    if names:
        _run(
            "mcopy", "-s", "-m", "-Q", "-i", path, *[src / n for n in names], "::/", env=MTOOLS_ENV
        )
    expected: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(src).as_posix()
            expected[rel] = os.lstat(p).st_mtime_ns // 10**9 // 2 * 2
    stored = fat32_short_entries(path)
    want = {k.upper(): (os.path.isdir(src / k), v) for k, v in expected.items()}
    if stored != want:
        diff = sorted(set(stored.items()) ^ set(want.items()))
        raise RuntimeError(f"{path}: FAT entries differ from the source tree: {diff[:10]}")
    serial_text = f"{serial[:4]}-{serial[4:]}".upper()
    found = _run("blkid", "-p", "-o", "value", "-s", "UUID", path).strip()
    if found != serial_text:
        raise RuntimeError(f"{path}: blkid UUID {found}, expected {serial_text}")
    return EspImage(path, size, serial_text, src, expected)


def stage_vfat_view(esp: EspImage, target: Path, *, fmask: int, dmask: int) -> None:
    """Fill the empty directory ``target`` (a tmpfs root) with what a vfat mount of ``esp``
    shows with ``uid=0,gid=0,fmask=…,dmask=…`` (fs/fat/inode.c ``fat_fill_inode``): every
    file ``0777 & ~fmask`` (no ``showexec``, no read-only attributes here), every directory
    ``0777 & ~dmask``, owner 0:0, mtime the stored FAT time (nanoseconds 0); the root
    directory's mtime is 0 (``fat_read_root``)."""
    for dirpath, dirnames, filenames in os.walk(esp.source):
        rel = Path(dirpath).relative_to(esp.source)
        for n in dirnames:
            (target / rel / n).mkdir()
        for n in filenames:
            shutil.copyfile(Path(dirpath) / n, target / rel / n)
    paths = sorted(esp.mtimes, key=lambda p: -p.count("/"))  # children before parents
    for rel_text in paths:
        p = target / rel_text
        os.chown(p, 0, 0)
        os.chmod(p, 0o777 & ~(dmask if p.is_dir() else fmask))
        t = esp.mtimes[rel_text] * 10**9
        os.utime(p, ns=(t, t))
    os.chown(target, 0, 0)
    os.chmod(target, 0o777 & ~dmask)
    os.utime(target, ns=(0, 0))


# --------------------------------------------------------------------------------------------
# The reference: loop mounts (one loop device per byte range, shared), derived trees on tmpfs


@dataclass(frozen=True)
class RefMount:
    """One mount of the reference tree.

    Attributes:
        point: the mount point inside the guest (``/``, ``/home``, ``/boot/efi``).
        backing: the image holding the filesystem (``None`` for a derived tree).
        offset, size: its byte range in ``backing``; mounts of the same range share one
            loop device (btrfs refuses a second device with the same fsid; a second mount of
            the same device with another ``subvol=`` is fine).
        options: mount options (``ro`` is always added).
        derived: fills an empty tmpfs with the tree the kernel would show (for vfat, which
            this kernel cannot mount); that tmpfs is then bind-mounted at ``point``.
    """

    point: str
    backing: Path | None = None
    offset: int = 0
    size: int | None = None
    options: str = ""
    derived: Callable[[Path], None] | None = None


def make_reference_mounts(out_tar: Path, mounts: Sequence[RefMount]) -> list[str]:
    """Mount everything (by nesting depth) read-only under a fresh directory, run GNU tar
    with the reference options over it, tear it all down. Returns tar's warnings."""
    order = sorted(mounts, key=lambda m: (m.point.rstrip("/").count("/"), m.point))
    if not order or order[0].point != "/":
        raise ValueError(f"no root filesystem in {mounts!r}")
    mnt = Path(tempfile.mkdtemp(prefix="ova2img-ref-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            loops: dict[tuple[Path, int, int | None], str] = {}
            for m in order:
                target = mnt / m.point.lstrip("/")
                if not target.is_dir():
                    raise FileNotFoundError(f"mount point {m.point} is not a directory")
                if m.derived is not None:
                    scratch = Path(tempfile.mkdtemp(prefix="ova2img-derived-", dir="/tmp"))
                    stack.callback(scratch.rmdir)
                    stack.enter_context(
                        mounted("tmpfs", scratch, options="mode=0700,size=256m", fstype="tmpfs")
                    )
                    m.derived(scratch)
                    stack.enter_context(mounted(os.fspath(scratch), target, options="bind"))
                    continue
                assert m.backing is not None
                key = (m.backing, m.offset, m.size)
                if key not in loops:
                    loops[key] = stack.enter_context(loop_device(m.backing, m.offset, m.size))
                opts = ",".join(o for o in ("ro", m.options) if o)
                stack.enter_context(mounted(loops[key], target, options=opts))
            proc = subprocess.run(
                ["tar", *REFERENCE_TAR_ARGS, "-C", os.fspath(mnt), "-cf", os.fspath(out_tar), "."],
                capture_output=True,
                text=True,
                errors="surrogateescape",
                check=False,
            )
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(
                    proc.returncode, proc.args, proc.stdout, proc.stderr
                )
            return [line for line in proc.stderr.splitlines() if line]
    finally:
        mnt.rmdir()


# --------------------------------------------------------------------------------------------
# The four guests


@dataclass
class FsGuest:
    """A built guest: its raw disks (in order), the reference's mounts, and what
    ``ova2img.open(...).inspect()`` must report: mount point → ``(volume, fstype)``."""

    name: str
    disks: list[Path]
    refs: list[RefMount]
    expected_mounts: dict[str, tuple[str, str]]
    esp: EspImage | None = None
    images: dict[str, FsImage | ExtImage] = field(default_factory=dict)
    vg: str | None = None


def _esp_tree(distro: str) -> Populate:
    """An ESP as shim + GRUB install it (8.3 names), times with odd seconds on purpose."""

    def run(src: Path) -> None:
        files = {
            f"EFI/{distro}/shimx64.efi": b"MZ shim " * 4000,
            f"EFI/{distro}/grubx64.efi": b"MZ grub " * 9000,
            f"EFI/{distro}/mmx64.efi": b"MZ mokmanager " * 700,
            f"EFI/{distro}/BOOTX64.CSV": "shimx64.efi,debian,,\n".encode("utf-16"),
            f"EFI/{distro}/grub.cfg": b"search.fs_uuid 0000 root\nconfigfile $prefix/grub.cfg\n",
            "EFI/BOOT/BOOTX64.EFI": b"MZ shim " * 4000,
            "EFI/BOOT/fbx64.efi": b"MZ fallback " * 800,
            "EFI/BOOT/empty.dat": b"",
        }
        for i, (rel, data) in enumerate(sorted(files.items())):
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            t = 1_700_000_001 + 1000 * i  # odd: FAT keeps 2-second mtimes, mtools rounds down
            os.utime(p, (t, t))
        (src / "EFI" / "Linux").mkdir()  # an empty directory (systemd-boot's UKI place)
        for i, d in enumerate(("EFI/Linux", f"EFI/{distro}", "EFI/BOOT", "EFI")):
            t = 1_690_000_003 + 7 * i
            os.utime(src / d, (t, t))

    return run


def _boot_files(grub: str) -> Populate:
    def run(root: Path) -> None:
        (root / grub).mkdir()
        (root / grub / "grub.cfg").write_text(f"set timeout=1\n# ova2img test /boot ({grub})\n")
        (root / "vmlinuz-6.1.0-test").write_bytes(b"not a kernel\n" * 512)
        (root / "initrd.img-6.1.0-test").write_bytes(b"not an initrd\n" * 512)
        (root / "efi").mkdir()
        os.chmod(root / "efi", 0o700)
        _set_times(root)

    return run


def debian_efi(work: Path, populate: Populate = populate_probes) -> FsGuest:
    """Debian/Ubuntu on UEFI: GPT with a BIOS boot partition (sda1), a FAT32 ESP (sda2) at
    ``/boot/efi`` with ``umask=0077``, an ext4 root (sda3); fstab by UUID."""
    root_uuid = str(uuidlib.uuid4())
    esp = build_esp(work / "esp.fat32", _esp_tree("debian"), serial="4A3B2C1D")
    fstab = fstab_text(
        [
            (f"UUID={root_uuid}", "/", "ext4", "errors=remount-ro"),
            (f"UUID={esp.uuid}", "/boot/efi", "vfat", "umask=0077"),
            ("/swapfile", "none", "swap", "sw"),
        ]
    )
    root = build_ext_image(
        work / "root.ext4",
        48 * MiB,
        _with_fstab(populate, fstab, ("/boot", "/boot/efi")),
        uuid=root_uuid,
    )
    disk = build_disk(
        work / "debian-efi.raw",
        DiskLayout(
            "gpt",
            (
                Partition(MiB, "bios_boot", name="BIOS boot"),
                Partition(esp.size, "efi", image=esp.path, name="EFI System Partition"),
                Partition(root.size, image=root, name="root"),
            ),
            size=esp.size + root.size + 4 * MiB,
        ),
    )
    part = disk.partition(3)
    return FsGuest(
        "debian-efi",
        [disk.path],
        [
            RefMount("/", disk.path, part.start, part.size),
            RefMount("/boot/efi", derived=_derive(esp, 0o077, 0o077)),
        ],
        {"/": ("sda3", "ext4"), "/boot/efi": ("sda2", "vfat")},
        esp=esp,
        images={"root": root},
    )


def _derive(esp: EspImage, fmask: int, dmask: int) -> Callable[[Path], None]:
    def run(target: Path) -> None:
        stage_vfat_view(esp, target, fmask=fmask, dmask=dmask)

    return run


def _write_lv(disk: Path, pv_offset: int, desc: dict[str, object], lv: str, image: Path) -> None:
    """Copy ``image`` into the extents of ``lv`` with ``dd conv=sparse`` (the LV stays sparse
    on the host: an xfs of 300 MiB is mostly zeros)."""
    pe_start: dict[str, int] = desc["pe_start"]  # type: ignore[assignment]
    segs: list[tuple[str, int, int, int]] = desc["lvs"][lv]  # type: ignore[index]
    extent = 4 * MiB
    for dev, first_pe, count, le_start in segs:
        _run(
            "dd",
            f"if={image}",
            f"of={disk}",
            "bs=1M",
            f"skip={le_start * extent}",
            f"seek={pv_offset + pe_start[dev] + first_pe * extent}",
            f"count={count * extent}",
            "iflag=skip_bytes,count_bytes",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        )


def _selinux(path: Path, context: str) -> None:
    os.setxattr(path, "security.selinux", context.encode() + b"\x00", follow_symlinks=False)


def rhel_lvm(work: Path, populate: Populate = populate_probes) -> FsGuest:
    """RHEL: GPT with BIOS boot (sda1), xfs ``/boot`` (sda2), an LVM PV (sda3) holding xfs
    ``root`` and ``var``, ext4 ``home`` and swap; fstab names all by UUID."""
    vg = unique_vg("rhel")
    ids = {k: str(uuidlib.uuid4()) for k in ("root", "boot", "var", "home", "swap")}
    fstab = fstab_text(
        [
            (f"UUID={ids['root']}", "/", "xfs", "defaults"),
            (f"UUID={ids['boot']}", "/boot", "xfs", "defaults"),
            (f"UUID={ids['home']}", "/home", "ext4", "defaults"),
            (f"UUID={ids['var']}", "/var", "xfs", "defaults"),
            (f"UUID={ids['swap']}", "none", "swap", "defaults"),
        ]
    )
    root_populate = _with_fstab(populate, fstab, ("/boot", "/var", "/home"))

    def populate_root(m: Path) -> None:
        root_populate(m)
        _selinux(m / "etc" / "fstab", "system_u:object_r:etc_t:s0")

    root = build_xfs_image(work / "root.xfs", populate_root, fs_uuid=ids["root"])

    def populate_boot(m: Path) -> None:
        _boot_files("grub2")(m)
        (m / "loader" / "entries").mkdir(parents=True)
        (m / "loader" / "entries" / "test-6.1.0.conf").write_text("title RHEL test\n")
        _selinux(m / "vmlinuz-6.1.0-test", "system_u:object_r:boot_t:s0")
        _set_times(m)

    boot = build_xfs_image(work / "boot.xfs", populate_boot, fs_uuid=ids["boot"])

    def populate_var(m: Path) -> None:
        for d in ("lib/rpm", "log", "tmp", "empty"):
            (m / d).mkdir(parents=True)
        os.chmod(m / "tmp", 0o1777)
        (m / "log" / "messages").write_bytes(b"Jan  1 00:00:00 rhel kernel: test\n" * 100)
        os.chmod(m / "log" / "messages", 0o600)
        _selinux(m / "log" / "messages", "system_u:object_r:var_log_t:s0")
        with (m / "lib" / "rpm" / "rpmdb.sqlite").open("wb") as f:
            f.truncate(2 * MiB)
            f.seek(MiB)
            f.write(b"SQLite format 3\x00" * 256)
        os.link(m / "log" / "messages", m / "log" / "messages.hardlink")
        _set_times(m)

    var = build_xfs_image(work / "var.xfs", populate_var, fs_uuid=ids["var"])

    def populate_home(m: Path) -> None:
        user = m / "alice"
        user.mkdir(mode=0o700)
        (user / ".bashrc").write_text("# alice\n")
        for p in (user, user / ".bashrc"):
            os.chown(p, 1000, 1000)
        os.chmod(user, 0o700)
        _set_times(m)

    home = build_ext_image(work / "home.ext4", 32 * MiB, populate_home, uuid=ids["home"])
    swap = work / "swap.img"
    _sparse_file(swap, 8 * MiB)
    _run("mkswap", "-q", "-U", ids["swap"], swap)

    pv_size = 4 * MiB + (300 + 300 + 32 + 8) * MiB
    disk = build_disk(
        work / "rhel.raw",
        DiskLayout(
            "gpt",
            (
                Partition(MiB, "bios_boot", name="biosboot"),
                Partition(boot.size, image=boot.path, name="boot"),
                Partition(pv_size, "lvm", name="pv"),
            ),
            size=boot.size + pv_size + 4 * MiB,
        ),
    )
    pv = disk.partition(3)
    desc = create_vg(
        vg,
        [PVSpec(disk.path, pv.start, pv.size)],
        [
            LVSpec("root", 300),
            LVSpec("var", 300),
            LVSpec("home", 32, content=home.path),
            LVSpec("swap", 8, content=swap),
        ],
    )
    for lv, image in (("root", root.path), ("var", var.path)):
        _write_lv(disk.path, pv.start, desc, lv, image)
    boot_part = disk.partition(2)
    return FsGuest(
        "rhel-lvm",
        [disk.path],
        [
            RefMount("/", root.path),
            RefMount("/boot", disk.path, boot_part.start, boot_part.size),
            RefMount("/var", var.path),
            RefMount("/home", home.path),
        ],
        {
            "/": (f"{vg}/root", "xfs"),
            "/boot": ("sda2", "xfs"),
            "/var": (f"{vg}/var", "xfs"),
            "/home": (f"{vg}/home", "ext4"),
        },
        images={"root": root, "boot": boot, "var": var, "home": home},
        vg=vg,
    )


def _home_tree(m: Path) -> None:
    user = m / "geeko"
    user.mkdir()
    (user / "notes.txt").write_bytes(_compressible(300 * 1024, 7))
    (user / ".profile").write_text("# geeko\n")
    for p in (user, user / "notes.txt", user / ".profile"):
        os.chown(p, 1000, 100)
    os.chmod(user, 0o700)
    _set_times(m)


def opensuse_btrfs(work: Path, populate: Populate = populate_probes) -> FsGuest:
    """openSUSE-like: GPT with BIOS boot (sda1) and one btrfs (sda2): ``@`` is ``/``
    (``subvol=@``), ``@home`` is ``/home`` (``subvol=@home``), and ``@/srv/nested`` is a
    subvolume nested inside ``@``, shown by the same mount. The default subvolume stays the
    top level, so the root must be found among the subvolumes."""
    fs_uuid = str(uuidlib.uuid4())
    fstab = fstab_text(
        [
            (f"UUID={fs_uuid}", "/", "btrfs", "subvol=@"),
            (f"UUID={fs_uuid}", "/home", "btrfs", "subvol=@home"),
        ]
    )

    def build(m: Path) -> dict[str, int]:
        _run("btrfs", "subvolume", "create", m / "@")
        _with_fstab(populate, fstab, ("/home", "/srv"))(m / "@")
        nested = m / "@" / "srv" / "nested"
        _run("btrfs", "subvolume", "create", nested)
        (nested / "data").mkdir()
        (nested / "data" / "inside.txt").write_bytes(b"in the nested subvolume\n")
        os.link(nested / "data" / "inside.txt", nested / "data" / "inside-link.txt")
        os.setxattr(nested / "data" / "inside.txt", "user.where", b"nested")
        _set_times(nested, 1_600_000_000_555_000_000)
        os.chmod(nested, 0o750)
        for p in (m / "@" / "srv", m / "@"):
            os.utime(p, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        _run("btrfs", "subvolume", "create", m / "@home")
        _home_tree(m / "@home")
        return {}

    fs = build_btrfs_image(work / "opensuse.btrfs", build, fs_uuid=fs_uuid)
    disk = build_disk(
        work / "opensuse.raw",
        DiskLayout(
            "gpt",
            (
                Partition(MiB, "bios_boot", name="BIOS boot"),
                Partition(fs.size, image=fs.path, name="system"),
            ),
            size=fs.size + 4 * MiB,
        ),
    )
    part = disk.partition(2)
    return FsGuest(
        "opensuse-btrfs",
        [disk.path],
        [
            RefMount("/", disk.path, part.start, part.size, "subvol=@"),
            RefMount("/home", disk.path, part.start, part.size, "subvol=@home"),
        ],
        {"/": ("sda2", "btrfs"), "/home": ("sda2", "btrfs")},
        images={"btrfs": fs},
    )


def fedora_btrfs(work: Path, populate: Populate = populate_probes) -> FsGuest:
    """Fedora: GPT with a FAT32 ESP (sda1, ``umask=0077,shortname=winnt``), ext4 ``/boot``
    (sda2) and btrfs (sda3) with subvolumes ``root`` (``/``) and ``home`` (``/home``), all
    written through a ``compress=zstd:1`` mount."""
    fs_uuid, boot_uuid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    esp = build_esp(work / "esp.fat32", _esp_tree("fedora"), serial="0FED0A11")
    fstab = fstab_text(
        [
            (f"UUID={fs_uuid}", "/", "btrfs", "subvol=root,compress=zstd:1"),
            (f"UUID={boot_uuid}", "/boot", "ext4", "defaults"),
            (f"UUID={esp.uuid}", "/boot/efi", "vfat", "umask=0077,shortname=winnt"),
            (f"UUID={fs_uuid}", "/home", "btrfs", "subvol=home,compress=zstd:1"),
        ]
    )
    boot = build_ext_image(work / "boot.ext4", 32 * MiB, _boot_files("grub2"), uuid=boot_uuid)

    def build(m: Path) -> dict[str, int]:
        _run("btrfs", "subvolume", "create", m / "root")
        _run("btrfs", "subvolume", "create", m / "home")
        root = m / "root"
        _with_fstab(populate, fstab, ("/boot", "/home"))(root)
        doc = root / "usr" / "share" / "doc" / "ova2img"
        doc.mkdir(parents=True)
        (doc / "README").write_bytes(_compressible(512 * 1024 + 17, 1))
        (doc / "small").write_bytes(_compressible(1500, 2))  # an inline compressed extent
        for p in (doc / "README", doc / "small", doc, doc.parent, doc.parent.parent):
            os.utime(p, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        os.utime(root / "usr", ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        os.utime(root, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        _home_tree(m / "home")
        os.sync()
        return {
            "compressed_extents": _compressed_extents(doc / "README")
            + _compressed_extents(m / "home" / "geeko" / "notes.txt")
        }

    fs = build_btrfs_image(
        work / "fedora.btrfs", build, fs_uuid=fs_uuid, label="fedora", options="compress=zstd:1"
    )
    disk = build_disk(
        work / "fedora.raw",
        DiskLayout(
            "gpt",
            (
                Partition(esp.size, "efi", image=esp.path, name="EFI System Partition"),
                Partition(boot.size, image=boot, name="boot"),
                Partition(fs.size, image=fs.path, name="fedora"),
            ),
            size=esp.size + boot.size + fs.size + 4 * MiB,
        ),
    )
    part, boot_part = disk.partition(3), disk.partition(2)
    return FsGuest(
        "fedora-btrfs",
        [disk.path],
        [
            RefMount("/", disk.path, part.start, part.size, "subvol=root"),
            RefMount("/home", disk.path, part.start, part.size, "subvol=home"),
            RefMount("/boot", disk.path, boot_part.start, boot_part.size),
            RefMount("/boot/efi", derived=_derive(esp, 0o077, 0o077)),
        ],
        {
            "/": ("sda3", "btrfs"),
            "/home": ("sda3", "btrfs"),
            "/boot": ("sda2", "ext4"),
            "/boot/efi": ("sda1", "vfat"),
        },
        esp=esp,
        images={"btrfs": fs, "boot": boot},
    )


def tree_modes(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """``relative path → (mode, uid, gid, mtime_ns)`` of a tree (for checking a staged view)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in ["", *dirnames, *filenames]:
            p = Path(dirpath) / n if n else Path(dirpath)
            st = os.lstat(p)
            out[p.relative_to(root).as_posix()] = (
                stat.S_IMODE(st.st_mode) | stat.S_IFMT(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
            )
    return out
