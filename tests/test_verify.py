"""ova2img verify: exit 0 on a faithful conversion, 3 naming the entries that differ."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ova2img.cli import main
from ova2img.verify import verify

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "demo.tar"
    assert main(["convert", str(DEMO), "-o", str(out), "-q"]) == 0
    return out


def test_faithful_conversion_verifies(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(DEMO), str(converted)]) == 0
    assert capsys.readouterr().out == ""


def test_gzip_output_verifies(tmp_path: Path) -> None:
    out = tmp_path / "demo.tar.gz"
    assert main(["convert", str(DEMO), "-o", str(out), "-q"]) == 0
    assert verify(DEMO, out) == []


def _plain(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """The member as a plain (dense) one: tarfile cannot write GNU sparse members back."""
    m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith("GNU.sparse")}
    m.sparse = None
    return m


def _tampered(src: Path, dest: Path) -> None:
    """Copy a tar, changing the content of /etc/hostname and the mode of /etc/passwd."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == "./etc/hostname":
                data = b"tampered\n"
                m.size = len(data)
            if m.name == "./etc/passwd":
                m.mode = 0o666
            tout.addfile(_plain(m), io.BytesIO(data) if data is not None else None)


def test_changed_content_and_mode_are_named(
    converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.tar"
    _tampered(converted, bad)
    assert main(["verify", str(DEMO), str(bad)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("/etc/hostname:") for line in out), out
    assert any(line.startswith("/etc/passwd: mode 0o644") for line in out), out
    assert len(out) == 2, out


def test_missing_and_extra_entries(converted: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(converted) as tin, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            if m.name == "./etc/group":
                continue
            data = tin.extractfile(m) if m.isfile() else None
            tout.addfile(_plain(m), data)
        extra = tarfile.TarInfo("./etc/extra")
        tout.addfile(extra, io.BytesIO())
    diffs = verify(DEMO, bad)
    assert "/etc/group: missing from the tarball" in diffs
    assert "/etc/extra: only in the tarball" in diffs


def test_unreadable_tarball_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert main(["verify", str(DEMO), str(junk)]) == 1
    assert capsys.readouterr().err.startswith("ova2img: error: verify: ")


def test_a_hardlink_written_as_a_separate_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import subprocess

    stage = tmp_path / "stage"
    (stage / "etc").mkdir(parents=True)
    (stage / "etc" / "fstab").write_text("")
    (stage / "a").write_bytes(b"one inode, two names\n")
    os.link(stage / "a", stage / "b")
    img = tmp_path / "fs.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, img, "8M"], check=True)
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    assert main(["convert", str(img), "-o", str(good), "-q"]) == 0
    assert main(["verify", str(img), str(good)]) == 0
    with tarfile.open(good) as tin, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            if m.islnk():  # ./b as a file of its own, same content
                m.type, m.linkname = tarfile.REGTYPE, ""
                data = (stage / "a").read_bytes()
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    capsys.readouterr()
    assert main(["verify", str(img), str(bad)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out == ["/b: a separate member in the tarball, a hardlink of /a in the image"], out


def test_a_cut_off_compressed_tarball_is_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tmp_path / "t.tar.gz"
    assert main(["convert", str(DEMO), "-o", str(whole), "-q"]) == 0
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:1500])
    assert main(["verify", str(DEMO), str(cut)]) == 1
    assert "cannot read the tarball" in capsys.readouterr().err
