"""Benchmark: ``ova2img convert`` against root's pipeline, on realistic guest images.

Run: ``nox -s bench`` or ``python benchmarks/run.py [--cases a,b] [--full] [--repeat N]``.

Each case is an OVA (streamOptimized VMDK → MBR → ext4) built with real tools by
``tests/support`` and kept in ``--workdir`` (default ``/tmp/ova2img-bench``) for later runs:

==============  ============================================================================
``debian``      the debootstrapped Debian bookworm guest of the acceptance test (root only)
``files-2k5``   about 2,500 small files (text-like contents, ~2 KiB median), dirs, links
``files-25k``   the same mix, about 25,000 files: the small-file-heavy guest
``files-250k``  the same mix, about 250,000 files (only with ``--full`` or ``--cases``)
``bigfiles``    a dozen files of 32 MiB (half random, half text): the large-file guest
``sparse-20g``  a 20 GiB disk, mostly empty (a small tree in a 20 GiB ext4)
==============  ============================================================================

For every case it runs ``ova2img convert OVA -o out.tar`` as a subprocess and, as root, the
manual pipeline on the same OVA, alternating the two: ``tar -x`` the OVA, ``qemu-img convert
-O raw``, ``losetup --offset --sizelimit`` + ``mount -o ro``, ``tar --numeric-owner --xattrs
--xattrs-include='*' --acls --sparse -cf out.tar .``, teardown. It measures wall time, peak
RSS (``os.wait4`` per process; the largest step for the pipeline) and temporary disk (bytes
allocated in a private scratch directory: ``TMPDIR`` for ova2img, the extracted VMDK and raw
disk for the pipeline), with a cold page cache (``echo 3 > /proc/sys/vm/drop_caches``, root
only) and a warm one. It prints a table and writes the figures as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1 << 20
GiB = 1 << 30
BUILD_VERSION = 2  # bump when a builder changes: cached images are rebuilt
QUICK = ("debian", "files-2k5", "files-25k", "bigfiles", "sparse-20g")
ALL = (
    "debian",
    "files-2k5",
    "files-25k",
    "files-25k-xfs",
    "files-25k-btrfs",
    "files-250k",
    "bigfiles",
    "sparse-20g",
)
TAR_ARGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse")
IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# guest trees


def _text_pool(rng: random.Random, size: int) -> bytes:
    """Text-like bytes (words from a small vocabulary): compresses about as source code does."""
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
        for _ in range(2000)
    ]
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


# file sizes of the small-file mix (bytes, weight): mostly a few KiB, some empty, a few big
_SIZES = ((0, 3), (120, 10), (700, 20), (2_000, 25), (4_500, 18), (9_000, 12), (30_000, 8))
_SIZES += ((120_000, 2),)  # mean ~7 KiB


def small_files(count: int, seed: int = 1) -> Callable[[Path], None]:
    """A populate function: ~``count`` files in a 3-level tree of 40 entries per directory,
    with symlinks (1 %), hardlinks (0.5 %), a few owners and modes."""

    def populate(root: Path) -> None:
        rng = random.Random(seed)
        pool = _text_pool(rng, 4 * MiB)
        sizes = [s for s, w in _SIZES for _ in range(w)]
        made: list[Path] = []
        for i in range(count):
            d = root / "data" / f"d{i // 4000:03d}" / f"s{(i // 40) % 100:02d}"
            if i % 40 == 0:
                d.mkdir(parents=True, exist_ok=True)
            p = d / f"f{i % 40:02d}.txt"
            r = rng.random()
            if r < 0.01 and made:
                p.symlink_to(os.path.relpath(rng.choice(made), d))
                continue
            if r < 0.015 and made:
                os.link(rng.choice(made), p)
                continue
            size = rng.choice(sizes)
            off = rng.randrange(0, len(pool) - size)
            p.write_bytes(pool[off : off + size])
            if i % 7 == 0:
                os.chmod(p, 0o600)
            if IS_ROOT and i % 5 == 0:
                os.chown(p, 1000, 1000)
            made.append(p)

    return populate


def big_files(count: int = 12, size: int = 32 * MiB) -> Callable[[Path], None]:
    """A populate function: ``count`` files of ``size`` bytes, alternating random and text."""

    def populate(root: Path) -> None:
        rng = random.Random(2)
        text = _text_pool(rng, MiB)
        (root / "big").mkdir()
        for i in range(count):
            with (root / "big" / f"blob{i:02d}.bin").open("wb") as fh:
                for _ in range(size // MiB):
                    fh.write(os.urandom(MiB) if i % 2 else text)

    return populate


@dataclass(frozen=True)
class Case:
    """How to build one guest: the filesystem size, what goes in it, its inode count (ext4)."""

    name: str
    fs_size: int
    populate: Callable[[Path], None] | None
    inodes: int | None = None
    debian: bool = False
    fstype: str = "ext4"  # or xfs, btrfs: populated on a kernel mount, no fstab


def cases() -> dict[str, Case]:
    """Every case by name."""

    def files(name: str, n: int) -> Case:
        # Inodes for the files plus their directories and symlinks (a few % of n), with room.
        return Case(
            name, (64 * MiB + n * 16 * 1024) // MiB * MiB, small_files(n), n * 11 // 10 + 4096
        )

    return {
        "debian": Case("debian", 768 * MiB, None, debian=True),
        "files-2k5": files("files-2k5", 2_500),
        "files-25k": files("files-25k", 25_000),
        "files-250k": files("files-250k", 250_000),
        "files-25k-xfs": Case("files-25k-xfs", 512 * MiB, small_files(25_000), fstype="xfs"),
        "files-25k-btrfs": Case("files-25k-btrfs", 640 * MiB, small_files(25_000), fstype="btrfs"),
        "bigfiles": Case("bigfiles", 512 * MiB, big_files()),
        "sparse-20g": Case("sparse-20g", 20 * GiB - 2 * MiB, small_files(1_000, seed=3)),
    }


@dataclass
class Built:
    """A built case: its OVA and what is in it."""

    name: str
    ova: str
    virtual_size: int
    ova_size: int
    build_seconds: float
    entries: int = 0
    data_bytes: int = 0


def build(case: Case, workdir: Path, *, rebuild: bool) -> Built:
    """The case's OVA (cached in ``workdir/NAME`` with a ``built.json``)."""
    from tests.support.images import disk_mbr_single, make_ova, to_vmdk

    d = workdir / case.name
    meta = d / "built.json"
    if meta.exists() and not rebuild:
        data = json.loads(meta.read_text())
        if data.pop("version", None) == BUILD_VERSION and Path(data["ova"]).exists():
            return Built(**data)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.monotonic()
    if case.debian:
        if not IS_ROOT:
            raise SystemExit("the debian case is built as root (debootstrap, loop mounts)")
        from tests.support.guests import debian_guest

        ova = debian_guest(d, probes=False, fs_size=case.fs_size, name="debian").ova
    elif case.fstype != "ext4":
        if not IS_ROOT:
            raise SystemExit(f"the {case.name} case is built as root (a kernel mount)")
        import uuid

        from tests.support.fsguests import build_btrfs_image, build_xfs_image
        from tests.support.images import DiskLayout, Partition, build_disk

        assert case.populate is not None
        image = d / f"{case.name}.img"
        build = build_xfs_image if case.fstype == "xfs" else build_btrfs_image
        build(image, case.populate, fs_uuid=str(uuid.uuid4()), size=case.fs_size)
        layout = DiskLayout(
            "mbr", (Partition(None, image=image, mountpoint="/"),), size=case.fs_size + 2 * MiB
        )
        disk = build_disk(d / f"{case.name}.raw", layout)
        vmdk = to_vmdk(disk.path, d / f"{case.name}.vmdk")
        ova = make_ova(d / f"{case.name}.ova", [vmdk], case.name)
    else:
        kwargs: dict[str, object] = {"fixup": False}
        if case.inodes:
            kwargs["mkfs_args"] = ("-N", str(case.inodes))
        disk = disk_mbr_single(d, case.populate, name=case.name, fs_size=case.fs_size, **kwargs)
        vmdk = to_vmdk(disk.path, d / f"{case.name}.vmdk")
        ova = make_ova(d / f"{case.name}.ova", [vmdk], case.name)
    for f in d.iterdir():  # keep the OVA only
        if f != ova:
            f.unlink() if f.is_file() else shutil.rmtree(f)
    built = Built(
        case.name,
        str(ova),
        virtual_size=case.fs_size + 2 * MiB,
        ova_size=ova.stat().st_size,
        build_seconds=round(time.monotonic() - t0, 1),
    )
    meta.write_text(json.dumps({**asdict(built), "version": BUILD_VERSION}))
    return built


