"""Real LVM2 metadata on disk images, written by lvm2 itself on a kernel without device-mapper.

``lvcreate --driverloaded n -an -Zn`` writes the metadata without activating anything; the
bytes of each LV are then placed into its extents with ``dd`` at the offsets lvm2 reports
(``lvs -o seg_pe_ranges``/``pvs -o pe_start``), as ``shared/design/fidelity.md`` describes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
NOACT = ["--driverloaded", "n"]
MiB = 1 << 20


def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=LVM_ENV, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def loop(
    path: Path, offset: int = 0, size: int | None = None, *, ro: bool = False
) -> Iterator[str]:
    args = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        args += ["--sizelimit", str(size)]
    if ro:
        args.append("--read-only")
    dev = run(*args, str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@dataclass
class LVSpec:
    """An LV to create: ``size`` in MiB; ``stripes`` > 1 makes it striped."""

    name: str
    size_mib: int
    stripes: int = 1
    stripe_kib: int = 64
    content: Path | None = None  # an image file to copy into the LV
    extra_args: list[str] = field(default_factory=list)
    pvs: list[int] | None = None  # allocate from these PVs (indexes), in this order


@dataclass
class PVSpec:
    """A PV: a disk image file and the byte range on it (a partition, or the whole disk)."""

    disk: Path
    offset: int
    size: int


def unique_vg(prefix: str = "o2i") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def lv_extents(vg: str, lv: str) -> list[tuple[str, int, int, int]]:
    """Segments of an LV: ``(pv_device, first_pe, pe_count, le_start)`` per stripe run, from
    lvm2's own report."""
    out = run(
        "lvs",
        *NOACT,
        "--reportformat",
        "json",
        "--units",
        "b",
        "-o",
        "lv_name,seg_start_pe,seg_pe_ranges,stripes,stripe_size",
        f"{vg}/{lv}",
    )
    rows = json.loads(out)["report"][0]["lv"]
    segs = []
    for row in rows:
        le_start = int(row["seg_start_pe"])
        for rng in row["seg_pe_ranges"].split():
            dev, pes = rng.rsplit(":", 1)
            a, b = (int(x) for x in pes.split("-"))
            segs.append((dev, a, b - a + 1, le_start))
    return segs


def create_vg(
    vg: str, pvs: list[PVSpec], lvs: list[LVSpec], *, extent_mib: int = 4
) -> dict[str, object]:
    """Create PVs, a VG and LVs on the given byte ranges of disk images, copy each LV's content
    into its extents (striped ones interleaved as dm-stripe maps them), and detach.

    Returns a description with each PV's ``pe_start`` and each LV's segments, for tests.
    """
    with contextlib.ExitStack() as stack:
        devs = [stack.enter_context(loop(p.disk, p.offset, p.size)) for p in pvs]
        dev_to_pv = dict(zip(devs, pvs, strict=True))
        for d in devs:
            run("pvcreate", "-q", "-ff", "-y", *NOACT, d)
        run("vgcreate", "-q", *NOACT, "-s", f"{extent_mib}m", vg, *devs)
        for spec in lvs:
            args = [
                "lvcreate",
                "-q",
                *NOACT,
                "-an",
                "-Zn",
                "-y",
                "-L",
                f"{spec.size_mib}m",
                "-n",
                spec.name,
            ]
            if spec.stripes > 1:
                args += ["-i", str(spec.stripes), "-I", f"{spec.stripe_kib}k"]
            pv_args = [devs[i] for i in spec.pvs] if spec.pvs else []
            run(*args, *spec.extra_args, vg, *pv_args)
        pe_start = {
            row["pv_name"]: int(row["pe_start"].rstrip("B"))
            for row in json.loads(
                run(
                    "pvs",
                    *NOACT,
                    "--reportformat",
                    "json",
                    "--units",
                    "b",
                    "-o",
                    "pv_name,pe_start",
                    *devs,
                )
            )["report"][0]["pv"]
        }
        extent = extent_mib << 20
        description: dict[str, object] = {"pe_start": pe_start, "lvs": {}}
        for spec in lvs:
            segs = lv_extents(vg, spec.name)
            description["lvs"][spec.name] = segs  # type: ignore[index]
            if spec.content is None:
                continue
            _copy_into_lv(spec, segs, dev_to_pv, pe_start, extent)
    # Leaving the ExitStack detaches the loops: that is all the host forgets (no device-mapper,
    # nothing was activated), and the disk images keep lvm2's metadata.
    return description


