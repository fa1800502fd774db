"""The writer with a second process reading content and making headers
(:mod:`ova2img.sinks.split`) makes the very archive one process makes, and an error met by
the reader is raised by the writer, unchanged, where it belongs.

The pipeline's limits are made tiny here so that pieces read by either process, headers made
by either, the shared ring's wrap-around and the reader waiting for room all happen many
times over, with hardlinks, sparse files, xattrs and sockets on the way; the image is a real
``mke2fs -d`` ext4.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ova2img
from ova2img.errors import FilesystemError, Ova2imgError, SinkError
from ova2img.sinks import split
from ova2img.sinks.tar import TarWriter

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
        os.setxattr(sub / "f05", "user.note", b"n" * (40 + d))  # a PAX header
    with (stage / "d2" / "sparse").open("wb") as f:
        f.write(b"head")
        f.seek(300_000)
        f.write(b"tail")
    (stage / "big.bin").write_bytes(os.urandom(600_000))
    (stage / "bigger.bin").write_bytes(os.urandom(2_500_000))  # several pieces of CHUNK
    for d in (1, 4):  # sockets: tar skips them with a warning, whichever writer meets them
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(stage / f"d{d}" / "sock"))
    img = work / "fs.ext4"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BS), "-O", "^metadata_csum", "-d",
         stage, img, "16M")  # fmt: skip
    return img


#: pipeline limits (see ova2img.sinks.split)
LIMITS = {
    "defaults": {},
    "one-ahead": {"AHEAD_PIECES": 1},
    "few-bytes-ahead": {"AHEAD_PIECES": 5, "AHEAD_BYTES": 3000, "GROUP_ITEMS": 2},
    # a ring a group of 1 MiB (and its headers) just fits: it wraps and the reader waits for
    # room often
    "small-ring": {"RING_BYTES": split.GROUP_BYTES + (64 << 10), "AHEAD_BYTES": 4 << 20},
    "held-back": {"HELD_BYTES": 1000, "AHEAD_PIECES": 7, "XATTR_BYTES": 10},
    # every answer written from the ring by the output thread, which is slow (below): the
    # reader must wait for the thread's writes before it reuses their room
    "all-direct": {"DIRECT_BYTES": 1},
    "all-direct-small-ring": {
        "DIRECT_BYTES": 1,
        "RING_BYTES": split.GROUP_BYTES + (64 << 10),
        "QUEUED": 1,
    },
}


class _Counted:
    """Counts what the writer handed to the reader (pieces, headers) and what it did itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.handed = self.kept = 0
        for name in ("defer", "defer_header"):
            method = getattr(split.ContentPipeline, name)

            def counted(*args: object, _method: Any = method) -> bool:
                taken = bool(_method(*args))
                if taken:
                    self.handed += 1
                else:
                    self.kept += 1
                return taken

            monkeypatch.setattr(split.ContentPipeline, name, counted)


def _convert(
    src: Path, out: Path, workers: str, monkeypatch: pytest.MonkeyPatch
) -> ova2img.ConversionResult:
    monkeypatch.setenv("OVA2IMG_WORKERS", workers)
    return ova2img.convert(src, out)


@pytest.mark.parametrize("limits", list(LIMITS))
def test_two_processes_write_the_same_archive(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: str
) -> None:
    assert split.split_enabled(), "this machine has 2 CPUs and fork: the split must run"
    for name, value in LIMITS[limits].items():
        monkeypatch.setattr(split, name, value)
    one = _convert(image, tmp_path / "one.tar", "1", monkeypatch)
    if "DIRECT_BYTES" in LIMITS[limits]:
        emit_out = TarWriter.emit_out

        def slow(self: TarWriter, data: bytes | bytearray | memoryview) -> None:
            time.sleep(0.02 if "small-ring" in limits else 0.003)
            emit_out(self, data)

        monkeypatch.setattr(TarWriter, "emit_out", slow)
    counted = _Counted(monkeypatch)
    two = _convert(image, tmp_path / "two.tar", "2", monkeypatch)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert (one.entries, one.data_bytes, one.warnings) == (
        two.entries,
        two.data_bytes,
        two.warnings,
    )
    assert any("sock" in w for w in two.warnings)
    # the reader did its part (how much depends on timing) …
    assert counted.handed > 0
    if "AHEAD_PIECES" in LIMITS[limits]:
        assert counted.kept > 0  # … and with few answers ahead so did the writer
    # (with the small ring, the pieces handed over, over 3 MiB, went round it several times)


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


@pytest.mark.parametrize("limits", ["defaults", "one-ahead", "small-ring"])
def test_an_error_of_the_reader_is_raised_as_it_is(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: str
) -> None:
    # /big.bin's content fails to read, whichever process reads it; the error must be the one
    # a single process raises, word for word, and no output is left.
    q = _qcow2_with_bad_cluster(image, tmp_path)
    for name, value in LIMITS[limits].items():
        monkeypatch.setattr(split, name, value)
    errors = []
    for workers in ("1", "2"):
        with pytest.raises(Ova2imgError) as caught:
            _convert(q, tmp_path / f"out{workers}.tar", workers, monkeypatch)
        errors.append((type(caught.value), str(caught.value)))
        assert not (tmp_path / f"out{workers}.tar").exists()
    assert errors[0] == errors[1]
    assert "disk" in errors[0][1]


