"""VMFS 5/6 datastores: the real images shipped in dissect.vmfs's sdist (made on ESXi), fetched
with ``pip download`` into ``$OVA2IMG_CACHE`` at test time. What is asserted is what
dissect.vmfs's own ``tests/test_vmfs.py`` asserts about them.

The images hold no ``.vmx`` (no VM, only files and disk descriptors): a VM's ``.vmx`` on a
datastore is tested through the path mapping (:meth:`Datastore.inside`) and the ``.vmx`` parser
of ``test_vmx.py``; the disks through the descriptors ``normal.vmdk`` (a 69 GiB thin ``vmfs``
disk), ``large.vmdk`` (42 TiB) and ``rdm.vmdk`` (a raw device mapping).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

import pytest
from dissect.vmfs import lvm

from ova2img.disks import open_disk
from ova2img.errors import SourceError, UnsupportedError
from ova2img.sources import open_source
from ova2img.sources.vmfs import Datastore, list_vmfs_vms, split_vmfs_path

VERSION = importlib.metadata.version("dissect.vmfs")
IMAGES = ("vmfs5", "vmfs6")  # LVM devices, as an ESXi VMFS partition holds them
GiB = 2**30


def _inflate_sparse(src: gzip.GzipFile, dest: Path) -> None:
    """Write the 2 GiB image sparse (it is mostly zeros)."""
    zero = bytes(2**20)
    with dest.open("wb") as out:
        while chunk := src.read(2**20):
            if chunk == zero[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate()


def sparse_copy(src: BinaryIO, offset: int, length: int, dest: Path, at: int = 0) -> None:
    """Copy ``length`` bytes of ``src`` at ``offset`` to ``dest`` at ``at``, data extents only
    (``dest`` is created with that size when missing)."""
    fd = src.fileno()
    if not dest.exists():
        with dest.open("wb") as out:
            out.truncate(at + length)
    with dest.open("r+b") as out:
        pos = offset
        while pos < offset + length:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(fd, pos, os.SEEK_HOLE), offset + length)
            if pos >= end:
                break
            os.pwrite(out.fileno(), os.pread(fd, end - pos, pos), at + pos - offset)
            pos = end


@pytest.fixture(scope="session")
def datastores() -> dict[str, Path]:
    """The datastore images, inflated into the cache once (``pip download`` of the sdist)."""
    cache = Path(os.environ.get("OVA2IMG_CACHE", "/var/cache/ova2img-tests"))
    cache = cache / f"dissect.vmfs-{VERSION}"
    wanted = {name: cache / f"{name}.img" for name in IMAGES}
    if all(p.exists() for p in wanted.values()):
        return wanted
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"dissect.vmfs=={VERSION}", "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"pip download of the dissect.vmfs {VERSION} sdist failed: {proc.stderr}")
        sdist = next(Path(tmp).glob("dissect*vmfs*.tar.gz"))
        with tarfile.open(sdist) as tf:
            for name, dest in wanted.items():
                member = next(
                    m for m in tf.getmembers() if m.name.endswith(f"/_data/vmfs/{name}.bin.gz")
                )
                fh = tf.extractfile(member)
                assert fh is not None
                part = dest.with_suffix(".part")
                with fh, gzip.GzipFile(fileobj=fh) as gz:
                    _inflate_sparse(gz, part)
                part.rename(dest)
    return wanted


@pytest.mark.parametrize("name", ["vmfs5", "vmfs6"])
def test_files_and_disks_on_the_datastore(name: str, datastores: dict[str, Path]) -> None:
    image = datastores[name]
    assert list_vmfs_vms(image) == ["/large.vmdk", "/normal.vmdk", "/rdm.vmdk"]
    with open_source([f"{image}:/normal.vmdk"]) as src:
        assert src.kind == "vmfs"
        files = src.files
        assert files["/small"] == 5
        assert files["/big"] == 1024 * 64 * 16 + 1
        assert files["/bigger"] == 128 * 2**20
        assert files["/normal-flat.vmdk"] == 69 * GiB
        assert files["/large-flat.vmdk"] == 42 * 1024 * GiB
        assert {f for f in files if f.startswith("/directory/")} == {
            f"/directory/file{i}" for i in range(1, 101)
        }
        assert not any(f.endswith(".sf") for f in files)  # VMFS's own metadata is left out
        disk = open_disk(src.disks[0])
        assert (disk.format, disk.subformat, disk.size) == ("vmdk", "vmfs", 69 * GiB)
        disk.stream.seek(42 * GiB)
        assert disk.stream.read(512) == b"\x42" * 512
        disk.stream.seek(0)
        assert disk.stream.read(4096) == bytes(4096)  # thin: unallocated reads as zeros
    with open_source([f"{image}:/large.vmdk"]) as src:
        disk = open_disk(src.disks[0])
        assert disk.size == 42 * 1024 * GiB
        disk.stream.seek(117 * GiB)
        assert disk.stream.read(512) == b"\x42" * 512
    # Plain files read byte-exact through DiskFile.open (as dissect.vmfs's tests assert).
    with open_source([f"{image}:/small"]) as src, src.disks[0].open() as fh:
        assert fh.read() == b"tiny\n"
    with open_source([f"{image}:/big"]) as src, src.disks[0].open() as fh:
        assert fh.read() == b"Kusjes van SRT<3" * (1024 * 64) + b"\n"
    with open_source([f"{image}:/bigger"]) as src, src.disks[0].open() as fh:
        h = hashlib.sha256()
        while chunk := fh.read(2**22):
            h.update(chunk)
        expected = hashlib.sha256(b"".join(bytes([i % 256]) * 2**20 for i in range(128)))
        assert h.digest() == expected.digest()
    with open_source([f"{image}:/directory/file42"]) as src, src.disks[0].open() as fh:
        assert fh.read() == b"File 42\n"
    with (
        open_source([f"{image}:/rdm.vmdk"]) as src,
        pytest.raises(UnsupportedError, match="raw device mapping"),
    ):
        open_disk(src.disks[0])


def test_errors_and_addressing(datastores: dict[str, Path], tmp_path: Path) -> None:
    image = datastores["vmfs6"]
    with pytest.raises(SourceError, match=r"a VMFS datastore image: .* \(it holds /large\.vmdk"):
        open_source([str(image)])
    with pytest.raises(SourceError, match=r"no file '/vm1/vm1\.vmx' on the datastore"):
        open_source([f"{image}:/vm1/vm1.vmx"])
    with pytest.raises(SourceError, match="not a regular file"):
        open_source([f"{image}:/directory"])
    # The split is at the last ':/' whose left part is an existing file.
    odd = tmp_path / "ds:" / "store.img"
    odd.parent.mkdir()
    odd.symlink_to(image)
    assert split_vmfs_path(f"{odd}:/a/b.vmx") == (odd, "/a/b.vmx")
    assert split_vmfs_path(f"{tmp_path}/nothing:/a.vmx") is None
    with open_source([f"{odd}:/small"]) as src:
        assert src.disks[0].size == 5
    # A bare VMFS volume (no LVM header) opens too: the volume carved out of the device.
    bare = tmp_path / "bare.img"
    with image.open("rb") as fh:
        runs = lvm.LVM(fh).volumes[0].dataruns()
        assert len(runs) == 1 and runs[0][0] == 0
        sparse_copy(fh, runs[0][1], runs[0][2], bare)
    assert list_vmfs_vms(bare) == ["/large.vmdk", "/normal.vmdk", "/rdm.vmdk"]
    with open_source([f"{bare}:/small"]) as src, src.disks[0].open() as fh2:
        assert fh2.read() == b"tiny\n"
    # A datastore cut short: dissect's failure is ours.
    cut = tmp_path / "cut.img"
    with image.open("rb") as src_fh, cut.open("wb") as out:
        out.write(src_fh.read(3 * 2**20))
    with pytest.raises(SourceError, match="not a VMFS datastore image"):
        list_vmfs_vms(cut)


def test_datastore_paths(datastores: dict[str, Path]) -> None:
    """How names in a .vmx or a descriptor on a datastore map onto it."""
    store = Datastore(datastores["vmfs6"])
    try:
        assert store.name == "vmfs6"
        assert store.inside("vm1-000001.vmdk", "/vm1") == "/vm1/vm1-000001.vmdk"
        assert store.inside("../base/base.vmdk", "/vm1") == "/base/base.vmdk"  # linked clone
        assert store.inside("../../etc/passwd", "/vm1") is None
        assert store.inside("/vmfs/volumes/vmfs6/vm1/vm1.vmdk") == "/vm1/vm1.vmdk"
        assert store.inside(f"/vmfs/volumes/{store.uuid}/vm1/vm1.vmdk") == "/vm1/vm1.vmdk"
        assert store.inside("/vmfs/volumes/datastore2/vm1/vm1.vmdk") is None
        assert store.inside("/etc/passwd") is None
    finally:
        store.close()


def test_whole_disk_with_a_vmfs_partition(datastores: dict[str, Path], tmp_path: Path) -> None:
    """``dd`` of an ESXi disk: GPT (sgdisk type FB00, VMware VMFS) with the datastore in
    partition 1 at 1 MiB."""
    image = datastores["vmfs6"]
    size = image.stat().st_size
    disk = tmp_path / "esxi-disk.img"
    with disk.open("wb") as out:
        out.truncate(size + 4 * 2**20)
    first = 2048
    subprocess.run(
        ["sgdisk", "-n", f"1:{first}:{first + size // 512 - 1}", "-t", "1:FB00", str(disk)],
        check=True, capture_output=True,
    )  # fmt: skip
    with image.open("rb") as fh:
        sparse_copy(fh, 0, size, disk, at=first * 512)
    assert list_vmfs_vms(disk) == ["/large.vmdk", "/normal.vmdk", "/rdm.vmdk"]
    with pytest.raises(SourceError, match=r"a VMFS datastore image: .* \(it holds /large"):
        open_source([str(disk)])
    with open_source([f"{disk}:/normal.vmdk"]) as src:
        stream = open_disk(src.disks[0]).stream
        stream.seek(42 * GiB)
        assert stream.read(512) == b"\x42" * 512


def test_vmx_on_the_datastore(datastores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A .vmx on the datastore (hand-written: the images hold none; it is served in place of a
    file at /vm1/vm1.vmx) whose disks are the datastore's real descriptors, named relative,
    by /vmfs/volumes/<label>/… and by another datastore's path (refused)."""
    image = datastores["vmfs6"]
    vmx = (
        'config.version = "8"\ndisplayName = "vm1"\n'
        'scsi0:1.fileName = "/vmfs/volumes/vmfs6/large.vmdk"\n'
        'scsi0:0.fileName = "../normal.vmdk"\n'
        'ide1:0.deviceType = "cdrom-image"\nide1:0.fileName = "/vmfs/volumes/iso/x.iso"\n'
    )
    real = Datastore.read_small

    def read_small(self: Datastore, path: str, limit: int) -> bytes:
        return vmx.encode() if path == "/vm1/vm1.vmx" else real(self, path, limit)

    monkeypatch.setattr(Datastore, "read_small", read_small)
    with open_source([f"{image}:/vm1/vm1.vmx"]) as src:
        assert src.kind == "vmfs" and src.product == {"product": "vm1"}
        assert [d.name for d in src.disks] == ["/normal.vmdk", "/large.vmdk"]
        sizes = [open_disk(d, i).size for i, d in enumerate(src.disks)]
        assert sizes == [69 * GiB, 42 * 1024 * GiB]
    vmx += 'sata0:0.fileName = "/vmfs/volumes/datastore2/vm1/vm1.vmdk"\n'
    with pytest.raises(SourceError, match="outside this datastore"):
        open_source([f"{image}:/vm1/vm1.vmx"])
