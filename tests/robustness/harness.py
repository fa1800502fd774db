"""Run damaged inputs through ``ova2img convert`` and check that it fails cleanly.

The mode that counts is :func:`run_subprocess`: ``python -m ova2img convert INPUT -o OUT`` in
a child process under ``RLIMIT_AS`` (an address-space limit) and ``RLIMIT_FSIZE`` (no file it
writes may exceed :data:`FSIZE_LIMIT`: a tiny damaged input must never make ova2img write an
absurd output, and if it tries, the write fails with ``EFBIG`` — Python ignores ``SIGXFSZ`` —
and the run is a finding), killed after a wall-clock limit, its peak RSS read from ``wait4``'s
rusage. :func:`campaign_fork` does the same from forked children (no interpreter start).
:func:`run_inprocess` calls :func:`ova2img.cli.main` under a ``SIGALRM`` timeout, for
throughput only. Scratch directories live under ``/tmp`` (``$OVA2IMG_FUZZ_TMP``), never in
``/dev/shm``: memory is the one thing the runs must not compete for.

Checks (:func:`check`): exit code 0 or 1; stderr without a traceback or a Python exception
name; on failure, exactly one ``ova2img: error:`` line, every line ``ova2img: …``, and an empty
output directory (no output, no ``.part`` temporary); on success, an output tar that CPython's
:mod:`tarfile` reads to the end, with no member (nor hardlink target) absolute or with a ``..``
component.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from robustness.corpus import Base, Mutation

TIME_LIMIT = 10.0
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of the child
RSS_BUDGET = 512 * 1024 * 1024
#: RLIMIT_FSIZE of the child: the largest file it may write. The bases' tarballs are a few
#: MiB; 256 MiB is far above any honest output and far below a full disk.
FSIZE_LIMIT = 256 * 1024 * 1024
#: Regular members up to this size are read to the end when an output is checked; of bigger
#: (sparse) ones only the first MiB: the headers of the whole archive are walked either way.
READ_LIMIT = 64 * 1024 * 1024

#: A Python exception's name or a traceback leaking onto stderr.
PY_EXC = re.compile(
    r"Traceback \(most recent call last\)|\b(?:[A-Z][A-Za-z]*(?:Error|Exception)|"
    r"struct\.error|zlib\.error|KeyboardInterrupt|StopIteration)\b"
)


@dataclass
class Outcome:
    """What one run did, and what was wrong with it."""

    ident: str
    rc: int | None
    stderr: str
    seconds: float
    maxrss: int  # bytes
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)
    partial: bool = False
    bad_paths: int = 0
    uncaught: bool = False
    too_large: bool = False


def _ok_member_name(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def check(out: Outcome, out_dir: Path, output: Path) -> Outcome:
    """Fill ``out.problems`` from the exit code, stderr and what is left in ``out_dir``."""
    if out.timed_out:
        out.problems.append(f"timeout after {out.seconds:.1f} s")
    if out.rc == -signal.SIGXFSZ or "File too large" in out.stderr:
        out.too_large = True
        out.problems.append("tried to write a file over the RLIMIT_FSIZE limit (EFBIG)")
    if PY_EXC.search(out.stderr):
        out.uncaught = True
        out.problems.append("python exception on stderr: " + out.stderr.strip()[-600:])
    if out.rc not in (0, 1) and not out.timed_out:
        out.problems.append(f"exit code {out.rc}")
    if out.maxrss > RSS_BUDGET:
        out.problems.append(f"peak RSS {out.maxrss >> 20} MiB")
    left = sorted(p.name for p in out_dir.iterdir())
    if out.rc == 0:
        if left != [output.name]:
            out.problems.append(f"output dir holds {left}")
        try:
            with tarfile.open(output, "r:") as tf:
                for m in tf:
                    if not _ok_member_name(m.name) or (
                        m.islnk() and not _ok_member_name(m.linkname)
                    ):
                        out.bad_paths += 1
                    if m.isreg():
                        f = tf.extractfile(m)
                        assert f is not None
                        with f:
                            left = m.size if m.size <= READ_LIMIT else 1 << 20
                            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                                left -= len(chunk)
        except (tarfile.TarError, OSError, EOFError) as err:
            out.problems.append(f"output tar unreadable: {err!r}")
        if out.bad_paths:
            out.problems.append(f"{out.bad_paths} member(s) with absolute or .. paths")
    else:
        if left:
            out.partial = True
            out.problems.append(f"failed run left {left}")
        lines = out.stderr.splitlines()
        errors = [ln for ln in lines if ln.startswith("ova2img: error:")]
        if not out.timed_out and len(errors) != 1:
            out.problems.append(f"{len(errors)} error lines on stderr: {out.stderr[-400:]!r}")
        stray = [ln for ln in lines if not ln.startswith("ova2img: ")]
        if stray:
            out.problems.append(f"stray stderr lines: {stray[:3]!r}")
    return out


def run_subprocess(
    ident: str,
    source: Path,
    out_dir: Path,
    *,
    time_limit: float = TIME_LIMIT,
    memory_limit: int = MEMORY_LIMIT,
    fsize_limit: int = FSIZE_LIMIT,
    extra: Iterable[str] = (),
) -> Outcome:
    """``python -m ova2img convert source -o out_dir/out.tar`` in a limited child process."""
    output = out_dir / "out.tar"
    argv = [
        sys.executable,
        "-m",
        "ova2img",
        "convert",
        os.fspath(source),
        "-o",
        os.fspath(output),
        *extra,
    ]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=out_dir,
            preexec_fn=lambda: set_limits(memory_limit, fsize_limit),
        )
        timed_out = False
        status = 0
        rusage: resource.struct_rusage | None = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > time_limit:
                timed_out = True
                proc.kill()
                _pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        seconds = time.monotonic() - start
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc  # reaped by wait4: tell Popen
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    maxrss = (rusage.ru_maxrss if rusage else 0) * 1024
    return check(Outcome(ident, rc, stderr, seconds, maxrss, timed_out), out_dir, output)


def set_limits(memory_limit: int = MEMORY_LIMIT, fsize_limit: int = FSIZE_LIMIT) -> None:
    """In a child process: cap its address space and the size of any file it writes.

    ``SIGXFSZ`` is ignored (as the Python interpreter does at start-up) so that a write past
    the limit fails with ``EFBIG``, which ova2img must report as its one-line error.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))


