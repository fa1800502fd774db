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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
NOACT = ["--driverloaded", "n"]


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