def _copy_into_lv(
    spec: LVSpec,
    segs: list[tuple[str, int, int, int]],
    dev_to_pv: dict[str, PVSpec],
    pe_start: dict[str, int],
    extent: int,
) -> None:
    assert spec.content is not None
    with spec.content.open("rb") as src:
        if spec.stripes == 1:
            for dev, first_pe, count, le_start in segs:
                pv = dev_to_pv[dev]
                src.seek(le_start * extent)
                data_len = count * extent
                _write_at(
                    pv.disk, pv.offset + pe_start[dev] + first_pe * extent, src.read(data_len)
                )
            return
        # dm-stripe: chunk i of the segment lives on stripe i % n, row i // n.
        chunk = spec.stripe_kib << 10
        stripes = [(dev, first_pe) for dev, first_pe, _count, _le in segs]
        n = len(stripes)
        seg_len = sum(c for _d, _f, c, _l in segs) * extent
        i = 0
        while i * chunk < seg_len:
            src.seek(i * chunk)
            data = src.read(chunk)
            if not data:
                break
            row, s = divmod(i, n)
            dev, first_pe = stripes[s]
            pv = dev_to_pv[dev]
            _write_at(pv.disk, pv.offset + pe_start[dev] + first_pe * extent + row * chunk, data)
            i += 1


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


# --------------------------------------------------------------------------------------------
# Guest layouts with LVM (the [lvm-assembly] acceptance cases) and their references


@dataclass
class LvmGuest:
    """A guest on LVM: its raw disks (in order), and what root mounts where for the reference:
    ``(mount point, file, offset, size)`` — a filesystem image file, or a range of a disk."""

    disks: list[Path]
    mounts: list[tuple[str, Path, int, int]]
    vg: str
    description: dict[str, object] = field(default_factory=dict)


