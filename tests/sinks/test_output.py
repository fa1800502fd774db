"""Output handling: atomic files, reproducible compression, stdout that is cut on failure."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tar_support import probe_fs

from ova2img.assembly import TreeItem
from ova2img.errors import SinkError
from ova2img.sinks import output as outmod
from ova2img.sinks.output import open_output
from ova2img.sinks.tar import FAILED_NAME, RECORD, write_tar

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".ova2img-" in p.name)


def failing_items(after: int, exc: BaseException) -> Iterator[TreeItem]:
    for n, item in enumerate(probe_fs().walk()):
        if n == after:
            raise exc
        yield item


def plain_tar() -> bytes:
    out = io.BytesIO()
    write_tar(probe_fs().walk(), out)
    return out.getvalue()


def test_file_is_written_under_a_temporary_name_then_renamed(tmp_path: Path) -> None:
    target = tmp_path / "rootfs.tar"
    old_umask = os.umask(0o022)
    try:
        with open_output(str(target)) as out:
            write_tar(probe_fs().walk(), out)
            # while writing, only the temporary file exists, beside the target
            assert not target.exists()
            (tmp,) = leftovers(tmp_path)
            assert tmp.startswith(".rootfs.tar.ova2img-") and tmp.endswith(".part")
    finally:
        os.umask(old_umask)
    assert leftovers(tmp_path) == []
    assert target.read_bytes() == plain_tar()
    assert target.stat().st_mode & 0o777 == 0o644  # 0666 minus the umask, like any new file


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["rootfs.tar", "rootfs.tar.gz", "rootfs.tar.zst"])
def test_failure_leaves_no_output_and_no_temporary(
    tmp_path: Path, exc: BaseException, name: str
) -> None:
    target = tmp_path / name
    with pytest.raises(type(exc)), open_output(str(target)) as out:
        write_tar(failing_items(40, exc), out)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "rootfs.tar"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), open_output(str(target)) as out:
        write_tar(failing_items(40, RuntimeError()), out)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []
    with open_output(str(target)) as out:  # and success replaces it
        out.write(b"new")
    assert target.read_bytes() == b"new"


def test_gzip_is_reproducible(tmp_path: Path) -> None:
    one, two = tmp_path / "one.tar.gz", tmp_path / "two.tar.gz"
    for target in (one, two):
        with open_output(str(target)) as out:
            write_tar(probe_fs().walk(), out)
    data = one.read_bytes()
    assert data == two.read_bytes()
    # RFC 1952 header: deflate, no flags (no FNAME), MTIME 0, OS 255
    assert data[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    assert gzip.decompress(data) == plain_tar()
    assert subprocess.run(["gzip", "-t", one]).returncode == 0
    res = subprocess.run(["tar", "-tzf", one], capture_output=True)
    assert res.returncode == 0 and res.stderr == b""


def test_zstd(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    target = tmp_path / "rootfs.tar.zst"
    with open_output(str(target)) as out:
        write_tar(probe_fs().walk(), out)
    with zstandard.ZstdDecompressor().stream_reader(target.open("rb")) as reader:
        assert reader.read() == plain_tar()
    again = tmp_path / "again.tar.zst"
    with open_output(str(again)) as out:
        write_tar(probe_fs().walk(), out)
    assert again.read_bytes() == target.read_bytes()


def test_zstd_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(SinkError, match="'zstandard' module is not installed"):  # noqa: SIM117
        with open_output(str(tmp_path / "x.tar.zst")):
            pytest.fail("must not get here")
    assert list(tmp_path.iterdir()) == []


def test_compression_by_suffix_and_override(tmp_path: Path) -> None:
    # GNU tar's -a list, in any case: a name that says compressed gets compressed
    assert outmod.compression_for("a.tar.gz") == "gz"
    assert outmod.compression_for("a.tgz") == outmod.compression_for("A.TAR.GZ") == "gz"
    assert outmod.compression_for("a.tar.zst") == "zst"
    assert outmod.compression_for("a.tar.xz") == outmod.compression_for("a.txz") == "xz"
    assert outmod.compression_for("a.tar.bz2") == outmod.compression_for("a.tbz2") == "bz2"
    assert outmod.compression_for("a.tar") == "none"
    for name, opener in (("x.tar.xz", "lzma"), ("x.tar.bz2", "bz2")):
        with open_output(str(tmp_path / name)) as out:
            out.write(b"payload" * 100)
        module = __import__(opener)
        assert module.decompress((tmp_path / name).read_bytes()) == b"payload" * 100
    target = tmp_path / "plain.gz"
    with open_output(str(target), compression="none") as out:
        out.write(b"x")
    assert target.read_bytes() == b"x"


def test_refuses_directories_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="is a directory"), open_output(str(tmp_path)):
        pass
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    for path in (fifo, link):
        with pytest.raises(SinkError, match="not a regular file"), open_output(str(path)):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link"]
    assert not (tmp_path / "elsewhere").exists()


def test_missing_directory(tmp_path: Path) -> None:
    with (
        pytest.raises(SinkError, match="cannot create a file in"),
        open_output(str(tmp_path / "nope" / "x.tar")),
    ):
        pass


def test_enospc_is_one_line(tmp_path: Path) -> None:
    with open("/dev/full", "wb", buffering=0) as full:  # noqa: SIM117
        with pytest.raises(SinkError) as info, open_output("-", stdout=full) as out:  # type: ignore[arg-type]
            write_tar(probe_fs().walk(), out)
    assert str(info.value) == "output: cannot write stdout: no space left on the device"


def test_stdout_success_and_gzip_trailer_only_on_success() -> None:
    sink = io.BytesIO()
    with open_output("-", stdout=sink) as out:
        write_tar(probe_fs().walk(), out)
    assert sink.getvalue() == plain_tar()

    sink = io.BytesIO()
    with pytest.raises(RuntimeError), open_output("-", stdout=sink, compression="gz") as out:
        write_tar(failing_items(40, RuntimeError()), out)
    with pytest.raises(EOFError):  # no gzip trailer
        gzip.decompress(sink.getvalue())


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{here!r}, {root!r}]
    from test_tar_support import probe_fs
    from ova2img.errors import Ova2imgError
    from ova2img.sinks.output import open_output
    from ova2img.sinks.tar import write_tar

    def items(fail_at):
        for n, item in enumerate(probe_fs().walk()):
            if n == fail_at:
                raise RuntimeError("source broke")
            yield item

    try:
        with open_output("-") as out:
            write_tar(items(int(sys.argv[1])), out)
    except Ova2imgError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    except RuntimeError:
        sys.exit(1)
    """
)


