"""Vagrant boxes: a tar (read in place) or tar.gz (spooled) holding box.ovf and its VMDKs
(provider virtualbox) or metadata.json and a qcow2 box.img (provider libvirt)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from test_ova_ovf import build_appliance, raw_disks, run

from ova2img.disks import open_disk
from ova2img.errors import SourceError, UnsupportedError
from ova2img.sources import open_source

__all__ = ["raw_disks"]  # the module-scoped fixture, re-exported for this module


def box(tmp: Path, files: list[str], out: str, gz: bool) -> Path:
    """``tar cvzf x.box ./metadata.json ./Vagrantfile ./box.img`` as Vagrant's docs say."""
    run("tar", "-czf" if gz else "-cf", tmp / out, *[f"./{f}" for f in files], cwd=tmp)
    return tmp / out


@pytest.mark.parametrize("gz", [False, True])
def test_virtualbox_box(
    gz: bool,
    raw_disks: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool_dir = tmp_path / "tmpdir"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    _, names = build_appliance(tmp_path, raw_disks, "virtualbox")
    (tmp_path / "app.ovf").rename(tmp_path / "box.ovf")
    (tmp_path / "metadata.json").write_text('{"provider": "virtualbox"}')
    (tmp_path / "Vagrantfile").write_text("Vagrant.configure('2') do |config| end\n")
    path = box(tmp_path, ["box.ovf", *names, "metadata.json", "Vagrantfile"], "vb.box", gz)
    with open_source([str(path)]) as src:
        assert src.kind == "ova"
        assert src.manifest == "absent"
        assert (src.spooled > 0) == gz  # a .tar.gz cannot be read in place
        assert set(src.files) == {"box.ovf", *names, "metadata.json", "Vagrantfile"}
        assert [d.name for d in src.disks] == names
        for d, raw in zip(src.disks, raw_disks, strict=True):
            assert open_disk(d).stream.read() == raw.read_bytes()
    assert list(spool_dir.iterdir()) == []


@pytest.mark.parametrize("gz", [False, True])
def test_libvirt_box(gz: bool, raw_disks: list[Path], tmp_path: Path) -> None:
    run("qemu-img", "convert", "-O", "qcow2", raw_disks[0], tmp_path / "box.img")
    meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": 1}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    path = box(tmp_path, ["metadata.json", "box.img"], "lv.box", gz)
    with open_source([str(path)]) as src:
        assert src.kind == "box"
        assert [d.name for d in src.disks] == ["box.img"]
        disk = open_disk(src.disks[0])
        assert disk.format == "qcow2"
        assert disk.stream.read() == raw_disks[0].read_bytes()
    # vagrant-libvirt >= 0.12: several disks listed in metadata.json, in that order.
    run("qemu-img", "convert", "-O", "qcow2", raw_disks[1], tmp_path / "box_2.img")
    (tmp_path / "box.img").rename(tmp_path / "box_1.img")
    meta["disks"] = [{"path": "box_2.img"}, {"path": "box_1.img"}]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    path = box(tmp_path, ["metadata.json", "box_1.img", "box_2.img"], "lv2.box", gz)
    with open_source([str(path)]) as src:
        assert [d.name for d in src.disks] == ["box_2.img", "box_1.img"]
        assert open_disk(src.disks[0]).stream.read() == raw_disks[1].read_bytes()
    meta["disks"] = [{"path": "../etc/passwd"}]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    path = box(tmp_path, ["metadata.json", "box_1.img"], "bad.box", gz)
    with pytest.raises(SourceError, match=r"\.\."):
        open_source([str(path)])
    (tmp_path / "metadata.json").write_text('{"provider": "docker"}')
    path = box(tmp_path, ["metadata.json"], "docker.box", gz)
    with pytest.raises(UnsupportedError, match="provider 'docker'"):
        open_source([str(path)])
