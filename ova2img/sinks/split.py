"""Writing one tar archive with two processes: the second core at work, the output unchanged.

Converting is Python work per entry (stat, tar headers, reading and inflating the content) that
one process does one item at a time. :func:`write_tar_split` forks a second writer once the
guest is open. Both processes walk the same tree (each its own copy of the walk, as the fork
left it) and cut it into the same batches (by item count and content bytes, from metadata
alone); each writes the members of every other batch and only *accounts* for the others (the
hardlink table and the counts advance exactly as when writing, without reading any content).
The first process writes its batches to the output and, at the place of each of the second's
batches, copies that batch's bytes from a pipe. The archive is byte for byte the one a single
process writes.

The second process only reads the guest: every regular file it inherited is reopened
read-only with its own file offset (``/proc/self/fd``), so its reads never move the first's
offsets. A thread of its own writes its finished batches to the pipe while it goes on with the
next (at most :data:`AHEAD` buffers of :data:`BATCH_BUFFER` bytes wait), it ignores
SIGINT (the first process handles Ctrl-C), and ends when the first closes the pipe or exits.
An error it meets in one of its batches (a corrupt extent, a truncated grain) is raised again
by the first process, with the same class and message, where that batch begins in the archive.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gc
import logging
import os
import pickle
import queue
import signal
import stat
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from .. import errors as _errors
from ..errors import Ova2imgError, SinkError
from ..filesystems.base import EntryType

if TYPE_CHECKING:
    from ..assembly import TreeItem
    from .tar import TarStats, TarWriter

#: a batch ends after this many items …
BATCH_ITEMS = 512
#: … or this many bytes of file content, whichever comes first
BATCH_BYTES = 8 << 20
#: what the second process gathers before handing it to its pipe thread …
BATCH_BUFFER = 8 << 20
#: … which has at most this many such buffers waiting (memory: (AHEAD + 2) x BATCH_BUFFER)
AHEAD = 2
#: pipe capacity asked for (``F_SETPIPE_SZ``; Linux's default limit is 1 MiB)
PIPE_BYTES = 1 << 20

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux)
_FRAME = struct.Struct("<I")
_END = 0  # a frame of length 0 ends a batch
_ERROR = 0xFFFFFFFF  # then the pickled error


def split_enabled() -> bool:
    """Whether writing with two processes is possible and wanted here: Linux with ``fork``,
    two CPUs or more, and ``OVA2IMG_WORKERS`` not set to 1."""
    wanted = os.environ.get("OVA2IMG_WORKERS", "").strip()
    if wanted and wanted != "2":
        return False
    return (
        sys.platform == "linux"
        and hasattr(os, "fork")
        and (os.cpu_count() or 1) > 1
        # the second writer reopens its inherited files there (no /proc: write alone)
        and Path("/proc/self/fd").is_dir()
    )


class _Batches:
    """Cuts the item sequence into batches from metadata alone (both processes agree)."""

    def __init__(self) -> None:
        self.number = 0
        self._items = 0
        self._bytes = 0

    def next_item(self, item: TreeItem) -> bool:
        """Count *item*; ``True`` when it starts a new batch."""
        new = self._items >= BATCH_ITEMS or self._bytes >= BATCH_BYTES
        if new:
            self.number += 1
            self._items = self._bytes = 0
        self._items += 1
        if item.entry.type is EntryType.FILE:
            self._bytes += item.entry.size
        return new


def write_tar_split(
    items: Iterable[TreeItem],
    out: BinaryIO,
    make_writer: Callable[[BinaryIO], TarWriter],
    child_setup: Callable[[], None] | None = None,
) -> TarStats:
    """What :func:`~ova2img.sinks.tar.write_tar` does, with a second writer process.

    Args:
        items: the walk; iterated by both processes (a copy each).
        out: the output.
        make_writer: a :class:`TarWriter` on a given stream, with the caller's options.
        child_setup: run first in the second process (e.g. to silence progress callbacks
            that the walk itself calls).
    """
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a threaded process may deadlock the child: the
            # second writer runs only the walk and this module, and touches no lock another
            # thread (rich's refresh, the Docker upload) may hold: logging is cut off and
            # progress callbacks too.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no process to be had (a process limit, no memory): write alone
        os.close(read_fd)
        os.close(write_fd)
        return write_alone(items, make_writer(out))
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            _second(items, write_fd, make_writer, child_setup)
            code = 0
        finally:
            os._exit(code)  # never the first process's atexit handlers or buffers
    os.close(write_fd)
    pipe = os.fdopen(read_fd, "rb", buffering=PIPE_BYTES)
    try:
        return _first(items, out, make_writer, pipe)
    finally:
        pipe.close()
        _reap(pid)


def write_alone(items: Iterable[TreeItem], writer: TarWriter) -> TarStats:
    """Write every item with *writer*, then end the archive (abort it on any failure)."""
    try:
        for item in items:
            writer.add(item)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def _first(
    items: Iterable[TreeItem],
    out: BinaryIO,
    make_writer: Callable[[BinaryIO], TarWriter],
    pipe: BinaryIO,
) -> TarStats:
    writer = make_writer(out)
    batches = _Batches()
    try:
        for item in items:
            if batches.next_item(item) and batches.number % 2 == 0:
                _copy_batch(pipe, writer)  # the batch that just ended was the second's
            if batches.number % 2 == 0:
                writer.add(item)
            else:
                writer.account(item)
        if batches.number % 2 == 1:
            _copy_batch(pipe, writer)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def _copy_batch(pipe: BinaryIO, writer: TarWriter) -> None:
    """Copy one batch of the second process from the pipe to the output, after flushing ours."""
    writer.flush()
    while True:
        (length,) = _FRAME.unpack(_read(pipe, _FRAME.size))
        if length == _END:
            (size,) = _FRAME.unpack(_read(pipe, _FRAME.size))
            delta, warned = pickle.loads(_read(pipe, size))  # noqa: S301 - our child, our pipe
            writer.merge_stats(delta, warned)
            return
        if length == _ERROR:
            (size,) = _FRAME.unpack(_read(pipe, _FRAME.size))
            _raise(pickle.loads(_read(pipe, size)))  # noqa: S301 - our own child, our pipe
        writer.emit_raw(_read(pipe, length))


def _read(pipe: BinaryIO, n: int) -> bytes:
    data = pipe.read(n)
    if len(data) != n:
        raise SinkError("the second writer process ended unexpectedly")
    return data


def _raise(failure: tuple[str, str, int | None, str | None]) -> None:
    name, message, offset, obj = failure
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, Ova2imgError):
        raise cls(message, offset=offset, obj=obj)
    raise RuntimeError(f"the second writer process failed:\n{message}")


def _reap(pid: int) -> None:
    """Wait a moment for the second process (it ends at the end of the walk or of the pipe),
    then end it."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        time.sleep(0.002)


