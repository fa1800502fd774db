"""Entry-by-entry comparison of two rootfs tarballs: ours against root's reference.

The reference is what GNU tar writes from the mounted guest (see
:func:`tests.support.reference.make_reference`); "faithful" is defined in
``/work/shared/design/fidelity.md``. Both tars are read with :mod:`tarfile`, which understands
PAX headers (long names, big ids, ``mtime`` with nanoseconds, ``SCHILY.xattr.*``) and GNU
sparse 1.0 members (``GNU.sparse.name``/``realsize``; ``extractfile`` fills the holes).

Compared per path (a leading ``./`` or ``/`` and a trailing ``/`` are normalised away; the
root directory is the entry ``/``):

* type (a hardlink member counts as the type of the inode it links to),
* mode (all 12 bits), uid, gid,
* mtime, exactly: the PAX ``mtime`` string is parsed with :class:`decimal.Decimal` (tarfile
  turns it into a float, which cannot hold nanoseconds of 2100); the ustar field otherwise,
* size and SHA-256 of the content of regular files (a hardlink's content is its target's),
* symlink target, device major/minor of char/block devices,
* hardlink *groups*: the set of paths that are names of one inode; which member carries the
  data is free,
* every ``SCHILY.xattr.*`` as bytes, including ``system.posix_acl_access``/``_default``
  (binary, numeric ids). GNU tar's ``SCHILY.acl.*`` text is ignored: it names users through
  the host's passwd, not the guest's.

atime and ctime are ignored. Use ``ignore`` for paths tar cannot carry (a socket: GNU tar says
``socket ignored``) and ``ignore_fields`` for properties a reference cannot have (FAT).
"""

from __future__ import annotations

import fnmatch
import hashlib
import tarfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

__all__ = [
    "FIELDS",
    "TarEntry",
    "TarTree",
    "assert_same_tree",
    "compare_tars",
    "compare_trees",
    "normalise_path",
    "parse_pax_time",
    "read_tree",
]

FIELDS = frozenset(
    {
        "type",
        "mode",
        "uid",
        "gid",
        "mtime",
        "size",
        "content",
        "target",
        "device",
        "xattrs",
        "hardlinks",
    }
)
"""Names accepted by ``ignore_fields``."""

_KIND = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR = "SCHILY.xattr."
_CHUNK = 1 << 20


