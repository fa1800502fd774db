"""The committed fixtures: present, small, well-formed, and what make_fixtures.py says."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import defusedxml.ElementTree as ET
from support.compare import read_tree
from support.reference import make_reference

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DEMO = FIXTURES / "demo.ova"
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
# busybox-static alone deflates to 1.0 MiB in 64 KiB grains: the demo cannot be under 1 MiB.
DEMO_MAX = 1_310_720  # 1.25 MiB
COMMITTED_MAX = 1_572_864  # 1.5 MiB for everything in fixtures/


def test_demo_ova_is_small() -> None:
    assert DEMO.is_file()
    assert DEMO.stat().st_size < DEMO_MAX
    assert sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()) < COMMITTED_MAX


def test_demo_ova_layout_and_manifest() -> None:
    with tarfile.open(DEMO) as tf:
        members = tf.getmembers()
        assert tf.format == tarfile.USTAR_FORMAT or all(not m.pax_headers for m in members)
        names = [m.name for m in members]
        assert names == ["demo.ovf", "demo.mf", "demo-disk1.vmdk"]  # OVF first (OVF 1.0 §5.3)
        data = {m.name: tf.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    for line in data["demo.mf"].decode().splitlines():
        m = re.fullmatch(r"SHA256 \((.+)\) = ([0-9a-f]{64})", line)
        assert m, line
        assert hashlib.sha256(data[m.group(1)]).hexdigest() == m.group(2)
    root = ET.fromstring(data["demo.ovf"])
    (ref,) = root.findall(f"{OVF}References/{OVF}File")
    assert ref.get(f"{OVF}href") == "demo-disk1.vmdk"
    assert int(ref.get(f"{OVF}size")) == len(data["demo-disk1.vmdk"])
    (disk,) = root.findall(f"{OVF}DiskSection/{OVF}Disk")
    assert disk.get(f"{OVF}capacity") == str(8 << 20)
    assert disk.get(f"{OVF}format", "").endswith("#streamOptimized")
    assert b'createType="streamOptimized"' in data["demo-disk1.vmdk"][:4096]


def test_demo_guest_content(tmp_path: Path, require_root: None) -> None:
    with tarfile.open(DEMO) as tf, (tmp_path / "demo-disk1.vmdk").open("wb") as out:
        src = tf.extractfile("demo-disk1.vmdk")
        assert src is not None
        with src:
            shutil.copyfileobj(src, out)
    raw = tmp_path / "demo.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tmp_path / "demo-disk1.vmdk"), str(raw)],
        check=True,
    )
    ref = tmp_path / "ref.tar"
    make_reference(raw, ref, [("/", 1 << 20, 7 << 20)])
    tree = read_tree(ref)
    e = tree.entries
    assert e["/bin/sh"].kind == "symlink" and e["/bin/sh"].link == "/bin/busybox"
    assert e["/bin/busybox"].mode == 0o755 and e["/bin/busybox"].size > 1_000_000
    assert e["/tmp"].mode == 0o1777 and e["/root"].mode == 0o700
    with tarfile.open(ref) as tf:
        osr = tf.extractfile("./etc/os-release").read().decode()  # type: ignore[union-attr]
        fstab = tf.extractfile("./etc/fstab").read().decode()  # type: ignore[union-attr]
    assert 'PRETTY_NAME="ova2img demo"' in osr
    uuid = subprocess.run(
        ["blkid", "-p", "-O", str(1 << 20), "-o", "value", "-s", "UUID", str(raw)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"UUID={uuid}\t/\text4" in fstab