# -- the second process ------------------------------------------------------------------------


class _FrameSink:
    """The second writer's output: frames gathered into a buffer, handed at each batch's end
    (or at :data:`BATCH_BUFFER` bytes) to a thread that writes them to the pipe.

    The pipe holds 1 MiB and the first process takes a batch only when its own previous batch
    is written: writing in this thread would stop the second writer there, idle, for about
    a fifth of its time. The thread lets it go on with its next batch; at most
    :data:`AHEAD` buffers wait for the pipe, so memory stays bounded.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(maxsize=AHEAD)
        self._failed: OSError | None = None
        self._thread = threading.Thread(target=self._pump, name="ova2img-pipe", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not data:
            return 0  # a frame of length 0 would end the batch
        self._buf += _FRAME.pack(len(data))
        self._buf += data
        if len(self._buf) >= BATCH_BUFFER:
            self.flush()
        return len(data)

    def end_batch(self, stats: TarStats, before: TarStats) -> None:
        """End a batch: its counts (what *stats* gained since *before*) and warnings follow."""
        delta = {
            name: getattr(stats, name) - getattr(before, name)
            for name in stats.__slots__
            if name != "warnings"
        }
        warned = stats.warnings[len(before.warnings) :]
        payload = pickle.dumps((delta, warned), protocol=pickle.HIGHEST_PROTOCOL)
        self._buf += _FRAME.pack(_END) + _FRAME.pack(len(payload)) + payload
        self.flush()

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, Ova2imgError):
            failure = (type(exc).__name__, exc.message, exc.offset, exc.obj)
        else:
            failure = ("", "".join(traceback.format_exception(exc)).rstrip(), None, None)
        payload = pickle.dumps(failure, protocol=pickle.HIGHEST_PROTOCOL)
        self._buf += _FRAME.pack(_ERROR) + _FRAME.pack(len(payload)) + payload
        self.flush()

    def flush(self) -> None:
        """Hand what is gathered to the pipe thread (waits while :data:`AHEAD` buffers do)."""
        if self._failed is not None:
            raise self._failed
        if self._buf:
            self._queue.put(self._buf)
            self._buf = bytearray()

    def close(self) -> None:
        """Wait until everything handed over is in the pipe."""
        self._queue.put(None)
        self._thread.join()
        if self._failed is not None:
            raise self._failed

    def _pump(self) -> None:
        while (buf := self._queue.get()) is not None:
            if self._failed is not None:
                continue  # keep taking buffers, so that flush() never waits forever
            try:
                view = memoryview(buf)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:  # EPIPE ends the process (SIGPIPE): something stranger
                self._failed = exc


def _second(
    items: Iterable[TreeItem],
    fd: int,
    make_writer: Callable[[BinaryIO], TarWriter],
    child_setup: Callable[[], None] | None,
) -> None:
    gc.freeze()  # nothing inherited is finalised here (a temporary file object could unlink)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the first process is gone: end quietly
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers = [logging.NullHandler()]
            logger.propagate = False
    if child_setup is not None:
        child_setup()
    sink = _FrameSink(fd)
    try:
        _reopen_files()
    except BaseException as exc:  # the first process raises it where our first batch begins
        with contextlib.suppress(OSError):
            sink.fail(exc)
            sink.close()
        return
    writer = make_writer(cast(BinaryIO, sink))
    writer.quiet()
    batches = _Batches()
    before = copy.deepcopy(writer.stats)
    try:
        for item in items:
            if batches.next_item(item):
                if batches.number % 2 == 0:  # ours just ended
                    writer.flush()
                    sink.end_batch(writer.stats, before)
                else:
                    before = copy.deepcopy(writer.stats)
            if batches.number % 2 == 1:
                writer.add(item)
            else:
                writer.account(item)
        if batches.number % 2 == 1:
            writer.flush()
            sink.end_batch(writer.stats, before)
    except BaseException as exc:  # the first process raises it where this batch begins
        with contextlib.suppress(OSError):
            sink.fail(exc)
    finally:
        with contextlib.suppress(OSError):
            sink.close()  # before os._exit(): the pipe thread may still be writing


def _reopen_files() -> None:
    """Give every inherited regular file (but stdin/out/err) its own offset, read-only."""
    for entry in Path("/proc/self/fd").iterdir():
        fd = int(entry.name)
        if fd < 3:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.dup2(new, fd, inheritable=os.get_inheritable(fd))
        finally:
            os.close(new)


__all__ = ["BATCH_BYTES", "BATCH_ITEMS", "split_enabled", "write_alone", "write_tar_split"]
