"""Assembly layer: find the guest's root filesystem, apply its /etc/fstab, and walk the one
tree the guest would see, in a deterministic order.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from .errors import AssemblyError, DiskError, FilesystemError, Ova2imgError, VolumeError
from .filesystems.base import DataRun, Entry, EntryType, Filesystem, Piece
from .volumes.base import Volume


@dataclass(slots=True)
class TreeItem:
    """One path of the assembled guest tree.

    Attributes:
        path: path relative to the guest root as raw bytes, without leading ``/``; ``b""`` is
            the root directory itself. Components never are ``.``/``..`` nor contain NUL.
        entry: its metadata.
        fs: the filesystem it lives on.
        fs_id: a small integer naming that filesystem within this tree (hardlink identity is
            ``(fs_id, entry.inode)``).
        handle: the adapter's handle, for :meth:`open` and :meth:`data_runs`.
    """

    path: bytes
    entry: Entry
    fs: Filesystem
    fs_id: int
    handle: object

    def open(self) -> BinaryIO:
        """A stream over a regular file's content."""
        return self.fs.open(self.handle)

    def content_pieces(self) -> tuple[int, list[Piece]] | None:
        """Where a regular file's content lies, to read with ``fs.read_piece``, or ``None``
        (see :meth:`Filesystem.content_pieces`)."""
        return self.fs.content_pieces(self.handle)

    def read_content(self) -> bytes | None:
        """A regular file's whole content in one call, or ``None``: use :meth:`open` (see
        :meth:`Filesystem.read_content`)."""
        return self.fs.read_content(self.handle)

    def data_runs(self) -> list[DataRun] | None:
        """Data stretches of a regular file (``None``: treat as dense)."""
        return self.fs.data_runs(self.handle)

    @property
    def link_key(self) -> tuple[int, int]:
        """Hardlink identity: the same key means the same inode."""
        return (self.fs_id, self.entry.inode)


# --------------------------------------------------------------------------------------------
# The guest's filesystems, the root, and /etc/fstab
# --------------------------------------------------------------------------------------------

log = logging.getLogger("ova2img.assembly")

#: fstab types that are not disk filesystems (pseudo, network, or in-memory): never mounted
#: from the image (they hold nothing on disk), and their mount points stay as on the root.
PSEUDO_FSTYPES = frozenset(
    {
        "proc",
        "sysfs",
        "devpts",
        "devtmpfs",
        "tmpfs",
        "ramfs",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "pstore",
        "efivarfs",
        "mqueue",
        "hugetlbfs",
        "configfs",
        "fusectl",
        "binfmt_misc",
        "autofs",
        "rpc_pipefs",
        "nfsd",
        "bpf",
        "nfs",
        "nfs4",
        "cifs",
        "smbfs",
        "smb3",
        "sshfs",
        "fuse.sshfs",
        "glusterfs",
        "ceph",
        "9p",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "fuse.vmhgfs-fuse",
        "iso9660",
        "udf",
        "none",
        "usbfs",
        "selinuxfs",
        "davfs",
        "fuse",
        "overlay",
        "squashfs",
    }
)


@dataclass
class GuestFilesystem:
    """A filesystem found on one of the guest's volumes (its default mount view).

    Attributes:
        volume: where it lives.
        fs: the opened filesystem.
        mountpoints: where the assembled tree shows it (``b"/"`` for the root); empty when
            fstab does not mount it.
    """

    volume: Volume
    fs: Filesystem
    mountpoints: list[bytes] = field(default_factory=list)


@dataclass
class Mount:
    """One mount of the assembled tree.

    Attributes:
        path: the mount point, absolute (``b"/"``, ``b"/boot"``).
        guest_fs: the filesystem mounted there.
        fs: the view the mount shows (a btrfs subvolume, vfat with its uid/umask options, or
            the filesystem itself).
        fs_id: this mount's number; hardlink identity is ``(fs_id, inode)``.
        options: the fstab options it was mounted with.
    """

    path: bytes
    guest_fs: GuestFilesystem
    fs: Filesystem
    fs_id: int
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.guest_fs.volume.name


@dataclass(frozen=True)
class FstabEntry:
    """One line of ``/etc/fstab``."""

    lineno: int
    spec: str
    mountpoint: bytes
    fstype: str
    options: tuple[str, ...]
    line: str

    @property
    def nofail(self) -> bool:
        return "nofail" in self.options


