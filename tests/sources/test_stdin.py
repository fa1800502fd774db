"""Sources read from a pipe (``-``) and gzip'd archives: spooled sparse to an unnamed temp file,
the manifest verified while spooling, nothing left in ``$TMPDIR``."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_ova_ovf import build_appliance, ovftool_ovf, raw_disks, run, tar_ova

from ova2img.disks import open_disk
from ova2img.errors import SourceError, UnsupportedError, UsageError
from ova2img.sources import open_source

__all__ = ["raw_disks"]  # the module-scoped fixture, re-exported for this module

ROOT = Path(__file__).parent.parent.parent
DEMO = ROOT / "fixtures" / "demo.ova"


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$TMPDIR`` for the spool, checked by the tests to stay empty."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def disk_bytes(src_args: list[str], **kw: object) -> list[bytes]:
    with open_source(src_args, **kw) as src:  # type: ignore[arg-type]
        return [open_disk(d).stream.read() for d in src.disks]


def test_cli_pipe_equals_file(tmp_path: Path) -> None:
    """``cat demo.ova | ova2img convert - -o out.tar`` (a real pipe) and ``stdin=<file>`` give the
    same tar as converting the file; the spool leaves nothing in ``$TMPDIR``."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    py = sys.executable
    by_file = tmp_path / "file.tar"
    run(py, "-m", "ova2img", "convert", DEMO, "-o", by_file, "-q", cwd=ROOT)
    by_pipe = tmp_path / "pipe.tar"
    subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; cat '{DEMO}' | '{py}' -m ova2img convert - -o '{by_pipe}' -q",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
    )
    by_stdin_file = tmp_path / "stdin.tar"
    with DEMO.open("rb") as fh:
        subprocess.run(
            [py, "-m", "ova2img", "convert", "-", "-o", str(by_stdin_file), "-q"],
            stdin=fh,
            check=True,
            capture_output=True,
            env=env,
            cwd=ROOT,
        )
    assert by_file.read_bytes() == by_pipe.read_bytes() == by_stdin_file.read_bytes()
    assert list(tmpdir.iterdir()) == []
    # Failure: a truncated stream names the member, writes no output, leaves TMPDIR clean.
    out = tmp_path / "cut.tar"
    proc = subprocess.run(
        ["bash", "-c", f"head -c 700000 '{DEMO}' | '{py}' -m ova2img convert - -o '{out}'"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "member 'demo-disk1.vmdk' is truncated: 1187328 bytes expected" in proc.stderr
    assert not out.exists()
    assert list(tmpdir.iterdir()) == []


def test_spool_is_unnamed_and_sized_like_the_ova(tmpdir_env: Path) -> None:
    """A streamOptimized OVA spools to about its own size (kept compressed): never more."""
    data = DEMO.read_bytes()
    with open_source(["-"], stdin=io.BytesIO(data)) as src:
        assert list(tmpdir_env.iterdir()) == []  # O_TMPFILE / unlinked at once
        assert src.kind == "ova" and src.manifest == "verified"
        assert src.files == {"demo.ovf": 3508, "demo.mf": 177, "demo-disk1.vmdk": 1187328}
        # measured: 1,085,440 bytes for this 1,198,080-byte OVA (its zero padding is holes)
        assert 0.85 * len(data) < src.spooled <= len(data)
        piped = open_disk(src.disks[0]).stream.read()
    assert piped == disk_bytes([str(DEMO)])[0]
    assert list(tmpdir_env.iterdir()) == []


def test_raw_disk_spools_only_its_data(tmp_path: Path, tmpdir_env: Path) -> None:
    """A raw disk of 64 MiB holding 5 MiB of data costs 5 MiB of temporary space."""
    raw = tmp_path / "big.raw"
    with raw.open("wb") as f:
        f.truncate(64 * 2**20)
        for i in range(5):
            f.seek(i * 12 * 2**20 + 4096 * i)
            f.write(os.urandom(2**20))
    ova_dir = tmp_path / "ova"
    ova_dir.mkdir()
    os.link(raw, ova_dir / "big.raw")
    (ova_dir / "big.ovf").write_text(ovftool_ovf({"big.raw": raw.stat().st_size}, [1]))
    ova = tar_ova(ova_dir, ["big.ovf", "big.raw"], tmp_path / "big.ova")
    with ova.open("rb") as fh, open_source(["-"], stdin=fh) as src:
        assert src.disks[0].size == 64 * 2**20
        assert 5 * 2**20 <= src.spooled <= 5 * 2**20 + 6 * 4096 + 2 * 4096
        with src.disks[0].open() as d:
            assert hashlib.sha256(d.read()).digest() == hashlib.sha256(raw.read_bytes()).digest()
    # A bare raw image on stdin is spooled sparse the same way.
    with raw.open("rb") as fh, open_source(["-"], stdin=fh) as src:
        assert src.kind == "images" and src.disks[0].size == 64 * 2**20
        assert src.spooled <= 5 * 2**20 + 6 * 4096
        assert open_disk(src.disks[0]).stream.read() == raw.read_bytes()
    assert list(tmpdir_env.iterdir()) == []


def _ova_stream(tmp: Path, order: list[str]) -> bytes:
    out = tmp / ("-".join(order).replace("/", "_") + ".ova")
    return tar_ova(tmp, order, out).read_bytes()


def test_manifest_after_the_disks_and_sha512(
    raw_disks: list[Path], tmp_path: Path, tmpdir_env: Path
) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    expected = [r.read_bytes() for r in raw_disks]
    late = _ova_stream(tmp_path, ["app.ovf", *names, "app.mf"])
    assert disk_bytes(["-"], stdin=io.BytesIO(late)) == expected
    with open_source(["-"], stdin=io.BytesIO(late)) as src:
        assert src.manifest == "verified"
    # A SHA512 manifest after the disks: hashed again from the spool.
    lines = [
        f"SHA512({n})= {hashlib.sha512((tmp_path / n).read_bytes()).hexdigest()}"
        for n in ["app.ovf", *names]
    ]
    (tmp_path / "app.mf").write_text("\n".join(lines) + "\n")
    late512 = _ova_stream(tmp_path, ["app.ovf", *names, "app.mf"])
    assert disk_bytes(["-"], stdin=io.BytesIO(late512)) == expected
    bad = lines[2].replace(lines[2][-8:], "00000000")
    (tmp_path / "app.mf").write_text("\n".join([*lines[:2], bad]) + "\n")
    tampered = _ova_stream(tmp_path, ["app.ovf", *names, "app.mf"])
    with pytest.raises(SourceError, match=re.escape(f"{names[1]}: SHA512 digest mismatch")):
        open_source(["-"], stdin=io.BytesIO(tampered))
    assert disk_bytes(["-"], stdin=io.BytesIO(tampered), verify_manifest=False) == expected
    assert list(tmpdir_env.iterdir()) == []


def test_manifest_first_fails_before_reading_on(
    raw_disks: list[Path], tmp_path: Path, tmpdir_env: Path
) -> None:
    """With the manifest first, a bad first disk fails right after it: the truncated second
    disk is never reached."""
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    text = (tmp_path / "app.mf").read_text().replace("= ", "= 0", 1)
    fixed = text.splitlines()
    fixed[0] = fixed[0][:-1]  # keep the length: one digit moved
    (tmp_path / "app.mf").write_text("\n".join(fixed) + "\n")
    data = _ova_stream(tmp_path, ["app.ovf", "app.mf", *names])
    cut = data[: len(data) - 10240 - 4096]  # into the last member, before the end blocks
    with pytest.raises(SourceError, match=r"app\.ovf: SHA256 digest mismatch"):
        open_source(["-"], stdin=io.BytesIO(cut))
    with pytest.raises(SourceError, match=re.escape(f"member '{names[1]}' is truncated")):
        open_source(["-"], stdin=io.BytesIO(cut), verify_manifest=False)
    assert list(tmpdir_env.iterdir()) == []


def test_non_disk_files_are_hashed_not_spooled(
    raw_disks: list[Path], tmp_path: Path, tmpdir_env: Path
) -> None:
    """An ISO the OVF references for a CD-ROM is verified against the manifest, not spooled."""
    _, names = build_appliance(tmp_path, raw_disks[:1], "ovftool")
    iso = tmp_path / "tools.iso"
    iso.write_bytes(os.urandom(3 * 2**20))
    disk = tmp_path / names[0]
    (tmp_path / "app.ovf").write_text(
        ovftool_ovf({names[0]: disk.stat().st_size, "tools.iso": iso.stat().st_size}, [1])
    )
    lines = [
        f"SHA1({n})= {hashlib.sha1((tmp_path / n).read_bytes()).hexdigest()}"
        for n in ["app.ovf", names[0], "tools.iso"]
    ]
    (tmp_path / "app.mf").write_text("\n".join(lines) + "\n")
    for order in (
        ["app.ovf", "app.mf", names[0], "tools.iso"],
        ["app.ovf", "tools.iso", names[0], "app.mf"],
    ):
        data = _ova_stream(tmp_path, order)
        with open_source(["-"], stdin=io.BytesIO(data)) as src:
            assert src.manifest == "verified"
            assert src.files["tools.iso"] == 3 * 2**20
            assert src.spooled < disk.stat().st_size + 64 * 1024  # the ISO is not there
            assert open_disk(src.disks[0]).stream.read() == raw_disks[0].read_bytes()
    iso.write_bytes(os.urandom(3 * 2**20))  # replaced after the manifest was written
    data = _ova_stream(tmp_path, ["app.ovf", "tools.iso", names[0], "app.mf"])
    with pytest.raises(SourceError, match=r"tools\.iso: SHA1 digest mismatch"):
        open_source(["-"], stdin=io.BytesIO(data))


def test_gzip_member_and_other_streams(
    raw_disks: list[Path], tmp_path: Path, tmpdir_env: Path
) -> None:
    """An ``ovf:compression="gzip"`` member stays compressed in the spool; a qcow2 on stdin;
    an OVF alone on stdin is refused."""
    _, names = build_appliance(tmp_path, raw_disks[:1], "ovftool")
    gz = gzip.compress((tmp_path / names[0]).read_bytes(), mtime=0)
    (tmp_path / "d.vmdk.gz").write_bytes(gz)
    (tmp_path / "gz.ovf").write_text(ovftool_ovf({"d.vmdk.gz": len(gz)}, [1], compression="gzip"))
    data = _ova_stream(tmp_path, ["gz.ovf", "d.vmdk.gz"])
    with open_source(["-"], stdin=io.BytesIO(data)) as src:
        assert src.spooled < len(gz) + 3 * 4096
        assert open_disk(src.disks[0]).stream.read() == raw_disks[0].read_bytes()
    qcow = tmp_path / "d.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", "-c", raw_disks[0], qcow)
    with qcow.open("rb") as fh, open_source(["-"], stdin=fh) as src:
        disk = open_disk(src.disks[0])
        assert disk.format == "qcow2"
        assert disk.stream.read() == raw_disks[0].read_bytes()
    with pytest.raises(UnsupportedError, match="OVF descriptor on stdin"):
        open_source(["-"], stdin=io.BytesIO((tmp_path / "gz.ovf").read_bytes()))
    with pytest.raises(SourceError, match="nothing to read"):
        open_source(["-"], stdin=io.BytesIO(b""))
    with pytest.raises(UsageError, match="alone"):
        open_source(["-", str(raw_disks[0])])
    assert list(tmpdir_env.iterdir()) == []


def test_gnu_sparse_member_from_a_pipe(tmp_path: Path, tmpdir_env: Path) -> None:
    """A GNU sparse member (``tar -S``) cannot be read in place, but from a pipe tarfile expands
    it and the spool keeps its holes."""
    raw = tmp_path / "holes.raw"
    with raw.open("wb") as f:
        f.truncate(32 * 2**20)
        f.seek(8 * 2**20)
        f.write(os.urandom(2**20))
    (tmp_path / "s.ovf").write_text(ovftool_ovf({"holes.raw": None}, [1]))
    run("tar", "-S", "--format=gnu", "-cf", tmp_path / "s.ova", "s.ovf", "holes.raw", cwd=tmp_path)
    with pytest.raises(UnsupportedError, match="GNU sparse"):
        open_source([str(tmp_path / "s.ova")])
    with (tmp_path / "s.ova").open("rb") as fh, open_source(["-"], stdin=fh) as src:
        assert src.spooled <= 2**20 + 2 * 4096
        assert open_disk(src.disks[0]).stream.read() == raw.read_bytes()
