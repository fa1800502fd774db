"""Streaming PAX tar writer for the assembled tree (a ``docker import`` rootfs tarball).

The archive looks like what root gets from
``tar --numeric-owner --xattrs --xattrs-include='*' --sparse --format=pax -C mnt -cf x.tar .``
with GNU tar 1.34:

* member names are ``./`` for the root, ``./path`` for the rest, directories end in ``/``;
* a PAX extended header (typeflag ``x``, POSIX.1-2008 "pax Interchange Format") precedes a
  member whenever a value does not fit the ustar header: ``path``/``linkpath`` longer than 100
  bytes or not plain ASCII (as GNU tar; names that are not UTF-8 are raw bytes, as GNU tar
  writes them), ``uid``/``gid`` of 2^21 and above, ``size`` of 8 GiB and above, ``mtime``
  with nanoseconds or outside the ustar range, and every extended attribute as
  ``SCHILY.xattr.NAME`` (the star/GNU tar keyword; values are raw bytes);
* hardlinks are members of type ``1`` that point at the first member of the same inode;
* sparse files use GNU sparse format 1.0 (``GNU.sparse.major=1``/``minor=0``): the member
  is named ``DIR/GNUSparseFile.0/BASE`` (GNU tar puts its PID where we put 0, so the output is
  deterministic), its data starts with the sparse map in decimal lines padded to a block and
  then holds the data of each run back to back;
* numeric owners only (``uname``/``gname`` empty);
* with ``sparse=False`` (image layers) a sparse file is a plain member holding its full size,
  holes written as zeros: Docker's layer store cannot give back (``docker save``) a layer it
  imported from GNU sparse members, and image tools that read layers with Go's
  ``archive/tar`` writer or with ``tarfile`` mis-handle them; ``docker export`` of a
  container writes sparse files dense too;
* the archive ends with two zero blocks, padded to a multiple of the 10240-byte record.

Unlike :class:`tarfile.TarFile` nothing is kept per member, except the first name of each
inode that has more than one link, until all of its links were seen.

End-of-archive blocks are written only after the last item succeeded. Leaving them out is not
enough to make readers notice a failure, though: GNU tar 1.34, CPython's tarfile and Go's
archive/tar (``docker import``) all accept, silently, an archive that stops at a member
boundary. So on failure :func:`write_tar` ends the stream *inside* a member: it writes the
header of a regular file named :data:`FAILED_NAME` that announces 8 GiB of data and nothing
after it, and every one of those readers then fails with "unexpected EOF". (For a file output
the whole file is discarded anyway, see :mod:`ova2img.sinks.output`.)
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, BinaryIO, cast

from ..assembly import TreeItem
from ..errors import SinkError
from ..filesystems.base import DataRun, EntryType, Piece
from .output import write_all, write_error
from .split import split_enabled, write_alone, write_tar_split

if TYPE_CHECKING:
    from .split import ContentPipeline

BLOCK = 512
#: what :func:`member_bytes` takes, in its order (name, typeflag, size, linkname, sparse size,
#: mode, uid, gid, mtime in ns, device major and minor, xattrs)
MemberFields = tuple[
    bytes, bytes, int, bytes, int | None, int, int, int, int, int, int, dict[str, bytes] | None
]
#: GNU tar's default record size (``-b 20``): the archive length is a multiple of it.
RECORD = 20 * BLOCK
#: Largest read from a file's stream, and the size at which buffered output is flushed.
CHUNK = 1 << 20

# ustar typeflags (POSIX.1-1988 + pax).
_REGTYPE = b"0"
_LNKTYPE = b"1"
_SYMTYPE = b"2"
_CHRTYPE = b"3"
_BLKTYPE = b"4"
_DIRTYPE = b"5"
_FIFOTYPE = b"6"
_XHDTYPE = b"x"
_DEVTYPES = (_CHRTYPE, _BLKTYPE)  # members with a device number (never a hardlink to one)

_TYPEFLAGS = {
    EntryType.FILE: _REGTYPE,
    EntryType.DIR: _DIRTYPE,
    EntryType.SYMLINK: _SYMTYPE,
    EntryType.CHAR: _CHRTYPE,
    EntryType.BLOCK: _BLKTYPE,
    EntryType.FIFO: _FIFOTYPE,
}

#: Name of the truncated member that ends an archive whose conversion failed.
FAILED_NAME = b"./OVA2IMG-CONVERSION-FAILED-THIS-ARCHIVE-IS-INCOMPLETE"

_NS = 1_000_000_000
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CHUNK = memoryview(bytes(CHUNK))


@dataclass(slots=True)
class TarStats:
    """What :func:`write_tar` wrote.

    Attributes:
        entries: members written (PAX extended headers not counted; hardlinks counted).
        files, dirs, symlinks, hardlinks, devices, fifos: members of each kind.
        sparse_files: regular files written in GNU sparse format.
        skipped: items left out (sockets).
        data_bytes: file content bytes in the archive (the holes of sparse members excluded;
            with ``sparse=False`` holes written as zeros are counted).
        archive_bytes: length of the archive, end-of-archive padding included.
        warnings: every warning, in order (each was also passed to ``on_warning``).
    """

    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    sparse_files: int = 0
    skipped: int = 0
    data_bytes: int = 0
    archive_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def write_tar(
    items: Iterable[TreeItem],
    out: BinaryIO,
    *,
    on_warning: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    sparse: bool = True,
    workers: int = 1,
) -> TarStats:
    """Write *items* (in the given order) as a PAX tar to *out*.

    Args:
        items: the tree, parents before children (the assembly walk's order).
        out: where the archive goes; only ``write`` is used, in large writes.
        on_warning: called with each warning (a socket skipped, a ``.wh.`` name, …).
        on_progress: called with the number of file-content bytes written so far.
        sparse: write files with holes as GNU sparse 1.0 members (as ``tar --sparse``);
            ``False`` writes them dense, holes as zeros (for image layers).
        workers: 2 reads file content with a second process as well
            (:mod:`ova2img.sinks.split`; the same bytes), where
            :func:`~ova2img.sinks.split.split_enabled` says it can; 1 works alone.

    Returns:
        Counts of what was written, with the warnings.

    Raises:
        SinkError: *out* could not be written, or a file's content ended before its size.
        Ova2imgError: whatever reading the items raised. In every failure (``KeyboardInterrupt``
            included) the archive is ended by :meth:`TarWriter.abort`, so that readers fail.
    """

    def make_writer(stream: BinaryIO) -> TarWriter:
        return TarWriter(stream, on_warning=on_warning, on_progress=on_progress, sparse=sparse)

    if workers > 1 and split_enabled():
        return write_tar_split(items, out, make_writer, member_bytes)
    return write_alone(items, make_writer(out))


def measure_tar(items: Iterable[TreeItem], *, sparse: bool = True) -> TarStats:
    """What :func:`write_tar` would write for *items* (with the same *sparse*), from their
    metadata alone.

    No file content is read and nothing is written; ``archive_bytes`` is the exact length of
    the archive :func:`write_tar` makes from the same items (members' sizes and sparse maps
    depend only on sizes and data runs). Costs one more walk of the tree's metadata; used
    where an archive's length must be known before its first byte (a tar member holding it,
    written to a pipe).
    """
    writer = TarWriter(cast(BinaryIO, None), measure_only=True, sparse=sparse)
    for item in items:
        writer.add(item)
    return writer.finish()


def member_header(name: bytes, size: int, *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """The 512-byte ustar header of a regular file *name* (at most 100 bytes, ASCII) holding
    *size* bytes, owned by 0:0; sizes of 8 GiB and more use GNU tar's base-256 field (read by
    GNU tar, Go's archive/tar, CPython). For containers of layers (image archives)."""
    if len(name) > 100 or not name.isascii():
        raise SinkError(f"{_show(name)}: member name longer than 100 bytes or not ASCII")
    return bytes(
        _ustar_header(
            name=name,
            mode=mode,
            uid=_octal(0, 8),
            gid=_octal(0, 8),
            size=_size_field(size),
            mtime=_octal(mtime, 12),
            typeflag=_REGTYPE,
        )
    )


