"""compare_tars must see every kind of difference fidelity.md lists (it must be able to fail).

Each test makes two trees, tars both with GNU tar and the reference options, and checks the
one difference is reported, and nothing else.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from decimal import Decimal
from pathlib import Path

import pytest
from support.compare import (
    assert_same_tree,
    compare_tars,
    normalise_path,
    parse_pax_time,
    read_tree,
)
from support.reference import REFERENCE_TAR_ARGS

T0 = 1_600_000_000_123_456_789


def gnu_tar(src: Path, out: Path, *extra: str) -> Path:
    subprocess.run(
        ["tar", *REFERENCE_TAR_ARGS, *extra, "-C", str(src), "-cf", str(out), "."],
        check=True,
        capture_output=True,
    )
    return out


def make_tree(root: Path) -> Path:
    root.mkdir()
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(b"hello\n")
    (root / "dir" / "x").write_bytes(b"xattr\n")
    os.setxattr(root / "dir" / "x", "user.k", b"\x00v\xff")
    (root / "a").write_bytes(b"linked\n")
    os.link(root / "a", root / "b")
    (root / "sparse").touch()
    with (root / "sparse").open("r+b") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"data in the middle")
    os.symlink("dir/file", root / "link")
    os.mkfifo(root / "fifo")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in dirnames + filenames:
            os.utime(Path(dirpath) / n, ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))
    return root


def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_tree(tmp_path / "ours"), make_tree(tmp_path / "ref")


def diffs_after(tmp_path: Path, change: object = None, *ours_args: str) -> list[str]:
    ours, ref = pair(tmp_path)
    if callable(change):
        change(ours)
    return compare_tars(
        gnu_tar(ours, tmp_path / "ours.tar", *ours_args), gnu_tar(ref, tmp_path / "ref.tar")
    )


def keep_mtime(path: Path) -> None:
    os.utime(path, ns=(T0, T0), follow_symlinks=False)


def test_identical_trees_have_no_difference(tmp_path: Path) -> None:
    assert diffs_after(tmp_path) == []


def test_mode_difference(tmp_path: Path) -> None:
    d = diffs_after(tmp_path, lambda r: os.chmod(r / "dir" / "file", 0o4644))
    assert d == ["'/dir/file': mode 0o4644 != ref 0o644"]


def test_uid_difference(tmp_path: Path) -> None:
    d = diffs_after(tmp_path, None, "--owner=1234", "--group=0")
    assert d and all(": uid 1234 != ref " in line for line in d)
    assert len(d) == len(read_tree(tmp_path / "ref.tar").entries)


def test_mtime_nanosecond_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        os.utime(root / "dir" / "file", ns=(T0, T0 + 1))

    d = diffs_after(tmp_path, change)
    assert len(d) == 1
    assert d[0].startswith("'/dir/file': mtime 1600000000.12345679 ")
    assert "1600000000123456790 ns" in d[0] and "1600000000123456789 ns" in d[0]


def test_xattr_value_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        os.setxattr(root / "dir" / "x", "user.k", b"\x00v\xfe")

    assert diffs_after(tmp_path, change) == [
        "'/dir/x': xattr user.k b'\\x00v\\xfe' != ref b'\\x00v\\xff'"
    ]


def test_xattr_missing(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        os.removexattr(root / "dir" / "x", "user.k")

    assert diffs_after(tmp_path, change) == [
        "'/dir/x': xattr user.k missing from ours (ref b'\\x00v\\xff')"
    ]


def test_content_difference_same_size(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "dir" / "file").write_bytes(b"HELLO\n")
        keep_mtime(root / "dir" / "file")

    d = diffs_after(tmp_path, change)
    assert len(d) == 1 and d[0].startswith("'/dir/file': content sha256 ")


def test_size_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "dir" / "file").write_bytes(b"hello!\n")
        keep_mtime(root / "dir" / "file")

    assert diffs_after(tmp_path, change) == ["'/dir/file': size 7 != ref 6"]


def test_missing_and_extra_paths(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "dir" / "file").rename(root / "dir" / "other")
        keep_mtime(root / "dir")

    assert diffs_after(tmp_path, change) == [
        "'/dir/file': missing from ours (ref has a file)",
        "'/dir/other': only in ours (a file)",
    ]


def test_hardlink_group_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "b").unlink()
        (root / "b").write_bytes(b"linked\n")  # same content, another inode
        keep_mtime(root / "b")
        keep_mtime(root)

    d = diffs_after(tmp_path, change)
    assert d == [
        "'/a': hardlink group {/a} != ref {/a, /b}",
        "'/b': hardlink group {/b} != ref {/a, /b}",
    ]


def test_hardlink_data_carrier_may_differ(tmp_path: Path) -> None:
    """GNU tar links the later name to the earlier; a writer that picked the other is fine."""
    _, ref = pair(tmp_path)
    gnu_tar(ref, tmp_path / "ref.tar")
    out = tmp_path / "ours.tar"
    with (
        tarfile.open(tmp_path / "ref.tar") as src,
        tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst,
    ):
        members = src.getmembers()
        a = next(m for m in members if m.name == "./a")
        b = next(m for m in members if m.name == "./b")
        data_carrier = a if a.isfile() else b
        for m in members:
            if m.name in ("./a", "./b"):
                continue
            # Re-written as a plain member: drop the GNU sparse 1.0 headers of its old layout.
            fileobj = src.extractfile(m) if m.isfile() else None
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if "sparse" not in k}
            m.sparse = None
            dst.addfile(m, fileobj)
        carrier = src.extractfile(data_carrier)
        assert carrier is not None
        b2 = tarfile.TarInfo("b")  # no "./": normalised away
        for attr in ("mode", "uid", "gid", "size", "mtime", "pax_headers"):
            setattr(b2, attr, getattr(data_carrier, attr))
        dst.addfile(b2, carrier)
        a2 = tarfile.TarInfo("a")
        for attr in ("mode", "uid", "gid", "mtime", "pax_headers"):
            setattr(a2, attr, getattr(data_carrier, attr))
        a2.type, a2.linkname = tarfile.LNKTYPE, "b"
        dst.addfile(a2)
    assert compare_tars(out, tmp_path / "ref.tar") == []


def test_symlink_target_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "link").unlink()
        os.symlink("dir/x", root / "link")
        keep_mtime(root / "link")
        keep_mtime(root)

    assert diffs_after(tmp_path, change) == ["'/link': target 'dir/x' != ref 'dir/file'"]


def test_type_difference(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        (root / "fifo").unlink()
        (root / "fifo").write_bytes(b"")
        os.chmod(root / "fifo", 0o644)
        keep_mtime(root / "fifo")
        keep_mtime(root)

    d = diffs_after(tmp_path, change)
    assert "'/fifo': type file != ref fifo" in d


def test_sparse_member_reads_like_a_plain_one(tmp_path: Path) -> None:
    """GNU sparse 1.0 (--sparse) and a plain member of the same file compare equal."""
    ours, ref = pair(tmp_path)
    plain = tmp_path / "plain.tar"
    subprocess.run(
        [
            "tar",
            "--format=posix",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
            str(ours),
            "-cf",
            str(plain),
            ".",
        ],
        check=True,
        capture_output=True,
    )
    sparse = gnu_tar(ref, tmp_path / "ref.tar")
    with tarfile.open(sparse) as tf:
        assert tf.getmember("./sparse").pax_headers["GNU.sparse.major"] == "1"
    assert compare_tars(plain, sparse) == []
    entry = read_tree(sparse).entries["/sparse"]
    assert entry.size == 4 << 20


def test_ignore_paths_and_fields(tmp_path: Path) -> None:
    def change(root: Path) -> None:
        os.chmod(root / "dir" / "file", 0o600)
        (root / "extra").write_bytes(b"")
        keep_mtime(root / "extra")
        keep_mtime(root)

    ours, ref = pair(tmp_path)
    change(ours)
    o, r = gnu_tar(ours, tmp_path / "o.tar"), gnu_tar(ref, tmp_path / "r.tar")
    assert len(compare_tars(o, r)) == 2
    assert compare_tars(o, r, ignore={"extra", "./dir/file"}) == []
    assert compare_tars(o, r, ignore={"/ex*"}, ignore_fields={"mode"}) == []
    with pytest.raises(ValueError, match="unknown ignore_fields"):
        compare_tars(o, r, ignore_fields={"colour"})


def test_assert_same_tree_fails_with_the_differences(tmp_path: Path) -> None:
    ours, ref = pair(tmp_path)
    os.chmod(ours / "a", 0o600)
    o, r = gnu_tar(ours, tmp_path / "o.tar"), gnu_tar(ref, tmp_path / "r.tar")
    assert_same_tree(r, r)
    with pytest.raises(AssertionError, match=r"differs from the reference .* in 2 ways") as exc:
        assert_same_tree(o, r)
    assert "'/a': mode 0o600 != ref 0o644" in str(exc.value)


def test_device_numbers(tmp_path: Path, require_root: None) -> None:
    def change(root: Path) -> None:
        os.mknod(root / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        keep_mtime(root / "dev")
        keep_mtime(root)

    ours, ref = pair(tmp_path)
    change(ours)
    os.mknod(ref / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    keep_mtime(ref / "dev")
    keep_mtime(ref)
    d = compare_tars(gnu_tar(ours, tmp_path / "o.tar"), gnu_tar(ref, tmp_path / "r.tar"))
    assert d == ["'/dev': device (1, 5) != ref (1, 3)"]


def test_duplicate_member_is_reported(tmp_path: Path) -> None:
    ours, ref = pair(tmp_path)
    r = gnu_tar(ref, tmp_path / "r.tar")
    o = tmp_path / "o.tar"
    subprocess.run(["cp", str(r), str(o)], check=True)
    subprocess.run(["tar", "-C", str(ours), "-rf", str(o), "./dir/file"], check=True)
    assert "ours: /dir/file: appears more than once in the archive" in compare_tars(o, r)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (".", "/"),
        ("./", "/"),
        ("/", "/"),
        ("", "/"),
        ("./a/b/", "/a/b"),
        ("a", "/a"),
        ("/a/b", "/a/b"),
        ("././a", "/a"),
    ],
)
def test_normalise_path(name: str, expected: str) -> None:
    assert normalise_path(name) == expected


def test_parse_pax_time_is_exact() -> None:
    t = parse_pax_time("4102444800.987654321")
    assert t * 10**9 == 4_102_444_800_987_654_321
    assert float("4102444800.987654321") * 10**9 != 4_102_444_800_987_654_321  # why not float
    assert parse_pax_time("-315619199.876543211") * 10**9 == -315_619_199_876_543_211
    assert parse_pax_time("12") == Decimal(12)
    with pytest.raises(ValueError):
        parse_pax_time("nan")
    with pytest.raises(ValueError):
        parse_pax_time("1.2.3")