class _Alarm(BaseException):
    pass


def run_inprocess(
    ident: str, source: Path, out_dir: Path, *, time_limit: float = TIME_LIMIT
) -> Outcome:
    """:func:`ova2img.cli.main` in this process, under a SIGALRM timeout (no memory limit)."""
    from ova2img import cli

    output = out_dir / "out.tar"
    buf = io.StringIO()

    def alarm(signum: int, frame: object) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    start = time.monotonic()
    rc: int | None
    timed_out = False
    try:
        with contextlib.redirect_stderr(buf):
            rc = cli.main(["convert", os.fspath(source), "-o", os.fspath(output)])
    except _Alarm:
        rc, timed_out = None, True
    except BaseException as exc:
        import traceback

        rc = 1
        buf.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.monotonic() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return check(Outcome(ident, rc, buf.getvalue(), seconds, maxrss, timed_out), out_dir, output)


@dataclass
class Summary:
    """The figures of a campaign."""

    inputs: int = 0
    successes: int = 0
    failures: int = 0
    uncaught: int = 0
    timeouts: int = 0
    partial: int = 0
    bad_paths: int = 0
    too_large: int = 0
    other: int = 0
    peak_rss: int = 0
    slowest: float = 0.0
    #: refusals by the layer that refused (``ova2img: error: LAYER: …``)
    classes: dict[str, int] = field(default_factory=dict)
    bad: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.inputs += 1
        self.successes += o.rc == 0
        self.failures += o.rc != 0
        self.uncaught += o.uncaught
        self.timeouts += o.timed_out
        self.partial += o.partial
        self.bad_paths += o.bad_paths
        self.too_large += o.too_large
        self.peak_rss = max(self.peak_rss, o.maxrss)
        self.slowest = max(self.slowest, o.seconds)
        if o.rc:
            m = re.search(r"^ova2img: error: (\w+):", o.stderr, re.M)
            layer = m.group(1) if m else ("timeout" if o.timed_out else f"exit {o.rc}")
            self.classes[layer] = self.classes.get(layer, 0) + 1
        if o.problems:
            self.other += not (o.uncaught or o.timed_out or o.partial or o.bad_paths or o.too_large)
            self.bad.append(o)

    def text(self) -> str:
        return (
            f"inputs {self.inputs} (converted {self.successes}, refused {self.failures}); "
            f"uncaught exceptions {self.uncaught}; timeouts (>{TIME_LIMIT:.0f} s) {self.timeouts}; "
            f"partial outputs {self.partial}; members with bad paths {self.bad_paths}; "
            f"files over {FSIZE_LIMIT >> 20} MiB attempted {self.too_large}; "
            f"other problems {self.other}; peak RSS {self.peak_rss / 2**20:.0f} MiB; "
            f"slowest {self.slowest:.2f} s; refused by "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items(), key=lambda kv: -kv[1]))
        )


def _scratch_root() -> Path:
    """Where inputs and outputs of the runs go: ``$OVA2IMG_FUZZ_TMP``, else ``/tmp`` (never
    ``/dev/shm``, whose pages are memory the runs are measured against)."""
    root = Path(os.environ.get("OVA2IMG_FUZZ_TMP") or tempfile.gettempdir())
    if root.resolve().is_relative_to("/dev/shm"):
        root = Path("/tmp")
    return root


def run_one(m: Mutation, bases: dict[str, Base], *, inprocess: bool = False) -> Outcome:
    """Apply ``m`` in a fresh scratch directory, run it, check it, clean up."""
    with tempfile.TemporaryDirectory(prefix="ova2img-fuzz-", dir=_scratch_root()) as tmp:
        src_dir = Path(tmp) / "in"
        out_dir = Path(tmp) / "out"
        src_dir.mkdir()
        out_dir.mkdir()
        source = m.apply(bases, src_dir)
        if inprocess:
            return run_inprocess(m.ident, source, out_dir)
        return run_subprocess(m.ident, source, out_dir)


