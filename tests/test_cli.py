"""The command line contract (architecture.md): help, version, usage errors, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ova2img
from ova2img.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ova2img {ova2img.__version__}"


def test_help_explains_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("examples:", "--exclude", "--root", "-o OUTPUT", "docker import"):
        assert needle in out


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "x.ova"]) == 2  # -o missing
    assert "usage" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_missing_source_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.tar"
    assert main(["convert", str(tmp_path / "nope.ova"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ova2img: error: ")
    assert "nope.ova" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_not_a_disk_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"hello, this is not a disk\n" * 100)
    out = tmp_path / "out.tar"
    assert main(["convert", str(junk), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ova2img: error: ")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.vmdk"]


def test_python_dash_m_is_the_same_command() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ova2img", "--version"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0
    assert res.stdout.strip() == f"ova2img {ova2img.__version__}"


def test_main_leaves_the_logging_level_as_it_found_it(tmp_path: Path) -> None:
    # An embedding program (or a test run) calls main() more than once: `-q` in one call must
    # not silence the warnings of the library's later conversions in the same process.
    import logging

    logger = logging.getLogger("ova2img")
    before = logger.level
    demo = Path(__file__).resolve().parent.parent / "fixtures" / "demo.ova"
    assert main(["convert", str(demo), "-o", str(tmp_path / "out.tar"), "-q"]) == 0
    assert logger.level == before
    assert not [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]


def test_process_entry_flushes_before_it_ends(capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m ova2img` and the `ova2img` script end with os._exit (no interpreter teardown):
    # what main() printed to a pipe (block-buffered) must all be there, and its exit code.
    main(["convert", "--help"])
    expected = capsys.readouterr()
    done = subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert len(expected.out) > 4096  # more than a pipe write's worth of buffered text
    assert done.stdout == expected.out
    bad = subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", "/nonexistent", "-o", "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("ova2img: error: source: /nonexistent")


# -- outputs and reports that would go wrong (found by an audit) --------------------------------

DEMO = Path(__file__).resolve().parent.parent / "fixtures" / "demo.ova"


def _cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ova2img", *args],
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_output_naming_the_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "vm.ova"
    src.write_bytes(DEMO.read_bytes())
    link = tmp_path / "link.tar"
    link.symlink_to(src)
    for out in (src, link):
        done = _cli("convert", str(src), "-o", str(out))
        assert done.returncode == 2
        assert "is the source" in _one_line(done.stderr)
    assert src.read_bytes() == DEMO.read_bytes()


def test_replacing_an_output_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "rootfs.tar"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert main(["convert", str(DEMO), "-o", str(out), "-q"]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.stat().st_size > 10240


def test_unwritable_report_fails_first_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    for report in (tmp_path / "missing" / "r.json", tmp_path):
        done = _cli("convert", str(DEMO), "-o", str(out), "--report", str(report))
        assert done.returncode == 2
        assert "--report" in _one_line(done.stderr)
        assert not out.exists()


def test_report_that_fails_at_the_end_takes_the_output_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ova2img import report as reportmod
    from ova2img.errors import SinkError

    def fail(self: object, path: object) -> None:
        raise SinkError(f"cannot write the report {path}: No space left on device")

    monkeypatch.setattr(reportmod.Ledger, "write", fail)
    out = tmp_path / "out.tar"
    with pytest.raises(SinkError, match="report"):
        ova2img.convert(DEMO, out, report=tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_compressed_names_compress_and_image_formats_refuse_them(tmp_path: Path) -> None:
    for name, magic in (("r.tgz", b"\x1f\x8b"), ("R.TAR.XZ", b"\xfd7zXZ"), ("r.tbz2", b"BZh")):
        assert main(["convert", str(DEMO), "-o", str(tmp_path / name), "-q"]) == 0
        assert (tmp_path / name).read_bytes()[: len(magic)] == magic
    done = _cli("convert", str(DEMO), "--format", "oci", "-o", str(tmp_path / "i.oci.tar.gz"))
    assert done.returncode == 2
    assert "uncompressed archive" in _one_line(done.stderr)
    assert not (tmp_path / "i.oci.tar.gz").exists()


def test_stdout_closed_full_or_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    closed = _cli("convert", str(DEMO), "-o", "-", preexec_fn=lambda: os.close(1))
    assert closed.returncode == 1
    assert "stdout" in _one_line(closed.stderr)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "ova2img", "inspect", str(DEMO)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert done.returncode == 1
    assert "No space left" in _one_line(done.stderr)
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ova2img", "convert", str(DEMO), "-o", "-", "-q"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(primary)
        os.close(secondary)
    assert done.returncode == 1
    assert "terminal" in _one_line(done.stderr)


def test_listing_into_a_closed_pipe_ends_quietly() -> None:
    shell = (
        f"{sys.executable} -m ova2img inspect {DEMO} | head -c 5 >/dev/null; "
        'echo "${PIPESTATUS[0]}"'
    )
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "0"
    assert done.stderr == ""


def test_paths_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(DEMO), "--no-fstab", "/etc"]) == 0
    assert "fstab" in capsys.readouterr().out.split()
    assert main(["ls", str(DEMO), "--bogus", "/etc"]) == 2


def test_image_only_options_with_a_rootfs_output_are_usage_errors(tmp_path: Path) -> None:
    out = tmp_path / "r.tar"
    for extra in (["--change", "CMD /bin/sh"], ["--tag", "a:b"], ["--gzip-layer"]):
        done = _cli("convert", str(DEMO), "-o", str(out), *extra)
        assert done.returncode == 2
        assert "only for images" in _one_line(done.stderr)
    done = _cli("convert", str(DEMO), "--dry-run", "--report", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "--dry-run" in _one_line(done.stderr)
    assert not out.exists()


def test_progress_into_a_log_is_plain_lines(tmp_path: Path) -> None:
    # --progress when stderr is a file (a CI log): plain lines, no escape codes or redraws
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        argv = ["convert", str(DEMO), "-o", str(tmp_path / "o.tar"), "--progress"]
        done = subprocess.run([sys.executable, "-m", "ova2img", *argv], stderr=log, check=False)
    assert done.returncode == 0
    text = log_path.read_text()
    assert "\x1b" not in text and "\r" not in text
    assert "ova2img: converting: " in text and " entries, " in text


def test_path_naming_a_file_is_refused(tmp_path: Path) -> None:
    # a tree's root must be a directory: a file there became "./" as a regular file, which
    # tar extracts over the target directory itself
    out = tmp_path / "p.tar"
    done = _cli("convert", str(DEMO), "--path", "/etc/fstab", "-o", str(out))
    assert done.returncode == 1
    assert "not a directory" in _one_line(done.stderr)
    assert not out.exists()
    with ova2img.open(DEMO) as guest, pytest.raises(NotADirectoryError):
        guest.walk(path="/etc/fstab")
