"""The disk/VMDK/OVA builders produce what the real tools say they should."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import defusedxml.ElementTree as ET
import pytest
from support.compare import read_tree
from support.images import (
    MiB,
    build_ext_image,
    disk_gpt_bios,
    disk_mbr_boot_logical,
    disk_whole,
    make_ova,
    ovf_envelope,
    qemu_virtual_size,
    to_vmdk,
)
from support.reference import loops_backing, make_reference

OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"


def small_root(root: Path) -> None:
    (root / "hello").write_text("hello from the root\n")
    (root / "tmp").mkdir(mode=0o755)
    os.chmod(root / "tmp", 0o1777)


def sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
    )
    table: dict[str, object] = json.loads(out.stdout)["partitiontable"]
    return table


def fstab_of(tree_tar: Path) -> str:
    with tarfile.open(tree_tar) as tf:
        f = tf.extractfile("./etc/fstab")
        assert f is not None
        with f:
            return f.read().decode()


def test_gpt_bios_layout(tmp_path: Path, require_root: None) -> None:
    disk = disk_gpt_bios(tmp_path, small_root, fs_size=8 * MiB)
    table = sfdisk_json(disk.path)
    assert table["label"] == "gpt"
    parts = table["partitions"]
    assert isinstance(parts, list)
    assert parts[0]["type"] == "21686148-6449-6E6F-744E-656564454649"  # BIOS boot
    assert parts[1]["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # Linux filesystem
    root = disk.partition(2)
    assert root.start == parts[1]["start"] * 512 and root.partuuid == parts[1]["uuid"].lower()
    ref = tmp_path / "ref.tar"
    make_reference(disk.path, ref, disk.mounts())
    assert f"UUID={root.fs_uuid}\t/\text4" in fstab_of(ref)
    assert read_tree(ref).entries["/tmp"].mode == 0o1777
    assert loops_backing(disk.path) == []


def test_whole_disk_layout(tmp_path: Path, require_root: None) -> None:
    disk = disk_whole(tmp_path, small_root, fs_size=8 * MiB)
    probe = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(disk.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "ext4"
    assert disk.mounts() == [("/", 0, 8 * MiB)]
    ref = tmp_path / "ref.tar"
    make_reference(disk.path, ref, disk.mounts())
    assert "/hello" in read_tree(ref).entries


def test_mbr_boot_and_logical_root_layout(tmp_path: Path, require_root: None) -> None:
    disk = disk_mbr_boot_logical(tmp_path, small_root, fs_size=8 * MiB, boot_size=4 * MiB)
    table = sfdisk_json(disk.path)
    parts = table["partitions"]
    assert isinstance(parts, list)
    assert [(p["node"][-1], p["type"]) for p in parts] == [("1", "83"), ("2", "5"), ("5", "83")]
    boot, root = disk.partition(1), disk.partition(5)
    assert boot.partuuid == "0a2a0004-01" and root.partuuid == "0a2a0004-05"
    boot_img = boot.spec.image
    assert boot_img is not None and not isinstance(boot_img, Path)
    assert boot_img.fstype == "ext2" and boot_img.block_size == 1024
    ref = tmp_path / "ref.tar"
    make_reference(disk.path, ref, disk.mounts())
    fstab = fstab_of(ref)
    assert f"UUID={boot.fs_uuid}\t/boot\text2" in fstab and f"UUID={root.fs_uuid}\t/\t" in fstab
    tree = read_tree(ref).entries
    assert "/boot/grub/grub.cfg" in tree and "/boot/lost+found" in tree and "/hello" in tree


def test_vmdk_round_trips(tmp_path: Path, require_root: None) -> None:
    image = build_ext_image(tmp_path / "fs.ext4", 4 * MiB, small_root, fixup=False)
    for sub in ("streamOptimized", "monolithicSparse", "monolithicFlat"):
        vmdk = to_vmdk(image.path, tmp_path / f"{sub}.vmdk", sub, fixed_cid=0x12345678)
        subprocess.run(["qemu-img", "compare", "-f", "raw", str(image.path), str(vmdk)], check=True)
        with vmdk.open("rb") as f:
            head = f.read(64 * 1024)
        if sub != "monolithicFlat":  # flat: the descriptor is the .vmdk itself
            assert b"CID=12345678" in head and f'createType="{sub}"'.encode() in head


@pytest.mark.parametrize("style", ["virtualbox", "ovftool"])
def test_make_ova(tmp_path: Path, style: str, require_root: None) -> None:
    raw1, raw2 = tmp_path / "a.raw", tmp_path / "b.raw"
    for raw, size in ((raw1, 3 * MiB), (raw2, 2 << 30)):
        with raw.open("wb") as f:
            f.truncate(size)
            f.write(b"disk " + raw.name.encode())
    disks = [to_vmdk(raw1, tmp_path / "a.vmdk"), to_vmdk(raw2, tmp_path / "b.vmdk")]
    ova = make_ova(tmp_path / "vm.ova", disks, "vm", style=style, mtime=1_700_000_000)  # type: ignore[arg-type]
    with tarfile.open(ova) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm-disk2.vmdk"]
        assert all(m.mtime == 1_700_000_000 and m.uid == 0 for m in members)
        data = {m.name: tf.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    manifest = data["vm.mf"].decode().splitlines()
    sep = ("SHA256 ({}) = {}") if style == "virtualbox" else ("SHA256({})= {}")
    assert manifest == [
        sep.format(n, hashlib.sha256(data[n]).hexdigest()) for n in list(data) if n != "vm.mf"
    ]
    root = ET.fromstring(data["vm.ovf"])
    files = root.findall(f"{OVF}References/{OVF}File")
    assert [(f.get(f"{OVF}href"), int(f.get(f"{OVF}size"))) for f in files] == [
        ("vm-disk1.vmdk", len(data["vm-disk1.vmdk"])),
        ("vm-disk2.vmdk", len(data["vm-disk2.vmdk"])),
    ]
    caps = [
        (d.get(f"{OVF}capacity"), d.get(f"{OVF}capacityAllocationUnits"))
        for d in root.findall(f"{OVF}DiskSection/{OVF}Disk")
    ]
    if style == "virtualbox":
        assert caps == [(str(3 * MiB), None), (str(2 << 30), None)]
    else:
        assert caps == [("3", "byte * 2^20"), ("2", "byte * 2^30")]
    hosts = [e.text for e in root.iter(f"{RASD}HostResource")]
    assert hosts == ["ovf:/disk/vmdisk1", "ovf:/disk/vmdisk2"]
    assert qemu_virtual_size(disks[1]) == 2 << 30


def test_ovf_envelope_escapes_names() -> None:
    text = ovf_envelope('a<b&"c', [("x.vmdk", 1, 512, "streamOptimized")])
    root = ET.fromstring(text.encode())
    assert root.find(f"{OVF}VirtualSystem").get(f"{OVF}id") == 'a<b&"c'


def test_tools_present() -> None:
    for tool in ("mke2fs", "e2fsck", "debugfs", "sfdisk", "sgdisk", "qemu-img", "tar", "losetup"):
        assert shutil.which(tool), tool
