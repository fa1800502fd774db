"""Where a tarball goes: a file written atomically, optionally compressed, or stdout.

:func:`open_output` hands out a write-only stream and decides, when the ``with`` block ends,
whether what was written becomes the output:

* a path is written under a temporary name in the same directory
  (``.NAME.ova2img-XXXXXXXX.part``) and renamed over NAME only when the block ends without an
  exception; on any exception (``KeyboardInterrupt`` included) the temporary file is removed,
  so no partial output is ever left behind. ``SIGINT``/``SIGTERM`` are held back while the
  file is committed or removed (``pthread_sigmask``): an interrupt that arrived before the
  rename cancels it, and a second Ctrl-C cannot cut the clean-up short;
* a name ending in ``.gz`` (or ``.tgz``) is gzip-compressed (RFC 1952) with MTIME 0, no FNAME
  and OS 255, so the same tar gives the same bytes; ``.zst`` is Zstandard (the optional
  ``zstandard`` module), ``.xz`` and ``.bz2`` the standard library's lzma and bz2 (endings
  compared in any case, GNU tar's ``-a`` list); the compression trailer is written only on
  success; replacing an existing file keeps its mode;
* ``-`` is stdout: nothing can be taken back, so on failure the stream is cut — no
  end-of-archive blocks, no compression trailer, and :func:`~ova2img.sinks.tar.write_tar`
  ends it inside a member (a bare cut at a member boundary is accepted silently by GNU tar,
  CPython's tarfile and ``docker import``), so a reader such as ``docker import -`` fails
  instead of importing a truncated tree.

Write errors (``ENOSPC``, ``EPIPE``, …) become a one-line :class:`~ova2img.errors.SinkError`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import select
import signal
import stat
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, cast

from ..errors import SinkError

Compression = Literal["none", "gz", "zst", "xz", "bz2"]

#: gzip level: GNU gzip's default (9 costs twice the time for ~1 % on a rootfs).
GZIP_LEVEL = 6
#: zstd level: the zstd CLI's default.
ZSTD_LEVEL = 3
#: a file output asks the kernel to start writing back every this many bytes (see
#: :func:`_writeback_starter`), so the ``fsync`` before the rename finds little left to do
WRITEBACK_STEP = 32 << 20


class _Codec(Protocol):
    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...

    def finish(self) -> bytes: ...


class _Gzip:
    """A gzip member written by hand, so every header byte is fixed (RFC 1952 §2.3):
    no FNAME, MTIME 0, XFL 0, OS 255 (unknown) — as ``gzip -n`` does except for OS."""

    HEADER = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x00\xff"

    def __init__(self, level: int = GZIP_LEVEL) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
        self._crc = 0
        self._size = 0
        self._started = False

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._z.compress(data)
        if not self._started:
            self._started = True
            return self.HEADER + out
        return out

    def finish(self) -> bytes:
        head = b"" if self._started else self.HEADER
        self._started = True
        tail = struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)
        return head + self._z.flush() + tail


class _Zstd:
    """One Zstandard frame with a checksum (no content size: it is not known in advance)."""

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        try:
            import zstandard
        except ImportError as exc:
            raise SinkError(
                "cannot write .zst: the 'zstandard' module is not installed "
                "(pip install 'ova2img[zstd]', or use .gz)"
            ) from exc
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._z = cctx.compressobj()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(self._z.compress(bytes(data)))

    def finish(self) -> bytes:
        return bytes(self._z.flush())


class OutputStream(io.RawIOBase):
    """The write-only stream :func:`open_output` yields.

    It compresses (if asked) and writes to the underlying file; write errors become
    :class:`SinkError`. ``close`` only stops further writes: committing or discarding is the
    context manager's job.
    """

    def __init__(
        self,
        raw: BinaryIO,
        label: str,
        codec: _Codec | None,
        writeback: Callable[[int, int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._codec = codec
        self.name = label
        #: bytes handed to :meth:`write` (before compression)
        self.bytes_in = 0
        #: bytes written to the file or stdout (after compression)
        self.bytes_out = 0
        self._writeback = writeback
        self._written_back = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed output")
        n = len(data)
        self.bytes_in += n
        self._put(self._codec.compress(data) if self._codec is not None else data)
        return n

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        try:
            write_all(self._raw, data)
        except OSError as exc:
            raise write_error(self.name, exc) from exc
        self.bytes_out += len(data)
        if self._writeback is not None and self.bytes_out - self._written_back >= WRITEBACK_STEP:
            self._writeback(self._raw.fileno(), self._written_back, self.bytes_out)
            self._written_back = self.bytes_out

    def _commit(self) -> None:
        """Write the compression trailer and flush (success only)."""
        if self._codec is not None:
            self._put(self._codec.finish())
        try:
            self._raw.flush()
        except OSError as exc:
            raise write_error(self.name, exc) from exc


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """``start(fd, begin, end)``: ask Linux to start writing the dirty pages of a byte range
    to disk, without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, through libc; the
    os module has no binding). A tarball of gigabytes would otherwise sit in the page cache
    until the ``fsync`` before the rename wrote it all at once, a second or more per GiB of
    nothing else happening. ``None`` where there is no such call (only a hint: nothing else
    depends on it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    sync_file_range_write = 2  # SYNC_FILE_RANGE_WRITE (<linux/fs.h>)

    def start(fd: int, begin: int, end: int) -> None:
        call(fd, begin, end - begin, sync_file_range_write)  # a failure only loses the hint

    return start


def write_all(raw: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write all of *data*: an unbuffered stream (``sys.stdout.buffer`` is a raw ``FileIO``
    under ``python -u``/``PYTHONUNBUFFERED``) returns short counts on pipes, and ``None`` when
    it is non-blocking and full."""
    view = memoryview(data).cast("B")
    while view:
        n = raw.write(view)
        if n is None:  # non-blocking file descriptor: wait until it can take more
            select.select([], [raw.fileno()], [])
            continue
        if n >= len(view):
            return
        view = view[n:]


def write_error(label: str, exc: OSError) -> SinkError:
    """The one-line error for a failed write to *label* (EPIPE and ENOSPC in plain words)."""
    if exc.errno == errno.EPIPE:
        return SinkError(f"cannot write {label}: the reader went away (broken pipe)")
    if exc.errno == errno.ENOSPC:
        return SinkError(f"cannot write {label}: no space left on the device")
    return SinkError(f"cannot write {label}: {exc.strerror or exc}")


#: name endings (compared in lower case) and the compression they ask for, as GNU tar's -a
_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".gz", "gz"),
    (".tgz", "gz"),
    (".taz", "gz"),
    (".zst", "zst"),
    (".tzst", "zst"),
    (".xz", "xz"),
    (".txz", "xz"),
    (".bz2", "bz2"),
    (".tbz", "bz2"),
    (".tbz2", "bz2"),
)


def compression_for(path: str) -> Compression:
    """The compression a name asks for, whatever its case: ``.gz``/``.tgz`` → gzip,
    ``.zst``/``.tzst`` → zstd, ``.xz``/``.txz`` → xz, ``.bz2``/``.tbz2``/``.tbz`` → bzip2,
    else none."""
    lower = path.lower()
    for suffix, kind in _SUFFIXES:
        if lower.endswith(suffix):
            return kind
    return "none"


class _Xz:
    """One .xz stream (the standard library's lzma, preset 6 as xz's default, CRC64)."""

    def __init__(self) -> None:
        import lzma

        self._z = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._z.compress(data)

    def finish(self) -> bytes:
        return self._z.flush()


class _Bz2:
    """One .bz2 stream (the standard library's bz2, level 9 as bzip2's default)."""

    def __init__(self) -> None:
        import bz2

        self._z = bz2.BZ2Compressor(9)

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._z.compress(data)

    def finish(self) -> bytes:
        return self._z.flush()


def _codec(kind: Compression) -> _Codec | None:
    if kind == "gz":
        return _Gzip()
    if kind == "zst":
        return _Zstd()
    if kind == "xz":
        return _Xz()
    if kind == "bz2":
        return _Bz2()
    return None


@contextlib.contextmanager
def open_output(
    path: str,
    *,
    compression: Compression | None = None,
    stdout: BinaryIO | None = None,
) -> Iterator[BinaryIO]:
    """Open *path* (or ``-``, stdout) for writing a tarball; commit only on success.

    Args:
        path: the output file, or ``-`` for stdout.
        compression: ``"gz"``, ``"zst"`` or ``"none"``; default: from the name's suffix
            (stdout: none).
        stdout: the stream ``-`` stands for (default ``sys.stdout.buffer``).

    Yields:
        A write-only binary stream.

    Raises:
        SinkError: the path is a directory or not a regular file, its directory is not
            writable, a write failed, or ``.zst`` was asked without ``zstandard``.
    """
    kind: Compression = compression or (compression_for(path) if path != "-" else "none")
    if path == "-":
        with _open_stdout(stdout, kind) as stream:
            yield stream
        return
    with _open_file(path, kind) as stream:
        yield stream


@contextlib.contextmanager
def _open_stdout(stdout: BinaryIO | None, kind: Compression) -> Iterator[BinaryIO]:
    if stdout is None:
        if sys.stdout is None:  # started with fd 1 closed (`>&-`)
            raise SinkError("cannot write to stdout: it is closed")
        raw = sys.stdout.buffer
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if raw.isatty():
                # as gzip and zstd do: a tarball is no reading for a terminal
                raise SinkError(
                    "refusing to write a tarball to a terminal: redirect stdout, or use -o FILE"
                )
    else:
        raw = stdout
    stream = OutputStream(raw, "stdout", _codec(kind))
    try:
        yield cast(BinaryIO, stream)  # a RawIOBase that does BinaryIO's write
        stream._commit()
    except SinkError as exc:
        if stdout is None and isinstance(exc.__cause__, BrokenPipeError):
            # The reader is gone: point fd 1 at /dev/null so the interpreter's final flush
            # of sys.stdout does not print a second BrokenPipeError (Python docs, "Note on
            # SIGPIPE").
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise
    finally:
        # On failure the stream is cut here: no trailer, no end-of-archive blocks.
        stream.close()


@contextlib.contextmanager
def _open_file(path: str, kind: Compression) -> Iterator[BinaryIO]:
    st: os.stat_result | None = None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SinkError(f"cannot use {path} as output: {exc.strerror}") from exc
    else:
        # Replace only a regular file: never a directory, nor what a symlink, a device or a
        # FIFO leads to (as root, renaming over /dev/null would be a disaster).
        if stat.S_ISDIR(st.st_mode):
            raise SinkError(f"cannot write {path}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise SinkError(
                f"cannot write {path}: it exists and is not a regular file "
                "(use '-o -' to write to a pipe or device)"
            )
    target = Path(path).absolute()
    codec = _codec(kind)  # before creating anything: a missing zstandard fails cleanly
    fd, tmp = _create_temp(target.parent, target.name)
    if st is not None:
        # Replacing a file keeps its mode (and, as root, its owner), as writing into it would:
        # a 0600 rootfs tarball holding /etc/shadow must not come back 0644.
        with contextlib.suppress(OSError):
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
    raw = os.fdopen(fd, "wb", buffering=0)
    stream = OutputStream(raw, path, codec, _writeback_starter())
    committed = False
    try:
        yield cast(BinaryIO, stream)
        stream._commit()
        try:
            os.fsync(raw.fileno())
        except OSError as exc:
            raise write_error(path, exc) from exc
        raw.close()
        for attempt in range(3):
            with _interrupts_held() as pending:
                if pending() and attempt < 2:
                    # Interrupted while finishing: no rename yet. Leaving the block lets the
                    # handler run (KeyboardInterrupt: the file is discarded below); if it
                    # returns instead, the commit goes on.
                    continue
                try:
                    tmp.replace(target)
                except OSError as exc:
                    raise SinkError(f"cannot rename {tmp} to {path}: {exc.strerror}") from exc
                committed = True
                break
    finally:
        with _interrupts_held():
            stream.close()
            raw.close()
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


_INTERRUPTS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def _interrupts_held() -> Iterator[Callable[[], bool]]:
    """Hold ``SIGINT`` and ``SIGTERM`` back (``pthread_sigmask``) for the block; they are
    delivered — their handlers run, ``KeyboardInterrupt`` is raised — when it ends. Yields a
    function telling whether one is pending that a Python handler will act on. Outside the
    main thread (where Python runs no handler) or where masks are not available, nothing is
    held."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        yield lambda: False
        return
    # Only what a Python handler will turn into an exception counts: not a signal the caller
    # blocked itself, nor one ignored or left to its default action.
    handled = {s for s in _INTERRUPTS if s not in old and callable(signal.getsignal(s))}
    try:
        yield lambda: bool(handled & signal.sigpending())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_NAME_MAX = 255  # bytes of a file name (Linux filesystems)


def _create_temp(directory: Path, base: str) -> tuple[int, Path]:
    """Create ``.BASE.ova2img-XXXXXXXX.part`` in *directory* (BASE cut short when the name
    would be too long), exclusively; mode 0666 minus the umask, like any new file (``mkstemp``
    would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    # the name's bytes, cut so that the temporary name fits NAME_MAX as the output's does
    head = os.fsencode(base)[: _NAME_MAX - len(".ova2img-01234567.part") - 1]
    for _ in range(100):
        tmp = directory / os.fsdecode(
            b"." + head + f".ova2img-{secrets.token_hex(4)}.part".encode()
        )
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise SinkError(f"cannot create a file in {directory}: {exc.strerror}") from exc
    raise SinkError(f"cannot create a temporary file in {directory}")  # pragma: no cover


__all__ = [
    "Compression",
    "OutputStream",
    "compression_for",
    "open_output",
    "write_all",
    "write_error",
]
