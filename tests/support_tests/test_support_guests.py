"""The debootstrapped Debian guest (slow the first time: debootstrap; then cached)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from support.compare import read_tree
from support.guests import debian_guest
from support.probes import PROBE_PATHS
from support.reference import loops_backing, make_reference


@pytest.mark.slow
def test_debian_guest(tmp_path: Path, require_root: None) -> None:
    guest = debian_guest(tmp_path)
    assert guest.rootfs_tarball.is_file()
    with tarfile.open(guest.ova) as tf:
        assert tf.getnames() == ["debian.ovf", "debian.mf", "debian-disk1.vmdk"]
    ref = tmp_path / "ref.tar"
    make_reference(guest.raw, ref, guest.disk.mounts())
    tree = read_tree(ref).entries
    assert tree["/usr/bin/make"].kind == "file"
    assert tree["/etc/debian_version"].kind == "file"
    assert [p for p in PROBE_PATHS if p not in tree] == []
    with tarfile.open(ref) as tf:
        fstab = tf.extractfile("./etc/fstab").read().decode()  # type: ignore[union-attr]
    assert f"UUID={guest.disk.partition(1).fs_uuid}\t/\text4" in fstab
    assert loops_backing(guest.raw) == []
