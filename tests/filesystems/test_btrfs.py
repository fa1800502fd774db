"""BtrfsFilesystem against the kernel: full walks of every subvolume view vs a loop mount.

The image is made by real tools: ``mkfs.btrfs --rootdir`` over a staging tree carrying the
fidelity probes, then a read-write kernel mount adds subvolumes (``@`` with the probes again,
a nested one under a plain directory, ``@home``), compressed files (``compress=zstd:1``, ``lzo``,
``zlib``), preallocated and reflinked extents, a read-only snapshot (holding the placeholder
of the nested subvolume) and ``btrfs subvolume set-default``. The oracle is a read-only kernel
loop mount with the same ``subvol=``/``subvolid=`` option, walked with ``os.lstat``,
``listxattr``/``getxattr``, ``readlink`` and ``SEEK_DATA``/``SEEK_HOLE``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dissect.btrfs import Btrfs
from support.probes import populate_probes
from support.walks import adapter_walk, assert_same_walk, kernel_walk

from ova2img.errors import FilesystemError, UnsupportedError
from ova2img.filesystems.btrfs import BtrfsFilesystem, BtrfsHandle, _dir_items
from ova2img.filesystems.probe import open_filesystem, probe

MiB = 1 << 20
KiB = 1 << 10
T_PRE_1970 = -1_234_567_890_123_456_789  # 1930
T_2100 = 4_102_444_800 * 10**9 + 999_999_999
LOW40 = (1 << 40) - 1


def _is_root() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


def run(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, errors="surrogateescape"
    )
    if proc.returncode not in ok:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def mounted(img: Path, *, rw: bool = False, options: str = "") -> Iterator[Path]:
    """Loop-mount *img* on a unique directory; unmount (and free the loop) on exit."""
    mnt = Path(f"/tmp/o2i-btrfs-{uuid.uuid4().hex[:12]}")
    mnt.mkdir()
    opts = ",".join(o for o in ("rw" if rw else "ro", options) if o)
    ro = () if rw else ("--read-only",)
    dev = run("losetup", "--find", "--show", *ro, img).strip()
    try:
        run("mount", "-t", "btrfs", "-o", opts, dev, mnt)
        try:
            yield mnt
        finally:
            run("umount", mnt)
    finally:
        run("losetup", "--detach", dev, ok=(0, 1))
        mnt.rmdir()


def subvol_id(path: Path) -> int:
    out = run("btrfs", "inspect-internal", "rootid", path)
    return int(out.strip())


# -- building the image ------------------------------------------------------------------------


def _compressible(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefgh") for _ in range(7)) for _ in range(50)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def populate_btrfs_extras(m: Path) -> None:
    """btrfs specifics on a rw mount: extents of every kind, device numbers, xattrs."""
    rnd = random.Random(11)
    x = m / "x"
    x.mkdir()
    (x / "big").write_bytes(rnd.randbytes(MiB + 123))  # regular, uncompressed
    (x / "inline").write_bytes(b"tiny inline file\n")
    with open(x / "prealloc", "wb") as fh:  # prealloc, data, prealloc
        os.posix_fallocate(fh.fileno(), 0, MiB)
        fh.seek(256 * KiB)
        fh.write(b"D" * 8192)
    with open(x / "prealloc-keep", "wb") as fh:  # data, then prealloc beyond EOF
        fh.write(rnd.randbytes(5000))
        fh.flush()
        run("fallocate", "--keep-size", "-o", "0", "-l", str(2 * MiB), x / "prealloc-keep")
    with open(x / "holes", "wb") as fh:  # data, hole, data, hole to the end
        fh.write(rnd.randbytes(10000))
        fh.seek(MiB)
        fh.write(rnd.randbytes(70000))
        fh.truncate(3 * MiB + 17)
    (x / "reflink-src").write_bytes(rnd.randbytes(300 * KiB))
    run("cp", "--reflink=always", x / "reflink-src", x / "reflink-dst")
    with open(x / "reflink-dst", "r+b") as fh:  # split the shared extent: offsets into it
        fh.seek(100 * KiB)
        fh.write(b"\xee" * 4096)
    (x / "hard1").write_bytes(b"linked")
    os.link(x / "hard1", x / "hard2")
    os.mknod(x / "bigdev", stat.S_IFCHR | 0o600, os.makedev(259, 70000))
    (x / "sel").write_bytes(b"s")
    os.setxattr(x / "sel", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    os.setxattr(x / "sel", "user.big", rnd.randbytes(3000))
    (x / "acl").write_bytes(b"acl")
    run("setfacl", "-m", "u:1234:rwx,g:55:r-x,m::rwx", x / "acl")
    (x / "acldir").mkdir()
    run("setfacl", "-m", "u:4321:rx", "-d", "-m", "u:1234:rwx,g:55:r", x / "acldir")
    for name, t in (("old", T_PRE_1970), ("y2100", T_2100)):
        (x / name).write_bytes(name.encode())
        os.utime(x / name, ns=(t, t))
    # A directory where the `btrfs property` compression xattr is set (btrfs.compression).
    (x / "prop").mkdir()
    run("btrfs", "property", "set", x / "prop", "compression", "zstd")
    (x / "prop" / "f").write_bytes(_compressible(200 * KiB, 3))


def write_compressed(m: Path, img_dev_mnt: Path, algo: str) -> None:
    """Files written while the filesystem is mounted with compress=ALGO."""
    run("mount", "-o", f"remount,compress={algo}", img_dev_mnt)
    c = m / "c" / algo.split(":")[0]
    c.mkdir(parents=True)
    (c / "inline").write_bytes(_compressible(1500, 1))  # a compressed inline extent
    (c / "big").write_bytes(_compressible(700 * KiB + 5, 2))  # several 128 KiB extents
    with open(c / "sparse", "wb") as fh:
        fh.seek(200 * KiB)
        fh.write(_compressible(150 * KiB, 4))
        fh.truncate(MiB)
    (c / "over").write_bytes(_compressible(512 * KiB, 5))
    os.sync()
    with open(c / "over", "r+b") as fh:  # later extents point into the middle of compressed ones
        fh.seek(130 * KiB)
        fh.write(random.Random(9).randbytes(8192))
    os.sync()


@dataclass
class Layout:
    img: Path
    ids: dict[str, int]  # subvolume path from the top level → id


def build_image(base: Path, mkfs_args: tuple[str, ...]) -> Layout:
    stage = base / "stage"
    stage.mkdir()
    populate_probes(stage)
    img = base / "btrfs.img"
    with open(img, "wb") as fh:
        fh.truncate(300 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-L", "o2i-btrfs", *mkfs_args, "--rootdir", stage, img)
    shutil.rmtree(stage)
    with mounted(img, rw=True) as m:
        run("btrfs", "subvolume", "create", m / "@")
        populate_probes(m / "@", fstab="LABEL=o2i-btrfs / btrfs subvol=@ 0 0\n")
        populate_btrfs_extras(m / "@")
        for algo in ("zstd:1", "lzo", "zlib"):
            write_compressed(m / "@", m, algo)
        run("mount", "-o", "remount,compress=no", m)
        (m / "@" / "srv").mkdir()
        run("btrfs", "subvolume", "create", m / "@" / "srv" / "nested")
        (m / "@" / "srv" / "nested" / "inside").write_bytes(b"in the nested subvolume\n")
        os.chmod(m / "@" / "srv" / "nested", 0o750)
        os.utime(m / "@" / "srv" / "nested", ns=(T_PRE_1970, T_PRE_1970))
        run("btrfs", "subvolume", "create", m / "@home")
        (m / "@home" / "user").mkdir()
        (m / "@home" / "user" / "notes").write_bytes(b"home\n" * 1000)
        run("btrfs", "subvolume", "snapshot", "-r", m / "@", m / "@snap")
        ids = {name: subvol_id(m / name) for name in ("@", "@/srv/nested", "@home", "@snap")}
        run("btrfs", "subvolume", "set-default", str(ids["@"]), m)
        os.sync()
    return Layout(img, ids)


# -- fixtures ---------------------------------------------------------------------------------

#: variant → mkfs.btrfs options: the defaults (NO_HOLES, DUP metadata), and explicit hole
#: extents with DUP data too.
VARIANTS: dict[str, tuple[str, ...]] = {
    "no-holes": ("-O", "no-holes"),
    "holes": ("-O", "^no-holes", "-d", "dup", "-m", "dup"),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layout]:
    if not _is_root():
        pytest.skip("needs root and loop devices to build a reference")
    return {
        name: build_image(tmp_path_factory.mktemp(f"btrfs-{name}"), args)
        for name, args in VARIANTS.items()
    }


def _views(lay: Layout) -> dict[str, list[str]]:
    return {
        "default": [],
        "subvol=@": ["subvol=@"],
        "subvol=/@home": ["subvol=/@home"],
        "subvolid=5": ["subvolid=5"],
        "subvolid=nested": [f"subvolid={lay.ids['@/srv/nested']}"],
        "subvol=@/srv/nested": ["subvol=@/srv/nested"],
        "subvol=@snap": ["subvol=@snap"],
        "both": ["subvol=@", f"subvolid={lay.ids['@']}"],
    }


VIEW_NAMES = list(_views(Layout(Path(), {"@": 0, "@/srv/nested": 0})))


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("view", VIEW_NAMES)
def test_view_matches_kernel(
    require_root: None, variant: str, view: str, layouts: dict[str, Layout]
) -> None:
    lay = layouts[variant]
    options = _views(lay)[view]
    with mounted(lay.img, options=",".join(options)) as m:
        ref = kernel_walk(m)
    with open(lay.img, "rb") as fh:
        fs = BtrfsFilesystem(fh, name=variant).mount(options)
        ours = adapter_walk(fs, inode=lambda i: i & LOW40)
    assert_same_walk(
        ours,
        ref,
        # new_simple_dir(): a subvolume placeholder's times are those of the lookup, not on disk
        ignore=lambda want, field: want.inode == 2 and field in ("mtime_ns", "ctime_ns"),
        # ours unique within the view exactly where the kernel's (st_dev, st_ino) is
        # (placeholders excluded: every one in a subvolume is (dev, 2))
        identities=lambda want: want.inode != 2,
    )
    if view in ("default", "subvol=@", "both"):
        # The probes did land (guards against a silently weaker fixture).
        assert fs.subvolume_id == lay.ids["@"]
        assert len(ref) > 3000
        assert ref[b"/x/old"].mtime_ns < 0 and ref[b"/probes/mtime-1960"].mtime_ns < 0
        assert ref[b"/x/acl"].xattrs["system.posix_acl_access"][:4] == b"\x02\x00\x00\x00"
        assert "system.posix_acl_default" in ref[b"/x/acldir"].xattrs
        assert "security.capability" in ref[b"/probes/capability"].xattrs
        assert ref[b"/x/prop"].xattrs == {"btrfs.compression": b"zstd"}
        assert ref[b"/x/bigdev"].rdev == (259, 70000)
        assert ref[b"/probes/block-8-1"].rdev == (8, 1)
        assert ref[b"/x/prealloc"].runs == [(256 * KiB, 8192)]
        assert ref[b"/srv/nested"].inode == 256 and ref[b"/srv/nested"].mode == 0o750
        assert ref[b"/srv/nested/inside"].type == "file"
    if view == "subvolid=5":
        assert ref[b"/@snap/srv/nested"].inode == 2  # the placeholder
        assert ref[b"/@snap/srv/nested"].mode == 0o755
        assert b"/@/srv/nested/inside" in ref and b"/probes/bigdir/f0000" in ref


@pytest.mark.root
def test_compressed_extents_present(require_root: None, layouts: dict[str, Layout]) -> None:
    """The fixture really holds zlib, lzo and zstd extents, inline and regular, and shared ones
    (``btrfs inspect-internal dump-tree``), so the walks above cover them."""
    lay = layouts["no-holes"]
    dump = run("btrfs", "inspect-internal", "dump-tree", "-t", str(lay.ids["@"]), lay.img)
    for algo, name in ((1, "zlib"), (2, "lzo"), (3, "zstd")):
        assert re.search(rf"inline extent data size \d+ ram_bytes 1500 compression {algo}", dump)
        assert dump.count(f"extent compression {algo} ({name})") >= 4
    assert re.search(r"prealloc data offset \d+ nr", dump)
    # Compressed extents used from an offset into their decompressed data (the overwrite).
    assert re.search(r"extent data offset [1-9]\d* nr \d+ ram 131072", dump)


@pytest.mark.root
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_and_subvolumes(
    require_root: None, variant: str, layouts: dict[str, Layout]
) -> None:
    lay = layouts[variant]
    tags = dict(
        line.split("=", 1)
        for line in run("blkid", "-p", "-o", "export", lay.img).splitlines()
        if "=" in line
    )
    with open(lay.img, "rb") as fh:
        assert probe(fh) == "btrfs"
        fs = open_filesystem(fh, "btrfs", name="vol")
        assert isinstance(fs, BtrfsFilesystem)
        assert (fs.fstype, fs.uuid, fs.label) == (tags["TYPE"], tags["UUID"], "o2i-btrfs")
        assert not fs.log_tree_pending
        # `btrfs subvolume list` is the oracle for ids and paths.
        with mounted(lay.img, options="subvolid=5") as m:
            listed = run("btrfs", "subvolume", "list", m)
            default = run("btrfs", "subvolume", "get-default", m)
        pattern = r"^ID (\d+) gen \d+ top level \d+ path (.*)$"
        found = re.finditer(pattern, listed, re.M)
        want = [(5, ""), *sorted((int(mt.group(1)), mt.group(2)) for mt in found)]
        assert fs.subvolumes() == want
        assert fs.subvolume_id == int(default.split()[1])
        assert fs.subvolume_path() == "@"
        cands = list(fs.root_candidates())
        assert [c.subvolume_id for c in cands] == [lay.ids["@"]] + [  # type: ignore[attr-defined]
            i for i, _ in want if i != lay.ids["@"]
        ]
        assert all(c.uuid == fs.uuid and c.fstype == "btrfs" for c in cands)
        # The assembly's pick: the first candidate with /etc/fstab is the default view.
        assert cands[0].read_file(b"/etc/fstab").startswith(b"LABEL=o2i-btrfs")
        # Views share the parsed filesystem and have their own roots.
        top = fs.mount(["subvol=/"])
        assert top.subvolume_id == 5
        assert fs.mount(["subvolid=0"]).subvolume_id == 5
        assert fs.mount(["subvol=@snap/", "ro", "compress=zstd"]).subvolume_id == lay.ids["@snap"]
        h = top.lookup(b"/@/srv/nested/inside")
        assert isinstance(h, BtrfsHandle) and h.tree == lay.ids["@/srv/nested"]
        assert top.stat(h).inode == (lay.ids["@/srv/nested"] << 40) | h.ino


@pytest.mark.root
def test_mount_option_errors_match_kernel(require_root: None, layouts: dict[str, Layout]) -> None:
    lay = layouts["no-holes"]
    bad = {
        "not-a-subvolume": ["subvol=@/srv"],
        "missing-path": ["subvol=@nope"],
        "disagree": ["subvol=@home", f"subvolid={lay.ids['@']}"],
        "missing-id": ["subvolid=4242"],
        "placeholder": ["subvol=@snap/srv/nested"],
    }
    with open(lay.img, "rb") as fh:
        fs = BtrfsFilesystem(fh, name="vol9")
        for what, options in bad.items():
            with pytest.raises(FilesystemError) as info:
                fs.mount(options)
            assert "vol9" in str(info.value), what
            # The kernel refuses the same mounts.
            with (
                pytest.raises(AssertionError, match="failed"),
                mounted(lay.img, options=",".join(options)),
            ):
                pass


# -- dissect gaps: each shows the unpatched library wrong and the adapter right ----------------


@pytest.mark.root
def test_gap_times_before_1970(require_root: None, layouts: dict[str, Layout]) -> None:
    """dissect 1.10 reads btrfs_timespec.sec unsigned: 1930 comes out near year 584 billion."""
    lay = layouts["no-holes"]
    paths = ("/@/x/old", "/probes/mtime-1960")  # kernel-written; mkfs.btrfs --rootdir-written
    with mounted(lay.img, options="subvolid=5") as m:
        kernel = [os.lstat(m / p.lstrip("/")).st_mtime_ns for p in paths]
    assert kernel[0] == T_PRE_1970 and kernel[1] < 0
    with open(lay.img, "rb") as fh:
        dfs = Btrfs(fh).find_subvolume("")
        assert dfs is not None
        assert all(dfs.get(p).mtime_ns > 2**63 for p in paths)  # the gap
        fs = BtrfsFilesystem(fh).mount(["subvolid=5"])
        assert [fs.stat(fs.lookup(p.encode())).mtime_ns for p in paths] == kernel


@pytest.mark.root
def test_gap_xattrs(require_root: None, layouts: dict[str, Layout]) -> None:
    """dissect has no xattr API at all; we parse XATTR_ITEMs (ACLs stored in version 2)."""
    lay = layouts["no-holes"]
    names = ("x/sel", "x/acl", "x/acldir", "probes/capability", "probes/user-xattr")
    with mounted(lay.img) as m:
        kernel = {
            n: {a: os.getxattr(m / n, a) for a in os.listxattr(m / n, follow_symlinks=False)}
            for n in names
        }
    assert all(kernel.values())
    with open(lay.img, "rb") as fh:
        node = Btrfs(fh).get("/x/sel")
        assert not any(hasattr(node, a) for a in ("xattr", "xattrs", "listxattr", "getxattr"))
        fs = BtrfsFilesystem(fh)
        ours = {n: fs.stat(fs.lookup(b"/" + n.encode())).xattrs for n in names}
        # On disk, btrfs_set_acl() stored the ACL already in the version-2 xattr format.
        h = fs.lookup(b"/x/acl")
        assert isinstance(h, BtrfsHandle)
        core = fs._core
        raw = {
            name: value
            for _key, data in core.items(core.tree_root(h.tree), (h.ino, 24, 0), (h.ino, 24, 2**64))
            for _loc, _type, name, value in _dir_items(data)
        }
        assert raw[b"system.posix_acl_access"] == kernel["x/acl"]["system.posix_acl_access"]
    assert ours == kernel


@pytest.mark.root
def test_gap_snapshot_placeholder(require_root: None, layouts: dict[str, Layout]) -> None:
    """A snapshot copies the dir entry of a nested subvolume it does not own: the kernel shows
    an empty directory (inode 2); dissect descends into the other subvolume's content."""
    lay = layouts["no-holes"]
    with mounted(lay.img, options="subvol=@snap") as m:
        assert os.listdir(m / "srv" / "nested") == []
        assert os.lstat(m / "srv" / "nested").st_ino == 2
    with open(lay.img, "rb") as fh:
        dfs = Btrfs(fh)
        snap = dfs.find_subvolume("@snap")
        assert snap is not None
        assert "inside" in snap.get("srv/nested").listdir()  # the gap
        fs = BtrfsFilesystem(fh).mount(["subvol=@snap"])
        h = fs.lookup(b"/srv/nested")
        assert list(fs.iterdir(h)) == []
        assert fs.stat(h).inode & LOW40 == 2