def _fork_child(argv: list[str], err_path: Path, cwd: Path, memory_limit: int) -> None:
    """In a forked child: limit memory, send stderr to ``err_path``, run the CLI, exit as
    ``python -m ova2img`` would (an exception escaping ``main`` prints a traceback, status 1)."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        set_limits(memory_limit, FSIZE_LIMIT)
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.chdir(cwd)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        from ova2img import cli

        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        os._exit(code)


def _import_everything() -> None:
    """Import every module of the package now, so that each forked child runs the code as it
    was when the campaign started: the package imports its sinks and formats lazily, and a
    file edited on disk meanwhile must not change what the later inputs run."""
    import importlib
    import pkgutil

    import ova2img

    for info in pkgutil.walk_packages(ova2img.__path__, "ova2img."):
        if info.name != "ova2img.__main__":
            importlib.import_module(info.name)


def campaign_fork(
    muts: Iterable[Mutation],
    bases: dict[str, Base],
    *,
    jobs: int = 2,
    time_limit: float = TIME_LIMIT,
    memory_limit: int = MEMORY_LIMIT,
    progress: bool = False,
) -> Summary:
    """Like :func:`campaign` in subprocess mode, but each child is forked from this process
    with ``ova2img`` already imported (saves the interpreter start and imports, ~0.25 s of CPU
    per input). Each input still runs in its own process under ``RLIMIT_AS``, killed after
    ``time_limit``, its peak RSS from ``wait4``; the parent must be single-threaded."""
    _import_everything()

    summary = Summary()
    start = time.monotonic()
    running: dict[int, tuple[Mutation, Path, float]] = {}
    queue = iter(muts)

    def finish(pid: int, status: int, ru: resource.struct_rusage | None, timed_out: bool) -> None:
        m, tmp, t0 = running.pop(pid)
        out_dir = tmp / "out"
        stderr = (tmp / "stderr").read_text(errors="replace")
        o = Outcome(
            m.ident,
            os.waitstatus_to_exitcode(status),
            stderr,
            time.monotonic() - t0,
            (ru.ru_maxrss if ru else 0) * 1024,
            timed_out,
        )
        check(o, out_dir, out_dir / "out.tar")
        shutil.rmtree(tmp)
        summary.add(o)
        if o.problems and progress:
            print(f"PROBLEM {o.ident}: {'; '.join(o.problems)}", file=sys.stderr, flush=True)
        if progress and summary.inputs % 250 == 0:
            rate = summary.inputs / (time.monotonic() - start)
            print(f"[{summary.inputs}] {rate:.1f}/s {summary.text()}", file=sys.stderr, flush=True)

    try:
        exhausted = False
        while running or not exhausted:
            while not exhausted and len(running) < jobs:
                m = next(queue, None)
                if m is None:
                    exhausted = True
                    break
                tmp = Path(tempfile.mkdtemp(prefix="ova2img-fuzz-", dir=_scratch_root()))
                (tmp / "in").mkdir()
                (tmp / "out").mkdir()
                src = m.apply(bases, tmp / "in")
                argv = ["convert", os.fspath(src), "-o", os.fspath(tmp / "out" / "out.tar")]
                sys.stderr.flush()
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _fork_child(argv, tmp / "stderr", tmp / "out", memory_limit)
                running[pid] = (m, tmp, time.monotonic())
            if not running:
                break
            pid, status, ru = os.wait4(-1, os.WNOHANG)
            if pid:
                finish(pid, status, ru, False)
                continue
            now = time.monotonic()
            for cpid, (_m, _tmp, t0) in list(running.items()):
                if now - t0 > time_limit:
                    os.kill(cpid, signal.SIGKILL)
                    _p, status, ru = os.wait4(cpid, 0)
                    finish(cpid, status, ru, True)
            time.sleep(0.003)
    finally:
        # interrupted (Ctrl-C, SIGTERM, an error): no child nor scratch directory outlives us
        for cpid, (_m, tmp, _t0) in running.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(cpid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(cpid, 0)
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def campaign(
    muts: Iterable[Mutation],
    bases: dict[str, Base],
    *,
    jobs: int = 2,
    inprocess: bool = False,
    progress: bool = False,
) -> Summary:
    """Run every mutation (``jobs`` at a time in subprocess mode) and sum up."""
    summary = Summary()
    start = time.monotonic()

    def report(o: Outcome) -> None:
        summary.add(o)
        if o.problems and progress:
            print(f"PROBLEM {o.ident}: {'; '.join(o.problems)}", file=sys.stderr, flush=True)
        if progress and summary.inputs % 250 == 0:
            rate = summary.inputs / (time.monotonic() - start)
            print(f"[{summary.inputs}] {rate:.1f}/s {summary.text()}", file=sys.stderr, flush=True)

    if inprocess or jobs <= 1:
        for m in muts:
            report(run_one(m, bases, inprocess=inprocess))
        return summary
    with ThreadPoolExecutor(jobs) as pool:
        for o in pool.map(lambda m: run_one(m, bases), muts):
            report(o)
    return summary
