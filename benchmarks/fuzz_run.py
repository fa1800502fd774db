"""The long robustness campaign: ``python benchmarks/fuzz_run.py -n 10000`` (``nox -s fuzz``).

Builds the corpus bases (tests/robustness/corpus.py) from ``fixtures/demo.ova`` and real tools,
runs ``-n`` mutated inputs through ``python -m ova2img convert`` in limited subprocesses
(tests/robustness/harness.py) and prints the figures; exit status 1 when any input broke a rule
(uncaught exception, run over the time limit, partial output, RSS over budget, bad member path).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from robustness.corpus import build_bases, mutations
from robustness.harness import (
    FSIZE_LIMIT,
    MEMORY_LIMIT,
    RSS_BUDGET,
    TIME_LIMIT,
    campaign,
    campaign_fork,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", "--inputs", type=int, default=10_000)
    ap.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="inputs run at a time (default 1: the machine is shared; each run is measured alone)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--mode",
        choices=["subprocess", "fork", "inprocess"],
        default="fork",
        help="subprocess: python -m ova2img per input; fork: a child forked per input from "
        "this process with ova2img imported (same limits, no interpreter start; default); "
        "inprocess: cli.main here under SIGALRM (no memory limit)",
    )
    ap.add_argument("--no-heavy", action="store_true", help="skip the XFS and btrfs bases")
    ap.add_argument("--report", type=Path, help="write the problems as JSON here")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C: the corpus and the running input's scratch are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    print(
        f"limits per input: {TIME_LIMIT:.0f} s, RLIMIT_AS {MEMORY_LIMIT >> 20} MiB, "
        f"RLIMIT_FSIZE {FSIZE_LIMIT >> 20} MiB; RSS budget {RSS_BUDGET >> 20} MiB; scratch "
        f"under {os.environ.get('OVA2IMG_FUZZ_TMP') or tempfile.gettempdir()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ova2img-corpus-") as tmp:
        bases = build_bases(Path(tmp), heavy=not args.no_heavy)
        print(f"bases: {', '.join(f'{n} ({b.size} B)' for n, b in bases.items())}", flush=True)
        muts = mutations(bases, args.inputs, seed=args.seed)
        if args.mode == "fork":
            summary = campaign_fork(muts, bases, jobs=args.jobs, progress=True)
        else:
            summary = campaign(
                muts, bases, jobs=args.jobs, inprocess=args.mode == "inprocess", progress=True
            )
    print(f"SUMMARY: {summary.text()}; wall {time.monotonic() - t0:.0f} s", flush=True)
    if args.report:
        args.report.write_text(
            json.dumps([{"input": o.ident, "problems": o.problems} for o in summary.bad], indent=1)
        )
    return 1 if summary.bad else 0


if __name__ == "__main__":
    sys.exit(main())