def _unescape_fstab(field_text: str) -> str:
    # fstab(5): spaces and tabs in fields are written as octal escapes (\040, \011).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_fstab(text: bytes) -> list[FstabEntry]:
    """Parse ``/etc/fstab`` (fstab(5)): comments and blank lines skipped, octal escapes decoded.

    Malformed lines (fewer than 2 fields) are skipped with a warning, as ``mount -a`` does.
    """
    entries: list[FstabEntry] = []
    for lineno, raw in enumerate(text.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            log.warning("/etc/fstab line %d is malformed, ignored: %s", lineno, line)
            continue
        spec = _unescape_fstab(fields[0])
        mountpoint = _unescape_fstab(fields[1])
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        entries.append(
            FstabEntry(
                lineno, spec, mountpoint.encode("utf-8", "surrogateescape"), fstype, options, line
            )
        )
    return entries


def _strip_quotes(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def match_spec(spec: str, candidates: list[GuestFilesystem]) -> list[GuestFilesystem]:
    """Which filesystems a device spec names: ``UUID=``, ``LABEL=``, ``PARTUUID=``,
    ``PARTLABEL=``, ``/dev/disk/by-*/…``, ``/dev/sdXN`` (and ``vd``/``hd``/``xvd``/``nvme``), or a
    bare volume name (``sda1``)."""
    spec = spec.strip()
    key, _, value = spec.partition("=")
    value = _strip_quotes(value)
    by_link = re.fullmatch(r"/dev/disk/by-(uuid|label|partuuid|partlabel)/(.+)", spec)
    if by_link:
        key, value = by_link.group(1).upper(), _unescape_udev(by_link.group(2))
    if key in ("UUID", "LABEL", "PARTUUID", "PARTLABEL") and (value or by_link):

        def attr(g: GuestFilesystem) -> str | None:
            return {
                "UUID": g.fs.uuid,
                "LABEL": g.fs.label,
                "PARTUUID": g.volume.partuuid,
                "PARTLABEL": g.volume.partlabel,
            }[key]

        if key in ("UUID", "PARTUUID"):
            return [g for g in candidates if (attr(g) or "").lower() == value.lower()]
        return [g for g in candidates if attr(g) == value]
    name = spec.removeprefix("/dev/")
    mapper = re.fullmatch(r"(?:/dev/mapper/|/dev/disk/by-id/dm-name-)(.+)", spec)
    if mapper:
        return [g for g in candidates if g.volume.extra.get("mapper") == mapper.group(1)]
    dm_uuid = re.fullmatch(r"/dev/disk/by-id/dm-uuid-LVM-([0-9A-Za-z]{32})([0-9A-Za-z]{32})", spec)
    if dm_uuid:
        lv_uuid = dm_uuid.group(2)
        return [
            g for g in candidates if g.volume.extra.get("lv_uuid", "").replace("-", "") == lv_uuid
        ]
    # The guest may name its disks sdX, vdX, hdX or xvdX depending on the hypervisor's
    # controller; they all mean "disk N in order" here.
    m = re.fullmatch(r"(?:sd|vd|hd|xvd)([a-z]+)(\d*)", name)
    if m:
        disk_index = _letters_to_index(m.group(1))
        number = int(m.group(2)) if m.group(2) else 0
        return [
            g for g in candidates if g.volume.disk_index == disk_index and g.volume.number == number
        ]
    m = re.fullmatch(r"nvme0n(\d+)(?:p(\d+))?", name)
    if m:
        return [
            g
            for g in candidates
            if g.volume.disk_index == int(m.group(1)) - 1
            and g.volume.number == int(m.group(2) or 0)
        ]
    return [g for g in candidates if g.volume.name == name]


def _unescape_udev(text: str) -> str:
    # udev escapes unsafe characters in by-label links as \xNN.
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _letters_to_index(letters: str) -> int:
    index = 0
    for ch in letters:
        index = index * 26 + (ord(ch) - ord("a") + 1)
    return index - 1


def _normalise_mountpoint(mountpoint: bytes) -> bytes:
    parts = [p for p in mountpoint.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise AssemblyError(f"mount point {mountpoint!r} contains '..'")
    return b"/" + b"/".join(parts)


def _followed(mounts: dict[bytes, Mount], mountpoint: bytes, lineno: int) -> bytes:
    """Where mount(8) puts a mount whose mount point is, or passes through, a symlink: the
    kernel resolves the path in the tree mounted so far (fstab order), so ``/home`` ->
    ``srv/home`` mounts on ``/srv/home`` and ``/home`` stays a symlink. A path that does not
    resolve stays as it is (the walk warns about a missing mount point)."""
    try:
        resolved = b"/" + resolve_path(mounts, mountpoint)
    except (FileNotFoundError, *_ENTRY_ERRORS):
        return mountpoint
    if resolved == mountpoint or resolved == b"/":
        return mountpoint
    log.info(
        "/etc/fstab line %d: mount point %s is a symlink to %s; mounted there, as mount(8) does",
        lineno,
        mountpoint.decode(errors="replace"),
        resolved.decode(errors="replace"),
    )
    return resolved


def _describe(g: GuestFilesystem) -> str:
    bits = [g.volume.name, g.fs.fstype]
    if g.fs.uuid:
        bits.append(f"UUID={g.fs.uuid}")
    if g.fs.label:
        bits.append(f"LABEL={g.fs.label}")
    return " ".join(bits)


def _fstab_of(view: Filesystem, *, strict: bool = False) -> list[FstabEntry] | None:
    """The parsed ``/etc/fstab`` of *view*, or ``None`` when it has none.

    Args:
        strict: for the chosen root: an ``/etc/fstab`` that exists but cannot be read (a
            symlink loop, a damaged inode) is an error rather than no fstab, since converting
            without the filesystems it mounts would silently leave them out.

    Raises:
        AssemblyError: (*strict*) the fstab's symlinks loop.
        FilesystemError: (*strict*) the fstab cannot be read, or the root directory.
    """
    if strict:
        view.stat(view.root())  # a broken root is named as such, not as a broken fstab
    try:
        return parse_fstab(view.read_file(b"/etc/fstab"))
    except FileNotFoundError as exc:
        if strict and "too many symlinks" in str(exc):
            raise AssemblyError(
                "/etc/fstab of the root filesystem cannot be read: too many levels of symbolic "
                "links (a symlink loop); use --no-fstab to convert the root filesystem alone"
            ) from None
        return None
    except FilesystemError as exc:
        if strict:
            where = f"{exc.obj}: " if exc.obj else ""
            raise FilesystemError(
                f"/etc/fstab of the root filesystem cannot be read ({where}{exc.message}); "
                "use --no-fstab to convert the root filesystem alone",
                offset=exc.offset,
            ) from exc
        return None
    except Ova2imgError:
        if strict:
            raise
        return None


def choose_root(
    filesystems: list[GuestFilesystem], root_spec: str | None = None
) -> tuple[GuestFilesystem, Filesystem]:
    """Pick the guest's root filesystem and the view of it that holds the root tree.

    ``--root SPEC`` wins; with one filesystem it is the root; with several, the one whose
    ``/etc/fstab`` names itself as ``/``. The view is the first of the filesystem's
    :meth:`~Filesystem.root_candidates` that has an ``/etc/fstab`` (a btrfs subvolume such as
    ``@``), else its default view.

    Raises:
        AssemblyError: no filesystem, an unmatched ``--root``, or an ambiguous choice.
    """
    if not filesystems:
        raise AssemblyError("no Linux filesystem found on any disk")

    def view_with_fstab(g: GuestFilesystem) -> tuple[Filesystem, list[FstabEntry]] | None:
        for view in g.fs.root_candidates():
            entries = _fstab_of(view)
            if entries is not None:
                return view, entries
        return None

    if root_spec:
        found = match_spec(root_spec, filesystems)
        if len(found) != 1:
            have = "; ".join(_describe(g) for g in filesystems)
            what = "matches no filesystem" if not found else "matches several filesystems"
            raise AssemblyError(f"--root {root_spec} {what} (found: {have})")
        hit = view_with_fstab(found[0])
        return found[0], hit[0] if hit else found[0].fs
    named_root: list[tuple[GuestFilesystem, Filesystem]] = []
    with_fstab: list[tuple[GuestFilesystem, Filesystem]] = []
    for g in filesystems:
        hit = view_with_fstab(g)
        if hit is None:
            continue
        view, entries = hit
        with_fstab.append((g, view))
        for e in entries:
            if e.mountpoint.rstrip(b"/") == b"" and g in match_spec(e.spec, filesystems):
                named_root.append((g, view))
                break
    if len(named_root) == 1:
        return named_root[0]
    if not named_root and len(with_fstab) == 1:
        return with_fstab[0]
    if len(filesystems) == 1 and not named_root:
        return filesystems[0], with_fstab[0][1] if with_fstab else filesystems[0].fs
    have = "; ".join(_describe(g) for g in filesystems)
    raise AssemblyError(
        f"cannot tell which filesystem is the root (found: {have}); pick one with --root SPEC"
    )


def _skipped_entry(e: FstabEntry) -> bool:
    """fstab entries that mount nothing from the disks: swap, noauto, pseudo and network
    filesystems, bind mounts."""
    if e.fstype == "swap" or e.fstype in PSEUDO_FSTYPES:
        return True
    if {"noauto", "bind", "rbind"} & set(e.options):
        return True
    if not e.mountpoint.startswith(b"/"):
        return True  # "none" mount points (swap written oddly) and the like
    # network shares: server:/path, //server/share
    return e.spec.startswith("//") or (":" in e.spec and not e.spec.startswith("/dev/"))


def apply_fstab(
    root: GuestFilesystem,
    root_view: Filesystem,
    filesystems: list[GuestFilesystem],
    *,
    use_fstab: bool = True,
    unreadable: Iterable[str] = (),
) -> dict[bytes, Mount]:
    """Mount table of the assembled tree (``{b"/": …, b"/boot": …}``) from the root's fstab.

    Swap, ``noauto``, pseudo and network filesystems and bind mounts are skipped; an entry that
    names no filesystem on the disks is a warning with ``nofail`` and an error otherwise.

    Args:
        unreadable: names of volumes that hold something ova2img cannot read, for messages.
    """
    root.mountpoints = [b"/"]
    mounts: dict[bytes, Mount] = {b"/": Mount(b"/", root, root_view, 0)}
    entries = _fstab_of(root_view, strict=True) if use_fstab else None
    next_id = 0
    for e in entries or []:
        if _skipped_entry(e):
            continue
        mountpoint = _normalise_mountpoint(e.mountpoint)
        found = match_spec(e.spec, filesystems)
        if len(found) != 1:
            problem = "names no filesystem on the disks" if not found else "is ambiguous"
            msg = f"/etc/fstab line {e.lineno} ({e.line}) {problem}"
            skipped = ", ".join(unreadable)
            if skipped and not found:
                msg += f" (volumes not read: {skipped})"
            if e.nofail:
                log.warning("%s; skipped (nofail)", msg)
                continue
            if not found:
                msg += ": is a disk of the VM missing? (give every disk, in order)"
            raise AssemblyError(f"{msg}; --no-fstab mounts the root filesystem only")
        g = found[0]
        if mountpoint == b"/":
            if g is not root:
                raise AssemblyError(
                    f"/etc/fstab line {e.lineno} mounts {_describe(g)} as /, "
                    f"but the root chosen is {_describe(root)}"
                )
            # The root's own options choose its view (btrfs subvol=@, …).
            mounts[b"/"] = Mount(b"/", root, root.fs.mount(e.options), 0, e.options)
            continue
        mountpoint = _followed(mounts, mountpoint, e.lineno)
        if mountpoint in mounts:
            # A later line over the same mount point hides the earlier mount, as mount -a does.
            log.warning(
                "/etc/fstab line %d mounts over %s a second time; the later mount is shown",
                e.lineno,
                mountpoint.decode(errors="replace"),
            )
        view = g.fs.mount(e.options)
        g.mountpoints.append(mountpoint)
        next_id += 1
        mounts[mountpoint] = Mount(mountpoint, g, view, next_id, e.options)
    return mounts


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------

#: deepest directory nesting we follow before calling the tree hostile
MAX_DEPTH = 1024


def _bad_name(name: bytes) -> bool:
    return not name or name in (b".", b"..") or b"/" in name or b"\0" in name


class Excluder:
    """``--exclude GLOB`` as GNU tar applies it: a pattern without a leading ``/`` matches the
    path or any trailing part of it after a ``/``; ``*`` also matches ``/``."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._anchored: list[re.Pattern[bytes]] = []
        self._floating: list[re.Pattern[bytes]] = []
        for p in patterns:
            raw = p.encode("utf-8", "surrogateescape").rstrip(b"/")
            if raw.startswith(b"./"):
                raw = raw[2:]
                target = self._anchored
            elif raw.startswith(b"/"):
                raw = raw.lstrip(b"/")
                target = self._anchored
            else:
                target = self._floating
            target.append(
                re.compile(fnmatch.translate(raw.decode("latin-1")).encode("latin-1"), re.S)
            )

    def __bool__(self) -> bool:
        return bool(self._anchored or self._floating)

    def __call__(self, path: bytes) -> bool:
        if any(r.match(path) for r in self._anchored):
            return True
        start = 0
        while True:
            if any(r.match(path, start) for r in self._floating):
                return True
            start = path.find(b"/", start) + 1
            if start == 0:
                return False


class _Leniency:
    """What a ``lenient`` walk left out or filled in, and the warnings saying so."""

    def __init__(self) -> None:
        self.skipped = 0
        self.damaged = 0

    def skip(self, path: bytes, err: Ova2imgError, what: str = "") -> None:
        self.skipped += 1
        log.warning(
            "cannot read /%s%s: %s; skipped (--lenient)",
            path.decode(errors="replace"),
            what,
            err,
        )

    def damage(self, path: bytes, pos: int, size: int, err: Exception | None) -> None:
        self.damaged += 1
        why = f"{err}" if err is not None else "the data ends before the file's size"
        log.warning(
            "/%s: content unreadable from byte %d of %d (%s); the rest is written as zeros "
            "(--lenient)",
            path.decode(errors="replace"),
            pos,
            size,
            why,
        )

    def summary(self) -> None:
        if self.skipped or self.damaged:
            damaged = f", {self.damaged} damaged file(s) filled with zeros" if self.damaged else ""
            log.warning("--lenient: skipped %d unreadable entries%s", self.skipped, damaged)


#: what may fail while a single entry is read, and be skipped by a lenient walk
_ENTRY_ERRORS = (FilesystemError, DiskError, VolumeError)
#: what may fail while a file's content is read (a library's decoding error, an I/O error)
_READ_ERRORS = (FilesystemError, DiskError, VolumeError, OSError, EOFError)
#: the granularity at which a lenient read finds where a file's content stops being readable
_PIECE = 4096


class _ZeroFilled(io.RawIOBase):
    """A file's content stream that never fails nor ends early (``--lenient``): from a read
    that raises, or that ends before the file's size, the rest reads as zeros and the file is
    reported as damaged. The tar member keeps the size its header announced, so the archive
    stays aligned."""

    def __init__(self, inner: BinaryIO, path: bytes, size: int, report: _Leniency) -> None:
        super().__init__()
        self._inner = inner
        self._path = path
        self._size = size
        self._report = report
        self._pos = 0
        self._failed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        if not n:
            return b""
        data = b""
        if not self._failed:
            try:
                self._inner.seek(self._pos)
                data = bytes(self._inner.read(n))
            except _READ_ERRORS:
                data = self._salvage(n)
            else:
                if len(data) < n:
                    self._fail(None, self._pos + len(data))
        data += bytes(n - len(data))
        self._pos += n
        return data

    def _salvage(self, n: int) -> bytes:
        """After a failed read of *n* bytes: what can be read of them in 4 KiB pieces, up to
        the first piece that fails (from there on the file is zeros)."""
        parts: list[bytes] = []
        pos, end = self._pos, self._pos + n
        while pos < end:
            try:
                self._inner.seek(pos)
                piece = bytes(self._inner.read(min(_PIECE, end - pos)))
            except _READ_ERRORS as exc:
                self._fail(exc, pos)
                break
            if not piece:
                self._fail(None, pos)
                break
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)

    def _fail(self, err: Exception | None, pos: int | None = None) -> None:
        self._failed = True
        self._report.damage(self._path, self._pos if pos is None else pos, self._size, err)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


class _LenientItem(TreeItem):
    """A :class:`TreeItem` whose content stream is :class:`_ZeroFilled`."""

    __slots__ = ("report",)
    report: _Leniency

    def content_pieces(self) -> None:
        return None  # always through open(): its stream fills what cannot be read with zeros

    def read_content(self) -> None:
        return None

    def open(self) -> BinaryIO:
        try:
            inner = self.fs.open(self.handle)
        except _ENTRY_ERRORS as exc:  # checked before the item was yielded: rare
            inner = io.BytesIO()
            self.report.damage(self.path, 0, self.entry.size, exc)
        return cast(BinaryIO, _ZeroFilled(inner, self.path, self.entry.size, self.report))


def walk_tree(
    mounts: dict[bytes, Mount],
    *,
    exclude: Iterable[str] = (),
    start: bytes = b"",
    lenient: bool = False,
) -> Iterator[TreeItem]:
    """Walk the assembled tree depth-first, children sorted by name (bytes), deterministically.

    A mount-point directory shows the mounted filesystem's root (its metadata and its
    children), hiding what the lower filesystem has there, as a real mount does.

    Args:
        mounts: the mount table from :func:`apply_fstab`.
        exclude: GNU-tar-style globs of paths to leave out (matched against the paths yielded).
        start: walk only the subtree at this guest path (relative, without symlinks, as
            :meth:`ova2img.Guest.resolve` returns it); yielded paths are relative to it.
        lenient: an entry whose metadata or listing cannot be read (a :class:`FilesystemError`
            or a disk/volume read error), an invalid name, a directory loop or absurd nesting
            is left out (with its subtree) with a warning, instead of failing the walk; a regular
            file's data runs are checked before it is yielded, and content that fails to read
            later is written as zeros with a warning (see :class:`_ZeroFilled`). A summary
            warning ends the walk. The roots of the mounts stay fatal.

    Raises:
        FilesystemError: an invalid name in a directory, a directory loop, absurd nesting (not
            with *lenient*, except at a mount's root).
    """
    excluded = Excluder(exclude)
    excluding = bool(excluded)  # no patterns: skip the per-path check (~12 us a path)
    report = _Leniency() if lenient else None
    by_path = {mp.strip(b"/"): g for mp, g in mounts.items()}
    start = start.strip(b"/")
    g0, h0 = resolve_in_mounts(mounts, start)
    cut = len(start) + 1 if start else 0
    visited: set[bytes] = set()
    # Explicit stack of (path, filesystem, handle, depth): children are pushed sorted in
    # reverse so they pop in order. ``branch[d]`` is the identity of the directory at depth d
    # on the current path, to detect a directory that contains itself.
    stack: list[tuple[bytes, Mount, object, int]] = [(start, g0, h0, 0)]
    branch: list[tuple[int, int]] = []
    while stack:
        path, g, handle, depth = stack.pop()
        rel = path[cut:]
        if excluding and rel and excluded(rel):
            continue
        mounted = by_path.get(path)
        is_root = not depth
        if mounted is not None and mounted is not g:
            g, handle = mounted, mounted.fs.root()
            visited.add(path)
            is_root = True
        try:
            entry = g.fs.stat(handle)
            if is_root and not path and entry.type is not EntryType.DIR:
                raise FilesystemError(
                    f"the root directory (inode {entry.inode} on {g.name}) is not a directory"
                )
            if is_root and mounted is not None and entry.type is not EntryType.DIR:
                raise FilesystemError(
                    f"the root of {g.name}, mounted at /{path.decode(errors='replace')}, is "
                    "not a directory"
                )
            item = TreeItem(rel, entry, g.fs, g.fs_id, handle)
            if entry.type is EntryType.DIR:
                children = _list_children(g, path, handle, entry, depth, branch, report)
            elif report is not None and entry.type is EntryType.FILE:
                item = _checked_file(item, report)
        except _ENTRY_ERRORS as exc:
            if report is None or is_root:
                raise
            report.skip(path, exc)
            continue
        yield item
        if entry.type is not EntryType.DIR:
            continue
        prefix = path + b"/" if path else b""
        for name in sorted(children, reverse=True):
            stack.append((prefix + name, g, children[name], depth + 1))
    for mp, m in by_path.items():
        inside = not start or mp == start or mp.startswith(start + b"/")
        if mp and inside and mp not in visited and not excluded(mp[cut:]):
            # mount(8) refuses a mount point that does not exist: nothing of it is shown.
            log.warning(
                "mount point /%s (%s) is not a directory on the filesystem below it; "
                "its contents are not included",
                mp.decode(errors="replace"),
                m.name,
            )
    if report is not None:
        report.summary()


def _list_children(
    g: Mount,
    path: bytes,
    handle: object,
    entry: Entry,
    depth: int,
    branch: list[tuple[int, int]],
    report: _Leniency | None,
) -> dict[bytes, object]:
    """The children of a directory by name, after the depth and loop checks (``branch``, the
    directories on the current path, is updated)."""
    shown = path.decode(errors="replace")
    if depth >= MAX_DEPTH:
        raise FilesystemError(f"directory nesting deeper than {MAX_DEPTH} at /{shown}")
    del branch[depth:]
    key = (g.fs_id, entry.inode)
    if key in branch:
        raise FilesystemError(
            f"directory loop: /{shown} is its own ancestor (inode {entry.inode} on {g.name})"
        )
    children: dict[bytes, object] = {}
    try:
        listing = list(g.fs.iterdir(handle))
    except FilesystemError as exc:
        if exc.message.startswith("/"):
            raise
        # name the path: the adapter knows the directory only by its inode
        raise type(exc)(f"/{shown}: {exc.message}", offset=exc.offset, obj=exc.obj) from exc
    for name, child in listing:
        if _bad_name(name):
            err = FilesystemError(
                f"directory /{shown} (inode {entry.inode} on {g.name}) has an invalid entry "
                f"name {name!r}"
            )
            if report is None:
                raise err
            report.skip((path + b"/" if path else b"") + name.replace(b"/", b"\\x2f"), err)
            continue
        if name in children:
            log.warning("directory /%s lists %r twice; the first is kept", shown, name)
            continue
        children[name] = child
    branch.append(key)
    return children


def _checked_file(item: TreeItem, report: _Leniency) -> TreeItem:
    """A regular file for a lenient walk: its data runs read (the extent tree or block map
    validated) before its tar header can be written, its content stream zero-filled."""
    item.data_runs()
    checked = _LenientItem(item.path, item.entry, item.fs, item.fs_id, item.handle)
    checked.report = report
    return checked


def resolve_path(mounts: dict[bytes, Mount], raw: bytes, *, follow: bool = True) -> bytes:
    """The canonical form of a guest path: relative to the guest root, without ``.``, ``..``
    or symlinks, which are followed inside the guest (an absolute target restarts at the guest
    root, never the host's), across the mount points of *mounts*.

    Args:
        follow: also follow a symlink in the last component.

    Raises:
        FileNotFoundError: a component does not exist, or symlinks loop (40 hops, as Linux).
    """
    todo = [p for p in raw.split(b"/") if p and p != b"."]
    done: list[bytes] = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == b"..":
            if done:
                done.pop()
            continue
        candidate = b"/".join([*done, name])
        try:
            mount, handle = resolve_in_mounts(mounts, candidate)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{raw.decode(errors='replace')}: no such file or directory in the guest"
            ) from None
        entry = mount.fs.stat(handle)
        if entry.type is EntryType.SYMLINK and (todo or follow):
            hops += 1
            if hops > 40:
                raise FileNotFoundError(f"{raw.decode(errors='replace')}: too many symlinks")
            if entry.link_target.startswith(b"/"):
                done = []
            todo = [p for p in entry.link_target.split(b"/") if p and p != b"."] + todo
            continue
        if todo and entry.type is not EntryType.DIR:
            raise FileNotFoundError(f"{raw.decode(errors='replace')}: not a directory")
        done.append(name)
    return b"/".join(done)


def resolve_in_mounts(mounts: dict[bytes, Mount], path: bytes) -> tuple[Mount, object]:
    """The mount and handle of a guest path that holds no symlinks (``b""`` is the root).

    Raises:
        FileNotFoundError: no such path.
    """
    path = path.strip(b"/")
    best = b""
    for mp in mounts:
        key = mp.strip(b"/")
        if key and (path == key or path.startswith(key + b"/")) and len(key) > len(best):
            best = key
    mount = mounts[b"/" + best if best else b"/"]
    inner = path[len(best) :]
    if not inner.strip(b"/"):
        return mount, mount.fs.root()
    return mount, mount.fs.lookup(b"/" + inner.strip(b"/"), follow=False)