def save_contents(workdir: Path, built: Built) -> None:
    meta = workdir / built.name / "built.json"
    meta.write_text(json.dumps({**asdict(built), "version": BUILD_VERSION}))


# --------------------------------------------------------------------------------------------
# measuring


@dataclass
class Run:
    """One measured conversion."""

    case: str
    tool: str  # "ova2img" or "root"
    cache: str  # "cold" or "warm"
    wall: float
    peak_rss: int  # bytes
    temp_disk: int  # bytes
    out_size: int
    steps: dict[str, float] = field(default_factory=dict)


# Forks and execs argv from a small, fresh process, and writes the child's ru_maxrss (KiB) and
# its wall time (from just before the fork to its exit) to the file descriptor given first. A
# child forked straight from this (large) benchmark process would report this process's own
# peak: Linux carries the memory high-water mark of a forked copy over exec (fs/exec.c
# exec_mmap), so every tool run after the 250k-file case read "160 MiB". The spawner's own
# start (a Python interpreter, ~20 ms) is not the tool's: only the child's time counts.
_SPAWN = """
import os, sys, time
fd = int(sys.argv[1])
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, f"{usage.ru_maxrss} {time.perf_counter() - t0!r}".encode())
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Measured:
    """One tool run: its peak RSS, its own wall time, and the time the measuring added."""

    rss: int  # bytes
    wall: float  # seconds, fork to exit
    overhead: float  # seconds around it (the spawner's start and exit)


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``argv`` to completion: its peak RSS (its own, and that of any process it waited
    for, as ``ru_maxrss`` counts) and wall time."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPAWN, str(w), *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(w,),
    )
    os.close(w)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    proc.wait()
    outer = time.perf_counter() - t0
    with os.fdopen(r, "rb") as fh:
        report = fh.read().split()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    wall = float(report[1])
    return Measured(int(report[0]) * 1024, wall, max(0.0, outer - wall))


def allocated(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (``st_blocks``, so sparse holes count 0)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


@contextlib.contextmanager
def watch_disk(path: Path, every: float = 0.05) -> Iterator[list[int]]:
    """Poll the space allocated under ``path`` while the block runs; yields ``[peak]``."""
    peak = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], allocated(path))
            stop.wait(every)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], allocated(path))


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_ova2img(built: Built, out: Path, cache: str) -> Run:
    """``ova2img convert OVA -o out.tar -q`` in a subprocess, ``TMPDIR`` watched."""
    with tempfile.TemporaryDirectory(prefix="ova2img-bench-tmp-", dir="/tmp") as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        # As installed by pip: byte-compiled modules are used (and written on the warm-up run),
        # not compiled again on every start as PYTHONDONTWRITEBYTECODE=1 makes Python do.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        argv = [sys.executable, "-m", "ova2img", "convert", built.ova, "-o", str(out), "-q"]
        with watch_disk(Path(tmp)) as peak:
            m = run_measured(argv, env)
    return Run(built.name, "ova2img", cache, m.wall, m.rss, peak[0], out.stat().st_size)


def _first_partition(raw: Path) -> tuple[int, int]:
    table = json.loads(subprocess.check_output(["sfdisk", "--json", str(raw)]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    p = table["partitions"][0]
    return int(p["start"]) * sector, int(p["size"]) * sector


def run_root(built: Built, out: Path, cache: str) -> Run:
    """Root's pipeline; each step's time in ``steps``."""
    steps: dict[str, float] = {}
    rss = temp = 0
    overhead = 0.0  # the measuring's own time, taken off the steps and the total

    def measured(argv: list[str]) -> float:
        nonlocal rss, overhead
        m = run_measured(argv)
        rss = max(rss, m.rss)
        overhead += m.overhead
        return m.wall

    scratch = Path(tempfile.mkdtemp(prefix="ova2img-bench-root-", dir="/tmp"))
    mnt = Path(tempfile.mkdtemp(prefix="ova2img-bench-mnt-", dir="/tmp"))
    dev = None
    mounted = False
    t0 = time.perf_counter()
    try:
        steps["tar-x"] = measured(["tar", "-xf", built.ova, "-C", str(scratch)])
        vmdk = next(scratch.glob("*.vmdk"))
        raw = scratch / "disk.raw"
        steps["qemu-img"] = measured(["qemu-img", "convert", "-O", "raw", str(vmdk), str(raw)])
        t = time.perf_counter()
        temp = allocated(scratch)
        overhead += time.perf_counter() - t
        t = time.perf_counter()
        offset, size = _first_partition(raw)
        losetup = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset)]
        losetup += ["--sizelimit", str(size), str(raw)]
        dev = subprocess.check_output(losetup, text=True).strip()
        subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
        mounted = True
        steps["mount"] = time.perf_counter() - t
        steps["tar-c"] = measured(["tar", *TAR_ARGS, "-C", str(mnt), "-cf", str(out), "."])
    finally:
        t = time.perf_counter()
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        if dev:
            subprocess.run(["losetup", "-d", dev], check=True)
        mnt.rmdir()
        shutil.rmtree(scratch)
        steps["teardown"] = time.perf_counter() - t
    wall = time.perf_counter() - t0 - overhead
    return Run(built.name, "root", cache, wall, rss, temp, out.stat().st_size, steps)


def tar_contents(path: Path) -> tuple[int, int]:
    """(entries, bytes of regular-file data) of a tar, streamed."""
    entries = data = 0
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            entries += 1
            if m.isreg():
                data += m.size
    return entries, data


# --------------------------------------------------------------------------------------------
# report


def summarise(built: list[Built], runs: list[Run]) -> list[dict[str, object]]:
    """One row per case, cache state and tool: medians over the repeats."""
    rows: list[dict[str, object]] = []
    for b in built:
        for cache in ("cold", "warm"):
            by_tool: dict[str, list[Run]] = {}
            for r in runs:
                if r.case == b.name and r.cache == cache:
                    by_tool.setdefault(r.tool, []).append(r)
            walls = {t: statistics.median(x.wall for x in rs) for t, rs in by_tool.items()}
            for tool, rs in by_tool.items():
                wall = walls[tool]
                ratio = round(wall / walls["root"], 2) if "root" in walls else None
                steps: dict[str, float] = {}
                for k in rs[0].steps:
                    steps[k] = round(statistics.median(x.steps[k] for x in rs), 3)
                rows.append(
                    {
                        "case": b.name,
                        "cache": cache,
                        "tool": tool,
                        "runs": len(rs),
                        "wall_s": round(wall, 3),
                        "ratio_to_root": ratio,
                        "data_MBps": round(b.data_bytes / 1e6 / wall, 1),
                        "files_per_s": round(b.entries / wall),
                        "peak_rss_MiB": round(max(x.peak_rss for x in rs) / MiB, 1),
                        "temp_disk_MiB": round(max(x.temp_disk for x in rs) / MiB, 1),
                        "steps_s": steps,
                    }
                )
    return rows


def print_table(built: list[Built], rows: list[dict[str, object]]) -> None:
    """The figures, readable."""
    print()
    print(f"{'case':<15} {'entries':>8} {'data MB':>9} {'virtual MiB':>12} {'OVA MiB':>8}")
    for b in built:
        print(
            f"{b.name:<15} {b.entries:>8,} {b.data_bytes / 1e6:>9,.0f}"
            f" {b.virtual_size / MiB:>12,.0f} {b.ova_size / MiB:>8,.0f}"
        )
    print()
    head = (
        f"{'case':<15} {'cache':<5} {'tool':<7} {'wall s':>8} {'ratio':>6} {'MB/s':>7}"
        f" {'files/s':>8} {'RSS MiB':>8} {'tmp MiB':>8}  root steps (s)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "" if r["ratio_to_root"] is None else f"{r['ratio_to_root']:.2f}"
        steps = r["steps_s"]
        assert isinstance(steps, dict)
        print(
            f"{r['case']:<15} {r['cache']:<5} {r['tool']:<7} {r['wall_s']:>8.2f} {ratio:>6}"
            f" {r['data_MBps']:>7.1f} {r['files_per_s']:>8,} {r['peak_rss_MiB']:>8.1f}"
            f" {r['temp_disk_MiB']:>8.1f}  " + " ".join(f"{k}={v:.2f}" for k, v in steps.items())
        )


def main(argv: list[str] | None = None) -> int:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description="ova2img convert against root's pipeline")
    ap.add_argument("--cases", help=f"comma-separated, from {', '.join(ALL)}")
    ap.add_argument("--full", action="store_true", help="every case (files-250k takes a while)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and cache state")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ova2img-bench"))
    ap.add_argument("--json", type=Path, default=None, help="default: WORKDIR/results.json")
    ap.add_argument("--no-root", action="store_true", help="skip root's pipeline")
    ap.add_argument("--no-cold", action="store_true", help="warm page cache only")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached images")
    ap.add_argument("--build-only", action="store_true", help="build the images, measure nothing")
    ap.add_argument(
        "--check",
        action="store_true",
        help="also compare each case's ova2img tarball with root's, entry by entry (fidelity "
        "on the big images; root only)",
    )
    args = ap.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(ALL if args.full else QUICK)
    known = cases()
    if not IS_ROOT and "debian" in names and not args.cases:
        names.remove("debian")  # debootstrap needs root
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    with_root = IS_ROOT and not args.no_root
    caches = ["warm"] if (args.no_cold or not IS_ROOT) else ["cold", "warm"]
    built: list[Built] = []
    runs: list[Run] = []
    out = args.workdir / "out.tar"
    kept = {tool: args.workdir / f"last-{tool}.tar" for tool in ("ova2img", "root")}
    mismatched: list[str] = []
    for name in names:
        print(f"[{name}] building (or cached)…", file=sys.stderr, flush=True)
        b = build(known[name], args.workdir, rebuild=args.rebuild)
        built.append(b)
        if args.build_only:
            continue
        warmed = False
        for cache in caches:
            for i in range(args.repeat):
                tools = ["ova2img", "root"] if with_root else ["ova2img"]
                if i % 2:
                    tools.reverse()  # alternate who goes first
                for tool in tools:
                    if cache == "cold":
                        drop_caches()
                    else:
                        if not warmed:
                            run_ova2img(b, out, cache)  # read the OVA into the page cache
                            out.unlink()  # (not replaced by the next run: that costs it)
                            warmed = True
                        # the last run's output (gigabytes for the large guests) is written
                        # back now, not while the next tool runs (not counted)
                        os.sync()
                    r = (run_ova2img if tool == "ova2img" else run_root)(b, out, cache)
                    if tool == "ova2img" and not b.entries:
                        b.entries, b.data_bytes = tar_contents(out)
                        save_contents(args.workdir, b)
                    runs.append(r)
                    print(
                        f"[{name}] {cache} {tool}: {r.wall:.2f} s, {r.peak_rss / MiB:.0f} MiB RSS",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.check and with_root:
                        out.replace(kept[tool])
                    out.unlink(missing_ok=True)
        if args.check and with_root:
            mismatched += check_case(name, kept["ova2img"], kept["root"])
    rows = summarise(built, runs)
    print_table(built, rows)
    path = args.json or args.workdir / "results.json"
    path.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "root": IS_ROOT, "python": sys.version},
                "cases": [asdict(b) for b in built],
                "summary": rows,
                "runs": [asdict(r) for r in runs],
            },
            indent=1,
        )
    )
    print(f"\nfigures: {path}")
    if mismatched:
        print(f"\nova2img and root's tar differ for: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


def check_case(name: str, ours: Path, ref: Path) -> list[str]:
    """Compare the last tarballs of a case (tests/support/compare.py, the test suite's own
    comparison); print the verdict; ``[name]`` when they differ."""
    from tests.support.compare import compare_tars

    t = time.monotonic()
    # GNU tar cannot hold sockets ("socket ignored"); ova2img skips them too, with a warning.
    differences = compare_tars(ours, ref)
    took = time.monotonic() - t
    ours.unlink()
    ref.unlink()
    if not differences:
        print(f"[{name}] check: same tree as root's tar ({took:.0f} s)", file=sys.stderr)
        return []
    print(f"[{name}] check: {len(differences)} differences, first ones:", file=sys.stderr)
    for line in differences[:20]:
        print(f"    {line}", file=sys.stderr)
    return [name]


if __name__ == "__main__":
    raise SystemExit(main())
