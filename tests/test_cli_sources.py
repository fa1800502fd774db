"""CLI behaviour of the source layer's checks: the manifest, external references."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from ova2img.cli import main

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"


def _tampered_copy(dest: Path) -> str:
    """Copy the demo OVA with one digest of its manifest changed; return that file's name."""
    changed = ""
    with tarfile.open(DEMO) as src, tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as out:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            if member.name.endswith(".mf"):
                lines = data.decode().splitlines()
                m = re.match(r"(\w+) ?\((.+)\) ?= ?([0-9a-f]+)", lines[-1])
                assert m, lines[-1]
                changed = m.group(2)
                digest = m.group(3)
                flipped = ("0" if digest[0] != "0" else "1") + digest[1:]
                lines[-1] = lines[-1].replace(digest, flipped)
                data = ("\n".join(lines) + "\n").encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return changed


def test_tampered_manifest_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ova = tmp_path / "tampered.ova"
    name = _tampered_copy(ova)
    out = tmp_path / "out.tar"
    assert main(["convert", str(ova), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert name in err and "digest" in err.lower()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.ova"]
    # --no-manifest-check reads it anyway.
    assert main(["convert", str(ova), "-o", str(out), "--no-manifest-check", "-q"]) == 0
    assert out.stat().st_size > 0


def test_inspect_reports_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "manifest verified" in out
    assert "mounted at /" in out


def test_tampered_manifest_to_stdout_never_ends_the_archive(tmp_path: Path) -> None:
    # The digests are computed beside the conversion: a mismatch found once the tree is
    # written still fails it before the archive's end, so `| docker import -` fails too.
    import subprocess
    import sys

    ova = tmp_path / "tampered.ova"
    name = _tampered_copy(ova)
    done = subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", str(ova), "-o", "-", "-q"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.count("\n") == 1 and name in err and "digest mismatch" in err, err
    names = []
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(done.stdout)) as tf:
        names.extend(m.name for m in tf)  # the last member announces data that never comes
    assert names and names[-1].startswith("./OVA2IMG-CONVERSION-FAILED")
    assert "./etc" in names  # the tree was written: the mismatch came at its end
