"""Pre-flight report: what in a guest's tree a container engine may refuse or lose, counted
from the metadata of one walk (``inspect --container``, and the summary after ``convert``).

Checked: owners above 65535 (a user namespace of 65536 ids — rootless podman, dockerd
``--userns-remap=default`` — cannot map them: ``docker import`` fails with "Container ID
100000 cannot be mapped to a host ID"), device nodes (a user namespace cannot create them),
sockets (tar cannot hold them), ``.wh.`` names (``docker import`` takes them for whiteouts and
drops them), entries that need PAX headers, hardlinks, and sparse files. The verdict says
whether the tarball will import under a 65536-id user namespace; ids above 65535 and device
nodes are the blockers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .assembly import TreeItem
from .filesystems.base import EntryType
from .sinks.tar import HARDLINKED_TYPES

if TYPE_CHECKING:
    from .api import Guest

__all__ = ["Finding", "Preflight", "PreflightReport", "preflight"]

#: ids 0..65535 are what a default user namespace maps (``/etc/subuid`` ranges of 65536)
USERNS_IDS = 65536
#: ustar numeric fields: 7 octal digits for ids, 11 for size and mtime (POSIX ustar)
_USTAR_ID = 8**7
_USTAR_SIZE = 8**11
_NS = 1_000_000_000
#: tar's block: a file whose holes add up to less is written dense (see sinks/tar.py)
_BLOCK = 512
EXAMPLES = 5


@dataclass
class Finding:
    """A count and the first few paths it was seen at."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, path: bytes, note: str = "") -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            shown = "/" + path.decode("utf-8", "backslashreplace")
            self.examples.append(f"{shown} ({note})" if note else shown)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": list(self.examples)}


