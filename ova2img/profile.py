"""Container profile: named cleaning operations and id/device/whiteout normalisation, applied
to the stream of :class:`~ova2img.assembly.TreeItem` between the walk and the sink.

Nothing here touches the source: each transform is a generator that yields the items the sink
should write: the same item, a changed copy (an emptied file, new owners, a new name, new
content for ``/etc/passwd``), no item (dropped), or an extra item (a systemd unit masked by a
symlink to ``/dev/null``). The default conversion is a faithful copy; the profile is opt-in.

Pipeline, in this order (see :func:`transform`)::

    guest.walk() → apply_profile → remap_ids → drop_devices → whiteout_names → sink

Hardlinks. The tar sink writes the first path of an inode (its ``link_key``) with the data
and later paths as links to it. A dropped path simply never reaches the sink, so the next path
of its inode becomes the one carrying the data. An emptied (or rewritten) path is split off its
inode: it gets a link key of its own (shared with the other emptied paths of the same inode,
which stay linked together), while the untouched paths keep the original content and key.
Either way every link member points at a member that carries data.

The profile works on a whole-tree walk (paths relative to the guest root); with ``--path`` the
paths are relative to a subtree and the operations' paths would not match.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Literal

from .assembly import TreeItem, parse_fstab
from .errors import FilesystemError, UnsupportedError, UsageError
from .filesystems._posix_acl import ACL_GROUP, ACL_USER
from .filesystems.base import DataRun, Entry, EntryType, Filesystem
from .report import Ledger

if TYPE_CHECKING:
    from .api import Guest

log = logging.getLogger("ova2img.profile")

__all__ = [
    "MASK_UNITS",
    "OPERATIONS",
    "PROFILES",
    "IdMap",
    "Operation",
    "ProfileContext",
    "apply_profile",
    "drop_devices",
    "dry_run",
    "plan_ids",
    "remap_ids",
    "select_operations",
    "transform",
    "whiteout_names",
]


# --------------------------------------------------------------------------------------------
# Synthetic items: content held in memory (emptied files, rewritten /etc/passwd, masks)
# --------------------------------------------------------------------------------------------


class MemoryFilesystem(Filesystem):
    """Backs items whose content ova2img made: the handle is the content itself (``bytes``)."""

    fstype = "memory"

    def root(self) -> object:
        return b""

    def stat(self, handle: object) -> Entry:
        raise FilesystemError("a synthetic item has no inode to stat")

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        return iter(())

    def open(self, handle: object) -> BinaryIO:
        assert isinstance(handle, bytes)
        return io.BytesIO(handle)

    def data_runs(self, handle: object) -> list[DataRun] | None:
        assert isinstance(handle, bytes)
        return [(0, len(handle))] if handle else []


MEMORY = MemoryFilesystem()

#: fs_id of items ova2img adds (masks, directories): never a real mount's number (those are ≥ 0)
_ADDED_FS_ID = -1


def _split_key(item: TreeItem) -> int:
    """The fs_id of a path split off its inode (see the module docstring): negative, distinct
    from real mounts and from :data:`_ADDED_FS_ID`, the same for every split path of one
    inode, so that those stay linked together."""
    return -2 - item.fs_id


def with_content(item: TreeItem, content: bytes) -> TreeItem:
    """A copy of a regular file's item with new *content* (held in memory), split off its
    inode's other names when it has several (see the module docstring)."""
    entry = dataclasses.replace(item.entry, size=len(content))
    return TreeItem(item.path, entry, MEMORY, _split_key(item), content)


def _synthetic(path: bytes, entry: Entry) -> TreeItem:
    return TreeItem(path, entry, MEMORY, _ADDED_FS_ID, b"")


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------

Decision = Literal["empty", "drop", "mask"]


