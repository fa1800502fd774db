"""Output safety when a conversion is cut short: Ctrl-C, ``SIGTERM``, a full disk, and an
interrupted ``--docker`` import leave nothing behind.

The input is a real ext4 image (``mke2fs -d``) holding 96 MiB of random data, so that a
conversion to ``.tar.gz`` takes seconds; the signal is sent once the temporary output file
holds data (or, for ``--docker``, once the upload to the engine is under way).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs e2fsprogs")

MiB = 1 << 20


def _ext4(work: Path, name: str, data_mib: int, fs_mib: int) -> Path:
    stage = work / f"{name}.stage"
    (stage / "etc").mkdir(parents=True)
    (stage / "etc" / "hostname").write_text("interrupt\n")
    with (stage / "data.bin").open("wb") as f:
        for _ in range(data_mib):
            f.write(os.urandom(MiB))
    img = work / f"{name}.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, img, f"{fs_mib}M"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(stage)
    return img


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ext4(tmp_path_factory.mktemp("interrupt"), "big", 96, 112)


def _start(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    def child() -> None:
        # as from a terminal: SIGINT raises KeyboardInterrupt (a background job of a
        # non-interactive shell would start with it ignored)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "ova2img", "convert", *map(os.fspath, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=child,
    )


def _interrupt_when(
    proc: subprocess.Popen[str], ready: Callable[[], bool], sig: int, limit: float = 60
) -> tuple[int, str]:
    """Send *sig* as soon as *ready()*; return the exit code and stderr."""
    deadline = time.monotonic() + limit
    try:
        while not ready():
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr}"
            assert time.monotonic() < deadline, "never got under way"
            time.sleep(0.01)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=limit)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_file_output_leaves_nothing(big_image: Path, tmp_path: Path, sig: int) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(big_image, "-o", out_dir / "rootfs.tar.gz")

    def writing() -> bool:
        parts = [p for p in out_dir.iterdir() if p.name.endswith(".part")]
        return any(p.stat().st_size > MiB for p in parts)

    rc, err = _interrupt_when(proc, writing, sig)
    assert rc == 130, err
    assert err == "ova2img: interrupted; no output was left behind\n"
    assert list(out_dir.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path: Path, require_root: None) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for the test."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)


def test_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path: Path, tiny_fs: Path) -> None:
    img = _ext4(tmp_path, "small", 3, 8)
    out = tiny_fs / "rootfs.tar"
    proc = subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", img, "-o", out],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert re.fullmatch(
        rf"ova2img: error: output: cannot write {re.escape(str(out))}: no space left on the "
        r"device\n",
        proc.stderr,
    ), proc.stderr
    assert list(tiny_fs.iterdir()) == []
    assert shutil.disk_usage(tiny_fs).used < 64 * 1024


def _docker(host: str, *args: str) -> list[str]:
    proc = subprocess.run(
        ["docker", "-H", host, *args], capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout.split()


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")
def test_interrupted_docker_import_leaves_no_image(big_image: Path, docker_host: str) -> None:
    tag = "ova2img-interrupted:1"
    before = set(_docker(docker_host, "image", "ls", "-aq", "--no-trunc"))
    proc = _start(big_image, "--docker", tag, env={"DOCKER_HOST": docker_host})

    def uploading() -> bool:
        try:
            io = Path(f"/proc/{proc.pid}/io").read_text()
        except OSError:
            return False
        # bytes read from the image (the data file is read only while the layer is sent;
        # what goes to the engine's socket does not count in wchar)
        rchar = int(re.search(r"rchar: (\d+)", io).group(1))  # type: ignore[union-attr]
        return rchar > 24 * MiB

    rc, err = _interrupt_when(proc, uploading, signal.SIGINT)
    assert rc == 130, err
    assert err.endswith("ova2img: interrupted; no output was left behind\n"), err
    assert _docker(docker_host, "image", "ls", "-q", tag) == []
    assert set(_docker(docker_host, "image", "ls", "-aq", "--no-trunc")) == before


def test_interrupt_arriving_while_the_output_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGINT that arrives once the tar is complete but before the rename: held back, it
    cancels the rename, then raises; the temporary file is removed."""
    from ova2img.sinks import output

    real = signal.sigpending

    def pending_now() -> set[signal.Signals]:
        # SIGINT is masked in this thread: it stays pending. (Sent to the thread, not the
        # process: with another thread alive, the kernel would deliver it there instead.)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        monkeypatch.setattr(output.signal, "sigpending", real)
        return real()

    out = tmp_path / "out.tar"
    # Python's own handler, even when pytest was started with SIGINT ignored (as a background
    # job of a non-interactive shell is): then no KeyboardInterrupt would ever come.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), output.open_output(str(out)) as fh:
            fh.write(b"x" * 10240)
            monkeypatch.setattr(output.signal, "sigpending", pending_now)
    finally:
        signal.signal(signal.SIGINT, old)
    assert list(tmp_path.iterdir()) == []


def test_commit_goes_on_when_the_handler_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ova2img.sinks import output

    seen: list[int] = []
    old = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))  # a handler that returns
    try:
        real = signal.sigpending

        def pending_now() -> set[signal.Signals]:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            monkeypatch.setattr(output.signal, "sigpending", real)
            return real()

        out = tmp_path / "out.tar"
        with output.open_output(str(out)) as fh:
            fh.write(b"x" * 10240)
            monkeypatch.setattr(output.signal, "sigpending", pending_now)
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen == [signal.SIGINT]
    assert [p.name for p in tmp_path.iterdir()] == ["out.tar"]
    assert out.read_bytes() == b"x" * 10240