def run_script(fail_at: int, **kw: object) -> subprocess.CompletedProcess[bytes]:
    code = SCRIPT.format(here=str(HERE), root=str(ROOT))
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, str(fail_at)], capture_output=True, **kw
    )


class Trickle(io.RawIOBase):
    """A raw stream that takes at most 1000 bytes per write, like a pipe under -u."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        piece = bytes(b[:1000])
        self.data += piece
        return len(piece)


@pytest.mark.parametrize("compression", ["none", "gz"])
def test_short_writes_are_completed(compression: str) -> None:
    sink = Trickle()
    with open_output("-", stdout=sink, compression=compression) as out:  # type: ignore[arg-type]
        write_tar(probe_fs().walk(), out)
    data = bytes(sink.data)
    assert (gzip.decompress(data) if compression == "gz" else data) == plain_tar()
    sink = Trickle()
    write_tar(probe_fs().walk(), sink)  # type: ignore[arg-type]
    assert bytes(sink.data) == plain_tar()


@pytest.mark.parametrize("fail_at", [10, 55])
def test_stdout_is_cut_on_failure(fail_at: int) -> None:
    """What a consumer of the pipe (``docker import -``) gets when the conversion fails."""
    whole = run_script(-1)
    assert whole.returncode == 0 and whole.stderr == b""
    assert whole.stdout == plain_tar()
    res = run_script(fail_at)
    assert res.returncode == 1
    data = res.stdout
    assert len(data) < len(whole.stdout)
    assert whole.stdout.startswith(data[:-512])
    # no end-of-archive blocks, no record padding: a member that announces data and stops
    assert data[-512:][:100].rstrip(b"\0") == FAILED_NAME
    assert len(data) % RECORD != 0 or data[-1024:] != bytes(1024)
    tar = subprocess.run(["tar", "-tf", "-"], input=data, capture_output=True)
    assert tar.returncode == 2 and b"Unexpected EOF in archive" in tar.stderr
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for member in tf:
            fh = tf.extractfile(member)
            if fh is not None:
                with fh:
                    fh.read()


@pytest.mark.parametrize("unbuffered", ["0", "1"])
def test_stdout_broken_pipe_is_one_line(unbuffered: str) -> None:
    code = SCRIPT.format(here=str(HERE), root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered == "1":
        env["PYTHONUNBUFFERED"] = "1"  # sys.stdout.buffer is then a raw FileIO
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait() == 1
    assert err == b"output: cannot write stdout: the reader went away (broken pipe)\n"


def test_writeback_is_started_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel is asked to start writing each step's pages while the conversion goes on, so
    # the fsync before the rename has little left (a GiB tarball: ~1 s less here).
    calls: list[tuple[int, int]] = []
    real = outmod._writeback_starter()
    assert real is not None  # Linux: sync_file_range is in libc

    def recording(fd: int, begin: int, end: int) -> None:
        calls.append((begin, end))
        real(fd, begin, end)  # the real call on the real file: accepted

    monkeypatch.setattr(outmod, "_writeback_starter", lambda: recording)
    monkeypatch.setattr(outmod, "WRITEBACK_STEP", 1 << 20)
    target = tmp_path / "out.tar"
    with open_output(str(target)) as out:
        for _ in range(10):
            out.write(bytes(300 << 10))
    assert target.stat().st_size == 3000 << 10
    # contiguous ranges, each at least one step, up to the last full step
    assert calls == [(0, 1200 << 10), (1200 << 10, 2400 << 10)]


def test_no_writeback_hint_for_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outmod, "WRITEBACK_STEP", 1)
    monkeypatch.setattr(
        outmod, "_writeback_starter", lambda: pytest.fail("stdout got a writeback hint")
    )
    sink = io.BytesIO()
    with open_output("-", stdout=sink) as out:
        out.write(b"x" * 4096)
    assert sink.getvalue() == b"x" * 4096


@pytest.mark.parametrize("name", ["r" * 251 + ".tar", "é" * 125 + "x.tar"])
def test_a_name_as_long_as_the_filesystem_allows(tmp_path: Path, name: str) -> None:
    # 255 bytes (NAME_MAX): the temporary name beside it is cut short to fit, not refused
    # (in UTF-8 too: "é" is two bytes, cut anywhere)
    assert len(os.fsencode(name)) == 255
    target = tmp_path / name
    with open_output(str(target)) as out:
        write_tar(probe_fs().walk(), out)
        (tmp,) = leftovers(tmp_path)
        assert len(os.fsencode(tmp)) <= 255
    assert leftovers(tmp_path) == []
    assert target.read_bytes() == plain_tar()