# -- unprivileged ------------------------------------------------------------------------------


def _mkfs(img: Path, *args: str, size: int = 120 * MiB) -> None:
    with open(img, "wb") as fh:
        fh.truncate(size)
    run("mkfs.btrfs", "-q", "-f", *args, img)


def test_fstype_uuid_label_unprivileged(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "d").mkdir(parents=True)
    (stage / "d" / "f").write_bytes(b"content\n" * 100)
    os.symlink("d/f", stage / "l")
    img = tmp_path / "b.img"
    _mkfs(img, "-L", "lbl", "--rootdir", str(stage))
    tags = dict(
        line.split("=", 1)
        for line in run("blkid", "-p", "-o", "export", img).splitlines()
        if "=" in line
    )
    with open(img, "rb") as fh:
        fs = BtrfsFilesystem(fh)
        assert (fs.fstype, fs.uuid, fs.label) == (tags["TYPE"], tags["UUID"], "lbl")
        assert fs.subvolume_id == 5 and fs.subvolumes() == [(5, "")]
        assert [c.subvolume_id for c in fs.root_candidates()] == [5]  # type: ignore[attr-defined]
        assert fs.read_file(b"/l") == b"content\n" * 100
        assert sorted(n for n, _ in fs.iterdir(fs.root())) == [b"d", b"l"]
        with pytest.raises(FilesystemError, match="not a btrfs handle"):
            fs.stat(256)


