"""[sources] acceptance: the seed's guest (MBR + LVM + ext4) delivered in every packaging gives
the very same tarball (byte for byte: conversions are deterministic) as the plain OVA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.images import make_ova, ovf_envelope, to_vmdk
from support.lvm import LvmGuest, seed_layout
from support.probes import populate_probes

import ova2img


def _qemu(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LvmGuest, Path, bytes]:
    if os.geteuid() != 0:
        pytest.skip("needs root and lvm2 to build the seed's layout")
    work = tmp_path_factory.mktemp("formats")
    guest = seed_layout(work, populate_probes)
    vmdk = to_vmdk(guest.disks[0], work / "seed.vmdk")
    ova = make_ova(work / "seed.ova", [vmdk], "seed")
    out = work / "plain.tar"
    ova2img.convert(ova, out)
    return guest, work, out.read_bytes()


def _make(kind: str, raw: Path, work: Path) -> Path:
    d = work / kind
    d.mkdir()
    if kind == "qcow2-compressed":
        _qemu("convert", "-f", "raw", "-O", "qcow2", "-c", raw, d / "disk.qcow2")
        return d / "disk.qcow2"
    if kind == "qcow2-backing":
        _qemu("convert", "-f", "raw", "-O", "qcow2", raw, d / "base.qcow2")
        _qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
        return d / "top.qcow2"
    if kind in ("vhd", "vhdx", "vdi"):
        fmt = {"vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}[kind]
        _qemu("convert", "-f", "raw", "-O", fmt, raw, d / f"disk.{kind}")
        return d / f"disk.{kind}"
    if kind == "raw":
        shutil.copyfile(raw, d / "disk.img")
        return d / "disk.img"
    if kind == "vmdk-monolithicSparse":
        return to_vmdk(raw, d / "disk.vmdk", subformat="monolithicSparse")
    if kind == "ovf-folder":
        vmdk = to_vmdk(raw, d / "seed-disk1.vmdk")
        envelope = ovf_envelope(
            "seed", [(vmdk.name, vmdk.stat().st_size, raw.stat().st_size, "streamOptimized")]
        )
        (d / "seed.ovf").write_text(envelope)
        return d / "seed.ovf"
    raise AssertionError(kind)


KINDS = [
    "qcow2-compressed",
    "qcow2-backing",
    "vhd",
    "vhdx",
    "vdi",
    "raw",
    "vmdk-monolithicSparse",
    "ovf-folder",
]


@pytest.mark.parametrize("kind", KINDS)
def test_same_tarball_from_every_format(
    seed: tuple[LvmGuest, Path, bytes], kind: str, tmp_path: Path
) -> None:
    guest, _work, plain = seed
    source = _make(kind, guest.disks[0], tmp_path)
    out = tmp_path / "out.tar"
    ova2img.convert(source, out)
    assert out.read_bytes() == plain


def test_same_tarball_from_stdin(seed: tuple[LvmGuest, Path, bytes], tmp_path: Path) -> None:
    _guest, work, plain = seed
    out = tmp_path / "out.tar"
    with (work / "seed.ova").open("rb") as stdin:
        res = subprocess.run(
            [sys.executable, "-m", "ova2img", "convert", "-", "-o", str(out), "-q"],
            stdin=stdin,
            capture_output=True,
            check=False,
        )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == plain
