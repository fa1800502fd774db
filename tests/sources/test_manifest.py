"""The OVF manifest: every listed digest checked before any disk is decoded."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from test_ova_ovf import build_appliance, raw_disks, tar_ova

from ova2img.errors import SourceError
from ova2img.sources import manifest, open_source
from ova2img.sources.manifest import parse_manifest

__all__ = ["raw_disks"]  # the module-scoped fixture, re-exported for this module


def write_manifest(tmp: Path, names: list[str], algorithm: str, style: str) -> None:
    lines = []
    for n in names:
        h = hashlib.new(algorithm.lower(), (tmp / n).read_bytes()).hexdigest()
        lines.append(f"{algorithm}({n})= {h}" if style == "ovftool" else f"{algorithm} ({n}) = {h}")
    (tmp / "app.mf").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
@pytest.mark.parametrize("style", ["ovftool", "openssl"])
def test_manifest_verified(
    algorithm: str, style: str, raw_disks: list[Path], tmp_path: Path
) -> None:
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    write_manifest(tmp_path, ["app.ovf", *names], algorithm, style)
    (tmp_path / "app.cert").write_text("SHA256(app.mf)= 00\n-----BEGIN CERTIFICATE-----\n")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", "app.cert", *names], tmp_path / "app.ova")
    for source in (ova, ovf):
        with open_source([str(source)]) as src:
            assert (src.manifest, src.certificate) == ("verified", True)


def test_manifest_mismatch_names_the_file(raw_disks: list[Path], tmp_path: Path) -> None:
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    good = hashlib.sha256((tmp_path / names[1]).read_bytes()).hexdigest()
    with (tmp_path / names[1]).open("r+b") as f:  # one flipped byte in the second disk
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 1]))
    bad = hashlib.sha256((tmp_path / names[1]).read_bytes()).hexdigest()
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    for source in (ova, ovf):
        with pytest.raises(SourceError) as err:
            open_source([str(source)])
        message = str(err.value)
        assert names[1] in message and good in message and bad in message
        with open_source([str(source)], verify_manifest=False) as src:
            assert src.manifest == "skipped"
            assert not src.certificate


def test_manifest_absent_and_listed_file_missing(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", *names], tmp_path / "plain.ova")
    with open_source([str(ova)]) as src:
        assert src.manifest == "absent"
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", names[0]], tmp_path / "short.ova")
    with pytest.raises(SourceError, match=names[1].replace(".", r"\.")):
        open_source([str(ova)])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("MD5(a)= 00\n", "not understood"),
        ("SHA256(a)= 0011\n", "hex digits"),
        (f"SHA1(a)= {'0' * 40}\nSHA1(a)= {'0' * 40}\n", "twice"),
    ],
)
def test_malformed_manifest(text: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        parse_manifest(text.encode(), "app.mf")


def test_companion_runs_beside_a_long_check_and_ends_before_it(
    raw_disks: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API layer has the decoders imported in a second thread while the digests are
    # computed: the thread has ended when the check returns (nothing decoded before it, no
    # thread left for the fork), its errors are its own, and a short check does without it.
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    write_manifest(tmp_path, ["app.ovf", *names], "SHA256", "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    ran: list[str] = []

    def slow() -> None:
        time.sleep(0.2)
        ran.append(threading.current_thread().name)
        raise RuntimeError("ignored")

    token = manifest.COMPANION.set(slow)
    try:
        with open_source([str(ova)]) as src:  # the disks are smaller than the threshold
            assert src.manifest == "verified"
        assert ran == []
        monkeypatch.setattr(manifest, "COMPANION_MIN_BYTES", 1)
        with open_source([str(ova)]) as src:
            assert src.manifest == "verified"
            assert ran == ["ova2img-manifest-companion"]
        assert not any(t.name == "ova2img-manifest-companion" for t in threading.enumerate())
        with (tmp_path / names[0]).open("r+b") as f:  # a mismatch: raised, thread joined
            f.seek(100)
            f.write(b"\xff")
        ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "bad.ova")
        with pytest.raises(SourceError, match="digest mismatch"):
            open_source([str(ova)])
        assert ran == ["ova2img-manifest-companion"] * 2
    finally:
        manifest.COMPANION.reset(token)


def test_manifest_leaving_out_a_disk_is_partial_not_verified(
    raw_disks: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ovftool warns about a manifest that does not list every file: its digests are right,
    # but the unlisted disk was never checked, so "verified" would be a lie.
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    write_manifest(tmp_path, ["app.ovf", names[0]], "SHA256", "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    for source in (ova, ovf):
        caplog.clear()
        with open_source([str(source)]) as src:
            assert src.manifest == "partial"
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(f"does not list {names[1]}" in w for w in warned), warned
    with (tmp_path / "app.ova").open("rb") as fh, open_source(["-"], stdin=fh) as src:
        assert src.manifest == "partial"