def test_the_reader_gone_is_one_error(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(*args: object) -> None:
        os._exit(3)

    monkeypatch.setattr(split, "_serve", dies)
    with pytest.raises(SinkError, match="reader process ended unexpectedly"):
        _convert(image, tmp_path / "out.tar", "2", monkeypatch)
    assert not (tmp_path / "out.tar").exists()


def test_an_earlier_failure_of_the_reader_comes_first(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer fails at an entry after /big.bin, while the reader's answer for /big.bin (an
    # error) is still on its way: the archive's order says which failure is reported.
    q = _qcow2_with_bad_cluster(image, tmp_path)
    walk = ova2img.Guest.walk

    def failing_walk(self: ova2img.Guest, *args: Any, **kwargs: Any) -> Any:
        for item in walk(self, *args, **kwargs):
            if item.path == b"d0":
                raise FilesystemError("made-up failure after /big.bin")
            yield item

    monkeypatch.setattr(ova2img.Guest, "walk", failing_walk)
    for workers in ("1", "2"):
        with pytest.raises(Ova2imgError) as caught:
            _convert(q, tmp_path / f"out{workers}.tar", workers, monkeypatch)
        assert "made-up" not in str(caught.value)
        assert "disk" in str(caught.value)


def test_no_second_process_to_be_had_writes_alone(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _convert(image, tmp_path / "one.tar", "1", monkeypatch)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(split.os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    _convert(image, tmp_path / "two.tar", "2", monkeypatch)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipe was closed


def test_answers_never_overwrite_what_the_writer_has_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader's side of the ring: answers go one after another, wrap to the start when one
    # does not fit at the end, and there is room only for what the writer has taken.
    monkeypatch.setattr(split, "RING_BYTES", 100)
    ring = mmap.mmap(-1, 100)
    r, w = os.pipe()
    answers = split._Answers(w, ring)
    try:
        assert answers.room(60, taken=0)
        answers.data((b"a" * 50, b"a" * 10), 60)
        assert not answers.room(50, taken=0)  # 40 left at the end, the start not taken
        assert not answers.room(50, taken=49)  # the answer's last 11 bytes are not taken
        assert answers.room(50, taken=50)  # its last 10, at 50..59, are past the new one
        answers.data((b"b" * 50,), 50)  # at the start: the 40 bytes at the end are skipped
        assert answers.written == 150
        assert ring[:50] == b"b" * 50 and ring[50:60] == b"a" * 10
        assert answers.room(10, taken=60)  # where the first answer was, 50..59
        assert not answers.room(51, taken=60)  # not at the end (50 left), nor at the start
        assert answers.room(100, taken=150)  # all taken: the whole ring
        answers.fail(FilesystemError("bad piece", obj="fs"))
        answers.flush()
        sent = os.read(r, 4096)
    finally:
        del answers  # its view of the ring, before the ring is closed
        os.close(r)
        os.close(w)
        ring.close()
    assert struct.unpack_from("<III", sent) == (60, 50, 0xFFFFFFFF)


def _told(fd: int) -> list[int]:
    """The ``taken`` of each message the writer sent on the request pipe so far."""
    import marshal

    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    told, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        told.append(marshal.loads(data[at + 4 : at + 4 + size])[0])
        at += 4 + size
    return told


def test_the_reader_reuses_no_room_the_output_thread_has_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The writer's side of the ring: a large answer goes to the output thread as it is, and
    # the reader is told its room is free only once the thread has written it (a small one
    # after it is copied, but its room is after the large one's).
    monkeypatch.setattr(split, "RING_BYTES", 1000)
    monkeypatch.setattr(split, "DIRECT_BYTES", 100)
    monkeypatch.setattr(split, "CHUNK", 100)  # what is gathered goes to the thread at once
    ring = mmap.mmap(-1, 1000)
    requests, answers = os.pipe(), os.pipe()
    gate = threading.Event()
    out: list[bytes] = []

    def emit(data: bytes | bytearray | memoryview) -> None:
        gate.wait(10)
        out.append(bytes(data))

    pipeline = split.ContentPipeline(emit, requests[1], answers[0], ring, {})
    try:
        assert pipeline.defer_header(bytearray(b"<"), (1,))
        pipeline.write(b"|")  # ends the group: two answers
        assert pipeline.defer_header(bytearray(), (2,))
        ring[:300] = b"L" * 300  # the reader's answers: 300 bytes, then 50
        ring[300:350] = b"s" * 50
        os.write(answers[1], struct.pack("<II", 300, 50))
        pipeline.drain()
        assert _told(requests[0])[-1] == 0  # the large answer is still being written
        gate.set()
        assert pipeline._output.wait_released(300, time.monotonic() + 10)
        pipeline.drain()  # (the writer's next look at the answers tells the reader)
        assert _told(requests[0])[-1] == 350
        pipeline.finish()
        assert b"".join(out) == b"<" + b"L" * 300 + b"|" + b"s" * 50
    finally:
        gate.set()
        pipeline.close()
        for fd in (requests[0], answers[1]):
            os.close(fd)
