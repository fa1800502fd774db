"""A/B: one conversion timed with two versions of ova2img, runs interleaved.

The development VM's speed drifts by 20-30 % within an hour, so a change of a few percent
only shows when both versions run side by side, alternating, and their medians are compared.

    git worktree add /tmp/base HEAD~1         # the version to compare against
    python benchmarks/ab.py IMAGE /tmp/base . --runs 8
    python benchmarks/ab.py IMAGE . . --env-b OVA2IMG_WORKERS=1   # one tree, two settings

Each side runs ``python -m ova2img convert IMAGE -o OUT -q`` with ``PYTHONPATH`` set to its
tree (bytecode written and used, as an installed package does) and prints median, min and
max wall seconds. Arguments after ``--`` go to ``ova2img convert``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """The A/B command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", help="what to convert (an OVA, a disk image, …)")
    ap.add_argument("a", type=Path, help="source tree of version A (holds ova2img/)")
    ap.add_argument("b", type=Path, help="source tree of version B")
    ap.add_argument("--runs", type=int, default=6, help="runs of each (default 6)")
    ap.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("extra", nargs="*", help="more arguments for ova2img convert (after --)")
    args = ap.parse_args(argv)
    base = dict(os.environ)
    base.pop("PYTHONDONTWRITEBYTECODE", None)
    sides = {
        "A": (args.a.resolve(), dict(e.split("=", 1) for e in args.env_a)),
        "B": (args.b.resolve(), dict(e.split("=", 1) for e in args.env_b)),
    }
    times: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="ova2img-ab-") as tmp:
        out = Path(tmp) / "out.tar"
        for run in range(args.runs):
            for side in ("A", "B") if run % 2 == 0 else ("B", "A"):
                tree, extra_env = sides[side]
                env = {**base, **extra_env, "PYTHONPATH": str(tree)}
                out.unlink(missing_ok=True)
                argv_ = [sys.executable, "-m", "ova2img", "convert", args.image, "-o", str(out)]
                t = time.perf_counter()
                subprocess.run([*argv_, "-q", *args.extra], cwd=tree, env=env, check=True)
                times[side].append(time.perf_counter() - t)
    for side, values in times.items():
        tree, extra_env = sides[side]
        setting = " ".join(f"{k}={v}" for k, v in extra_env.items())
        print(
            f"{side}: median {statistics.median(values):.3f} s, min {min(values):.3f}, "
            f"max {max(values):.3f}  ({tree}{' ' + setting if setting else ''})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