@dataclass(slots=True)
class TarEntry:
    """One member of a tar, reduced to what fidelity compares.

    Attributes:
        path: the normalised path (``/`` for the root, else ``/a/b``), surrogate-escaped.
        kind: ``file``, ``dir``, ``symlink``, ``char``, ``block``, ``fifo``, or ``hardlink``
            (then :attr:`link` is the normalised path of the member it links to).
        mode: the 12 permission bits.
        uid, gid: numeric owners.
        mtime: seconds since the epoch, exact (``Decimal``; negative before 1970).
        size: content size of a regular file (``realsize`` of a sparse one), else 0.
        sha256: hex digest of the content of a regular file, else ``None``.
        link: symlink target (raw, surrogate-escaped) or hardlink target path.
        device: ``(major, minor)`` of a char/block device, else ``None``.
        xattrs: ``SCHILY.xattr.*`` names (prefix stripped) to raw values.
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: Decimal
    size: int = 0
    sha256: str | None = None
    link: str = ""
    device: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class TarTree:
    """All members of one tar by normalised path, hardlink groups, and reading problems."""

    entries: dict[str, TarEntry]
    groups: dict[str, frozenset[str]]
    problems: list[str]

    def resolved(self, path: str) -> TarEntry:
        """The entry carrying the inode data of ``path`` (its hardlink target, if any)."""
        entry = self.entries[path]
        seen = {path}
        while entry.kind == "hardlink" and entry.link in self.entries and entry.link not in seen:
            seen.add(entry.link)
            entry = self.entries[entry.link]
        return entry


def normalise_path(name: str) -> str:
    """``./a/b/``, ``a/b`` and ``/a/b`` → ``/a/b``; ``.``, ``./`` and ``/`` → ``/``."""
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    name = name.rstrip("/")
    if name in ("", "."):
        return "/"
    return "/" + name


def parse_pax_time(value: str) -> Decimal:
    """Parse a PAX time (``-315619199.876543211``) exactly; raise ``ValueError`` if bad."""
    # POSIX pax: "a decimal number, optionally with a fraction"; Decimal keeps every digit.
    text = value.strip()
    try:
        result = Decimal(text)
    except ArithmeticError as exc:  # decimal.InvalidOperation
        raise ValueError(f"bad PAX time {value!r}") from exc
    if not result.is_finite():
        raise ValueError(f"bad PAX time {value!r}")
    return result


def _format_time(t: Decimal) -> str:
    ns = t * 10**9
    return f"{t} ({ns.to_integral_value()} ns)" if ns == ns.to_integral_value() else str(t)


def _sha256(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    digest = hashlib.sha256()
    fobj = tf.extractfile(member)
    if fobj is None:
        raise ValueError(f"cannot read the content of {member.name!r}")
    with fobj:
        while chunk := fobj.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_tree(path: Path) -> TarTree:
    """Read a tar (any compression tarfile knows) into a :class:`TarTree`.

    Content is hashed while reading, one member at a time, in 1 MiB chunks.
    """
    entries: dict[str, TarEntry] = {}
    problems: list[str] = []
    with tarfile.open(path, "r:*", encoding="utf-8", errors="surrogateescape") as tf:
        for member in tf:
            p = normalise_path(member.name)
            kind = _KIND.get(member.type, f"other({member.type!r})")
            pax = member.pax_headers
            mtime = parse_pax_time(pax["mtime"]) if "mtime" in pax else Decimal(int(member.mtime))
            entry = TarEntry(
                path=p,
                kind=kind,
                mode=member.mode & 0o7777,
                uid=member.uid,
                gid=member.gid,
                mtime=mtime,
                xattrs={
                    k[len(_XATTR) :]: v.encode("utf-8", "surrogateescape")
                    for k, v in pax.items()
                    if k.startswith(_XATTR)
                },
            )
            if kind == "file":
                entry.size = member.size
                entry.sha256 = _sha256(tf, member)
            elif kind == "symlink":
                entry.link = member.linkname
            elif kind == "hardlink":
                entry.link = normalise_path(member.linkname)
                if entry.link not in entries:
                    # tar extracts a link by linking to an earlier member (POSIX ustar LNKTYPE).
                    problems.append(
                        f"{p}: hardlink to {entry.link}, which is not an earlier member"
                    )
            elif kind in ("char", "block"):
                entry.device = (member.devmajor, member.devminor)
            if p in entries:
                problems.append(f"{p}: appears more than once in the archive")
            entries[p] = entry
    groups = _hardlink_groups(entries)
    return TarTree(entries=entries, groups=groups, problems=problems)


def _hardlink_groups(entries: dict[str, TarEntry]) -> dict[str, frozenset[str]]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for e in entries.values():
        if e.kind == "hardlink":
            a, b = find(e.path), find(e.link)
            if a != b:
                parent[a] = b
    members: dict[str, set[str]] = {}
    for p in parent:
        members.setdefault(find(p), set()).add(p)
    groups: dict[str, frozenset[str]] = {}
    for rootp, ms in members.items():
        group = frozenset(ms | {rootp})
        for m in group:
            groups[m] = group
    return groups


def _ignored(path: str, patterns: Collection[str]) -> bool:
    return any(path == pat or fnmatch.fnmatchcase(path, pat) for pat in patterns)


def _fmt_group(group: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(group)) + "}"


def compare_trees(
    ours: TarTree,
    ref: TarTree,
    *,
    ignore: Collection[str] = frozenset(),
    ignore_fields: Collection[str] = frozenset(),
) -> list[str]:
    """Compare two read trees; see :func:`compare_tars`."""
    bad = set(ignore_fields) - FIELDS
    if bad:
        raise ValueError(f"unknown ignore_fields {sorted(bad)}; known: {sorted(FIELDS)}")
    patterns = {normalise_path(p) if not p.startswith("*") else p for p in ignore}
    diffs = [f"ours: {p}" for p in ours.problems] + [f"ref: {p}" for p in ref.problems]
    seen_groups: set[tuple[frozenset[str], frozenset[str]]] = set()
    for path in sorted(ours.entries.keys() | ref.entries.keys()):
        if _ignored(path, patterns):
            continue
        if path not in ours.entries:
            diffs.append(f"{path!r}: missing from ours (ref has a {ref.entries[path].kind})")
            continue
        if path not in ref.entries:
            diffs.append(f"{path!r}: only in ours (a {ours.entries[path].kind})")
            continue
        diffs.extend(_compare_entry(path, ours, ref, ignore_fields, seen_groups))
    return diffs


def _compare_entry(
    path: str,
    ours: TarTree,
    ref: TarTree,
    ignore_fields: Collection[str],
    seen_groups: set[tuple[frozenset[str], frozenset[str]]],
) -> list[str]:
    out: list[str] = []
    o, r = ours.resolved(path), ref.resolved(path)
    own_o, own_r = ours.entries[path], ref.entries[path]

    def check(name: str, a: object, b: object, fmt: str = "{!r}") -> None:
        if name not in ignore_fields and a != b:
            out.append(f"{path!r}: {name} {fmt.format(a)} != ref {fmt.format(b)}")

    check("type", o.kind, r.kind, "{}")
    if "hardlinks" not in ignore_fields:
        go = ours.groups.get(path, frozenset({path}))
        gr = ref.groups.get(path, frozenset({path}))
        if go != gr and (go, gr) not in seen_groups:
            seen_groups.add((go, gr))
            out.append(f"{path!r}: hardlink group {_fmt_group(go)} != ref {_fmt_group(gr)}")
    # The link member's own header carries the inode's metadata (GNU tar writes lstat's).
    check("mode", own_o.mode, own_r.mode, "{:#o}")
    check("uid", own_o.uid, own_r.uid)
    check("gid", own_o.gid, own_r.gid)
    if "mtime" not in ignore_fields and own_o.mtime != own_r.mtime:
        out.append(
            f"{path!r}: mtime {_format_time(own_o.mtime)} != ref {_format_time(own_r.mtime)}"
        )
    if o.kind == r.kind == "file":
        check("size", o.size, r.size)
        if o.size == r.size:
            check("content", o.sha256, r.sha256, "sha256 {}")
    if o.kind == r.kind == "symlink":
        check("target", o.link, r.link)
    if o.kind == r.kind and o.kind in ("char", "block"):
        check("device", o.device, r.device)
    if "xattrs" not in ignore_fields:
        xo, xr = own_o.xattrs or o.xattrs, own_r.xattrs or r.xattrs
        for name in sorted(xo.keys() | xr.keys()):
            if name not in xo:
                out.append(f"{path!r}: xattr {name} missing from ours (ref {xr[name]!r})")
            elif name not in xr:
                out.append(f"{path!r}: xattr {name} only in ours ({xo[name]!r})")
            elif xo[name] != xr[name]:
                out.append(f"{path!r}: xattr {name} {xo[name]!r} != ref {xr[name]!r}")
    return out


def compare_tars(
    ours: Path,
    ref: Path,
    *,
    ignore: Collection[str] = frozenset(),
    ignore_fields: Collection[str] = frozenset(),
) -> list[str]:
    """Compare two rootfs tarballs entry by entry; return the differences, one line each.

    Args:
        ours: the tar ova2img wrote.
        ref: the reference (GNU tar of the mounted guest).
        ignore: paths to leave out on both sides, normalised like member names (``probes/x``,
            ``./probes/x`` and ``/probes/x`` are one path), or ``fnmatch`` patterns
            (``/proc/*``).
        ignore_fields: any of :data:`FIELDS` not to compare.

    Returns:
        Human-readable differences sorted by path; an empty list means the trees are the same.
    """
    return compare_trees(
        read_tree(ours), read_tree(ref), ignore=ignore, ignore_fields=ignore_fields
    )


def assert_same_tree(
    ours: Path,
    ref: Path,
    *,
    ignore: Collection[str] = frozenset(),
    ignore_fields: Collection[str] = frozenset(),
    limit: int = 50,
) -> None:
    """Fail (``AssertionError``) listing the first ``limit`` differences, if there are any."""
    diffs = compare_tars(ours, ref, ignore=ignore, ignore_fields=ignore_fields)
    if diffs:
        shown = "\n  ".join(diffs[:limit])
        more = f"\n  … and {len(diffs) - limit} more" if len(diffs) > limit else ""
        raise AssertionError(
            f"{ours} differs from the reference {ref} in {len(diffs)} ways:\n  {shown}{more}"
        )
