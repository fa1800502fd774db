"""The OVF manifest: every listed digest checked, beside the decoding, before anything is
handed out."""

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


def _checks_running() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ova2img-manifest"]


def _listed_appliance(tmp_path: Path, raw_disks: list[Path]) -> tuple[Path, list[str], Path]:
    """An OVF with its disks and a manifest listing them all, and the OVA of them:
    ``(ovf, disk names, ova)``."""
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    write_manifest(tmp_path, ["app.ovf", *names], "SHA256", "ovftool")
    return ovf, names, tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")


def test_check_runs_beside_the_caller_until_settled(
    raw_disks: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # settle=False: the digests are computed in a thread while the caller decodes; the status
    # says so until settle(), which gives the final one (or raises the mismatch, every time it
    # is asked). The thread runs at the lowest priority: settle() does not wait for it, it
    # hashes what is left itself (here all of it: the thread is held back).
    ovf, names, ova = _listed_appliance(tmp_path, raw_disks)
    gate = threading.Event()
    monkeypatch.setattr(manifest, "_yield_cpu", lambda: gate.wait(10))
    for source in (ova, ovf):
        gate.clear()
        with open_source([str(source)], settle=False) as src:
            assert (src.manifest, len(_checks_running())) == ("checking", 1)
            started = time.monotonic()
            src.settle()
            assert time.monotonic() - started < 5
            assert (src.manifest, src.check) == ("verified", None)
            gate.set()
            for thread in _checks_running():
                thread.join(5)
            assert _checks_running() == []
    monkeypatch.undo()
    with (tmp_path / names[1]).open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    bad = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "bad.ova")
    for source in (bad, ovf):
        with open_source([str(source)], settle=False) as src:
            assert src.manifest == "checking"
            for _ in range(2):
                with pytest.raises(SourceError, match=f"{names[1]}: SHA256 digest mismatch"):
                    src.settle()


def test_closing_stops_a_check_at_once(
    raw_disks: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing the source (a failure or Ctrl-C elsewhere) stops the hashing after the step
    # under way, and the thread reads nothing after that: the files may be closed.
    _, names, ova = _listed_appliance(tmp_path, raw_disks)
    monkeypatch.setattr(manifest, "STEP", 512)
    real_update = hashlib.new
    chunks: list[int] = []

    def slow_new(name: str) -> object:
        h = real_update(name)

        class Slow:
            digest_size = h.digest_size

            def update(self, data: bytes) -> None:
                chunks.append(len(data))
                time.sleep(0.01)
                h.update(data)

            def hexdigest(self) -> str:
                return h.hexdigest()

        return Slow()

    monkeypatch.setattr(manifest.hashlib, "new", slow_new)
    src = open_source([str(ova)], settle=False)
    time.sleep(0.05)
    started = time.monotonic()
    src.close()
    assert time.monotonic() - started < 1.0
    for thread in _checks_running():
        thread.join(1)
    assert _checks_running() == []
    total = sum((tmp_path / n).stat().st_size for n in ["app.ovf", *names])
    assert 0 < sum(chunks) < total  # it stopped before the end


def test_a_mismatch_is_preferred_to_the_failure_it_explains(
    raw_disks: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A decoding error met while the check runs is reported as the mismatch (chained to it),
    # a good package leaves the error as it is, and Ctrl-C never waits for the hashing.
    _, names, good = _listed_appliance(tmp_path, raw_disks)
    with (tmp_path / names[0]).open("r+b") as f:
        f.write(b"\0" * 16)
    bad = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "bad.ova")
    symptom = ValueError("a damaged partition table")
    with open_source([str(bad)], settle=False) as src:
        assert src.check is not None
        with pytest.raises(SourceError, match="digest mismatch") as err:
            src.check.prefer_mismatch(symptom)
        assert err.value.__cause__ is symptom
        # the mismatch itself failing what the caller did (a walk's end): left to the caller
        src.check.prefer_mismatch(err.value)
        assert err.value.__cause__ is symptom
    with open_source([str(good)], settle=False) as src:
        assert src.check is not None
        src.check.prefer_mismatch(symptom)  # nothing better to say: returns
        src.settle()
        assert src.manifest == "verified"
    gate = threading.Event()
    monkeypatch.setattr(manifest, "_yield_cpu", lambda: gate.wait(10))
    with open_source([str(bad)], settle=False) as src:
        assert src.check is not None
        src.check.prefer_mismatch(KeyboardInterrupt())  # cancelled, not waited for
        gate.set()
        with pytest.raises(SourceError, match="cancelled"):
            src.settle()


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


def test_an_empty_manifest_checks_nothing_and_says_so(
    raw_disks: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # no digest to compute: the check ends at once, "partial" with the usual warning
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    (tmp_path / "app.mf").write_text("")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    with open_source([str(ova)]) as src:
        assert src.manifest == "partial"
    assert any("does not list" in r.getMessage() for r in caplog.records)