@dataclass
class ProfileContext:
    """What the operations need to know about the guest before the stream starts.

    Attributes:
        swap_files: regular files the guest's ``/etc/fstab`` names as swap (relative paths).
        units: names of the systemd units the guest ships (in ``/lib/systemd/system``,
            ``/usr/lib/systemd/system`` or ``/etc/systemd/system``).
        existing: which of ``etc``, ``etc/systemd``, ``etc/systemd/system`` exist as
            directories, with their entry (for the owner and time of what is added).
    """

    swap_files: frozenset[bytes] = frozenset()
    units: frozenset[str] = frozenset()
    existing: dict[bytes, Entry] = field(default_factory=dict)

    @classmethod
    def from_guest(cls, guest: Guest | None) -> ProfileContext:
        """Read the guest's fstab and unit directories (nothing else)."""
        if guest is None:
            return cls()
        swaps: set[bytes] = set()
        try:
            fstab = guest.read_file("/etc/fstab")
        except (FileNotFoundError, OSError):
            fstab = b""
        for e in parse_fstab(fstab):
            # fstab(5): a swap file is named by its absolute path; /dev/… names devices.
            if e.fstype == "swap" and e.spec.startswith("/") and not e.spec.startswith("/dev/"):
                try:
                    swaps.add(guest.resolve(e.spec, follow=False))
                except FileNotFoundError:
                    continue
        units: set[str] = set()
        for unit_dir in ("lib/systemd/system", "usr/lib/systemd/system", "etc/systemd/system"):
            try:
                units.update(
                    i.path.rsplit(b"/", 1)[-1].decode("utf-8", "surrogateescape")
                    for i in guest.listdir(unit_dir)
                )
            except FileNotFoundError:
                continue
        existing: dict[bytes, Entry] = {}
        for directory in (b"etc", b"etc/systemd", b"etc/systemd/system"):
            try:
                st = guest.stat(directory, follow=False)
            except FileNotFoundError:
                continue
            if st.entry.type is not EntryType.DIR:
                # /etc/systemd is something else than a directory: masks cannot go there.
                return cls(frozenset(swaps), frozenset(), existing)
            existing[directory] = st.entry
        return cls(frozenset(swaps), frozenset(units), existing)


