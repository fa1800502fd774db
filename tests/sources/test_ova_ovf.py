"""OVF envelopes as VirtualBox and VMware ovftool write them, OVAs built with GNU tar."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
from pathlib import Path

import pytest

from ova2img.disks import open_disk
from ova2img.errors import SourceError, UnsupportedError, UsageError
from ova2img.sources import open_source
from ova2img.sources.ovf import parse_capacity, parse_envelope

VMDK_FMT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
SASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"


def virtualbox_ovf(files: dict[str, int | None], capacities: list[int]) -> str:
    """VirtualBox 7 "Export Appliance" (OVF 1.0): IDE with the CD-ROM, SATA (AHCI) with disks.

    The disk Items are written port 1 first, so the order must come from AddressOnParent.
    """
    refs = "\n".join(
        f'    <File ovf:id="file{i + 1}" ovf:href="{name}"/>' for i, name in enumerate(files)
    )
    disks = "\n".join(
        f'    <Disk ovf:capacity="{cap}" ovf:diskId="vmdisk{i + 1}" ovf:fileRef="file{i + 1}" '
        f'ovf:format="{VMDK_FMT}" vbox:uuid="7a6f1c9e-2d1b-4c55-9a52-0b5d0c7e6f{i:02d}"/>'
        for i, cap in enumerate(capacities)
    )
    items = "\n".join(
        f"""      <Item>
        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>
        <rasd:Caption>disk{i + 1}</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk{i + 1}</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk{i + 1}</rasd:HostResource>
        <rasd:InstanceID>{8 + i}</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>"""
        for i in reversed(range(len(capacities)))
    )
    return f"""<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="{RASD}" xmlns:vssd="{VSSD}"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
{refs}
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
{disks}
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian12">
    <Info>A virtual machine</Info>
    <ProductSection>
      <Info>Meta-information about the installed software</Info>
      <Product>Debian appliance</Product>
      <Vendor>Example Org</Vendor>
      <Version>12.5</Version>
      <ProductUrl>https://example.org/appliance</ProductUrl>
      <VendorUrl>https://example.org</VendorUrl>
    </ProductSection>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
{items}
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>cdrom1</rasd:Caption>
        <rasd:Description>CD-ROM Drive</rasd:Description>
        <rasd:ElementName>cdrom1</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux"
        uuid="{{0f4c3e2a-1b2c-4d5e-8f90-123456789abc}}" name="debian12">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><CPU count="1"/><Memory RAMSize="1024"/></Hardware>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="2">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
            <Image uuid="{{7a6f1c9e-2d1b-4c55-9a52-0b5d0c7e6f00}}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"""


def ovftool_ovf(
    files: dict[str, int | None], capacities_gib: list[int], version: int = 1, compression: str = ""
) -> str:
    """VMware ovftool 4.x: lsilogic SCSI controllers, sizes in References, capacity in GiB.

    With two disks, the second sits on SCSI controller 0 and the first on controller 1,
    written in that document order (controllers 1 then 0 is how the Items are laid out here).
    """
    ns = f"http://schemas.dmtf.org/ovf/envelope/{version}"
    comp = f' ovf:compression="{compression}"' if compression else ""
    refs = "\n".join(
        f'    <File ovf:href="{name}" ovf:id="file{i + 1}"'
        + (f' ovf:size="{size}"' if size is not None else "")
        + f"{comp}/>"
        for i, (name, size) in enumerate(files.items())
    )
    disks = "\n".join(
        f'    <Disk ovf:capacity="{cap}" ovf:capacityAllocationUnits="byte * 2^30" '
        f'ovf:diskId="vmdisk{i + 1}" ovf:fileRef="file{i + 1}" ovf:format="{VMDK_FMT}" '
        f'ovf:populatedSize="1048576"/>'
        for i, cap in enumerate(capacities_gib)
    )
    # disk i is on controller (i == 0 → SCSI 0 at InstanceID 3; i == 1 → SCSI 0 too, unit 1;
    # i == 2 → SCSI controller 1 at InstanceID 4)
    items = []
    for i in range(len(capacities_gib)):
        parent, unit = ("4", 0) if i == 2 else ("3", i)
        tag = "StorageItem" if version == 2 and i == 1 else "Item"
        pfx = "sasd" if tag == "StorageItem" else "rasd"
        items.append(
            f"""      <{tag}>
        <{pfx}:AddressOnParent>{unit}</{pfx}:AddressOnParent>
        <{pfx}:ElementName>Hard Disk {i + 1}</{pfx}:ElementName>
        <{pfx}:HostResource>ovf:/disk/vmdisk{i + 1}</{pfx}:HostResource>
        <{pfx}:InstanceID>{9 + i}</{pfx}:InstanceID>
        <{pfx}:Parent>{parent}</{pfx}:Parent>
        <{pfx}:ResourceType>17</{pfx}:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </{tag}>"""
        )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.3 (build-18663434), UTC time: 2024-03-01T10:00:00.000Z-->