def make_reference_from(out_tar: Path, mounts: list[tuple[str, Path, int, int]]) -> list[str]:
    """Root's reference over filesystems that live in several files (LVs cannot be activated
    on this kernel: their filesystems are mounted from the image files copied into them)."""
    import tempfile

    from .reference import REFERENCE_TAR_ARGS, loop_device, mounted

    order = sorted(mounts, key=lambda m: (m[0].rstrip("/").count("/"), m[0]))
    mnt = Path(tempfile.mkdtemp(prefix="ova2img-ref-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            for point, backing, offset, size in order:
                target = mnt / point.lstrip("/")
                dev = stack.enter_context(loop_device(backing, offset, size))
                stack.enter_context(mounted(dev, target, options="ro"))
            proc = subprocess.run(
                ["tar", *REFERENCE_TAR_ARGS, "-C", str(mnt), "-cf", str(out_tar), "."],
                capture_output=True,
                text=True,
                errors="surrogateescape",
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"reference tar failed: {proc.stderr}")
            return [line for line in proc.stderr.splitlines() if line]
    finally:
        mnt.rmdir()


def _mkswap(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    run("mkswap", "-q", str(path))
    return path


def seed_layout(workdir: Path, populate: Callable[[Path], None] | None) -> LvmGuest:
    """(a) The seed's Vagrant box: MBR, ext2 /boot (1 KiB blocks) on sda1, an extended
    partition with a logical LVM PV (sda5), a VG with ``root`` (ext4) and ``swap_1``; fstab
    names / and swap by /dev/mapper (dashes in the VG name doubled) and /boot by UUID."""
    from .images import (
        DiskLayout,
        Partition,
        _default_boot,
        build_disk,
        build_ext_image,
        fstab_text,
    )

    vg = unique_vg("seed-vg")  # a dash in the VG name, as Vagrant's "vagrant-vg"
    mapper = vg.replace("-", "--")
    boot_uuid, root_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    fstab = fstab_text(
        [
            (f"/dev/mapper/{mapper}-root", "/", "ext4", "errors=remount-ro"),
            (f"UUID={boot_uuid}", "/boot", "ext2", "defaults"),
            (f"/dev/mapper/{mapper}-swap_1", "none", "swap", "sw"),
            ("proc", "/proc", "proc", "defaults"),
            ("tmpfs", "/run/shm", "tmpfs", "defaults,noauto"),
        ]
    )
    boot = build_ext_image(
        workdir / "boot.ext2",
        8 * MiB,
        _default_boot,
        fstype="ext2",
        mkfs_args=("-b", "1024"),
        uuid=boot_uuid,
    )
    root = build_ext_image(
        workdir / "root.ext4",
        40 * MiB,
        _rootfs(populate, fstab, ("/boot", "/proc", "/run/shm")),
        uuid=root_uuid,
    )
    swap = _mkswap(workdir / "swap.img", 8 * MiB)
    disk = build_disk(
        workdir / "seed.raw",
        DiskLayout(
            "mbr",
            (
                Partition(8 * MiB, image=boot, mountpoint="/boot", bootable=True),
                Partition(None, "extended"),
                Partition(None, "lvm", logical=True),
            ),
            size=72 * MiB,
            disk_id="0x0a2a0a0a",
        ),
    )
    pv = disk.partition(5)
    desc = create_vg(
        vg,
        [PVSpec(disk.path, pv.start, pv.size)],
        [LVSpec("root", 40, content=root.path), LVSpec("swap_1", 8, content=swap)],
    )
    boot_part = disk.partition(1)
    return LvmGuest(
        [disk.path],
        [
            ("/", root.path, 0, root.path.stat().st_size),
            ("/boot", disk.path, boot_part.start, boot_part.size),
        ],
        vg,
        desc,
    )


def _rootfs(
    populate: Callable[[Path], None] | None, fstab: str, mkdirs: tuple[str, ...]
) -> Callable[[Path], None]:
    from .images import _with_fstab

    return _with_fstab(populate, fstab, mkdirs)


def two_disk_layout(workdir: Path, populate: Callable[[Path], None] | None) -> LvmGuest:
    """(b) Two disks: the first an MBR disk with an ext4 root; the second a whole-disk PV whose
    ext4 LV is mounted at /srv with ``nofail``, named /dev/VG/LV."""
    from .images import DiskLayout, Partition, build_disk, build_ext_image, fstab_text

    vg = unique_vg("data")
    root_uuid = str(uuid.uuid4())
    fstab = fstab_text(
        [
            (f"UUID={root_uuid}", "/", "ext4", "defaults"),
            (f"/dev/{vg}/srv", "/srv", "ext4", "defaults,nofail"),
        ]
    )
    root = build_ext_image(
        workdir / "root.ext4", 40 * MiB, _rootfs(populate, fstab, ("/srv",)), uuid=root_uuid
    )
    srv = build_ext_image(workdir / "srv.ext4", 16 * MiB, _srv_content)
    disk1 = build_disk(
        workdir / "disk1.raw",
        DiskLayout("mbr", (Partition(None, image=root, mountpoint="/"),), size=42 * MiB),
    )
    disk2 = workdir / "disk2.raw"
    with disk2.open("wb") as fh:
        fh.truncate(24 * MiB)
    desc = create_vg(vg, [PVSpec(disk2, 0, 24 * MiB)], [LVSpec("srv", 16, content=srv.path)])
    part = disk1.partition(1)
    return LvmGuest(
        [disk1.path, disk2],
        [("/", disk1.path, part.start, part.size), ("/srv", srv.path, 0, srv.path.stat().st_size)],
        vg,
        desc,
    )


def _srv_content(root: Path) -> None:
    (root / "www").mkdir()
    (root / "www" / "index.html").write_text("<h1>served from an LV on the second disk</h1>\n")
    os.chown(root / "www", 33, 33)


def multi_pv_layout(workdir: Path, populate: Callable[[Path], None] | None) -> LvmGuest:
    """(c) One GPT disk with two PV partitions; the VG over both holds a root LV whose
    extents are split over the two PVs (two segments), mounted by /dev/mapper."""
    from .images import DiskLayout, Partition, build_disk, build_ext_image, fstab_text

    vg = unique_vg("sys")
    fstab = fstab_text([(f"/dev/mapper/{vg}-root", "/", "ext4", "defaults")])
    root = build_ext_image(workdir / "root.ext4", 40 * MiB, _rootfs(populate, fstab, ()))
    disk = build_disk(
        workdir / "multi.raw",
        DiskLayout(
            "gpt",
            (Partition(28 * MiB, "lvm", name="pv-a"), Partition(28 * MiB, "lvm", name="pv-b")),
            size=60 * MiB,
        ),
    )
    a, b = disk.partition(1), disk.partition(2)
    desc = create_vg(
        vg,
        [PVSpec(disk.path, a.start, a.size), PVSpec(disk.path, b.start, b.size)],
        [LVSpec("pad", 8, pvs=[0]), LVSpec("root", 40, content=root.path, pvs=[0, 1])],
    )
    return LvmGuest([disk.path], [("/", root.path, 0, root.path.stat().st_size)], vg, desc)