@dataclass(frozen=True)
class Operation:
    """One named cleaning operation of the container profile.

    Attributes:
        name: its name on the command line (``--op NAME``/``--no-op NAME``).
        summary: one line for ``--help`` and the docs.
        doc: what it does exactly (the decision function's docstring).
        decide: ``(context, path, entry) → "empty" | "drop" | "mask" | None``; ``drop`` on a
            directory drops its subtree; ``mask`` replaces the entry by a symlink to
            ``/dev/null``.
        additions: ``context → [(path, entry)]`` entries to add where the guest has none
            (systemd masks).
    """

    name: str
    summary: str
    doc: str
    decide: Callable[[ProfileContext, bytes, Entry], Decision | None]
    additions: Callable[[ProfileContext], list[tuple[bytes, Entry]]] | None = None


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _name(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def _child_of(path: bytes, *parents: bytes) -> bool:
    """Is *path* directly inside one of *parents*?"""
    return _parent(path) in parents and path not in parents


def _op_machine_id(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Empty ``/etc/machine-id`` and remove ``/var/lib/dbus/machine-id``.

    An empty ``/etc/machine-id`` is what systemd expects in an image: it generates a new id at
    boot (machine-id(5), "First Boot Semantics") instead of every container sharing the VM's.
    ``/var/lib/dbus/machine-id`` (a file, or a symlink to ``/etc/machine-id``) is removed;
    ``dbus-uuidgen --ensure`` recreates it.
    """
    if path == b"etc/machine-id" and entry.type is EntryType.FILE and entry.size:
        return "empty"
    if path == b"var/lib/dbus/machine-id" and entry.type is not EntryType.DIR:
        return "drop"
    return None


def _op_ssh_host_keys(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove the SSH host keys ``/etc/ssh/ssh_host_*`` (private and ``.pub``).

    Every container of the image would otherwise present the VM's identity; sshd's packaging
    regenerates them (``ssh-keygen -A``, ``dpkg-reconfigure openssh-server``).
    """
    if _child_of(path, b"etc/ssh") and _name(path).startswith(b"ssh_host_"):
        return "drop" if entry.type is not EntryType.DIR else None
    return None


def _op_logs(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Truncate every regular file under ``/var/log`` to zero bytes.

    Directories, symlinks, owners, modes, times and xattrs stay as they are (so that daemons
    that log as their own user still can), only the content goes.
    """
    if path.startswith(b"var/log/") and entry.type is EntryType.FILE and entry.size:
        return "empty"
    return None


_APT_LISTS_KEEP = frozenset({b"lock", b"partial"})


def _op_package_caches(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove package-manager caches.

    apt: ``/var/cache/apt/*.bin`` (pkgcache/srcpkgcache), ``/var/cache/apt/archives/*.deb``
    and ``/var/lib/apt/lists/*`` except ``lock`` and ``partial`` (``apt-get update``
    refetches them). dnf/yum: the contents of ``/var/cache/dnf`` and ``/var/cache/yum``.
    zypper: the contents of ``/var/cache/zypp``. The directories themselves stay.
    """
    name = _name(path)
    if _child_of(path, b"var/cache/apt") and name.endswith(b".bin"):
        return "drop" if entry.type is not EntryType.DIR else None
    if _child_of(path, b"var/cache/apt/archives") and name.endswith(b".deb"):
        return "drop" if entry.type is not EntryType.DIR else None
    if _child_of(path, b"var/lib/apt/lists") and name not in _APT_LISTS_KEEP:
        return "drop"
    if _child_of(path, b"var/cache/dnf", b"var/cache/yum", b"var/cache/zypp"):
        return "drop"
    return None


def _op_tmp(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove the contents of ``/tmp`` and ``/var/tmp`` (the directories stay, sticky bit and
    all)."""
    return "drop" if _child_of(path, b"tmp", b"var/tmp") else None


def _op_udev_net_rules(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove ``/etc/udev/rules.d/70-persistent-net.rules``, which pins interface names to the
    VM's MAC addresses."""
    if path == b"etc/udev/rules.d/70-persistent-net.rules" and entry.type is not EntryType.DIR:
        return "drop"
    return None


def _op_dhcp_leases(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove DHCP leases: the contents of ``/var/lib/dhcp`` and ``/var/lib/dhclient``
    (ISC dhclient), and ``/var/lib/NetworkManager/*.lease``."""
    if _child_of(path, b"var/lib/dhcp", b"var/lib/dhclient"):
        return "drop"
    if _child_of(path, b"var/lib/NetworkManager") and _name(path).endswith(b".lease"):
        return "drop" if entry.type is not EntryType.DIR else None
    return None


#: shell and REPL history files removed from ``/root`` and ``/home/*``
HISTORY_FILES = frozenset(
    {
        b".bash_history",
        b".zsh_history",
        b".sh_history",
        b".ash_history",
        b".history",
        b".python_history",
        b".node_repl_history",
        b".mysql_history",
        b".psql_history",
        b".sqlite_history",
        b".lesshst",
    }
)


def _home_dir(path: bytes) -> bool:
    return path == b"root" or _child_of(path, b"home")


def _op_shell_history(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove shell and REPL histories from ``/root`` and ``/home/*``: ``.bash_history``,
    ``.zsh_history``, ``.sh_history``, ``.ash_history``, ``.history``, ``.python_history``,
    ``.node_repl_history``, ``.mysql_history``, ``.psql_history``, ``.sqlite_history``,
    ``.lesshst`` and fish's ``.local/share/fish/fish_history``."""
    if entry.type is EntryType.DIR:
        return None
    if _name(path) in HISTORY_FILES and _home_dir(_parent(path)):
        return "drop"
    home, _, rest = path.rpartition(b"/.local/share/fish/")
    if rest == b"fish_history" and _home_dir(home):
        return "drop"
    return None


def _op_swap_files(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove swap files: a regular file ``/etc/fstab`` names with type ``swap``, and
    ``/swapfile``. (Swap partitions and LVs are never part of the tree.)"""
    if entry.type is EntryType.FILE and (path == b"swapfile" or path in ctx.swap_files):
        return "drop"
    return None


def _op_boot_and_modules(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Remove the contents of ``/boot`` (kernels, initramfs, boot loader) and the kernel
    modules in ``/lib/modules`` and ``/usr/lib/modules``: a container runs the host's kernel.
    The directories stay (``/boot`` is often a mount point)."""
    return "drop" if _child_of(path, b"boot", b"lib/modules", b"usr/lib/modules") else None


#: systemd units masked (``/etc/systemd/system/UNIT → /dev/null``) when the guest has them:
#: they drive hardware, consoles, the clock or the kernel, which a container does not own.
MASK_UNITS: tuple[str, ...] = (
    # consoles: no ttys in a container
    "getty@.service",
    "serial-getty@.service",
    "autovt@.service",
    "console-getty.service",
    "getty-static.service",
    # udev: no hardware to manage
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    # the host owns the clock, the kernel's modules, sysctls, and the root mount
    "systemd-timesyncd.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-remount-fs.service",
    # networking is configured by the engine: waiting for it only delays boot
    "NetworkManager-wait-online.service",
    "systemd-networkd-wait-online.service",
    # kernel and pseudo filesystems the engine mounts (or forbids)
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "proc-sys-fs-binfmt_misc.automount",
)

_DEV_NULL = b"/dev/null"
_UNIT_DIR = b"etc/systemd/system"


def _op_mask_units(ctx: ProfileContext, path: bytes, entry: Entry) -> Decision | None:
    """Mask the systemd units of :data:`MASK_UNITS` that the guest has (consoles, udev,
    timesyncd, module loading, remount-fs, wait-online, kernel filesystem mounts): each becomes
    a symlink ``/etc/systemd/system/UNIT → /dev/null``, as ``systemctl mask`` makes. An
    existing ``/etc/systemd/system/UNIT`` is replaced; ``/etc/systemd/system`` is created
    (root, 0755) when missing. A unit the guest does not ship is left alone."""
    if _parent(path) != _UNIT_DIR:
        return None
    unit = _name(path).decode("utf-8", "surrogateescape")
    if unit in MASK_UNITS and unit in ctx.units:
        if entry.type is EntryType.SYMLINK and entry.link_target == _DEV_NULL:
            return None  # already masked
        return "mask"
    return None


def _mask_additions(ctx: ProfileContext) -> list[tuple[bytes, Entry]]:
    wanted = [u for u in MASK_UNITS if u in ctx.units]
    if not wanted or b"etc" not in ctx.existing:
        return []
    out: list[tuple[bytes, Entry]] = []
    parent = ctx.existing[b"etc"]
    for directory in (b"etc/systemd", _UNIT_DIR):
        have = ctx.existing.get(directory)
        if have is None:
            have = Entry(EntryType.DIR, 0o755, 0, 0, 4096, parent.mtime_ns, nlink=2)
            out.append((directory, have))
        parent = have
    for unit in wanted:
        out.append((_UNIT_DIR + b"/" + unit.encode(), _mask_entry(parent.mtime_ns)))
    return out


def _mask_entry(mtime_ns: int) -> Entry:
    return Entry(
        EntryType.SYMLINK,
        0o777,
        0,
        0,
        len(_DEV_NULL),
        mtime_ns,
        atime_ns=mtime_ns,
        ctime_ns=mtime_ns,
        link_target=_DEV_NULL,
    )


def _operation(
    name: str,
    decide: Callable[[ProfileContext, bytes, Entry], Decision | None],
    additions: Callable[[ProfileContext], list[tuple[bytes, Entry]]] | None = None,
) -> Operation:
    doc = " ".join((decide.__doc__ or "").split())
    summary = doc.split(". ")[0].rstrip(".") + "."
    return Operation(name, summary, doc, decide, additions)


#: Every operation, by name, in the order they are tried (the first that decides wins).
OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        _operation("machine-id", _op_machine_id),
        _operation("ssh-host-keys", _op_ssh_host_keys),
        _operation("logs", _op_logs),
        _operation("package-caches", _op_package_caches),
        _operation("tmp", _op_tmp),
        _operation("udev-net-rules", _op_udev_net_rules),
        _operation("dhcp-leases", _op_dhcp_leases),
        _operation("shell-history", _op_shell_history),
        _operation("swap-files", _op_swap_files),
        _operation("boot-and-modules", _op_boot_and_modules),
        _operation("mask-units", _op_mask_units, _mask_additions),
    )
}

#: Named profiles: the operations each one applies.
PROFILES: dict[str, tuple[str, ...]] = {"container": tuple(OPERATIONS)}


def select_operations(
    profile: str | None = None, ops: Sequence[str] = (), no_ops: Sequence[str] = ()
) -> list[str]:
    """The operations to apply: the profile's, plus ``--op`` ones, minus ``--no-op`` ones, in
    :data:`OPERATIONS` order.

    Raises:
        UsageError: an unknown profile or operation name.
    """
    if profile is not None and profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    for name in (*ops, *no_ops):
        if name not in OPERATIONS:
            raise UsageError(f"unknown operation {name!r}; known: {', '.join(OPERATIONS)}")
    chosen = set(PROFILES[profile] if profile else ()) | set(ops)
    chosen -= set(no_ops)
    return [name for name in OPERATIONS if name in chosen]


def _sort_key(path: bytes) -> tuple[bytes, ...]:
    """The walk's order: depth-first with children sorted by name is the lexicographic order
    of the paths' component tuples (a parent's tuple is a prefix of its children's)."""
    return tuple(path.split(b"/")) if path else ()


def _under(path: bytes, top: bytes) -> bool:
    return path.startswith(top + b"/") if top else bool(path)


def apply_profile(
    items: Iterable[TreeItem],
    ops: Sequence[str],
    *,
    ledger: Ledger | None = None,
    guest: Guest | None = None,
    context: ProfileContext | None = None,
) -> Iterator[TreeItem]:
    """Apply the named cleaning operations to a whole-tree walk, lazily.

    Args:
        items: the walk (``guest.walk()``), in its order (parents first, children sorted).
        ops: operation names (:data:`OPERATIONS`), e.g. from :func:`select_operations`.
        ledger: records every change (and :meth:`Ledger.watch` counts what is kept).
        guest: read once up front for fstab swap files and the units the guest has (without
            it, ``swap-files`` knows only ``/swapfile`` and ``mask-units`` masks nothing).
        context: instead of *guest* (tests).

    Yields:
        The items to write: unchanged, emptied, replaced, or added masks, in walk order.

    Raises:
        UsageError: an unknown operation name.
    """
    for name in ops:
        if name not in OPERATIONS:
            raise UsageError(f"unknown operation {name!r}; known: {', '.join(OPERATIONS)}")
    chosen = [OPERATIONS[name] for name in OPERATIONS if name in set(ops)]
    ctx = context if context is not None else ProfileContext.from_guest(guest)
    return _apply(items, chosen, ctx, ledger)


def _apply(
    items: Iterable[TreeItem],
    chosen: list[Operation],
    ctx: ProfileContext,
    ledger: Ledger | None,
) -> Iterator[TreeItem]:
    # Additions are merged into the stream at their sorted place; one whose path the walk has
    # is handled by the operation's decision instead.
    pending: list[tuple[tuple[bytes, ...], bytes, Entry, str]] = sorted(
        (_sort_key(path), path, entry, op.name)
        for op in chosen
        if op.additions is not None
        for path, entry in op.additions(ctx)
    )
    pending.reverse()  # pop() from the end gives the smallest
    dropping: tuple[bytes, str, int] | None = None  # (dir, operation, entries so far)
    drop_index = -1

    def flush(before: tuple[bytes, ...] | None) -> Iterator[TreeItem]:
        while pending and (before is None or pending[-1][0] < before):
            _, path, entry, op_name = pending.pop()
            if ledger is not None:
                action = "masked" if entry.type is EntryType.SYMLINK else "added"
                detail = "→ /dev/null" if action == "masked" else ""
                ledger.record(op_name, action, path, entry.type, detail=detail)
            yield _synthetic(path, entry)

    for item in items:
        path, entry = item.path, item.entry
        key = _sort_key(path)
        if dropping is not None:
            if _under(path, dropping[0]):
                dropping = (dropping[0], dropping[1], dropping[2] + 1)
                if ledger is not None:
                    ledger.dropped_below(entry.type)
                continue
            _end_drop(ledger, dropping, drop_index)
            dropping = None
        yield from flush(key)
        if pending and pending[-1][0] == key:
            pending.pop()  # the walk has this path: the decision below handles it
        decision: Decision | None = None
        op_name = ""
        for op in chosen:
            decision = op.decide(ctx, path, entry)
            if decision is not None:
                op_name = op.name
                break
        if decision is None:
            yield item
        elif decision == "drop":
            if ledger is not None:
                ledger.record(op_name, "dropped", path, entry.type)
            if entry.type is EntryType.DIR:
                dropping = (path, op_name, 1)
                drop_index = len(ledger.changes) - 1 if ledger is not None else -1
        elif decision == "empty":
            if ledger is not None:
                ledger.record(op_name, "emptied", path, entry.type, detail=f"{entry.size} bytes")
            yield with_content(item, b"")
        else:  # mask
            mtime = entry.mtime_ns
            if ledger is not None:
                ledger.record(
                    op_name,
                    "replaced",
                    path,
                    EntryType.SYMLINK,
                    detail=f"was a {entry.type.value}, now → /dev/null",
                )
            yield _synthetic(path, _mask_entry(mtime))
            if entry.type is EntryType.DIR:  # its subtree goes with it
                dropping = (path, op_name, 1)
                drop_index = len(ledger.changes) - 1 if ledger is not None else -1
    if dropping is not None:
        _end_drop(ledger, dropping, drop_index)
    yield from flush(None)


def _end_drop(ledger: Ledger | None, dropping: tuple[bytes, str, int], index: int) -> None:
    """Set the entry count of a dropped directory's change once its subtree has passed."""
    if ledger is None or dropping[2] == 1:
        return
    change = ledger.changes[index]
    ledger.changes[index] = dataclasses.replace(change, entries=dropping[2])


def dry_run(
    guest: Guest, ops: Sequence[str], *, exclude: Iterable[str] = (), ledger: Ledger | None = None
) -> list[str]:
    """What :func:`apply_profile` would change, one line per change, without writing anything
    (and without reading any file's content): ``machine-id: emptied /etc/machine-id (33
    bytes)``, ``tmp: dropped /tmp/build (dir, 12 entries)``."""
    ledger = ledger if ledger is not None else Ledger(operations=ops)
    for _ in apply_profile(guest.walk(exclude=exclude), ops, ledger=ledger, guest=guest):
        pass
    return ledger.lines()


# --------------------------------------------------------------------------------------------
# User and group ids
# --------------------------------------------------------------------------------------------

#: A user namespace made by ``--userns-remap=default`` or rootless podman maps 65536 ids
#: (``/etc/subuid``'s usual range): ids 0..65535 inside.
ID_LIMIT = 65536
#: the kernel's overflowuid/overflowgid, "nobody"/"nogroup": where ``clamp`` puts big ids
OVERFLOW_ID = 65534

_ID_FILES = {
    b"etc/passwd": "passwd",
    b"etc/passwd-": "passwd",
    b"etc/group": "group",
    b"etc/group-": "group",
}
#: largest /etc/passwd or /etc/group read into memory to rewrite
_MAX_ID_FILE = 64 << 20


@dataclass
class IdMap:
    """How ids at or above :attr:`limit` are rewritten.

    Attributes:
        mode: ``remap`` (each big id gets its own free id below the limit: injective, so
            owners stay distinct) or ``clamp`` (every big id becomes :attr:`overflow`).
        uids, gids: the ``remap`` tables (big id → new id).
        limit: ids below it are kept.
        overflow: ``clamp``'s target.
    """

    mode: Literal["remap", "clamp"]
    uids: dict[int, int] = field(default_factory=dict)
    gids: dict[int, int] = field(default_factory=dict)
    limit: int = ID_LIMIT
    overflow: int = OVERFLOW_ID

    def uid(self, value: int) -> int:
        if value < self.limit:
            return value
        return self.uids.get(value, self.overflow) if self.mode == "remap" else self.overflow

    def gid(self, value: int) -> int:
        if value < self.limit:
            return value
        return self.gids.get(value, self.overflow) if self.mode == "remap" else self.overflow


def _acl_ids(value: bytes) -> Iterator[tuple[int, int, int]]:
    """``(offset of e_id, tag, id)`` of the named entries of a ``system.posix_acl_*`` value
    (include/uapi/linux/posix_acl_xattr.h: u32 version, then u16 tag, u16 perm, u32 id)."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return
    for off in range(4, len(value), 8):
        tag, _perm, ident = struct.unpack_from("<HHI", value, off)
        if tag in (ACL_USER, ACL_GROUP):
            yield off + 4, tag, ident


def _id_fields(text: bytes, kind: str) -> Iterator[tuple[str, int]]:
    """``("uid"|"gid", value)`` of each line of passwd(5) (name:pw:uid:gid:…) or group(5)
    (name:pw:gid:members)."""
    for line in text.split(b"\n"):
        fields = line.split(b":")
        if line.startswith(b"#") or len(fields) < (4 if kind == "passwd" else 3):
            continue
        slots = [("uid", 2), ("gid", 3)] if kind == "passwd" else [("gid", 2)]
        for which, index in slots:
            if fields[index].isdigit():
                yield which, int(fields[index])


def _rewrite_id_file(text: bytes, kind: str, idmap: IdMap) -> bytes:
    out = []
    for line in text.split(b"\n"):
        fields = line.split(b":")
        if not line.startswith(b"#") and len(fields) >= (4 if kind == "passwd" else 3):
            slots = [(2, idmap.uid), (3, idmap.gid)] if kind == "passwd" else [(2, idmap.gid)]
            for index, mapper in slots:
                if fields[index].isdigit():
                    fields[index] = str(mapper(int(fields[index]))).encode()
            line = b":".join(fields)
        out.append(line)
    return b"\n".join(out)


def _read_small(item: TreeItem) -> bytes:
    if item.entry.size > _MAX_ID_FILE:
        raise UnsupportedError(
            f"/{item.path.decode(errors='replace')}: {item.entry.size} bytes, too large to "
            f"rewrite (limit {_MAX_ID_FILE})"
        )
    with item.open() as fh:
        return fh.read(_MAX_ID_FILE + 1)


def plan_ids(
    source: Guest | Iterable[TreeItem],
    mode: Literal["remap", "clamp"] = "remap",
    *,
    limit: int = ID_LIMIT,
    overflow: int = OVERFLOW_ID,
) -> IdMap:
    """Decide how big ids are rewritten.

    ``clamp`` needs nothing. ``remap`` walks the tree's metadata once (files' owners, ACL
    entries, ``/etc/passwd`` and ``/etc/group``): each distinct id at or above *limit*, in
    ascending order, gets the highest id below *limit* that nothing in the guest uses (from
    ``limit - 3`` down, so 65534 "nobody" and 65535 stay free), separately for uids and gids.

    Args:
        source: a :class:`~ova2img.Guest` (its whole tree is walked) or the items to scan.
        mode: ``remap`` or ``clamp``.
        limit: the size of the target id range (65536 for ``--userns-remap=default``).
        overflow: ``clamp``'s target (the kernel's overflow id, "nobody").

    Raises:
        UnsupportedError: more big ids than free ids below *limit*.
        UsageError: an unknown mode.
    """
    if mode not in ("remap", "clamp"):
        raise UsageError(f"unknown id mode {mode!r}; known: remap, clamp")
    if mode == "clamp":
        return IdMap("clamp", limit=limit, overflow=overflow)
    from .api import Guest

    items = source.walk() if isinstance(source, Guest) else source
    used: dict[str, set[int]] = {"uid": set(), "gid": set()}
    for item in items:
        e = item.entry
        used["uid"].add(e.uid)
        used["gid"].add(e.gid)
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            for _off, tag, ident in _acl_ids(e.xattrs.get(name, b"")):
                used["uid" if tag == ACL_USER else "gid"].add(ident)
        kind = _ID_FILES.get(item.path)
        if kind is not None and e.type is EntryType.FILE:
            for which, value in _id_fields(_read_small(item), kind):
                used[which].add(value)
    tables: dict[str, dict[int, int]] = {}
    for which in ("uid", "gid"):
        big = sorted(v for v in used[which] if v >= limit)
        free = (v for v in range(limit - 3, 0, -1) if v not in used[which])
        table: dict[int, int] = {}
        for value in big:
            target = next(free, None)
            if target is None:
                raise UnsupportedError(
                    f"{len(big)} {which}s at or above {limit} and not enough free {which}s "
                    "below it to remap them; use clamp"
                )
            table[value] = target
        tables[which] = table
    return IdMap("remap", tables["uid"], tables["gid"], limit, overflow)


def _remap_xattrs(xattrs: dict[str, bytes], idmap: IdMap) -> dict[str, bytes] | None:
    changed: dict[str, bytes] = {}
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        value = xattrs.get(name)
        if not value:
            continue
        buf = bytearray(value)
        for off, tag, ident in _acl_ids(value):
            new = idmap.uid(ident) if tag == ACL_USER else idmap.gid(ident)
            if new != ident:
                struct.pack_into("<I", buf, off, new)
        if buf != value:
            changed[name] = bytes(buf)
    cap = xattrs.get("security.capability")
    # VFS_CAP_REVISION_3 (linux/capability.h, struct vfs_ns_cap_data): 24 bytes, the last
    # u32 is the namespace root uid the capability is relative to.
    if cap is not None and len(cap) == 24 and cap[3] == 0x03:
        (rootid,) = struct.unpack_from("<I", cap, 20)
        new = idmap.uid(rootid)
        if new != rootid:
            changed["security.capability"] = cap[:20] + struct.pack("<I", new)
    if not changed:
        return None
    return {**xattrs, **changed}


def remap_ids(
    items: Iterable[TreeItem], idmap: IdMap, *, ledger: Ledger | None = None
) -> Iterator[TreeItem]:
    """Rewrite owners at or above ``idmap.limit`` (files, ACL entries, a v3 file capability's
    root id) and the uid/gid fields of ``/etc/passwd``, ``/etc/group`` (and their ``-``
    backups) with the same mapping, so that names still match the files they own.

    Args:
        items: the stream (a whole-tree walk for ``/etc/passwd`` to be found).
        idmap: from :func:`plan_ids`.
        ledger: records each change (``remap-ids``: ``remapped``, ``rewritten``).
    """
    for item in items:
        e = item.entry
        uid, gid = idmap.uid(e.uid), idmap.gid(e.gid)
        xattrs = _remap_xattrs(e.xattrs, idmap) if e.xattrs else None
        kind = _ID_FILES.get(item.path)
        if kind is not None and e.type is EntryType.FILE:
            text = _read_small(item)
            new_text = _rewrite_id_file(text, kind, idmap)
            if new_text != text:
                item = with_content(item, new_text)
                if ledger is not None:
                    ledger.record("remap-ids", "rewritten", item.path, e.type, detail="ids")
        if (uid, gid) != (e.uid, e.gid) or xattrs is not None:
            entry = dataclasses.replace(
                item.entry, uid=uid, gid=gid, xattrs=xattrs if xattrs is not None else e.xattrs
            )
            item = TreeItem(item.path, entry, item.fs, item.fs_id, item.handle)
            if ledger is not None:
                detail = []
                if uid != e.uid:
                    detail.append(f"uid {e.uid}→{uid}")
                if gid != e.gid:
                    detail.append(f"gid {e.gid}→{gid}")
                if xattrs is not None:
                    detail.append("ACL/capability ids")
                ledger.record("remap-ids", "remapped", item.path, e.type, detail=", ".join(detail))
        yield item


# --------------------------------------------------------------------------------------------
# Device nodes and whiteout names
# --------------------------------------------------------------------------------------------


def drop_devices(items: Iterable[TreeItem], *, ledger: Ledger | None = None) -> Iterator[TreeItem]:
    """Leave out char and block device nodes (a user namespace cannot create them: rootless
    podman and userns-remapped engines refuse or skip them). Every name of a device inode is a
    device node, so hardlink groups stay whole."""
    for item in items:
        e = item.entry
        if e.type in (EntryType.CHAR, EntryType.BLOCK):
            if ledger is not None:
                ledger.record(
                    "drop-devices",
                    "dropped",
                    item.path,
                    e.type,
                    detail=f"{e.rdev_major}:{e.rdev_minor}",
                )
            continue
        yield item


#: docker/moby pkg/archive (whiteouts.go): a name starting with this marks a deleted file of a
#: lower layer, and ``docker import`` drops it.
WH_PREFIX = b".wh."
#: what ``rename`` puts in front of such a name
WH_RENAME_PREFIX = b"_"


def whiteout_names(
    items: Iterable[TreeItem],
    mode: Literal["rename", "refuse"] = "rename",
    *,
    guest: Guest | None = None,
    ledger: Ledger | None = None,
) -> Iterator[TreeItem]:
    """Handle names that ``docker import`` would take for overlay whiteouts (``.wh.*``).

    ``rename`` prefixes each such component with ``_`` (``.wh.x`` → ``_.wh.x``; if the guest
    already has that name, ``~1``, ``~2``… is appended) and moves everything below a renamed
    directory with it; hardlinks stay links (identity is the inode, not the name).
    ``refuse`` raises at the first one.

    Args:
        guest: used to avoid renaming onto a name the directory already has.

    Raises:
        UnsupportedError: ``refuse`` and a ``.wh.`` name.
        UsageError: an unknown mode.
    """
    if mode not in ("rename", "refuse"):
        raise UsageError(f"unknown whiteout mode {mode!r}; known: rename, refuse")
    cache: dict[tuple[bytes, bytes], bytes] = {}

    def exists(path: bytes) -> bool:
        if guest is None:
            return False
        try:
            guest.stat(path, follow=False)
        except FileNotFoundError:
            return False
        return True

    def rename(parent: bytes, name: bytes) -> bytes:
        key = (parent, name)
        if key not in cache:
            prefix = parent + b"/" if parent else b""
            new = WH_RENAME_PREFIX + name
            n = 0
            while exists(prefix + new):
                n += 1
                new = WH_RENAME_PREFIX + name + b"~%d" % n
            cache[key] = new
        return cache[key]

    for item in items:
        if WH_PREFIX not in item.path:
            yield item
            continue
        parts = item.path.split(b"/")
        if not any(p.startswith(WH_PREFIX) for p in parts):
            yield item
            continue
        if mode == "refuse":
            raise UnsupportedError(
                f"/{item.path.decode(errors='replace')}: a name starting with '.wh.', which "
                "docker import takes for a whiteout and drops (rename it, or leave it out)"
            )
        new_parts = [
            rename(b"/".join(parts[:i]), p) if p.startswith(WH_PREFIX) else p
            for i, p in enumerate(parts)
        ]
        new_path = b"/".join(new_parts)
        if ledger is not None and parts[-1].startswith(WH_PREFIX):
            ledger.record(
                "whiteout-names",
                "renamed",
                new_path,
                item.entry.type,
                detail=f"was {parts[-1].decode('utf-8', 'backslashreplace')}",
            )
        elif ledger is not None:
            ledger.record("whiteout-names", "renamed", new_path, item.entry.type, detail="parent")
        yield TreeItem(new_path, item.entry, item.fs, item.fs_id, item.handle)


# --------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------


def transform(
    items: Iterable[TreeItem],
    *,
    guest: Guest | None = None,
    ops: Sequence[str] = (),
    ids: IdMap | None = None,
    devices: Literal["keep", "drop"] = "keep",
    whiteouts: Literal["keep", "rename", "refuse"] = "keep",
    ledger: Ledger | None = None,
) -> Iterator[TreeItem]:
    """The whole chain in its order: operations, ids, devices, whiteout names; then, when a
    *ledger* is given, :meth:`Ledger.watch` (so the result goes straight to the sink)."""
    stream: Iterable[TreeItem] = items
    if ops:
        stream = apply_profile(stream, ops, ledger=ledger, guest=guest)
    if ids is not None:
        stream = remap_ids(stream, ids, ledger=ledger)
    if devices == "drop":
        stream = drop_devices(stream, ledger=ledger)
    if whiteouts != "keep":
        stream = whiteout_names(stream, whiteouts, guest=guest, ledger=ledger)
    if ledger is not None:
        stream = ledger.watch(stream)
    return iter(stream)
