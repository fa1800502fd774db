"""ls, cat, convert --path and the progress display (under a real pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ova2img.cli import main

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"


def test_ls_lists_guest_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(DEMO), "/etc"]) == 0
    names = capsys.readouterr().out.split()
    assert names == sorted(names)
    assert {"fstab", "os-release", "passwd", "group"} <= set(names)


def test_ls_long_and_symlinks_stay_in_the_guest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(DEMO), "/bin/sh", "-l"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("lrwxrwxrwx") and line.endswith("sh -> /bin/busybox")
    # /bin/sh on the host is not what is listed: the guest's link is.
    assert main(["ls", str(DEMO), "/etc/passwd", "-l"]) == 0
    assert capsys.readouterr().out.startswith("-rw-r--r--   1     0     0 ")


def test_cat_prints_the_guest_file(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["cat", str(DEMO), "/etc/os-release"]) == 0
    out = capfdbinary.readouterr().out
    assert b'NAME="ova2img demo"' in out


def test_cat_follows_links_inside_the_guest(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    # /bin/sh -> /bin/busybox inside the guest: the guest's busybox, not the host's shell.
    assert main(["cat", str(DEMO), "/bin/sh"]) == 0
    out = capfdbinary.readouterr().out
    assert out[:4] == b"\x7fELF"
    with tarfile.open(DEMO) as ova:
        assert ova.getmember("demo-disk1.vmdk").size < len(out) * 2


@pytest.mark.parametrize("cmd", [["cat", "/etc/nope"], ["ls", "/nope"], ["cat", "/etc"]])
def test_missing_path_is_one_line(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([cmd[0], str(DEMO), cmd[1]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ova2img: error: ")
    assert cmd[1] in err


def test_convert_a_subtree(tmp_path: Path) -> None:
    out = tmp_path / "etc.tar"
    assert main(["convert", str(DEMO), "--path", "/etc", "-o", str(out), "-q"]) == 0
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "./os-release" in names and "./" not in names[1:]
    assert not any(n.startswith("./etc") for n in names)
    assert main(["convert", str(DEMO), "--path", "/nope", "-o", str(out), "-q"]) == 1


def _run_on_pty(args: list[str], cwd: Path) -> tuple[int, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; return its exit code and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ova2img", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        cwd=cwd,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), drawn


def test_progress_on_a_terminal_and_quiet(tmp_path: Path) -> None:
    code, drawn = _run_on_pty(["convert", str(DEMO), "-o", str(tmp_path / "a.tar")], tmp_path)
    assert code == 0
    assert b"converting" in drawn and b"entries" in drawn
    # The display is redrawn in place (carriage returns / cursor control), i.e. it moves.
    assert drawn.count(b"\r") + drawn.count(b"\x1b[2K") >= 1
    code, drawn = _run_on_pty(["convert", str(DEMO), "-o", str(tmp_path / "b.tar"), "-q"], tmp_path)
    assert code == 0
    assert drawn == b""


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", str(DEMO), "-o", str(tmp_path / "c.tar")],
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0
    assert b"converting" not in res.stderr
