"""Two writer processes (:mod:`ova2img.sinks.split`) make the very archive one process makes,
and an error met by the second process is raised by the first, unchanged.

Batches are made tiny here so that hardlinks, sparse files and directories straddle the two
writers' batches many times over; the image is a real ``mke2fs -d`` ext4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

import ova2img
from ova2img.errors import Ova2imgError
from ova2img.sinks import split

pytestmark = pytest.mark.skipif(
    shutil.which("mke2fs") is None or shutil.which("qemu-img") is None,
    reason="needs e2fsprogs and qemu-img",
)

BS = 1024


def _run(*argv: str | Path) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("split")
    stage = work / "stage"
    for d in range(6):
        sub = stage / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(25):
            (sub / f"f{i:02d}").write_bytes(os.urandom(37 * i + d))
        os.link(sub / "f03", sub / "link-to-f03")
        os.link(sub / "f04", stage / f"top-link-{d}")
        (sub / "sym").symlink_to("f01")
    with (stage / "d2" / "sparse").open("wb") as f:
        f.write(b"head")
        f.seek(300_000)
        f.write(b"tail")
    (stage / "big.bin").write_bytes(os.urandom(600_000))
    for d in (1, 4):  # sockets: tar skips them with a warning, whichever writer meets them
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(stage / f"d{d}" / "sock"))
    img = work / "fs.ext4"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BS), "-O", "^metadata_csum", "-d",
         stage, img, "8M")  # fmt: skip
    return img


def _convert(
    src: Path, out: Path, workers: str, monkeypatch: pytest.MonkeyPatch
) -> ova2img.ConversionResult:
    monkeypatch.setenv("OVA2IMG_WORKERS", workers)
    return ova2img.convert(src, out)


@pytest.mark.parametrize(("items", "content"), [(1, 1 << 30), (3, 1 << 30), (7, 2000)])
def test_two_writers_write_the_same_archive(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, items: int, content: int
) -> None:
    assert split.split_enabled(), "this machine has 2 CPUs and fork: the split must run"
    monkeypatch.setattr(split, "BATCH_ITEMS", items)
    monkeypatch.setattr(split, "BATCH_BYTES", content)
    one = _convert(image, tmp_path / "one.tar", "1", monkeypatch)
    two = _convert(image, tmp_path / "two.tar", "2", monkeypatch)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert (one.entries, one.data_bytes, one.warnings) == (
        two.entries,
        two.data_bytes,
        two.warnings,
    )


def _qcow2_with_bad_cluster(img: Path, tmp_path: Path) -> Path:
    """``img`` as qcow2 whose L2 entry for a cluster in the middle of /big.bin points 1 TiB
    past the end of the file: reading that file's content fails (after its header)."""
    q = tmp_path / "disk.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, q)
    stat = _run("debugfs", "-R", "stat /big.bin", img)
    m = re.search(r"\(0-\d+\):(\d+)-(\d+)", stat)
    assert m, stat
    first, last = int(m.group(1)), int(m.group(2))
    with q.open("rb") as f:
        head = f.read(48)
    cluster = 1 << struct.unpack_from(">I", head, 20)[0]
    l1_off = struct.unpack_from(">Q", head, 40)[0]
    guest = -(-first * BS // cluster) * cluster + cluster
    assert guest + cluster <= (last + 1) * BS
    mapped = json.loads(_run("qemu-img", "map", "--output=json", q))
    assert any(r["start"] <= guest < r["start"] + r["length"] and r["data"] for r in mapped)
    per_l2 = cluster // 8
    index = guest // cluster
    with q.open("r+b") as f:
        f.seek(l1_off + 8 * (index // per_l2))
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * (index % per_l2))
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    return q


@pytest.mark.parametrize("items", [1, 2, 3])
def test_an_error_of_the_second_writer_is_raised_as_it_is(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, items: int
) -> None:
    # With batches of 1, 2 and 3 items, /big.bin falls in the second writer's batches in at
    # least one case; the error must be the one a single process raises, word for word.
    q = _qcow2_with_bad_cluster(image, tmp_path)
    monkeypatch.setattr(split, "BATCH_ITEMS", items)
    errors = []
    for workers in ("1", "2"):
        with pytest.raises(Ova2imgError) as caught:
            _convert(q, tmp_path / f"out{workers}.tar", workers, monkeypatch)
        errors.append((type(caught.value), str(caught.value)))
        assert not (tmp_path / f"out{workers}.tar").exists()
    assert errors[0] == errors[1]
    assert "disk" in errors[0][1]


def test_no_second_process_to_be_had_writes_alone(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _convert(image, tmp_path / "one.tar", "1", monkeypatch)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(split.os, "fork", no_fork)
    monkeypatch.setattr(split, "BATCH_ITEMS", 2)
    fds = len(os.listdir("/proc/self/fd"))
    _convert(image, tmp_path / "two.tar", "2", monkeypatch)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipe was closed


def test_second_writer_goes_on_while_the_pipe_is_full() -> None:
    # The first process reads a batch only after writing its own: the second hands finished
    # batches to its pipe thread and goes on (up to AHEAD waiting), then delivers all, in order.
    r, w = os.pipe()
    sink = split._FrameSink(w)
    pieces = [bytes([65 + i]) * (1 << 20) for i in range(split.AHEAD + 1)]

    def produce() -> None:
        for piece in pieces:
            sink.write(piece)
            sink.flush()  # nobody reads yet: the pipe (64 KiB-1 MiB) is full after the first

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=10)
    assert not producer.is_alive(), "the second writer waited for the pipe"
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(r)))
    reader.start()
    sink.close()
    os.close(w)
    reader.join(timeout=10)
    os.close(r)
    frames = []
    view = memoryview(bytes(received))
    while view:
        (length,) = split._FRAME.unpack(view[:4])
        frames.append(bytes(view[4 : 4 + length]))
        view = view[4 + length :]
    assert frames == pieces


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
