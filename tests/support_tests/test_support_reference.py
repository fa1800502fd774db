"""make_reference and the probe image: every probe reaches the reference, nothing leaks.

One probed disk (layout a) is built per module; the tests read its reference tar.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from support.compare import TarTree, compare_tars, read_tree
from support.images import BuiltDisk, build_ext_image, disk_mbr_single, mounted_image
from support.probes import (
    BIG_DIR_ENTRIES,
    ETC_PATHS,
    PROBE_PATHS,
    PROBE_SOCKET,
    SPARSE_DATA_LEN,
    SPARSE_DATA_OFFSET,
    SPARSE_SIZE,
    populate_probes,
    sparse_probe_bytes,
)
from support.reference import REFERENCE_TAR_ARGS, loops_backing, make_reference


def _root() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


@dataclass
class Probed:
    disk: BuiltDisk
    ref: Path
    warnings: list[str]
    tree: TarTree


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Probed:
    if not _root():
        pytest.skip("needs root and loop devices to build a reference")
    work = tmp_path_factory.mktemp("probed")
    disk = disk_mbr_single(work, populate_probes)
    ref = work / "ref.tar"
    warnings = make_reference(disk.path, ref, disk.mounts())
    return Probed(disk, ref, warnings, read_tree(ref))


def test_every_probe_is_in_the_reference(probed: Probed, require_root: None) -> None:
    missing = [
        p for p in (*PROBE_PATHS, *ETC_PATHS, "/", "/lost+found") if p not in probed.tree.entries
    ]
    assert missing == []
    assert (
        len([p for p in probed.tree.entries if p.startswith("/probes/bigdir/")]) == BIG_DIR_ENTRIES
    )


def test_socket_is_skipped_with_a_warning(probed: Probed, require_root: None) -> None:
    assert PROBE_SOCKET not in probed.tree.entries
    assert probed.warnings == ["tar: ./probes/socket: socket ignored"]


def test_no_loop_device_left_behind(probed: Probed, require_root: None) -> None:
    assert loops_backing(probed.disk.path) == []
    assert not [p for p in Path("/tmp").glob("ova2img-ref-*") if p.is_dir() and os.path.ismount(p)]


def test_probe_metadata_survives_mke2fs_and_mount(probed: Probed, require_root: None) -> None:
    e = probed.tree.entries
    assert e["/probes/setuid-busybox"].mode == 0o4755
    assert e["/probes/setgid-dir"].mode == 0o2775 and e["/probes/tmp"].mode == 0o1777
    assert e["/tmp"].mode == 0o1777 and e["/root"].mode == 0o700
    cap = e["/probes/capability"].xattrs["security.capability"]
    assert cap[:4] == b"\x01\x00\x00\x02"  # VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    ux = e["/probes/user-xattr"].xattrs
    assert ux["user.binary"] == b"\x00\xff\xfe\x80 binary \x00"
    assert ux["trusted.ova2img"] == b"root only"
    assert e["/probes/acl-file"].xattrs["system.posix_acl_access"][:4] == b"\x02\x00\x00\x00"
    assert "system.posix_acl_default" in e["/probes/acl-dir"].xattrs
    assert (e["/probes/owned-100000"].uid, e["/probes/owned-100000"].gid) == (100000, 100000)
    assert e["/probes/owned-3000000000"].uid == 3_000_000_000
    assert e["/probes/char-1-3"].device == (1, 3) and e["/probes/block-8-1"].device == (8, 1)
    assert e["/probes/fifo"].kind == "fifo"
    assert len(e["/probes/long-symlink"].link) == 300
    assert probed.tree.groups["/probes/hardlink-a"] == {"/probes/hardlink-a", "/probes/hardlink-b"}
    assert e["/probes/mtime-1960"].mtime == Decimal("-315619199.876543211")
    assert e["/probes/symlink-1960"].mtime == Decimal("-315619199.876543211")
    assert e["/probes/mtime-2100"].mtime == Decimal("4102444800.987654321")
    assert e["/probes/mtime-ns"].mtime == Decimal("1577836800.000000001")
    assert e["/probes/.wh.not-a-whiteout"].kind == "file"
    assert "/probes/caf\udce9" in e and "/probes/" + "n" * 255 in e


def test_sparse_probe_is_sparse_in_the_reference(probed: Probed, require_root: None) -> None:
    with tarfile.open(probed.ref) as tf:
        member = tf.getmember("./probes/sparse")
        assert member.size == SPARSE_SIZE
        sparse_map: list[tuple[int, int]] = getattr(member, "sparse", None) or []
        assert sum(n for _, n in sparse_map) == SPARSE_DATA_LEN  # GNU sparse 1.0 map
        f = tf.extractfile(member)
        assert f is not None
        with f:
            f.seek(SPARSE_DATA_OFFSET - 1)
            assert f.read(SPARSE_DATA_LEN + 2) == b"\0" + sparse_probe_bytes() + b"\0"


def test_big_directory_is_an_htree(probed: Probed, require_root: None) -> None:
    """e2fsck -fyD indexed it (mke2fs -d never does): debugfs shows the htree root."""
    root = probed.disk.partition(1).spec.image
    assert root is not None
    image = root.path if not isinstance(root, Path) else root
    out = subprocess.run(
        ["debugfs", "-R", "htree /probes/bigdir", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Root node dump:" in out and "Number of entries" in out


def test_image_is_faithful_to_its_staging_tree(tmp_path: Path, require_root: None) -> None:
    """What build_ext_image wrote (read back by the kernel) equals the staging tree (GNU tar)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    image = build_ext_image(tmp_path / "fs.ext4", 32 << 20, populate_probes, staging=staging)
    assert image.fixups.get("mtime", 0) > 0  # mke2fs -d drops nanoseconds: the fix-up is needed
    staged = tmp_path / "staged.tar"
    subprocess.run(
        ["tar", *REFERENCE_TAR_ARGS, "-C", str(staging), "-cf", str(staged), "."],
        check=True,
        capture_output=True,
    )
    ref = tmp_path / "ref.tar"
    make_reference(image.path, ref, [("/", 0, image.size)])
    # mke2fs -d gives each name of a hardlinked symlink an inode of its own (it links regular
    # files, FIFOs and devices only): the one thing the image does not keep.
    split = "'/probes/symlink-linked"
    diffs = compare_tars(staged, ref, ignore={"/lost+found"})
    assert [d for d in diffs if not (d.startswith(split) and "hardlink group" in d)] == []


def test_make_reference_cleans_up_on_failure(tmp_path: Path, require_root: None) -> None:
    image = build_ext_image(tmp_path / "fs.ext4", 4 << 20, None, fixup=False)
    before = set(Path("/tmp").glob("ova2img-ref-*"))
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        make_reference(
            image.path, tmp_path / "r.tar", [("/", 0, image.size), ("/nonexistent", 0, image.size)]
        )
    assert loops_backing(image.path) == []
    assert set(Path("/tmp").glob("ova2img-ref-*")) == before
    with pytest.raises(ValueError, match="no root"):
        make_reference(image.path, tmp_path / "r.tar", [("/boot", 0, image.size)])


def test_mounted_image_helper_detaches(tmp_path: Path, require_root: None) -> None:
    image = build_ext_image(tmp_path / "fs.ext4", 4 << 20, None, fixup=False)
    with mounted_image(image.path) as mnt:
        assert (mnt / "lost+found").is_dir()
        assert loops_backing(image.path) != []
    assert loops_backing(image.path) == []
