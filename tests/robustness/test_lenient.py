"""``convert --lenient``: a damaged entry is skipped with a warning, the rest is converted.

The images are real (``mke2fs -d``, ``qemu-img convert``), damaged with ``dd``-style writes at
offsets found by ``debugfs`` (``imap``, ``blocks``, ``stat``) and ``qemu-img map``: one inode's
extent tree, one directory block, and one data cluster of a qcow2 (a read that fails in the
middle of a file, after its tar header was written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import ova2img
from ova2img.errors import DiskError, FilesystemError

pytestmark = pytest.mark.skipif(
    shutil.which("debugfs") is None or shutil.which("qemu-img") is None,
    reason="needs e2fsprogs and qemu-img",
)

BS = 1024


def _run(*argv: str | Path) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, check=True)
    return proc.stdout


def _poke(path: Path, offset: int, data: bytes) -> None:
    """``dd conv=notrunc``: overwrite bytes in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A staged tree, and an ext4 image of it (1 KiB blocks, no metadata_csum, as on old VMs)."""
    work = tmp_path_factory.mktemp("lenient")
    stage = work / "stage"
    files = {
        "etc/hostname": b"lenient\n",
        "data/good1.txt": b"one\n",
        "data/bad.bin": bytes(range(256)) * 12,
        "data/big.bin": os.urandom(600_000),
        "data/zz-after.txt": b"after\n",
        "baddir/a": b"a\n",
        "baddir/b": b"b\n",
        "keep/ok.txt": b"ok\n",
    }
    for name, data in files.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(data)
    img = work / "fs.ext4"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BS), "-O", "^metadata_csum", "-d",
         stage, img, "4M")  # fmt: skip
    return img, files


def _damaged(img: Path, tmp_path: Path, *, extent: bool = False, dirblock: bool = False) -> Path:
    out = tmp_path / "damaged.ext4"
    shutil.copyfile(img, out)
    if extent:
        # the extent header magic of /data/bad.bin's i_block (struct ext4_inode + 0x28)
        imap = _run("debugfs", "-R", "imap /data/bad.bin", out)
        m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", imap)
        assert m, imap
        inode_at = int(m.group(1)) * BS + int(m.group(2), 16)
        _poke(out, inode_at + 0x28, b"\x00\x00")
    if dirblock:
        # /baddir's only directory block, zeroed: its first entry has rec_len 0
        (block,) = (int(b) for b in _run("debugfs", "-R", "blocks /baddir", out).split())
        _poke(out, block * BS, bytes(BS))
    return out


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ova2img", "convert", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _contents(tar: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            assert not m.name.startswith("/") and ".." not in m.name.split("/")
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                with f:
                    out[m.name.removeprefix("./")] = f.read()
    return out


def test_strict_fails_lenient_skips_damaged_inode_and_directory(
    originals: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    img, files = originals
    src = _damaged(img, tmp_path, extent=True, dirblock=True)
    out = tmp_path / "out.tar"

    strict = _cli(src, "-o", out)
    assert strict.returncode == 1, strict.stderr
    assert strict.stderr.startswith("ova2img: error: filesystem: ")
    assert len(strict.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["damaged.ext4"]  # nothing left behind

    lenient = _cli(src, "-o", out, "--lenient")
    assert lenient.returncode == 0, lenient.stderr
    lines = lenient.stderr.splitlines()
    assert all(ln.startswith("ova2img: warning: ") for ln in lines), lines
    assert any(
        "cannot read /data/bad.bin: filesystem: " in ln
        and "extent header magic 0x0000" in ln
        and ln.endswith("skipped (--lenient)")
        for ln in lines
    ), lines
    assert any("cannot read /baddir: filesystem: " in ln and "rec_len 0" in ln for ln in lines), (
        lines
    )
    assert lines[-1] == "ova2img: warning: --lenient: skipped 2 unreadable entries"
    got = _contents(out)
    assert "data/bad.bin" not in got
    assert not [n for n in got if n.startswith("baddir")]
    for name in ("etc/hostname", "data/good1.txt", "data/big.bin", "data/zz-after.txt"):
        assert got[name] == files[name], name
    assert got["keep/ok.txt"] == files["keep/ok.txt"]


def test_lenient_api_warnings_and_strict_class(
    originals: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    img, _files = originals
    src = _damaged(img, tmp_path, extent=True)
    with pytest.raises(FilesystemError, match=r"inode \d+: extent header magic 0x0000"):
        ova2img.convert(src, tmp_path / "strict.tar")
    result = ova2img.convert(src, tmp_path / "lenient.tar", lenient=True)
    assert result.warnings[-1] == "--lenient: skipped 1 unreadable entries"
    assert [w for w in result.warnings if w.startswith("cannot read /data/bad.bin")]


def _qcow2_with_bad_cluster(img: Path, tmp_path: Path) -> tuple[Path, int]:
    """``img`` as qcow2 (64 KiB clusters) with the L2 entry of one data cluster in the middle
    of /data/big.bin sent past the end of the file; returns it and that cluster's offset
    in the file's content."""
    q = tmp_path / "disk.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, q)
    stat = _run("debugfs", "-R", "stat /data/big.bin", img)
    first, last = (int(x) for x in re.search(r"\(0-\d+\):(\d+)-(\d+)", stat).groups())  # type: ignore[union-attr]
    with q.open("rb") as f:
        head = f.read(48)
    cluster = 1 << struct.unpack_from(">I", head, 20)[0]
    l1_off = struct.unpack_from(">Q", head, 40)[0]
    guest = -(-first * BS // cluster) * cluster + cluster  # a whole cluster inside the file
    assert guest + cluster <= (last + 1) * BS
    mapped = {r["start"]: r for r in json.loads(_run("qemu-img", "map", "--output=json", q))}
    assert any(s <= guest < s + r["length"] and r["data"] for s, r in mapped.items())
    per_l2 = cluster // 8
    index = guest // cluster
    with q.open("r+b") as f:
        f.seek(l1_off + 8 * (index // per_l2))
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * (index % per_l2))
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))  # QCOW_OFLAG_COPIED, 1 TiB
    return q, guest - first * BS


