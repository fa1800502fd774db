"""VMware .vmx: disks found through a hand-written configuration, VMDKs (and a snapshot delta)
made by qemu-img/qemu-io, every disk compared with ``qemu-img convert -O raw``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ova2img.disks import open_disk
from ova2img.errors import SourceError, UsageError
from ova2img.sources import open_source
from ova2img.sources.vmx import looks_like_vmx, parse_vmx, vmx_disks


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, cwd=cwd)


def qemu_raw(image: Path) -> bytes:
    out = image.with_suffix(".oracle.raw")
    run("qemu-img", "convert", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "web |22prod|22"
guestOS = "debian11-64"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "tools.iso"
IDE0:0.present = "TRUE"
ide0:0.fileName = "d5.vmdk"
nvme0.present = "TRUE"
nvme0:0.present = "TRUE"
nvme0:0.fileName = "d4.vmdk"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "d3.vmdk"
sata1.present = "FALSE"
sata1:0.fileName = "missing.vmdk"
sata0:1.present = "TRUE"
sata0:1.deviceType = "atapi-cdrom"
sata0:1.fileName = "auto detect"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0.pciSlotNumber = "160"
SCSI0:1.FileName = "d2.vmdk"
scsi0:1.present = "TRUE"
scsi0:2.present = "FALSE"
scsi0:2.fileName = "gone.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "vm-000001.vmdk"
scsi1.present = "TRUE"
scsi1.pciSlotNumber = "16"
scsi1:0.present = "TRUE"
scsi1:0.fileName = "d7.vmdk"
"""
ORDER = ["d7.vmdk", "vm-000001.vmdk", "d2.vmdk", "d3.vmdk", "d4.vmdk", "d5.vmdk"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VM folder: a base disk with a snapshot delta over it, five other disks."""
    d = tmp_path_factory.mktemp("vmx")
    run("qemu-img", "create", "-f", "vmdk", d / "vm.vmdk", "4M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 64k",
        d / "vm.vmdk")  # fmt: skip
    # The snapshot: qemu writes parentFileNameHint="vm.vmdk" and the parent's CID.
    run("qemu-img", "create", "-f", "vmdk", "-b", "vm.vmdk", "-F", "vmdk", "vm-000001.vmdk",
        cwd=d)  # fmt: skip
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x33 512k 64k", "-c", "write -P 0x44 3M 4k",
        d / "vm-000001.vmdk")  # fmt: skip
    for n in (2, 3, 4, 5, 7):
        run("qemu-img", "create", "-f", "vmdk", d / f"d{n}.vmdk", "1M")
        run("qemu-io", "-f", "vmdk", "-c", f"write -P {n} {n * 4096} 4k", d / f"d{n}.vmdk")
    (d / "tools.iso").write_bytes(b"\0" * 4096)
    (d / "vm.vmx").write_text(VMX)
    return d


def test_parse_and_order() -> None:
    config = parse_vmx(VMX.encode(), "vm.vmx")
    assert config["displayname"] == 'web "prod"'  # |22 unescaped
    assert config["scsi0:1.filename"] == "d2.vmdk"  # keys are case-insensitive
    assert [d.file_name for d in vmx_disks(config)] == ORDER
    assert [d.device for d in vmx_disks(config)] == [
        "scsi1:0", "scsi0:0", "scsi0:1", "sata0:0", "nvme0:0", "ide0:0"
    ]  # fmt: skip
    # Without pciSlotNumber, controllers go by number.
    no_slots = "\n".join(x for x in VMX.splitlines() if "pciSlotNumber" not in x)
    assert [d.device for d in vmx_disks(parse_vmx(no_slots.encode(), "x"))][:3] == [
        "scsi0:0", "scsi0:1", "scsi1:0"
    ]  # fmt: skip
    assert looks_like_vmx(VMX.encode())
    hand = b'# my VM\nguestOS = "other"\nscsi0:0.fileName = "a.vmdk"\n'
    assert looks_like_vmx(hand)
    assert not looks_like_vmx(b"# Disk DescriptorFile\nversion=1\n")
    with pytest.raises(SourceError, match="line 2"):
        parse_vmx(b'a = "1"\nthis is no vmx line\n', "x")


def test_vmx_disks_read_like_qemu(vm: Path) -> None:
    with open_source([str(vm / "vm.vmx")]) as src:
        assert src.kind == "vmx"
        assert src.product == {"product": 'web "prod"'}
        assert [d.name for d in src.disks] == ORDER
        assert "vm.vmdk" in src.files and "vm.vmx" in src.files
        for df in src.disks:
            disk = open_disk(df)
            assert disk.stream.read() == qemu_raw(vm / df.name), df.name
        # the snapshot: delta data over the parent's
        delta = open_disk(src.disks[1]).stream
        delta.seek(512 * 1024)
        assert delta.read(4) == b"\x33" * 4
        delta.seek(0)
        assert delta.read(4) == b"\x11" * 4


def test_paths_outside_the_folder(vm: Path, tmp_path: Path) -> None:
    sibling = vm.parent / f"{vm.name}-sibling"  # so that ../<vm>/d2.vmdk reaches the disk
    sibling.mkdir(exist_ok=True)
    for outside in (str(vm / "d2.vmdk"), f"../{vm.name}/d2.vmdk"):
        vmx = sibling / "x.vmx"
        vmx.write_text(f'config.version = "8"\nscsi0:0.fileName = "{outside}"\n')
        with pytest.raises(SourceError, match="outside the VM's folder"):
            open_source([str(vmx)])
        with open_source([str(vmx)], allow_external=True) as src:
            assert open_disk(src.disks[0]).stream.read() == qemu_raw(vm / "d2.vmdk")
    (tmp_path / "none.vmx").write_text('config.version = "8"\nide1:0.fileName = "a.iso"\n')
    with pytest.raises(SourceError, match="names no disk"):
        open_source([str(tmp_path / "none.vmx")])
    (tmp_path / "miss.vmx").write_text('config.version = "8"\nscsi0:0.fileName = "nope.vmdk"\n')
    with pytest.raises(SourceError, match="not found"):
        open_source([str(tmp_path / "miss.vmx")])
    with pytest.raises(UsageError, match="alone"):
        open_source([str(vm / "vm.vmx"), str(vm / "d2.vmdk")])
