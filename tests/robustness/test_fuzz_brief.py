"""The robustness campaign in brief, for CI: a few hundred damaged inputs through the harness.

Every crafted damage of the corpus, a sample of the truncations at structure boundaries and a
run of seeded bit flips / overwrites in metadata, each converted by ``ova2img convert`` in its
own forked child process under the harness's limits (address space, file size, 10 s), with
the rules of the issue's "done when" checked on every run: no uncaught exception (no
traceback, no Python exception name on stderr), no run over the time limit, no partial output
(nor temporary file) after a failure, peak RSS under 512 MiB, no member with an absolute or
``..`` path, no attempt to write an absurd file. ``nox -s fuzz`` runs the long campaign
(benchmarks/fuzz_run.py).
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from robustness.corpus import Mutation, build_bases, mutations
from robustness.harness import RSS_BUDGET, campaign, campaign_fork

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("debugfs", "mke2fs", "sfdisk", "sgdisk", "qemu-img")),
    reason="needs e2fsprogs, fdisk, gdisk and qemu-img to build the corpus",
)

SEED = 20_240_901
RANDOM_INPUTS = 120
BOUNDARY_INPUTS = 40


def _inputs(count_fixed: int, bases: dict[str, object]) -> list[Mutation]:
    muts = list(mutations(bases, count_fixed + RANDOM_INPUTS, seed=SEED))  # type: ignore[arg-type]
    crafted = [m for m in muts if m.kind == "crafted"]
    boundaries = [m for m in muts[:count_fixed] if m.kind == "truncate"]
    sample = random.Random(SEED).sample(boundaries, min(BOUNDARY_INPUTS, len(boundaries)))
    return crafted + sample + muts[count_fixed:]


def test_brief_campaign(tmp_path: Path) -> None:
    bases = build_bases(tmp_path / "corpus", heavy=False)
    fixed = sum(len(b.crafted) + len(b.boundaries) for b in bases.values())
    inputs = _inputs(fixed, bases)
    assert 150 <= len(inputs) <= 300
    start = time.monotonic()
    if threading.active_count() == 1:
        summary = campaign_fork(inputs, bases, jobs=1)
    else:  # forking a threaded process is unsafe: one interpreter per input instead
        summary = campaign(inputs, bases, jobs=2)
    took = time.monotonic() - start
    print(f"brief campaign: {summary.text()}; {took:.0f} s")
    assert summary.inputs == len(inputs)
    assert summary.uncaught == 0, [o.problems for o in summary.bad if o.uncaught]
    assert summary.timeouts == 0, [o.ident for o in summary.bad if o.timed_out]
    assert summary.partial == 0, [o.problems for o in summary.bad if o.partial]
    assert summary.too_large == 0, [o.ident for o in summary.bad if o.too_large]
    assert summary.bad_paths == 0, [o.ident for o in summary.bad if o.bad_paths]
    assert summary.peak_rss < RSS_BUDGET
    assert summary.bad == [], [(o.ident, o.problems) for o in summary.bad]
    # the corpus is not all refusals: damage that a mount would also tolerate converts
    assert summary.successes >= 10 and summary.failures >= 100


def test_harness_flags_a_file_over_the_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE is on in every run: a conversion whose output outgrows it fails with
    EFBIG, cleanly (one line, nothing left behind), and the harness reports it as a finding."""
    from robustness.corpus import DEMO_OVA
    from robustness.harness import run_subprocess

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    o = run_subprocess("demo", DEMO_OVA, out_dir, fsize_limit=64 * 1024)
    assert o.rc == 1
    assert o.stderr.startswith("ova2img: error: output: cannot write ")
    assert o.stderr.endswith(": File too large\n")
    assert o.too_large and not o.partial and not o.uncaught
    assert o.problems == ["tried to write a file over the RLIMIT_FSIZE limit (EFBIG)"]
    assert list(out_dir.iterdir()) == []
