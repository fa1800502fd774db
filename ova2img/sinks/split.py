"""Writing one tar archive with two processes: the second core reads file content, the output
is unchanged.

Converting is Python work per entry (walking the tree, decoding inodes, making tar headers)
and disk work per byte (reading extents, inflating VMDK grains). :func:`write_tar_split` forks
a second process, the *reader*, once the guest is open. The first process walks the tree and
writes the whole archive, as one process would; for the content of a file whose data is plain
stored bytes (:meth:`~ova2img.filesystems.base.Filesystem.content_pieces`) it may, instead of
reading a piece itself, ask the reader for it by ``(filesystem, token, offset, length)``: the
reader holds the same filesystem objects (inherited at the fork), reads the piece and sends it
back. The writer goes on with the next entries meanwhile, and puts each piece at its place in
the archive when it arrives: the archive is byte for byte the one a single process writes.

Nothing is done twice: the tree is walked once, each piece is read once. The writer balances
the work itself: it asks the reader for pieces while fewer than :data:`AHEAD_BYTES` bytes (or
:data:`AHEAD_PIECES` pieces) are on their way, and reads the next piece itself otherwise, so
small files (the walk is most of the work) and large ones (reading is) both keep the two cores
busy. Its own bytes wait behind a missing piece (at most :data:`HELD_BYTES` of them).

The reader also makes tar headers (the writer sends a member's fields; a header with PAX
records costs more than sending them), and for a small file the whole member: header, content
and padding. Requests with nothing of the writer's between them (a directory of small files)
form a group with one answer. The answers' bytes go into memory the two processes share (a
ring of :data:`RING_BYTES`; copying is not free on a small VM), and only their lengths through
a pipe; the writer tells the reader, with its next requests, how far it has taken them, and the
reader never overwrites what the writer has not taken. The writer's output is written by a
thread of its own; an answer of :data:`DIRECT_BYTES` or more is not copied out of the ring
first, the thread writes it from there, and its room counts as taken only once written.

The reader only reads the guest: every regular file it inherited is reopened read-only with
its own file offset (``/proc/self/fd``), so its reads never move the writer's offsets. It
ignores SIGINT (the writer handles Ctrl-C), and ends when the writer closes its end of the
request pipe or exits. An error it meets reading a piece (a corrupt extent, a truncated
grain) is sent back instead of the piece, and the writer raises it, with the same class and
message, where that piece belongs in the archive: a failure that comes earlier in the
archive's order is the one raised.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import logging
import marshal
import mmap
import os
import pickle
import queue
import select
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
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from .. import errors as _errors
from ..errors import Ova2imgError, SinkError
from ..filesystems.base import Filesystem, live_filesystems

if TYPE_CHECKING:
    from ..assembly import TreeItem
    from .tar import TarStats, TarWriter

#: the writer asks the reader for pieces while fewer than this many bytes of them …
AHEAD_BYTES = 4 << 20
#: … and fewer than this many requests (twice as many for pieces alone) are on their way;
#: else it does the next one itself
AHEAD_PIECES = 512
#: the writer's own bytes waiting behind a piece still on its way (then it waits for it)
HELD_BYTES = 32 << 20
#: requests with nothing of the writer's between them are answered together, this many …
GROUP_ITEMS = 16
#: … or about this many bytes of content
GROUP_BYTES = 1 << 20
#: output gathered before a write
CHUNK = 1 << 20
#: writes waiting for the writer's output thread (memory: QUEUED x CHUNK)
QUEUED = 4
#: while the reader is behind, the writer looks for its answers every this many requests …
BUSY_TRIES = 8
#: … or right away before it reads a piece this large itself (a look costs far less)
BUSY_BYTES = 64 << 10
#: the memory shared by the two processes, where the reader puts its answers' bytes (a ring)
RING_BYTES = 16 << 20
#: answers this large go from the ring to the output as they are (the output's thread writes
#: them, and the reader may reuse their room once written) instead of being copied first
DIRECT_BYTES = 64 << 10
#: the reader tells the writer what it answered at least every this many bytes
ANSWERED_BYTES = 64 << 10
#: headers with more extended attributes than this are made by the writer (answers must fit
#: the ring with room to spare)
XATTR_BYTES = 64 << 10
#: how long a failed conversion waits for its output to take the end of the archive
ABORT_WAIT = 10.0
#: what one read of a pipe takes at most (its messages are small; a large buffer costs)
READ_BYTES = 64 << 10
#: pipe capacity asked for (``F_SETPIPE_SZ``; Linux's default limit is 1 MiB)
PIPE_BYTES = 1 << 20

_BLOCK = 512  # a tar block
_ZEROS = bytes(_BLOCK)
_FileRequest = tuple[tuple[object, ...], int, int, int, int]
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux)
_FRAME = struct.Struct("<I")
_LENGTH = _FRAME.unpack_from
_ERROR = 0xFFFFFFFF  # a frame of this length is an error: its pickled description follows


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
        # the reader reopens its inherited files there (no /proc: write alone)
        and Path("/proc/self/fd").is_dir()
    )


def write_tar_split(
    items: Iterable[TreeItem],
    out: BinaryIO,
    make_writer: Callable[[BinaryIO], TarWriter],
    build_header: Callable[..., bytes | bytearray],
) -> TarStats:
    """What :func:`~ova2img.sinks.tar.write_tar` does, with a second process reading content
    and making headers.

    Args:
        items: the walk (iterated by this process only).
        out: the output.
        make_writer: a :class:`TarWriter` on a given stream, with the caller's options.
        build_header: what makes a member's header from its fields
            (:func:`~ova2img.sinks.tar.member_bytes`).
    """
    # What the reader may be asked to read from: the filesystems alive now, which it inherits.
    readers = live_filesystems()
    try:
        ring = mmap.mmap(-1, RING_BYTES)  # anonymous and shared: the reader inherits it
    except OSError:  # no memory to be had for it: write alone
        return write_alone(items, make_writer(out))
    requests = os.pipe()
    answers = os.pipe()
    for fd in (requests[1], answers[1]):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a threaded process may deadlock the child: the
            # reader runs only this module and the filesystems' read paths, and touches no lock
            # another thread (rich's refresh, the Docker upload) may hold: logging is cut off.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no process to be had (a process limit, no memory): write alone
        for fd in (*requests, *answers):
            os.close(fd)
        ring.close()
        return write_alone(items, make_writer(out))
    if pid == 0:
        code = 1
        try:
            os.close(requests[1])
            os.close(answers[0])
            _serve(requests[0], answers[1], ring, readers, build_header)
            code = 0
        finally:
            os._exit(code)  # never the first process's atexit handlers or buffers
    os.close(requests[0])
    os.close(answers[1])
    writer = make_writer(out)
    try:
        pipeline = ContentPipeline(writer.emit_out, requests[1], answers[0], ring, readers)
    except BaseException:
        for fd in (requests[1], answers[0]):
            os.close(fd)
        _reap(pid)
        raise
    try:
        writer.attach(pipeline)
        try:
            for item in items:
                writer.add(item)
        except Exception:
            # A piece before this point in the archive may have failed too: that failure is
            # the one a single process would have met first.
            pipeline.settle()
            raise
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        pipeline.close()
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


class ContentPipeline:
    """The writer's side: puts what the writer makes and the pieces the reader sends back into
    the archive, in order.

    Bytes written while no piece is on its way go to the output (gathered into writes of
    :data:`CHUNK`); after a piece was asked for, they wait behind it (with the warnings that
    belong there: :meth:`later`) until it arrived.

    The reader answers in frames (a length, then that many bytes): each holds whole pieces,
    back to back, and an error frame stands where the piece that failed would be.
    """

    def __init__(
        self,
        emit: Callable[[bytes | bytearray | memoryview], None],
        request_fd: int,
        answer_fd: int,
        ring: mmap.mmap,
        readers: dict[int, Filesystem],
    ) -> None:
        self._output = _Output(emit)
        self._ring = ring
        self._ring_view = memoryview(ring)
        self._written = 0  # the reader's answers so far, in ring bytes (gaps at its end too)
        self._taken = 0  # what of them is copied, or handed to the output thread
        self._direct = 0  # where the last answer handed to the output thread as it is ends
        self._told = 0  # what the reader was last told it may reuse
        # what goes to the output thread next, in order: buffers and answers in the ring
        self._parts: list[bytes | bytearray | memoryview] = []
        self._parts_bytes = 0
        self._request_fd = request_fd
        self._answer_fd = answer_fd
        os.set_blocking(answer_fd, False)
        self._poll = select.poll()
        self._poll.register(answer_fd, select.POLLIN)
        self._readers = readers
        self._known: Filesystem | None = None  # the last filesystem found in *readers*
        self._out = bytearray()  # in order, to be written
        # behind the first answer still on its way: (bytes; then 0 and a call to make there
        # or None; or -1 - the bytes the writer counted of an answer that goes after them and
        # the number of requests it answers)
        self._held: collections.deque[tuple[bytes | bytearray, int, Any]] = collections.deque()
        self._held_bytes = 0
        self._ahead = 0  # pieces asked for and not yet taken
        self._ahead_bytes = 0
        self._unsent: list[list[tuple[object, ...]]] = []  # groups of requests, to send
        self._unsent_items = 0  # requests in them and in the open group
        self._group: list[tuple[object, ...]] | None = None  # the open group (held[-1])
        self._group_known = 0
        self._busy = 0  # requests refused since the writer last looked for answers
        self._failed = False  # an answer was an error
        self._asked = self._answered = 0  # groups sent to the reader, and answers taken
        self._answers = bytearray()  # answer lengths from the reader; from ``_at`` on not taken
        self._at = 0
        self._deadline: float | None = None  # when waiting for answers stops (a failure)
        #: bytes of headers the reader made, taken so far (the writer counts them at the end)
        self.made_bytes = 0
        self._closed = False

    # -- the writer's calls ---------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes of the archive, after everything written or deferred so far."""
        if self._held:
            self._close_group()
            self._held.append((data if type(data) is bytes else bytes(data), 0, None))
            self._held_bytes += len(data)
            if self._held_bytes > HELD_BYTES:
                self._take(block=True, until=HELD_BYTES // 2)
            return
        self._out += data
        if len(self._out) >= CHUNK:
            self._emit(self._out)
            self._out = bytearray()

    def defer(
        self, before: bytearray, fs: Filesystem, token: int, offset: int, length: int
    ) -> bool:
        """Ask the reader for a piece (``fs.read_piece(token, offset, length)``) to go after
        the bytes *before* (which it then owns), and keep its place in the archive; ``False``
        (*before* untouched) when the writer had better read it itself: the reader has
        enough to do, or does not know *fs*."""
        if not self._knows(fs):
            return False
        # (further ahead than whole members: when the reader is behind, the writer makes the
        # headers itself and still hands over the reading, which its grain cache would
        # otherwise do a second time)
        return self._defer(before, (id(fs), token, offset, length), length, 2 * AHEAD_PIECES)

    def defer_header(self, before: bytearray, fields: tuple[object, ...]) -> bool:
        """Ask the reader to make a member's header (``build_header(*fields)``) to go after
        the bytes *before* (which it then owns); ``False`` (*before* untouched) when the
        reader has enough to do and the writer makes it itself."""
        if _large_xattrs(fields):
            return False
        return self._defer(before, fields, 0, AHEAD_PIECES)

    def defer_file(
        self,
        before: bytearray,
        fields: tuple[object, ...],
        fs: Filesystem,
        token: int,
        offset: int,
        size: int,
    ) -> bool:
        """Ask the reader for a whole small member: its header (``build_header(*fields)``),
        its content in one piece (``fs.read_piece(token, offset, size)``) and the padding to
        a block, after the bytes *before* (which it then owns); ``False`` (*before*
        untouched) when the writer had better do it itself."""
        if not self._knows(fs) or _large_xattrs(fields):
            return False
        # what the writer counted of it (the padded content); the header comes on top
        known = size + -size % _BLOCK
        return self._defer(before, (fields, id(fs), token, offset, size), known, AHEAD_PIECES)

    def _knows(self, fs: Filesystem) -> bool:
        """Whether the reader has *fs* (it was there at the fork)."""
        if fs is not self._known:
            if self._readers.get(id(fs)) is not fs:
                return False
            self._known = fs
        return True

    def _defer(
        self, before: bytearray, request: tuple[object, ...], known: int, limit: int
    ) -> bool:
        """Hand *request* to the reader, its answer (of at least *known* bytes, which the
        writer counted) to go after *before*; ``False`` when the reader has enough to do
        (*limit* requests, or :data:`AHEAD_BYTES`, on their way).

        Requests that follow one another with nothing of the writer's between them form a
        group (up to :data:`GROUP_ITEMS` of them, about :data:`GROUP_BYTES`): one answer, in
        one piece of the ring, for all of them."""
        if self._ahead >= limit or self._ahead_bytes + known > AHEAD_BYTES:
            # The reader is behind: the writer does this one itself, and looks for answers to
            # take (a read of the pipe, mostly for nothing) only every few times, unless this
            # is a large piece: reading a megabyte costs far more than a look.
            self._busy += 1
            if self._busy < BUSY_TRIES and known < BUSY_BYTES:
                return False
            self._busy = 0
            self._take(block=False)
            if self._ahead >= limit or self._ahead_bytes + known > AHEAD_BYTES:
                return False
        group = self._group
        if (
            group is not None
            and not before
            and len(group) < GROUP_ITEMS
            and self._group_known + known <= GROUP_BYTES
        ):
            group.append(request)
            self._group_known += known
            self._held[-1] = (self._held[-1][0], -1 - self._group_known, len(group))
        else:
            self._close_group()
            group = self._group = [request]
            self._group_known = known
            self._held.append((before, -1 - known, 1))
            self._held_bytes += len(before)
        self._ahead += 1
        self._ahead_bytes += known
        self._unsent_items += 1
        if self._ahead - self._unsent_items < GROUP_ITEMS:
            self._send()  # the reader may be running out of work
        elif len(group) >= GROUP_ITEMS:
            self._close_group()
            if len(self._unsent) >= 2:
                self._send()
        return True

    def _close_group(self) -> None:
        if self._group is not None:
            self._unsent.append(self._group)
            self._group = None

    def drain(self) -> None:
        """Wait for every answer and put it in place."""
        self._take(block=True)

    def later(self, call: Callable[[], None]) -> None:
        """Call *call* when everything written or deferred so far is in the output."""
        if self._held:
            self._close_group()
            self._held.append((b"", 0, call))
        else:
            call()

    def finish(self) -> None:
        """Wait for every piece and write everything out (the archive's end included)."""
        self._take(block=True)
        if self._out or self._parts:
            self._emit(self._out)
            self._out = bytearray()
        self._output.close()

    def settle(self) -> None:
        """After a failure of the writer: wait for the pieces before it, raising the first
        failure among them (one met earlier in the archive's order)."""
        with contextlib.suppress(SinkError):  # the reader itself gone: the writer's error
            self._take(block=True)

    def abort(self, pending: bytes | bytearray, poison: bytes | bytearray) -> None:
        """End a failed archive: what is complete and in order, then *pending* (the writer's
        buffer) when nothing waits for a piece, then *poison*. Nothing lands out of place."""
        # The answers on their way (a few megabytes at most) first, as one process would have
        # written them before failing; a failed answer or a reader gone ends that.
        self._deadline = time.monotonic() + ABORT_WAIT
        with contextlib.suppress(Exception):
            self._take(block=True)
        out = self._out
        self._out = bytearray()
        if not self._held:
            out += pending
        self._held.clear()
        parts, self._parts = self._parts, []
        self._output.abort([*parts, out + poison])

    def close(self) -> None:
        """Close both pipes: the reader ends."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._request_fd, self._answer_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(BufferError):  # an output thread given up on still holds it
            self._ring_view.release()
            self._ring.close()

    # -- internals --------------------------------------------------------------------------------

    def _emit(self, out: bytearray) -> None:
        """Hand *out* (a full buffer, or the last) to the output, after the parts gathered."""
        self._parts.append(out)
        self._hand_over()

    def _hand_over(self) -> None:
        """Give the parts gathered to the output thread, in one write of its queue."""
        self._output.write(self._parts, self._direct)
        self._parts = []
        self._parts_bytes = 0

    def _send(self, *, tell: bool = False) -> None:
        """Send the requests gathered, with how far the answers are taken (alone, *tell*:
        when that changed)."""
        self._close_group()
        free = self._free()
        if not self._unsent and not (tell and free != self._told):
            return
        payload = marshal.dumps((free, self._unsent))
        self._told = free
        self._asked += len(self._unsent)
        self._unsent = []
        self._unsent_items = 0
        view = memoryview(_FRAME.pack(len(payload)) + payload)
        try:
            while view:  # a few hundred pieces at most are on their way: the pipe holds them
                view = view[os.write(self._request_fd, view) :]
        except OSError as exc:
            raise SinkError(f"the reader process ended unexpectedly ({exc.strerror})") from exc

    def _take(self, *, block: bool, until: int = -1) -> None:
        """Move what is at the head and has arrived into the output; with *block*, wait for
        answers (until no more than *until* of the writer's bytes wait behind them)."""
        if self._failed:
            return  # an answer failed (and was raised): nothing more is taken
        held = self._held
        out = self._out
        answers = self._answers  # (the same object however it grows or shrinks)
        while held and self._held_bytes > until:
            before, length, count = held[0]
            if length:  # the reader's answer to a group of *count* requests goes here
                # (length: -1 - the bytes of it the writer counted: content, padding)
                at = self._at
                if len(answers) - at >= 4 and (size := _LENGTH(answers, at)[0]) != _ERROR:
                    self._at = at + 4  # the usual case, without a call
                else:
                    size = self._answer(block)
                    if size < 0:
                        return  # not there yet
                known = -1 - length
                if size < known:
                    raise SinkError(f"the reader process sent {size} bytes for {known}")
                out += before
                start = _ring_start(self._written, size)
                at = start % RING_BYTES
                self._written = self._taken = start + size
                if size < DIRECT_BYTES:
                    out += self._ring_view[at : at + size]
                else:  # written from the ring (its room is reused once the thread wrote it)
                    parts = self._parts
                    if out:
                        parts.append(out)
                        self._parts_bytes += len(out)
                        out = self._out = bytearray()
                    parts.append(self._ring_view[at : at + size])
                    self._parts_bytes += size
                    self._direct = self._written
                    if self._parts_bytes >= CHUNK:
                        self._hand_over()
                self._ahead -= count
                self._ahead_bytes -= known
                self.made_bytes += size - known
                self._answered += 1
            else:
                out += before
                if count is not None:
                    count()  # a call to make here (a warning)
            held.popleft()
            self._held_bytes -= len(before)
            if len(out) >= CHUNK:
                self._emit(out)
                out = self._out = bytearray()
        if self._taken - self._told > RING_BYTES // 4:
            self._send(tell=True)  # room for the reader, which may be waiting for it

    def _free(self) -> int:
        """How much of the ring the reader may reuse: what is taken, but nothing of (or after)
        an answer the output thread has not written yet."""
        released = self._output.released
        return self._taken if released >= self._direct else released

    def _answer(self, block: bool) -> int:
        """The length of the reader's next answer (its bytes are next in the ring), or -1 if
        it has not arrived (not *block*). Raises the error that an error answer holds."""
        while True:
            buf, at = self._answers, self._at
            have = len(buf) - at
            if have >= 4:
                (size,) = _FRAME.unpack_from(buf, at)
                if size != _ERROR:
                    self._at = at + 4
                    return int(size)
                if have >= 8:
                    (n,) = _FRAME.unpack_from(buf, at + 4)
                    if have - 8 >= n:
                        failure = pickle.loads(buf[at + 8 : at + 8 + n])  # noqa: S301 - our child
                        self._at = at + 8 + n
                        # nothing after this answer goes out: the archive fails here (and
                        # the answers that follow belong to later requests, not to this one)
                        self._failed = True
                        _raise(failure)
            if not self._receive(block):
                return -1

    def _receive(self, block: bool) -> bool:
        """Read more of the reader's answers; ``False`` if none are there (not *block*)."""
        at = self._at
        if at and at >= len(self._answers) // 2:
            del self._answers[:at]
            self._at = 0
        if block:
            # it may be waiting for room: for what the output thread still writes from the
            # ring too (the writer waits for nothing else meanwhile)
            if self._parts:
                self._hand_over()
            if not self._output.wait_released(self._direct, self._deadline):
                return False  # a failed archive's end waited long enough
            self._send(tell=True)
            if self._answered >= self._asked:  # a bug, but never a hang
                raise SinkError("waiting for an answer that was not asked for")
        while True:
            try:
                data = os.read(self._answer_fd, READ_BYTES)
            except BlockingIOError:
                if not block:
                    return False
                if self._deadline is None:
                    self._poll.poll()
                elif not self._poll.poll(max(0.0, self._deadline - time.monotonic()) * 1000):
                    return False  # a failed archive's end waited long enough
                continue
            if not data:
                raise SinkError("the reader process ended unexpectedly")
            self._answers += data
            return True


class _Output:
    """The writer's output, written by a thread: writing (and compressing) a megabyte of it
    mostly waits for the kernel or zlib, which then overlaps with the walk. At most
    :data:`QUEUED` writes wait; the first error of the output is raised at the next call."""

    def __init__(self, emit: Callable[[bytes | bytearray | memoryview], None]) -> None:
        self._emit = emit
        self._queue: queue.Queue[tuple[list[bytes | bytearray | memoryview], int] | None] = (
            queue.Queue(QUEUED)
        )
        self._failed: BaseException | None = None
        #: where the last ring answer written (or given up on, after a failure) ends
        self.released = 0
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ova2img-output", daemon=True)
        self._thread.start()

    def write(self, parts: list[bytes | bytearray | memoryview], ring_end: int = 0) -> None:
        """Write *parts* (which must not change afterwards) after what came before; once
        written, :attr:`released` becomes *ring_end* if that is given (the parts' answers in
        the ring end there)."""
        if self._failed is not None:
            raise self._failed
        self._queue.put((parts, ring_end))

    def wait_released(self, ring_end: int, deadline: float | None = None) -> bool:
        """Wait until :attr:`released` reaches *ring_end* (at once when the thread ended);
        ``False`` if *deadline* (a :func:`time.monotonic` time) came first."""
        with self._progress:
            while self.released < ring_end and self._thread.is_alive():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self._progress.wait(0.1)
        return True

    def close(self) -> None:
        """Wait until everything is written; raise the output's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._failed is not None:
            raise self._failed

    def abort(self, tail: list[bytes | bytearray | memoryview]) -> None:
        """Write the parts of *tail* after what is queued (if the output still works) and
        stop; an output that takes nothing for :data:`ABORT_WAIT` seconds is left as it is."""
        with contextlib.suppress(BaseException):
            if self._failed is None and self._thread.is_alive():
                self._queue.put((tail, 0), timeout=ABORT_WAIT)
            self._queue.put(None, timeout=ABORT_WAIT)
            self._thread.join(ABORT_WAIT)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            parts, ring_end = item
            if self._failed is None:  # else keep taking, so that write() never waits forever
                try:
                    for part in parts:
                        if part:
                            self._emit(part)
                except BaseException as exc:
                    self._failed = exc
            del parts, item  # (views of the ring: none outlives the thread's use)
            if ring_end:
                with self._progress:
                    self.released = ring_end
                    self._progress.notify_all()


def _large_xattrs(fields: tuple[object, ...]) -> bool:
    """Whether a member's extended attributes (the last of its fields) are too large for the
    reader to make its header (:data:`XATTR_BYTES`)."""
    xattrs = fields[-1]
    return isinstance(xattrs, dict) and sum(map(len, xattrs.values())) > XATTR_BYTES


def _raise(failure: tuple[str, str, int | None, str | None]) -> None:
    name, message, offset, obj = failure
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, Ova2imgError):
        raise cls(message, offset=offset, obj=obj)
    raise RuntimeError(f"the reader process failed:\n{message}")


def _reap(pid: int) -> None:
    """Wait a moment for the reader (it ends when the request pipe closes), then end it."""
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


# -- the reader ---------------------------------------------------------------------------------


def _ring_start(written: int, size: int) -> int:
    """Where an answer of *size* bytes starts in the ring (counted as *written* is), after
    *written* bytes of answers: right after them, or at the ring's start when it does not fit
    before the end. The reader places answers with it and the writer finds them with it."""
    at = written % RING_BYTES
    return written + RING_BYTES - at if at + size > RING_BYTES else written


class _Answers:
    """The reader's answers: bytes into the ring, their lengths (or an error) into the pipe,
    gathered and written when :meth:`flush` is called or enough gathered."""

    def __init__(self, fd: int, ring: mmap.mmap) -> None:
        self._fd = fd
        self._ring = memoryview(ring)
        self.written = 0  # ring bytes used so far (gaps at its end too)
        self._lengths = bytearray()
        self._since = 0  # bytes answered since the last flush

    def room(self, size: int, taken: int) -> bool:
        """Whether *size* bytes fit now, the writer having taken *taken*: they must not land
        on what it has not taken (from *taken* to :attr:`written`, if anything)."""
        if taken >= self.written:
            return True  # nothing waits in the ring (and no answer is larger than it)
        return _ring_start(self.written, size) + size - taken <= RING_BYTES

    def data(self, parts: list[bytes | bytearray], size: int) -> None:
        """An answer of *size* bytes in *parts* (it has :meth:`room`): a piece that was read,
        a header that was made, a small member."""
        start = _ring_start(self.written, size)
        at = start % RING_BYTES
        ring = self._ring
        for part in parts:
            ring[at : at + len(part)] = part
            at += len(part)
        self.written = start + size
        self._lengths += _FRAME.pack(size)
        self._since += size
        if self._since >= ANSWERED_BYTES or len(self._lengths) >= 16:
            self.flush()  # the writer may be waiting: tell it every few answers

    def fail(self, exc: BaseException) -> None:
        """An answer that failed: the error, for the writer to raise."""
        if isinstance(exc, Ova2imgError):
            failure = (type(exc).__name__, exc.message, exc.offset, exc.obj)
        else:
            failure = ("", "".join(traceback.format_exception(exc)).rstrip(), None, None)
        payload = pickle.dumps(failure, protocol=pickle.HIGHEST_PROTOCOL)
        self._lengths += _FRAME.pack(_ERROR) + _FRAME.pack(len(payload)) + payload

    def flush(self) -> None:
        """Tell the writer what is answered (a few bytes: the pipe takes them)."""
        view = memoryview(self._lengths)
        while view:
            view = view[os.write(self._fd, view) :]
        view.release()
        self._lengths = bytearray()
        self._since = 0


def _serve(
    request_fd: int,
    answer_fd: int,
    ring: mmap.mmap,
    readers: dict[int, Filesystem],
    build_header: Callable[..., bytes | bytearray],
) -> None:
    """The reader: answer each request with the piece's bytes (or the header made), or the
    error met, in order, until the request pipe ends."""
    gc.freeze()  # nothing inherited is finalised here (a temporary file object could unlink)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the writer is gone: end quietly
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers = [logging.NullHandler()]
            logger.propagate = False
    answers = _Answers(answer_fd, ring)
    broken: Exception | None = None
    try:
        _reopen_files()
    except Exception as exc:  # every piece fails with it, where the first one belongs
        broken = exc
    inbox = _Requests(request_fd)
    while True:
        group = inbox.next(answers)
        if group is None:
            break
        try:
            if broken is not None:
                raise broken
            parts = _answer(group, readers, build_header)
        except Exception as exc:  # the writer raises it where this answer belongs
            answers.fail(exc)
            continue
        size = sum(map(len, parts))
        if size > RING_BYTES:  # a group is kept far smaller: never wait for room forever
            answers.fail(SinkError(f"an answer of {size} bytes does not fit the ring"))
            continue
        while not answers.room(size, inbox.taken):
            answers.flush()  # the writer takes what is there, then says so
            if not inbox.wait():
                return
        answers.data(parts, size)
    answers.flush()


def _answer(
    group: list[tuple[object, ...]],
    readers: dict[int, Filesystem],
    build_header: Callable[..., bytes | bytearray],
) -> list[bytes | bytearray]:
    """The bytes that answer a group of requests: for each, a piece that was read, a header
    that was made, or a small member (header, content, padding)."""
    parts: list[bytes | bytearray] = []
    for request in group:
        if len(request) == 5:  # a small member
            fields, key, token, offset, length = cast(_FileRequest, request)
            parts.append(build_header(*fields))
            parts.append(_piece(readers[key], token, offset, length))
            parts.append(_ZEROS[: -length % _BLOCK])
        elif len(request) == 4:  # a piece
            key, token, offset, length = cast("tuple[int, int, int, int]", request)
            parts.append(_piece(readers[key], token, offset, length))
        else:  # a member's fields
            parts.append(build_header(*request))
    return parts


def _piece(fs: Filesystem, token: int, offset: int, length: int) -> bytes:
    data = fs.read_piece(token, offset, length)
    if len(data) != length:  # read_piece reads exactly or raises: an adapter's bug
        raise SinkError(f"a piece of {length} bytes read as {len(data)}")
    return data


class _Requests:
    """What the writer asks the reader, read as it comes, with how far the writer has taken
    the answers (:attr:`taken`)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._buf = bytearray()
        self._queue: collections.deque[list[tuple[object, ...]]] = collections.deque()
        self.taken = 0
        self._ended = False

    def next(self, answers: _Answers) -> list[tuple[object, ...]] | None:
        """The next group of requests (``None``: the writer is done); tells the writer what is
        answered before waiting for more."""
        while not self._queue:
            if self._ended:
                return None
            if not self._read():
                answers.flush()
                self._poll.poll()
        return self._queue.popleft()

    def wait(self) -> bool:
        """Wait for the writer's next message; ``False`` if it is done."""
        while not self._read():
            if self._ended:
                return False
            self._poll.poll()
        return True

    def _read(self) -> bool:
        try:
            data = os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return False
        if not data:
            self._ended = True
            return False
        self._buf += data
        at = 0
        while len(self._buf) - at >= 4:
            (size,) = _FRAME.unpack_from(self._buf, at)
            if len(self._buf) - at - 4 < size:
                break
            taken, batch = marshal.loads(self._buf[at + 4 : at + 4 + size])  # noqa: S302 - ours
            at += 4 + size
            self.taken = max(self.taken, taken)
            self._queue.extend(batch)
        del self._buf[:at]
        return True


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


__all__ = ["ContentPipeline", "split_enabled", "write_alone", "write_tar_split"]