<Envelope vmw:buildId="build-18663434" xmlns="{ns}"
    xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="{ns}"
    xmlns:rasd="{RASD}" xmlns:sasd="{SASD}" xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:vssd="{VSSD}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
{refs}
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disks}
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="web01">
    <Info>A virtual machine</Info>
    <Name>web01</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>web01</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>VirtualIDEController 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
{chr(10).join(reversed(items))}
    </VirtualHardwareSection>
    <ProductSection>
      <Info>Information about the installed software</Info>
      <Product>Web Appliance</Product>
      <Vendor>Example Corp</Vendor>
      <Version>3.1</Version>
      <FullVersion>3.1.0-build42</FullVersion>
      <ProductUrl>https://example.com/web</ProductUrl>
    </ProductSection>
  </VirtualSystem>
</Envelope>
"""


# --- the envelope alone ---------------------------------------------------------------------


def test_virtualbox_envelope() -> None:
    env = parse_envelope(
        virtualbox_ovf({"a.vmdk": None, "b.vmdk": None}, [2**33, 2**30]).encode(), "x"
    )
    assert env.version == 1
    # Items are in reverse document order; SATA port order wins.
    assert [d.disk_id for d in env.disks] == ["vmdisk1", "vmdisk2"]
    assert [d.capacity for d in env.disks] == [2**33, 2**30]
    assert [env.files[d.file_ref].href for d in env.disks if d.file_ref] == ["a.vmdk", "b.vmdk"]
    assert env.product == {
        "product": "Debian appliance",
        "vendor": "Example Org",
        "version": "12.5",
        "product_url": "https://example.org/appliance",
        "vendor_url": "https://example.org",
    }


@pytest.mark.parametrize("version", [1, 2])
def test_ovftool_envelope(version: int) -> None:
    files: dict[str, int | None] = {"d1.vmdk": 10, "d2.vmdk": 20, "d3.vmdk": 30}
    env = parse_envelope(ovftool_ovf(files, [16, 1, 2], version=version).encode(), "x")
    assert env.version == version
    # controller 0 (units 0, 1) then controller 1, though the Items are written reversed
    assert [d.disk_id for d in env.disks] == ["vmdisk1", "vmdisk2", "vmdisk3"]
    assert [d.capacity for d in env.disks] == [16 * 2**30, 2**30, 2 * 2**30]
    assert env.files["file2"].size == 20
    assert env.product["full_version"] == "3.1.0-build42"
    assert env.product["product"] == "Web Appliance"


@pytest.mark.parametrize(
    ("capacity", "units", "expected"),
    [
        ("100", None, 100),
        ("16", "byte * 2^30", 16 * 2**30),
        ("3", "byte*2^20", 3 * 2**20),
        ("5", "byte * 10^9", 5 * 10**9),
        ("7", "byte * 1024", 7 * 1024),
        ("${disk.size}", "byte * 2^30", None),
        ("2", "MegaBytes", 2 * 2**20),
    ],
)
def test_capacity_units(capacity: str, units: str | None, expected: int | None) -> None:
    assert parse_capacity(capacity, units, "x") == expected


def test_bad_capacity_unit() -> None:
    with pytest.raises(SourceError, match="capacityAllocationUnits"):
        parse_capacity("1", "furlongs", "x")


def test_entities_are_refused() -> None:
    bomb = b"""<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&b;</Envelope>"""
    with pytest.raises(SourceError, match="refused"):
        parse_envelope(bomb, "x")


@pytest.mark.parametrize(
    ("xml", "match"),
    [
        (b"<Envelope xmlns='urn:other'/>", "not an OVF envelope"),
        (b"<Envelope", "well-formed"),
        (
            b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1' "
            b"xmlns:ovf='http://schemas.dmtf.org/ovf/envelope/1'><References>"
            b"<File ovf:id='f' ovf:href='a'/><File ovf:id='f' ovf:href='b'/>"
            b"</References></Envelope>",
            "twice",
        ),
    ],
)
def test_malformed_envelopes(xml: bytes, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        parse_envelope(xml, "x")


def test_virtual_system_collection_is_refused() -> None:
    xml = b"""<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">
