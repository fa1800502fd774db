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