def test_lenient_zero_fills_a_file_failing_midway(
    originals: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    img, files = originals
    q, bad_at = _qcow2_with_bad_cluster(img, tmp_path)
    with pytest.raises(DiskError):
        ova2img.convert(q, tmp_path / "strict.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2"]

    out = tmp_path / "out.tar"
    proc = _cli(q, "-o", out, "--lenient")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    found = [
        re.match(
            r"ova2img: warning: /data/big\.bin: content unreadable from byte (\d+) of 600000 "
            r"\(disk: .*\); the rest is written as zeros \(--lenient\)$",
            ln,
        )
        for ln in lines
    ]
    (cut,) = (int(m.group(1)) for m in found if m)
    # the layers below read ahead a little (aligned blocks): the cut is at most one cluster
    # before the damaged one, on a 4 KiB boundary
    assert bad_at - 65536 <= cut <= bad_at and cut % 4096 == 0
    assert lines[-1] == (
        "ova2img: warning: --lenient: skipped 0 unreadable entries, 1 damaged file(s) filled "
        "with zeros"
    )
    got = _contents(out)  # the archive stays aligned: every member after it reads back
    big = got["data/big.bin"]
    assert len(big) == len(files["data/big.bin"])
    assert big[:cut] == files["data/big.bin"][:cut]
    assert big[cut:] == bytes(len(big) - cut)
    for name in ("data/bad.bin", "data/zz-after.txt", "keep/ok.txt", "baddir/a"):
        assert got[name] == files[name], name


def test_lenient_keeps_fatal_damage_fatal(
    originals: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Superblock damage is not per-entry: --lenient fails just as strict does."""
    img, _files = originals
    src = tmp_path / "fs.ext4"
    shutil.copyfile(img, src)
    _poke(src, 1024 + 0x18, struct.pack("<I", 20))  # s_log_block_size
    proc = _cli(src, "-o", tmp_path / "out.tar", "--lenient")
    assert proc.returncode == 1
    assert proc.stderr == (
        "ova2img: error: filesystem: sda: invalid log block size 20 (2^30-byte blocks; at most "
        "64 KiB) (at offset 0x400)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fs.ext4"]