<VirtualSystemCollection><VirtualSystem/><VirtualSystem/></VirtualSystemCollection></Envelope>"""
    with pytest.raises(UnsupportedError, match="2 virtual systems"):
        parse_envelope(xml, "x")


# --- OVAs built by GNU tar, OVF directories --------------------------------------------------


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, cwd=cwd)


@pytest.fixture(scope="module")
def raw_disks(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("ova-disks")
    out = []
    for i, size in enumerate([3 * 2**20, 2**20 + 512]):
        raw = d / f"disk{i}.raw"
        rnd = random.Random(i)
        with raw.open("wb") as f:
            f.truncate(size)
            for off in (0, size // 2, size - 1000):
                f.seek(off)
                f.write(rnd.randbytes(1000))
        out.append(raw)
    return out


def build_appliance(tmp: Path, raw_disks: list[Path], style: str) -> tuple[Path, list[str]]:
    """An OVF and its streamOptimized disks in ``tmp``; returns the OVF path and disk names."""
    names = [f"app-disk{i + 1}.vmdk" for i in range(len(raw_disks))]
    for raw, name in zip(raw_disks, names, strict=True):
        run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, tmp / name)
    sizes = {n: (tmp / n).stat().st_size for n in names}
    if style == "virtualbox":
        xml = virtualbox_ovf(dict.fromkeys(names), [r.stat().st_size for r in raw_disks])
    else:
        xml = ovftool_ovf(dict(sizes), [1] * len(names), version=2 if style == "ovf2" else 1)
    ovf = tmp / "app.ovf"
    ovf.write_text(xml)
    lines = [
        f"SHA256({n})= {subprocess.check_output(['sha256sum', tmp / n]).split()[0].decode()}"
        for n in ["app.ovf", *names]
    ]
    (tmp / "app.mf").write_text("\n".join(lines) + "\n")
    return ovf, names


def tar_ova(tmp: Path, members: list[str], out: Path) -> Path:
    """GNU tar, OVF first then manifest then disks, as DSP0243 requires (ustar like ovftool)."""
    run("tar", "--format=ustar", "-cf", out, *members, cwd=tmp)
    return out


@pytest.mark.parametrize("style", ["virtualbox", "ovftool", "ovf2"])
def test_ova_disks_read_in_place(style: str, raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, style)
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    with open_source([str(ova)]) as src:
        assert src.kind == "ova"
        assert [d.name for d in src.disks] == names
        assert src.files == {
            n: (tmp_path / n).stat().st_size for n in ["app.ovf", "app.mf", *names]
        }
        assert src.product["vendor"] in ("Example Org", "Example Corp")
        for df, raw, name in zip(src.disks, raw_disks, names, strict=True):
            assert df.size == (tmp_path / name).stat().st_size
            with df.open() as fh:
                assert fh.read() == (tmp_path / name).read_bytes()
            disk = open_disk(df)
            assert disk.subformat == "streamOptimized"
            assert disk.stream.read() == raw.read_bytes()
        if style == "virtualbox":
            assert src.disks[0].capacity == raw_disks[0].stat().st_size
        else:
            assert src.disks[0].capacity == 2**30


def test_ovf_directory(raw_disks: list[Path], tmp_path: Path) -> None:
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    with open_source([str(ovf)]) as src:
        assert src.kind == "ovf"
        assert [d.name for d in src.disks] == names
        assert "app.ovf" in src.files and names[0] in src.files
        assert open_disk(src.disks[1]).stream.read() == raw_disks[1].read_bytes()
        # resolve: only names inside the directory
        with src.disks[0].resolve("app.mf") as fh:
            assert fh.read().startswith(b"SHA256(")
        for bad in ["/etc/passwd", "../x.vmdk", "a/../../x"]:
            with pytest.raises(SourceError):
                src.disks[0].resolve(bad)


def test_ovf_href_escaping_is_refused(raw_disks: list[Path], tmp_path: Path) -> None:
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ovf.write_text(ovf.read_text().replace(f'ovf:href="{names[0]}"', 'ovf:href="../secret.vmdk"'))
    with pytest.raises(SourceError, match=r"\.\."):
        open_source([str(ovf)], verify_manifest=False)
    ovf.write_text(ovf.read_text().replace('ovf:href="../secret.vmdk"', 'ovf:href="/etc/hostname"'))
    with pytest.raises(SourceError, match="absolute"):
        open_source([str(ovf)], verify_manifest=False)


def test_declared_size_mismatch(raw_disks: list[Path], tmp_path: Path) -> None:
    ovf, names = build_appliance(tmp_path, raw_disks, "ovftool")
    size = (tmp_path / names[0]).stat().st_size
    ovf.write_text(ovf.read_text().replace(f'ovf:size="{size}"', f'ovf:size="{size + 512}"'))
    with pytest.raises(
        SourceError, match=f"{size} bytes but the OVF declares ovf:size={size + 512}"
    ):
        open_source([str(ovf)], verify_manifest=False)


def test_gzip_and_chunked_references(raw_disks: list[Path], tmp_path: Path) -> None:
    """ovf:compression="gzip" and ovf:chunkSize, in a folder and in an OVA, read in place."""
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    disk = tmp_path / names[0]
    expected = disk.read_bytes()
    # gzip: a multi-member file (as `cat a.gz b.gz` makes), read through its checkpoints
    half = len(expected) // 2
    gz = gzip.compress(expected[:half], mtime=0) + gzip.compress(expected[half:], mtime=0)
    (tmp_path / f"{names[0]}.gz").write_bytes(gz)
    (tmp_path / "gz.ovf").write_text(
        ovftool_ovf({f"{names[0]}.gz": len(gz)}, [1], compression="gzip")
    )
    # chunks of 64 KiB: disk.vmdk.000000000, .000000001, ...
    chunk = 65536
    for i in range(0, len(expected), chunk):
        (tmp_path / f"{names[0]}.{i // chunk:09d}").write_bytes(expected[i : i + chunk])
    chunks = sorted(p.name for p in tmp_path.glob(f"{names[0]}.0*"))
    assert len(chunks) > 2
    (tmp_path / "chunk.ovf").write_text(
        ovftool_ovf({names[0]: len(expected)}, [1]).replace(
            'ovf:id="file1"', f'ovf:id="file1" ovf:chunkSize="{chunk}"'
        )
    )
    ova_gz = tar_ova(tmp_path, ["gz.ovf", f"{names[0]}.gz"], tmp_path / "gz.ova")
    ova_chunk = tar_ova(tmp_path, ["chunk.ovf", *chunks], tmp_path / "chunk.ova")
    ref = open_disk_bytes(disk)
    sources: list[str | Path] = ["gz.ovf", "chunk.ovf", ova_gz, ova_chunk]
    for source in sources:
        with open_source([str(tmp_path / source)]) as src:
            assert src.disks[0].size == len(expected)
            with src.disks[0].open() as fh:
                fh.seek(len(expected) - 1000)  # backwards: restart from a checkpoint
                tail = fh.read()
                fh.seek(0)
                assert fh.read() == expected
                assert tail == expected[-1000:]
            assert open_disk(src.disks[0]).stream.read() == ref
    (tmp_path / "bz.ovf").write_text(
        ovftool_ovf({f"{names[0]}.gz": None}, [1], compression="bzip2")
    )
    with pytest.raises(UnsupportedError, match="compression"):
        open_source([str(tmp_path / "bz.ovf")])
    (tmp_path / chunks[1]).unlink()  # a missing chunk ends the file early: sizes disagree
    with pytest.raises(SourceError, match="chunk"):
        open_source([str(tmp_path / "chunk.ovf")])


def open_disk_bytes(path: Path) -> bytes:
    with open_source([str(path)]) as src:
        return open_disk(src.disks[0]).stream.read()


def test_truncated_ova(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    # cut inside the last disk's data: a download that stopped early
    last = (tmp_path / names[-1]).stat().st_size
    out = subprocess.check_output(["tar", "-tvR", "-f", ova], text=True)
    block = int(next(ln for ln in out.splitlines() if names[-1] in ln).split(":")[0].split()[1])
    data_off = (block + 1) * 512
    with ova.open("r+b") as f:
        f.truncate(data_off + last // 2)
    with pytest.raises(
        SourceError,
        match=rf"'{names[-1]}' is truncated: {last} bytes expected, {last // 2} present",
    ) as err:
        open_source([str(ova)])
    assert err.value.offset == data_off


def test_member_names_must_stay_inside(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ova = tmp_path / "evil.ova"
    run(
        "tar",
        "--format=ustar",
        "-P",
        "--transform",
        "s,^app-disk2,../app-disk2,",
        "-cf",
        ova,
        "app.ovf",
        *names,
        cwd=tmp_path,
    )
    assert "../app-disk2.vmdk" in subprocess.check_output(["tar", "-tf", ova], text=True)
    with pytest.raises(SourceError, match="escapes"):
        open_source([str(ova)])
    ova2 = tmp_path / "abs.ova"
    run(
        "tar",
        "--format=ustar",
        "-P",
        "-cf",
        ova2,
        "app.ovf",
        str(tmp_path / names[0]),
        cwd=tmp_path,
    )
    with pytest.raises(SourceError, match="absolute"):
        open_source([str(ova2)])


def test_missing_member_and_no_ovf(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "virtualbox")
    ova = tar_ova(tmp_path, ["app.ovf", names[0]], tmp_path / "part.ova")
    with pytest.raises(SourceError, match=f"no member '{names[1]}'"):
        open_source([str(ova)])
    ova = tar_ova(tmp_path, names, tmp_path / "noovf.ova")
    with pytest.raises(SourceError, match=r"no \.ovf"):
        open_source([str(ova)])


def test_ova_resolve_and_window_after_close(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", "app.mf", *names], tmp_path / "app.ova")
    src = open_source([str(ova)])
    with src:
        fh = src.disks[0].resolve(names[1])
        assert fh.read() == (tmp_path / names[1]).read_bytes()
        for bad in ["../app.ova", "/etc/passwd", "nothere.vmdk"]:
            with pytest.raises(SourceError):
                src.disks[0].resolve(bad)
    with pytest.raises(ValueError, match="closed"):
        fh.seek(0)
        fh.read(10)


def test_bare_images_in_order_and_stdin(raw_disks: list[Path], tmp_path: Path) -> None:
    paths = [str(p) for p in reversed(raw_disks)]
    with open_source(paths) as src:
        assert src.kind == "images"
        assert [d.name for d in src.disks] == paths
        assert [d.size for d in src.disks] == [os.path.getsize(p) for p in paths]
        with src.disks[0].open() as fh:
            assert fh.read() == Path(paths[0]).read_bytes()
    with pytest.raises(SourceError, match="not found"):
        open_source([str(tmp_path / "nope.img")])
    # a folder: pointed at the files in it that can be converted
    with pytest.raises(SourceError, match=r"is a directory$"):
        open_source([str(tmp_path)])
    (tmp_path / "vm.vmx").write_text('config.version = "8"\n')
    with pytest.raises(SourceError, match=r"is a directory; give one of its files, e\.g\. vm\.vmx"):
        open_source([str(tmp_path)])


def test_ova_cannot_be_mixed_with_images(raw_disks: list[Path], tmp_path: Path) -> None:
    _, names = build_appliance(tmp_path, raw_disks, "ovftool")
    ova = tar_ova(tmp_path, ["app.ovf", *names], tmp_path / "app.ova")
    with pytest.raises(UsageError, match="given alone"):  # a usage error: exit code 2
        open_source([str(ova), str(raw_disks[0])])