class TarWriter:
    """Incremental form of :func:`write_tar`: :meth:`add` each item, then :meth:`finish`.

    After a failure call :meth:`abort`, never :meth:`finish`: the archive must not look
    complete.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        on_warning: Callable[[str], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        measure_only: bool = False,
        sparse: bool = True,
    ) -> None:
        self._out = out
        #: GNU sparse members for files with holes; ``False``: plain members, holes as zeros
        self._sparse = sparse
        self._on_warning = on_warning
        self._on_progress = on_progress
        #: count the archive's bytes without reading file contents nor writing (see
        #: :func:`measure_tar`)
        self._measure_only = measure_only
        self._buf = bytearray()
        # inode key -> (first member name, links still to come); only inodes with nlink > 1
        self._links: dict[tuple[int, int], tuple[bytes, int]] = {}
        self._finished = False
        self._pipeline: ContentPipeline | None = None
        self.stats = TarStats()

    # -- output ------------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue *data*; small pieces are gathered into writes of about :data:`CHUNK` bytes."""
        self.stats.archive_bytes += len(data)
        if len(data) >= CHUNK // 4:
            self._flush()
            self._emit(data)
            return
        self._buf += data
        if len(self._buf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = bytearray()

    # -- a second process reading content (see :mod:`ova2img.sinks.split`) ---------------------

    def attach(self, pipeline: ContentPipeline) -> None:
        """Write through *pipeline* from now on: it puts content pieces it reads in another
        process at their place in the archive, between the bytes this writer makes."""
        self._flush()
        self._pipeline = pipeline

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        if self._measure_only:
            return
        if self._pipeline is not None:
            self._pipeline.write(data)
            return
        self.emit_out(data)

    def emit_out(self, data: bytes | bytearray | memoryview) -> None:
        """Write *data* to the output now (what the pipeline calls, in archive order)."""
        try:
            # A raw (unbuffered) stream may take less than it was given: write the rest.
            write_all(self._out, data)
        except OSError as exc:
            raise write_error(str(getattr(self._out, "name", "the output")), exc) from exc

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        if self._on_warning is not None:
            if self._pipeline is not None:  # in order with the content still on its way
                self._pipeline.later(partial(self._on_warning, message))
            else:
                self._on_warning(message)

    # -- members -----------------------------------------------------------------------------

    def add(self, item: TreeItem) -> None:
        """Write one item: its PAX header if needed, its ustar header and its data."""
        if self._finished:
            raise SinkError("add() after finish()")
        entry = item.entry
        path = item.path
        if b"\0" in path:
            raise SinkError(f"{_show(path)}: NUL byte in a path")
        is_dir = entry.type is EntryType.DIR
        if not path:
            name = b"./"
        elif is_dir:
            name = b"./" + path + b"/"
        else:
            name = b"./" + path
        if entry.type is EntryType.SOCKET:
            # Neither ustar nor pax has a socket type; GNU tar skips them too ("socket ignored").
            self.stats.skipped += 1
            self._warn(f"socket {_show(name)} skipped: tar cannot hold sockets")
            return
        typeflag = _TYPEFLAGS.get(entry.type)
        if typeflag is None:  # pragma: no cover - EntryType is closed
            raise SinkError(f"{_show(name)}: cannot archive entry type {entry.type}")
        if b".wh." in path and path.rpartition(b"/")[2].startswith(b".wh."):
            # docker/moby pkg/archive treats ".wh.*" names as overlay whiteouts when importing.
            self._warn(
                f"{_show(name)}: name starts with '.wh.', which docker import treats as a "
                "whiteout and drops"
            )

        # Hardlinks: the first path of an inode carries the data, later ones link to it.
        if entry.nlink > 1 and entry.type in HARDLINKED_TYPES:
            key = item.link_key
            seen = self._links.get(key)
            if seen is not None:
                first, left = seen
                if left <= 1:
                    del self._links[key]  # every link seen: forget the inode
                else:
                    self._links[key] = (first, left - 1)
                self._member(item, name, _LNKTYPE, size=0, linkname=first)
                self.stats.hardlinks += 1
                self.stats.entries += 1
                return
            self._links[key] = (name, entry.nlink - 1)

        if entry.type is EntryType.FILE:
            self._file(item, name)
        elif entry.type is EntryType.SYMLINK:
            self._member(item, name, typeflag, size=0, linkname=entry.link_target)
            self.stats.symlinks += 1
        else:
            self._member(item, name, typeflag, size=0)
            if is_dir:
                self.stats.dirs += 1
            elif entry.type is EntryType.FIFO:
                self.stats.fifos += 1
            else:
                self.stats.devices += 1
        self.stats.entries += 1

    def _file(self, item: TreeItem, name: bytes) -> None:
        size = item.entry.size
        if size and not self._measure_only:
            # Most files: stored bytes without holes (a plain member), read piece by piece
            # without a stream and without asking for the data runs.
            found = item.content_pieces()
            if found is not None:
                token, pieces = found
                pipeline = self._pipeline
                if (
                    pipeline is not None
                    and len(pieces) == 1
                    and size <= CHUNK
                    and pipeline.defer_file(
                        self._buf,
                        self._fields(item, name, _REGTYPE, size),
                        item.fs,
                        token,
                        pieces[0][0],
                        size,
                    )
                ):
                    # The other process makes the header and reads the content (padded).
                    self._buf = bytearray()  # the pipeline's now, to go before the member
                    self.stats.archive_bytes += size + (-size % BLOCK)
                    self.stats.data_bytes += size
                    self.stats.files += 1
                    if self._on_progress is not None:
                        self._on_progress(self.stats.data_bytes)
                    return
                self._member(item, name, _REGTYPE, size=size)
                self._pieces(item, name, token, pieces)
                self._write(bytes(-size % BLOCK))
                self.stats.files += 1
                return
        if 0 < size <= CHUNK and not self._measure_only:
            # Inline or compressed data: one read, as the adapter gives it, when it can.
            content = item.read_content()
            if content is not None and len(content) == size:
                self._member(item, name, _REGTYPE, size=size)
                self._write(content)
                self._write(bytes(-size % BLOCK))
                self.stats.data_bytes += size
                if self._on_progress is not None:
                    self._on_progress(self.stats.data_bytes)
                self.stats.files += 1
                return
        runs = item.data_runs() if size else None
        if runs is not None and not (len(runs) == 1 and runs[0] == (0, size)):
            runs = _normalise_runs(runs, size)
        if runs is None or size - sum(length for _, length in runs) < BLOCK:
            self._member(item, name, _REGTYPE, size=size)
            if size:
                self._copy(item, name, None)
                self._write(bytes(-size % BLOCK))
            self.stats.files += 1
            return
        if not self._sparse:
            self._member(item, name, _REGTYPE, size=size)
            self._copy(item, name, runs, dense_size=size)
            self._write(bytes(-size % BLOCK))
            self.stats.files += 1
            return
        # GNU sparse format 1.0 (GNU tar manual, "Storing Sparse Files", and sparse.c
        # pax_dump_header_1): the map lists every data run and always ends with the entry
        # (realsize, 0), as GNU tar writes it, even when the file ends with data.
        mapping = [*runs, (size, 0)]
        lines = [str(len(mapping)).encode()]
        for offset, length in mapping:
            lines.append(str(offset).encode())
            lines.append(str(length).encode())
        sparse_map = b"\n".join(lines) + b"\n"
        sparse_map += bytes(-len(sparse_map) % BLOCK)
        stored = len(sparse_map) + sum(length for _, length in runs)
        self._member(item, name, _REGTYPE, size=stored, sparse_size=size)
        self._write(sparse_map)
        self._copy(item, name, runs)
        self._write(bytes(-stored % BLOCK))
        self.stats.files += 1
        self.stats.sparse_files += 1

    def _pieces(self, item: TreeItem, name: bytes, token: int, pieces: list[Piece]) -> None:
        """Write a file's content from its pieces, at most :data:`CHUNK` bytes at a time, each
        read here or (with a pipeline) handed to the other process."""
        fs = item.fs
        pipeline = self._pipeline
        stats = self.stats
        done = 0
        for offset, length in pieces:
            end = offset + length
            while offset < end:
                n = min(end - offset, CHUNK)
                if pipeline is not None and pipeline.defer(self._buf, fs, token, offset, n):
                    self._buf = bytearray()  # the pipeline's now, to go before the piece
                    stats.archive_bytes += n
                    offset += n
                    done += n
                    stats.data_bytes += n
                    continue
                data = fs.read_piece(token, offset, n)
                if len(data) != n:
                    raise SinkError(
                        f"{_show(name)}: content ended at byte {done + len(data)} of "
                        f"{item.entry.size}"
                    )
                self._write(data)
                offset += n
                done += n
                stats.data_bytes += n
            if self._on_progress is not None:
                self._on_progress(stats.data_bytes)
        if done != item.entry.size:  # an adapter's pieces must add up to the size
            raise SinkError(f"{_show(name)}: {done} bytes of content for {item.entry.size}")

    def _copy(
        self,
        item: TreeItem,
        name: bytes,
        runs: list[DataRun] | None,
        *,
        dense_size: int | None = None,
    ) -> None:
        """Copy the data of *runs* (``None``: the whole file) from the item's stream, back to
        back (no padding); with *dense_size*, zeros fill the holes before, between and after
        the runs up to it."""
        if runs is None:
            runs = [(0, item.entry.size)]
        if self._measure_only:
            # Sizes come from the metadata alone; the real pass fails rather than write a
            # member shorter than announced, so the two passes agree or the second one fails.
            total = sum(length for _, length in runs) if dense_size is None else dense_size
            self.stats.archive_bytes += total
            self.stats.data_bytes += total
            return
        done = 0  # file offset written so far (dense_size only)
        with item.open() as stream:
            for offset, length in runs:
                if dense_size is not None:
                    self._zeros(offset - done)
                    done = offset + length
                if offset:
                    stream.seek(offset)
                pos, end = offset, offset + length
                while pos < end:
                    chunk = stream.read(min(CHUNK, end - pos))
                    if not chunk:
                        # Never write a short member: the rest of the archive would be
                        # misaligned (and a reader would take data for headers).
                        raise SinkError(
                            f"{_show(name)}: content ended at byte {pos} of {item.entry.size} "
                            "(the file's data is shorter than its size)"
                        )
                    self._write(chunk)
                    pos += len(chunk)
                    self.stats.data_bytes += len(chunk)
                    if self._on_progress is not None:
                        self._on_progress(self.stats.data_bytes)
        if dense_size is not None:
            self._zeros(dense_size - done)

    def _zeros(self, count: int) -> None:
        """Write *count* zero bytes of a hole (no read: holes read as zeros by definition)."""
        while count > 0:
            n = min(count, CHUNK)
            self._write(_ZERO_CHUNK[:n])
            count -= n
            self.stats.data_bytes += n
            if self._on_progress is not None:
                self._on_progress(self.stats.data_bytes)

    def _member(
        self,
        item: TreeItem,
        name: bytes,
        typeflag: bytes,
        *,
        size: int,
        linkname: bytes = b"",
        sparse_size: int | None = None,
    ) -> None:
        """Write the (PAX header and) ustar header of one member (made here, or by the
        pipeline's other process when it has time for it)."""
        fields = self._fields(item, name, typeflag, size, linkname, sparse_size)
        pipeline = self._pipeline
        if pipeline is not None and pipeline.defer_header(self._buf, fields):
            self._buf = bytearray()  # the pipeline's now, to go before the header
            return  # its length is counted when it arrives (see finish())
        self._write(member_bytes(*fields))

    @staticmethod
    def _fields(
        item: TreeItem,
        name: bytes,
        typeflag: bytes,
        size: int,
        linkname: bytes = b"",
        sparse_size: int | None = None,
    ) -> MemberFields:
        """What :func:`member_bytes` takes for a member of *item*: plain values."""
        entry = item.entry
        xattrs = entry.xattrs
        if xattrs:
            xattrs = {attr: bytes(value) for attr, value in xattrs.items()}
        devmajor = devminor = 0
        if typeflag in _DEVTYPES:
            devmajor, devminor = entry.rdev_major, entry.rdev_minor
        return (
            name,
            typeflag,
            size,
            linkname,
            sparse_size,
            entry.mode & 0o7777,
            entry.uid,
            entry.gid,
            entry.mtime_ns,
            devmajor,
            devminor,
            xattrs or None,
        )

    def abort(self) -> None:
        """End a failed archive so that readers fail too: what is buffered, then the header of
        a member announcing 8 GiB of data, and no data. Errors of *out* are ignored here
        (the failure being reported may be the output's own)."""
        if self._finished:
            return
        self._finished = True
        poison = _ustar_header(
            name=FAILED_NAME,
            mode=0o444,
            uid=_octal(0, 8),
            gid=_octal(0, 8),
            size=_octal(8**11 - 1, 12),
            mtime=_octal(0, 12),
            typeflag=_REGTYPE,
        )
        with contextlib.suppress(Exception):
            if self._pipeline is not None:
                # what is complete, in order, then the poison: never a piece out of place
                self._pipeline.abort(bytes(self._buf), poison)
                return
            self._buf += poison
            self._flush()

    def finish(self) -> TarStats:
        """Write the end of the archive and flush; returns the statistics."""
        if self._finished:
            raise SinkError("finish() after finish() or abort()")
        if self._pipeline is not None:
            # the headers the other process made: their lengths are known once they are here
            self._pipeline.drain()
            self.stats.archive_bytes += self._pipeline.made_bytes
            self._pipeline.made_bytes = 0
        # Two zero blocks end the archive (POSIX ustar); GNU tar then pads the last record
        # with zeros to the full 10240-byte record (blocking factor 20).
        end = 2 * BLOCK
        end += -(self.stats.archive_bytes + end) % RECORD
        self._write(bytes(end))
        self._flush()
        if self._pipeline is not None:
            self._pipeline.finish()
        self._finished = True
        return self.stats


def member_bytes(
    name: bytes,
    typeflag: bytes,
    size: int,
    linkname: bytes,
    sparse_size: int | None,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    devmajor: int,
    devminor: int,
    xattrs: dict[str, bytes] | None,
) -> bytes | bytearray:
    """The (PAX extended header and) ustar header of one member: the fields are what
    :meth:`TarWriter._member` takes of an entry (plain values, so that the pipeline's other
    process can make it as well)."""
    records: list[tuple[bytes, bytes]] = []
    header_name = name
    if sparse_size is not None:
        # The real name goes in GNU.sparse.name; the ustar name is GNU tar's
        # "%d/GNUSparseFile.%p/%f" with 0 for the PID. No `path` record: Python's tarfile
        # applies records in order and a later `path` would replace GNU.sparse.name.
        header_name = _dirname(name) + b"/GNUSparseFile.0/" + _basename(name)
    elif len(name) > 100 or not name.isascii():
        # GNU tar (create.c start_header) also writes `path` for every non-ASCII name,
        # so UTF-8 names are marked as such. Names that are not UTF-8 go as raw bytes
        # without `hdrcharset=BINARY`, as GNU tar 1.34 does: it warns "Ignoring unknown
        # extended header keyword 'hdrcharset'" on every such member; CPython's tarfile
        # falls back to surrogateescape and Go keeps the bytes either way.
        records.append((b"path", name))
    if len(linkname) > 100 or not linkname.isascii():
        records.append((b"linkpath", linkname))
    uid_field = b"%07o\0" % uid if 0 <= uid < _MAX8 else None
    if uid_field is None:
        records.append((b"uid", str(uid).encode()))
    gid_field = b"%07o\0" % gid if 0 <= gid < _MAX8 else None
    if gid_field is None:
        records.append((b"gid", str(gid).encode()))
    size_field = b"%011o\0" % size if 0 <= size < _MAX12 else None
    if size_field is None and sparse_size is None:
        records.append((b"size", str(size).encode()))
        # A sparse member of 8 GiB or more keeps its stored size in base-256 only:
        # CPython's tarfile recomputes the next header's offset from `size` after
        # GNU.sparse.realsize replaced it, and would lose its place in the archive.
    seconds, nanos = divmod(mtime_ns, _NS)
    mtime_field = b"%011o\0" % seconds if 0 <= seconds < _MAX12 else None
    if nanos or mtime_field is None:
        records.append((b"mtime", _pax_time(mtime_ns)))
    if sparse_size is not None:
        records += [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.realsize", str(sparse_size).encode()),
        ]
    if xattrs:
        for attr in sorted(xattrs):
            keyword = b"SCHILY.xattr." + _xattr_keyword(attr)
            records.append((keyword, xattrs[attr]))
    header = _ustar_header(
        name=header_name,
        mode=mode,
        uid=uid_field or _base256(uid, 8),
        gid=gid_field or _base256(gid, 8),
        size=size_field or _base256(size, 12),
        mtime=mtime_field or _base256(seconds, 12),
        typeflag=typeflag,
        linkname=linkname,
        devmajor=devmajor,
        devminor=devminor,
    )
    if records:
        payload = b"".join([_pax_record(k, v) for k, v in records])
        # GNU tar 1.34's default extended header name: "%d/PaxHeaders/%f" (the directory
        # of "./a/b" is "./a", of "./b" it is "."; the root's own name is ".").
        head, _, base = name.rstrip(b"/").rpartition(b"/")
        if base == b".":
            base = b""
        xname = (head or b".") + b"/PaxHeaders/" + (base or b".")
        xheader = bytearray(
            _USTAR.pack(
                xname,
                b"0000644\0",
                _ZERO8,
                _ZERO8,
                _size_field(len(payload)),
                mtime_field or _ZERO12,
                b"        ",
                _XHDTYPE,
                b"",
                b"ustar\x0000",
                b"",
                b"",
                _ZERO8,
                _ZERO8,
                b"",
                b"",
            )
        )
        xheader[148:156] = b"%06o\0 " % _byte_sum(xheader)
        # one write for the three: the extended header, its records, the member's header
        return b"".join((xheader, payload, bytes(-len(payload) % BLOCK), header))
    return header


# -- encoding helpers ------------------------------------------------------------------------


def _show(name: bytes) -> str:
    """A printable form of a raw name for messages."""
    return name.decode("utf-8", "backslashreplace")


def _dirname(name: bytes) -> bytes:
    """``./a/b`` → ``./a``, ``./b`` → ``.``, ``./`` → ``.`` (trailing ``/`` ignored)."""
    head = name.rstrip(b"/").rpartition(b"/")[0]
    return head or b"."


def _basename(name: bytes) -> bytes:
    """``./a/b/`` → ``b``; ``./`` → ``b""``."""
    base = name.rstrip(b"/").rpartition(b"/")[2]
    return b"" if base == b"." else base


def _normalise_runs(runs: list[DataRun] | None, size: int) -> list[DataRun] | None:
    """Clip *runs* to ``[0, size)``, sort and merge them; ``None`` stays ``None``."""
    if runs is None:
        return None
    merged: list[DataRun] = []
    for offset, length in sorted(runs):
        start, end = max(offset, 0), min(offset + length, size)
        if end <= start:
            continue
        if merged and start <= merged[-1][0] + merged[-1][1]:
            prev_start, prev_len = merged[-1]
            merged[-1] = (prev_start, max(prev_len, end - prev_start))
        else:
            merged.append((start, end - start))
    return merged


def _octal(value: int, width: int) -> bytes:
    """``width - 1`` zero-padded octal digits and a NUL (GNU tar and CPython's layout)."""
    return b"%0*o\0" % (width - 1, value)


def _number(value: int, width: int) -> bytes | None:
    """The octal form of *value* if it fits a ustar field of *width* bytes, else ``None``."""
    if 0 <= value < 8 ** (width - 1):
        return _octal(value, width)
    return None


def _base256(value: int, width: int) -> bytes:
    """GNU tar's base-256 form (first byte 0x80, or 0xff for negative values, then a
    big-endian two's complement), read by GNU tar, bsdtar, CPython and Go. Used in the ustar
    field when the true value is in a PAX record, so even a reader that ignores PAX gets it."""
    limit = 1 << (8 * (width - 1))
    if not -limit <= value < limit:
        raise SinkError(f"value {value} does not fit a {width}-byte tar field")
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return b"\xff" + (limit + value).to_bytes(width - 1, "big")


def _size_field(value: int) -> bytes:
    return _number(value, 12) or _base256(value, 12)


def _pax_time(ns: int) -> bytes:
    """PAX time: decimal seconds, fraction with trailing zeros trimmed (as GNU tar's
    code_timespec). The value is signed as a whole: -1.5 s is ``-1.5``."""
    sign = b"-" if ns < 0 else b""
    seconds, nanos = divmod(abs(ns), _NS)
    text = b"%d" % seconds
    if nanos:
        text += (b".%09d" % nanos).rstrip(b"0")
    return sign + text


def _xattr_keyword(name: str) -> bytes:
    """The raw xattr name for ``SCHILY.xattr.NAME``; ``%`` and ``=`` are percent-encoded as
    GNU tar's xattr_encode_keyword does (``=`` ends a PAX keyword)."""
    raw = name.encode("utf-8", "surrogateescape")
    return raw.replace(b"%", b"%25").replace(b"=", b"%3D")


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """One ``"LEN KEYWORD=VALUE\\n"`` record; LEN counts every byte including its own digits."""
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    while len(str(length)) + len(body) != length:
        length = len(body) + len(str(length))
    return str(length).encode() + body


#: what GNU tar (1.34, create.c) writes as hardlink members when an inode has several names:
#: regular files and symlinks. A FIFO or a device node linked twice is written whole under
#: each name, as `tar -c` on a mounted filesystem does.
HARDLINKED_TYPES = frozenset({EntryType.FILE, EntryType.SYMLINK})

_MAX8 = 8**7  # the first value an 8-byte octal field cannot hold
_MAX12 = 8**11
_ZERO8 = b"0000000\0"
_ZERO12 = b"00000000000\0"
#: the ustar header's fields (POSIX.1-2001 pax, "ustar Interchange Format"): 512 bytes
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12s")


def _ustar_header(
    *,
    name: bytes,
    mode: int,
    uid: bytes,
    gid: bytes,
    size: bytes,
    mtime: bytes,
    typeflag: bytes,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytearray:
    """One 512-byte POSIX ustar header (names truncated: the full ones are in PAX records)."""
    header = bytearray(
        _USTAR.pack(
            name,  # struct's "s" truncates to the field and pads with NULs
            b"%07o\0" % mode,
            uid,
            gid,
            size,
            mtime,
            b"        ",  # checksum placeholder: eight spaces while summing
            typeflag,
            linkname,
            b"ustar\x0000",  # magic "ustar\0" and version "00"
            b"",  # uname: empty, owners are numeric (--numeric-owner)
            b"",  # gname
            _ZERO8 if not devmajor else _number(devmajor, 8) or _base256(devmajor, 8),
            _ZERO8 if not devminor else _number(devminor, 8) or _base256(devminor, 8),
            b"",  # prefix: unused, long names go in PAX `path`
            b"",
        )
    )
    header[148:156] = b"%06o\0 " % _byte_sum(header)
    return header


def _byte_sum(header: bytearray, adler32: Callable[[bytes | bytearray], int] = zlib.adler32) -> int:
    """The sum of a 512-byte header's bytes, the ustar checksum, at C speed: Adler-32's low
    half is 1 + the byte sum modulo 65521, and 256 bytes sum to at most 65280, so each half
    of the header gives its exact sum (``sum(header)`` costs 2.5 us a header: 5 % of a
    conversion of small files)."""
    return (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - 2


__all__ = [
    "BLOCK",
    "FAILED_NAME",
    "HARDLINKED_TYPES",
    "RECORD",
    "TarStats",
    "TarWriter",
    "measure_tar",
    "member_header",
    "write_tar",
]