@dataclass
class PreflightReport:
    """The findings over one tree; see the module docstring.

    Attributes:
        entries: entries seen, by type (``file``, ``dir``, …).
        big_ids: entries owned by a uid or gid above 65535.
        big_uids, big_gids: those distinct ids (sorted).
        devices: char and block device nodes.
        sockets: sockets (left out of the tar).
        fifos: named pipes (fine everywhere; counted for completeness).
        whiteouts: entries with a ``.wh.`` name.
        pax: entries that need a PAX header, by reason (``long name``, ``non-ASCII name``,
            ``long or non-ASCII link target``, ``id ≥ 2^21``, ``mtime with nanoseconds``,
            ``mtime outside 1970..2242``, ``size ≥ 8 GiB``, ``xattrs``).
        pax_entries: entries that need at least one.
        hardlink_groups: inodes with several names in the tree.
        hardlinks_across_mounts: one inode of one filesystem seen under two mounts (the same
            filesystem mounted twice); a tar cannot link across them, so each mount gets its own
            copy. Normally 0: a hardlink cannot cross a mount point.
        hardlinks_outside: inodes whose other names are not in the tree (excluded, hidden by a
            mount, or on a subtree not walked); each still gets its data.
        sparse_files: files with holes (written as GNU sparse).
        sparse_hole_bytes: bytes of holes in them.
    """

    entries: dict[str, int] = field(default_factory=dict)
    big_ids: Finding = field(default_factory=Finding)
    big_uids: list[int] = field(default_factory=list)
    big_gids: list[int] = field(default_factory=list)
    devices: Finding = field(default_factory=Finding)
    sockets: Finding = field(default_factory=Finding)
    fifos: int = 0
    whiteouts: Finding = field(default_factory=Finding)
    pax: dict[str, Finding] = field(default_factory=dict)
    pax_entries: int = 0
    hardlink_groups: int = 0
    hardlinks_across_mounts: Finding = field(default_factory=Finding)
    hardlinks_outside: Finding = field(default_factory=Finding)
    sparse_files: Finding = field(default_factory=Finding)
    sparse_hole_bytes: int = 0

    @property
    def blockers(self) -> list[str]:
        """Why the tarball would not import under a 65536-id user namespace."""
        out = []
        if self.big_ids.count:
            ids = sorted({*self.big_uids, *self.big_gids})
            shown = ", ".join(map(str, ids[:EXAMPLES])) + (", …" if len(ids) > EXAMPLES else "")
            out.append(
                f"{self.big_ids.count} entries owned by ids above 65535 ({shown}): a 65536-id "
                "user namespace cannot map them (remap or clamp the ids)"
            )
        if self.devices.count:
            out.append(
                f"{self.devices.count} device nodes: a user namespace cannot create them "
                "(drop them)"
            )
        return out

    @property
    def userns_ok(self) -> bool:
        """Will it import under rootless podman / dockerd ``--userns-remap``?"""
        return not self.blockers

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.whiteouts.count:
            out.append(
                f"{self.whiteouts.count} names start with '.wh.': docker import takes them for "
                "whiteouts and drops them (rename them)"
            )
        if self.sockets.count:
            out.append(f"{self.sockets.count} sockets: tar cannot hold them, they are left out")
        if self.hardlinks_across_mounts.count:
            out.append(
                f"{self.hardlinks_across_mounts.count} inodes appear under two mounts of one "
                "filesystem: each mount gets its own copy"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (schema 1)."""
        return {
            "schema": 1,
            "entries": dict(self.entries),
            "userns": {
                "ok": self.userns_ok,
                "id_range": USERNS_IDS,
                "blockers": self.blockers,
            },
            "warnings": self.warnings,
            "big_ids": {
                **self.big_ids.to_dict(),
                "uids": self.big_uids,
                "gids": self.big_gids,
            },
            "devices": self.devices.to_dict(),
            "sockets": self.sockets.to_dict(),
            "fifos": self.fifos,
            "whiteouts": self.whiteouts.to_dict(),
            "pax": {
                "entries": self.pax_entries,
                "reasons": {k: v.to_dict() for k, v in sorted(self.pax.items())},
            },
            "hardlinks": {
                "groups": self.hardlink_groups,
                "across_mounts": self.hardlinks_across_mounts.to_dict(),
                "outside_tree": self.hardlinks_outside.to_dict(),
            },
            "sparse": {**self.sparse_files.to_dict(), "hole_bytes": self.sparse_hole_bytes},
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_text(self) -> str:
        """The human report, one finding a line."""
        total = sum(self.entries.values())
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.entries.items()))
        lines = [f"entries: {total} ({kinds})"]
        verdict = "yes" if self.userns_ok else "NO"
        lines.append(f"imports under rootless podman / userns-remap (ids 0-65535): {verdict}")
        lines += [f"  blocker: {b}" for b in self.blockers]

        def finding(title: str, f: Finding) -> None:
            lines.append(f"{title}: {f.count}")
            lines.extend(f"  {e}" for e in f.examples)
            if f.count > len(f.examples):
                lines.append(f"  … and {f.count - len(f.examples)} more")

        finding("ids above 65535", self.big_ids)
        finding("device nodes", self.devices)
        finding("sockets (left out)", self.sockets)
        finding("'.wh.' names (docker import drops them)", self.whiteouts)
        lines.append(f"entries needing PAX headers: {self.pax_entries}")
        for reason, f in sorted(self.pax.items()):
            lines.append(f"  {reason}: {f.count}")
        lines.append(f"hardlink groups: {self.hardlink_groups}")
        finding("hardlinks across mount points", self.hardlinks_across_mounts)
        finding("hardlinks with names outside the tree", self.hardlinks_outside)
        finding("sparse files", self.sparse_files)
        if self.sparse_files.count:
            lines.append(f"  holes: {self.sparse_hole_bytes} bytes")
        return "\n".join(lines) + "\n"


class Preflight:
    """Collects a :class:`PreflightReport` from items as they stream by (:meth:`watch`), so
    ``convert`` can print it after writing without a second walk.

    Args:
        sparse: ask each regular file for its data runs to count sparse files (the adapters
            read their extent maps; cheap, but not free).
    """

    def __init__(self, *, sparse: bool = True) -> None:
        self._sparse = sparse
        self._r = PreflightReport()
        self._types: Counter[str] = Counter()
        self._uids: set[int] = set()
        self._gids: set[int] = set()
        # hardlink bookkeeping, only for inodes with nlink > 1:
        # link_key -> (names seen, nlink, first path); (id(fs), inode) -> fs_id
        self._links: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        self._inodes: dict[tuple[int, int], int] = {}

    def observe(self, item: TreeItem) -> None:
        """Count one item."""
        r = self._r
        e = item.entry
        self._types[e.type.value] += 1
        path = item.path
        if e.uid >= USERNS_IDS or e.gid >= USERNS_IDS:
            r.big_ids.add(path, f"{e.uid}:{e.gid}")
            if e.uid >= USERNS_IDS:
                self._uids.add(e.uid)
            if e.gid >= USERNS_IDS:
                self._gids.add(e.gid)
        if e.type in (EntryType.CHAR, EntryType.BLOCK):
            r.devices.add(path, f"{e.type.value} {e.rdev_major}:{e.rdev_minor}")
        elif e.type is EntryType.SOCKET:
            r.sockets.add(path)
        elif e.type is EntryType.FIFO:
            r.fifos += 1
        if any(p.startswith(b".wh.") for p in path.split(b"/")):
            r.whiteouts.add(path)
        self._pax(item)
        if e.nlink > 1 and e.type in HARDLINKED_TYPES:
            self._link(item)
        if self._sparse and e.type is EntryType.FILE and e.size >= _BLOCK:
            runs = item.data_runs()
            if runs is not None:
                data = sum(min(o + n, e.size) - max(o, 0) for o, n in runs if o < e.size)
                holes = e.size - data
                if holes >= _BLOCK:
                    r.sparse_files.add(path, f"{holes} of {e.size} bytes are holes")
                    r.sparse_hole_bytes += holes

    def _pax(self, item: TreeItem) -> None:
        e = item.entry
        name = b"./" + item.path + (b"/" if e.type is EntryType.DIR and item.path else b"")
        reasons = []
        if len(name) > 100:
            reasons.append("long name")
        if not name.isascii():
            reasons.append("non-ASCII name")
        if e.type is EntryType.SYMLINK and (
            len(e.link_target) > 100 or not e.link_target.isascii()
        ):
            reasons.append("long or non-ASCII link target")
        if not (0 <= e.uid < _USTAR_ID and 0 <= e.gid < _USTAR_ID):
            reasons.append("id ≥ 2^21")
        seconds, nanos = divmod(e.mtime_ns, _NS)
        if nanos:
            reasons.append("mtime with nanoseconds")
        if not 0 <= seconds < _USTAR_SIZE:
            reasons.append("mtime outside 1970..2242")
        if e.type is EntryType.FILE and e.size >= _USTAR_SIZE:
            reasons.append("size ≥ 8 GiB")
        if e.xattrs:
            reasons.append("xattrs")
        for reason in reasons:
            self._r.pax.setdefault(reason, Finding()).add(item.path)
        if reasons:
            self._r.pax_entries += 1

    def _link(self, item: TreeItem) -> None:
        key = item.link_key
        seen = self._links.get(key)
        if seen is None:
            self._links[key] = (1, item.entry.nlink, item.path)
            # The same filesystem object under another mount number: one inode, two mounts.
            ident = (id(item.fs), item.entry.inode)
            other = self._inodes.setdefault(ident, item.fs_id)
            if other != item.fs_id:
                self._r.hardlinks_across_mounts.add(item.path)
        else:
            self._links[key] = (seen[0] + 1, seen[1], seen[2])

    def watch(self, items: Iterable[TreeItem]) -> Iterator[TreeItem]:
        """Pass *items* through, observing each."""
        for item in items:
            self.observe(item)
            yield item

    def report(self) -> PreflightReport:
        """The report over what was observed so far."""
        r = self._r
        r.entries = dict(sorted(self._types.items()))
        r.big_uids = sorted(self._uids)
        r.big_gids = sorted(self._gids)
        r.hardlink_groups = 0
        r.hardlinks_outside = Finding()
        for seen, nlink, first in self._links.values():
            if seen > 1:
                r.hardlink_groups += 1
            if seen < nlink:
                r.hardlinks_outside.add(first, f"{seen} of {nlink} names in the tree")
        return r


def preflight(source: Guest | Iterable[TreeItem], *, sparse: bool = True) -> PreflightReport:
    """The pre-flight report over a guest's whole tree (or over any items, e.g. the stream
    after the profile's transforms, to see what the result will be).

    Example::

        with ova2img.open("vm.ova") as guest:
            report = preflight(guest)
            print(report.to_text())
            if not report.userns_ok: ...
    """
    from .api import Guest

    items = source.walk() if isinstance(source, Guest) else source
    collector = Preflight(sparse=sparse)
    for item in items:
        collector.observe(item)
    return collector.report()