def test_errors_small_bad_magic_multi_device(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 68000)
    with open(small, "rb") as fh, pytest.raises(FilesystemError, match="too small") as info:
        BtrfsFilesystem(fh, name="vol1")
    assert "vol1" in str(info.value)
    img = tmp_path / "one.img"
    _mkfs(img)
    with open(img, "r+b") as fh:
        fh.seek(0x10040)
        fh.write(b"\0" * 8)
    with open(img, "rb") as fh, pytest.raises(FilesystemError, match="magic") as info:
        BtrfsFilesystem(fh)
    assert info.value.offset == 0x10040
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as fh:
            fh.truncate(160 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", a, b)
    for p in (a, b):
        with open(p, "rb") as fh, pytest.raises(UnsupportedError, match="2 devices"):
            BtrfsFilesystem(fh)


def test_corrupt_tree_block_is_filesystem_error(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    for i in range(400):
        (stage / f"file-{i:04d}").write_bytes(b"x" * 3000)  # inline: the fs tree grows
    img = tmp_path / "c.img"
    _mkfs(img, "-m", "single", "--rootdir", str(stage))
    with open(img, "rb") as fh:
        fs = BtrfsFilesystem(fh)
        names = [n for n, _ in fs.iterdir(fs.root())]
        assert len(names) == 400
        # Find a leaf of the fs tree and zero its header: reads must fail as ours.
        core = fs._core
        root = core.tree_root(5)
        node = core.node(root)
        leaf = node.refs[-1] if node.level else root
        phys = _physical(fh, core, int(leaf))  # type: ignore[arg-type]
    with open(img, "r+b") as fh:
        fh.seek(phys + 48)
        fh.write(b"\0" * 8)  # bytenr
    with open(img, "rb") as fh:
        fs = BtrfsFilesystem(fh, name="broken")
        with pytest.raises(FilesystemError, match="broken") as info:
            for _name, h in fs.iterdir(fs.root()):
                fs.stat(h)
        assert "foreign header" in str(info.value)


def _physical(fh: object, core: object, logical: int) -> int:
    stream = core.btrfs._logical_fh  # type: ignore[attr-defined]
    for chunk in stream.chunks:
        if chunk.offset <= logical < chunk.offset + chunk.length:
            return int(chunk.stripes[0].offset + logical - chunk.offset)
    raise AssertionError(f"logical {logical:#x} is in no chunk")
