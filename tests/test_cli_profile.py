"""The container-ready options on the command line (the operations themselves are tested in
test_profile.py and test_preflight.py)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from ova2img.cli import main

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"


def test_profile_with_report(tmp_path: Path) -> None:
    out, report = tmp_path / "out.tar", tmp_path / "ledger.json"
    code = main(
        [
            "convert",
            str(DEMO),
            "-o",
            str(out),
            "--profile",
            "container",
            "--report",
            str(report),
            "--ids",
            "clamp",
            "--drop-devices",
            "--whiteouts",
            "rename",
            "-q",
        ]
    )
    assert code == 0
    ledger = json.loads(report.read_text())
    assert ledger["profile"] == "container"
    with tarfile.open(out) as tf:
        assert "./etc/os-release" in tf.getnames()


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(DEMO), "--profile", "container", "--dry-run"]) == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [["--op", "no-such-op"], ["--profile", "container", "--path", "/etc"]],
)
def test_bad_profile_usage_is_exit_2(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.tar"
    assert main(["convert", str(DEMO), "-o", str(out), *extra]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()


def test_inspect_container_preflight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DEMO), "--container", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["userns"]["ok"] is True
