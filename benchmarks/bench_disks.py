"""What verifying an OVA manifest costs: hashing a page-cached member vs merely reading it.

Run: ``.venv/bin/python benchmarks/bench_disks.py [SIZE_MIB]``. Also times a full read of a
compressed qcow2 through the disk layer against ``qemu-img convert -O raw``, and spooling an OVA
from a pipe (``-``): its speed and the temporary space it takes (``Source.spooled``), for a raw
disk half data, half zeros, and for the same disk as a streamOptimized VMDK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ova2img.disks import open_disk
from ova2img.sources import open_source
from ova2img.sources.manifest import hash_stream
from ova2img.sources.window import Window


def timed(label: str, size: int, fn: object) -> None:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    took = time.perf_counter() - start
    print(f"{label:<28} {took:7.3f} s  {size / took / 2**20:8.0f} MiB/s")


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "member.bin"
        with path.open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(2**20))
        size = mib * 2**20
        with path.open("rb") as fh:
            w = Window(fh, 0, size, "member")
            w.read()  # warm the page cache
            timed(
                "read (page cache)", size, lambda: (w.seek(0), [w.read(2**20) for _ in range(mib)])
            )
            for algorithm in ("sha1", "sha256", "sha512"):
                timed(
                    f"{algorithm} of the member",
                    size,
                    lambda a=algorithm: hash_stream(w.as_binary(), a),
                )
        qcow = Path(d) / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", path, qcow], check=True)
        timed(
            "qemu-img convert -O raw",
            size,
            lambda: subprocess.run(
                ["qemu-img", "convert", "-O", "raw", qcow, Path(d) / "out.raw"], check=True
            ),
        )

        def ours() -> None:
            with open_source([str(qcow)]) as src:
                s = open_disk(src.disks[0]).stream
                while s.read(2**20):
                    pass

        timed("ova2img qcow2 (compressed)", size, ours)
        spool_costs(Path(d), path, mib)


def spool_costs(d: Path, random_file: Path, mib: int) -> None:
    """Spool a raw-disk OVA and a streamOptimized OVA through a pipe; print time and space."""
    raw = d / "half.raw"
    with random_file.open("rb") as src, raw.open("wb") as out:
        out.truncate(2 * mib * 2**20)  # every other MiB is data, the rest zeros (holes)
        for i in range(mib):
            out.seek(2 * i * 2**20)
            out.write(src.read(2**20))
    vmdk = d / "half.vmdk"
    subprocess.run(
        ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk],
        check=True,
    )
    for disk in (raw, vmdk):
        ovf = d / "x.ovf"
        ovf.write_text(
            '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
            'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
            f'<File ovf:id="f" ovf:href="{disk.name}"/></References><DiskSection>'
            '<Disk ovf:diskId="d" ovf:fileRef="f"/></DiskSection></Envelope>'
        )
        ova = d / "x.ova"
        subprocess.run(["tar", "-cf", ova, "-C", d, "x.ovf", disk.name], check=True)
        size = ova.stat().st_size
        with subprocess.Popen(["cat", str(ova)], stdout=subprocess.PIPE) as cat:
            assert cat.stdout is not None
            start = time.perf_counter()
            with open_source(["-"], stdin=cat.stdout) as src:
                took = time.perf_counter() - start
                spooled = src.spooled
        print(
            f"spool {disk.suffix[1:]:<5} OVA {size / 2**20:8.1f} MiB: {took:6.3f} s "
            f"{size / took / 2**20:6.0f} MiB/s, temporary space {spooled / 2**20:8.1f} MiB"
        )


if __name__ == "__main__":
    main()
