"""VMDKs inside an OVA: extents are members of the same OVA, never files beside it."""

from __future__ import annotations

import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from dissect.util.stream import RangeStream

from ova2img.disks import open_disk
from ova2img.sources import open_source

SIZE = 2 * 2**30 + 5 * 2**20  # > 2 GiB so twoGbMaxExtentSparse writes two extents
OFFSETS = [4096, 2**31 - 700, 2**31 + 3 * 2**20, SIZE - 1500]
VMDKSTREAM = Path("/usr/lib/python3/dist-packages/VMDKstream.py")

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:href="{href}" ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#sparse"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, cwd=cwd)


def make_raw(path: Path, size: int, offsets: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(rnd.randbytes(min(1500, size - off)))


@pytest.fixture(scope="module")
def split_ova(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """An OVA holding a twoGbMaxExtentSparse descriptor and its two extents as members."""
    d = tmp_path_factory.mktemp("split-ova")
    raw = d / "big.raw"
    make_raw(raw, SIZE, OFFSETS, seed=3)
    pkg = d / "pkg"
    pkg.mkdir()
    run(
        "qemu-img",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        raw,
        pkg / "vm-disk1.vmdk",
    )
    extents = sorted(p.name for p in pkg.glob("vm-disk1-s*.vmdk"))
    assert len(extents) == 2
    desc = pkg / "vm-disk1.vmdk"
    (pkg / "vm.ovf").write_text(OVF.format(href=desc.name, size=desc.stat().st_size, capacity=SIZE))
    ova = d / "vm.ova"
    run("tar", "--format=ustar", "-cf", ova, "vm.ovf", desc.name, *extents, cwd=pkg)
    return ova, raw, extents


def windows(stream: object, raw: Path) -> None:
    with raw.open("rb") as ref:
        for off in [*OFFSETS, 2**31 - 4096, 2**30, 0]:
            start = max(0, off - 5000)
            ref.seek(start)
            stream.seek(start)  # type: ignore[attr-defined]
            assert stream.read(70_000) == ref.read(70_000)  # type: ignore[attr-defined]


def test_split_sparse_vmdk_inside_an_ova(split_ova: tuple[Path, Path, list[str]]) -> None:
    ova, raw, _ = split_ova
    with open_source([str(ova)]) as src:
        assert [d.name for d in src.disks] == ["vm-disk1.vmdk"]
        disk = open_disk(src.disks[0])
        assert (disk.subformat, disk.size) == ("twoGbMaxExtentSparse", SIZE)
        windows(disk.stream, raw)


def test_dissect_opens_extents_beside_the_ova(
    split_ova: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    """The gap: dissect's VMDK resolves extents by path next to ``fh.name``.

    Without a name it cannot open them at all; with the OVA's name it silently reads whatever
    files of that name lie beside the OVA on the host (here: decoys of another disk).
    """
    from dissect.hypervisor.disk.vmdk import VMDK

    ova, raw, _ = split_ova
    here = tmp_path / "vm.ova"
    shutil.copy(ova, here)
    decoy_raw = tmp_path / "decoy.raw"
    make_raw(decoy_raw, SIZE, OFFSETS, seed=99)
    run(
        "qemu-img",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        decoy_raw,
        tmp_path / "vm-disk1.vmdk",
    )
    with tarfile.open(here) as tf:
        member = tf.getmember("vm-disk1.vmdk")
    with here.open("rb") as fh:
        window = RangeStream(fh, member.offset_data, member.size)
        with pytest.raises((AttributeError, TypeError)):
            VMDK(window)
        window = RangeStream(fh, member.offset_data, member.size)
        window.name = str(here)
        wrong = VMDK(window)
        wrong.seek(OFFSETS[1])
        with decoy_raw.open("rb") as decoy:
            decoy.seek(OFFSETS[1])
            assert wrong.read(1500) == decoy.read(1500)  # the decoy's bytes, not the OVA's
        for d in wrong.disks:
            d.fh.close()
    # ova2img reads the OVA's own members, whatever lies beside it.
    with open_source([str(here)]) as src:
        windows(open_disk(src.disks[0]).stream, raw)


def test_stream_optimized_with_footer_inside_an_ova(tmp_path: Path) -> None:
    if not VMDKSTREAM.exists():
        pytest.skip("needs Debian's python3-vmdkstream (apt-get install python3-vmdkstream)")
    raw = tmp_path / "d.raw"
    make_raw(raw, 3 * 2**20 + 512, [0, 2**20 + 5, 3 * 2**20 - 1000], seed=5)
    run("/usr/bin/python3", VMDKSTREAM, raw, tmp_path / "d.vmdk")
    vmdk = tmp_path / "d.vmdk"
    (tmp_path / "d.ovf").write_text(
        OVF.format(href="d.vmdk", size=vmdk.stat().st_size, capacity=raw.stat().st_size)
    )
    run("tar", "--format=ustar", "-cf", "d.ova", "d.ovf", "d.vmdk", cwd=tmp_path)
    with open_source([str(tmp_path / "d.ova")]) as src:
        disk = open_disk(src.disks[0])
        assert disk.subformat == "streamOptimized"
        assert disk.stream.read() == raw.read_bytes()
