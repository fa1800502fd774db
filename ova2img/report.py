"""The conversion ledger (``--report FILE``): per category, what was kept, transformed (and by
which operation) or dropped.

Every transform of :mod:`ova2img.profile` records its changes in a :class:`Ledger`; the ledger
then :meth:`~Ledger.watch`-es the stream the sink receives, so that "kept" counts what was
really written untouched. The JSON (schema 1) looks like::

    {
      "schema": 1,
      "profile": "container",
      "operations": ["machine-id", "logs", ...],
      "totals": {"kept": 1234, "transformed": 12, "added": 9, "dropped": 40},
      "categories": {
        "file": {"kept": 900, "transformed": 10, "added": 0, "dropped": 38},
        "dir": {...}, "symlink": {...}, ...
      },
      "changes": [
        {"path": "/etc/machine-id", "type": "file", "action": "emptied",
         "operation": "machine-id", "detail": "33 bytes"},
        {"path": "/boot/grub", "type": "dir", "action": "dropped",
         "operation": "boot-and-modules", "entries": 12},
        ...
      ]
    }

``action`` is one of ``emptied``, ``dropped``, ``masked`` (a unit symlinked to ``/dev/null``),
``added`` (a directory created to hold a mask), ``rewritten`` (new content),
``remapped`` (owners), ``renamed``. A dropped directory is one change whose ``entries``
counts it with everything below it; the categories count every entry.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assembly import TreeItem
from .errors import SinkError, UsageError
from .filesystems.base import EntryType

__all__ = ["ADDED", "DROPPED", "TRANSFORMED", "Change", "Ledger", "check_report_path"]

#: actions that add an entry the guest does not have
ADDED = frozenset({"masked", "added"})
#: actions that take entries out
DROPPED = frozenset({"dropped"})
#: actions that change an entry in place
TRANSFORMED = frozenset({"emptied", "rewritten", "remapped", "renamed", "replaced"})


def _show(path: bytes) -> str:
    return "/" + path.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Change:
    """One change a transform made.

    Attributes:
        path: the guest path (relative, raw), as it is written (after a rename: the new name).
        type: the entry's type.
        action: see the module docstring.
        operation: the operation that made it (``machine-id``, ``remap-ids``, ``tar``, …).
        detail: free text (``33 bytes``, ``uid 100000→65533``, ``was .wh.x``).
        entries: for a dropped directory, how many entries went with it (itself included).
    """

    path: bytes
    type: EntryType
    action: str
    operation: str
    detail: str = ""
    entries: int = 1

    def line(self) -> str:
        """One human line: ``machine-id: emptied /etc/machine-id (33 bytes)``."""
        extra = []
        if self.detail:
            extra.append(self.detail)
        if self.entries > 1:
            extra.append(f"{self.entries} entries")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{self.operation}: {self.action} {_show(self.path)}{tail}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": _show(self.path),
            "type": self.type.value,
            "action": self.action,
            "operation": self.operation,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.entries != 1:
            out["entries"] = self.entries
        return out


class Ledger:
    """Collects the changes of one conversion and counts what the sink was given.

    Args:
        profile: the profile name (``container``) or ``None`` for hand-picked operations.
        operations: the operations that were asked for, in order.
    """

    def __init__(self, *, profile: str | None = None, operations: Sequence[str] = ()) -> None:
        self.profile = profile
        self.operations = list(operations)
        self.changes: list[Change] = []
        self._dropped: Counter[str] = Counter()
        self._touched: dict[bytes, str] = {}  # written path -> "transformed"/"added"
        self._written: dict[str, Counter[str]] = {}
        self.watched = False

    # -- recording ---------------------------------------------------------------------------

    def record(
        self,
        operation: str,
        action: str,
        path: bytes,
        type_: EntryType,
        *,
        detail: str = "",
        entries: int = 1,
    ) -> None:
        """Note one change (transforms call this; ``entries`` > 1 for a dropped subtree)."""
        self.changes.append(Change(path, type_, action, operation, detail, entries))
        if action in DROPPED:
            self._dropped[type_.value] += 1
        elif action in ADDED:
            self._touched[path] = "added"
        else:
            self._touched.setdefault(path, "transformed")

    def dropped_below(self, type_: EntryType) -> None:
        """Count an entry that went with a dropped directory (no change line of its own)."""
        self._dropped[type_.value] += 1

    def watch(self, items: Iterable[TreeItem]) -> Iterator[TreeItem]:
        """Pass *items* through, counting them per type as kept, transformed or added. Put it
        last before the sink. A socket is counted as dropped by ``tar`` (tar cannot hold one)."""
        self.watched = True
        for item in items:
            kind = item.entry.type
            if kind is EntryType.SOCKET:
                self.record("tar", "dropped", item.path, kind, detail="tar cannot hold sockets")
            else:
                state = self._touched.get(item.path, "kept")
                self._written.setdefault(kind.value, Counter())[state] += 1
            yield item

    # -- output ------------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """The changes, one human line each, in the order they were made (tree order)."""
        return [c.line() for c in self.changes]

    def by_operation(self) -> dict[str, list[Change]]:
        out: dict[str, list[Change]] = {}
        for c in self.changes:
            out.setdefault(c.operation, []).append(c)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ledger (schema 1, see the module docstring)."""
        categories: dict[str, dict[str, int]] = {}
        for kind in EntryType:
            written = self._written.get(kind.value, Counter())
            row = {
                "kept": written["kept"],
                "transformed": written["transformed"],
                "added": written["added"],
                "dropped": self._dropped[kind.value],
            }
            if any(row.values()):
                categories[kind.value] = row
        totals = {
            key: sum(row[key] for row in categories.values())
            for key in ("kept", "transformed", "added", "dropped")
        }
        return {
            "schema": 1,
            "profile": self.profile,
            "operations": self.operations,
            "counted": self.watched,
            "totals": totals,
            "categories": categories,
            "changes": [c.to_dict() for c in self.changes],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON ledger to *path* (UTF-8; names that are not UTF-8 keep their bytes
        as surrogate escapes turned into ``\\udcXX`` JSON escapes), under a temporary name
        renamed into place: a failed write leaves no half report.

        Raises:
            SinkError: it cannot be written (one line).
        """
        target = Path(path).absolute()
        tmp = target.with_name(f".{target.name}.ova2img-{os.getpid()}.part")
        try:
            with tmp.open("w", encoding="ascii") as fh:
                fh.write(self.to_json())
            tmp.replace(target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SinkError(f"cannot write the report {path}: {exc.strerror or exc}") from exc


def check_report_path(path: str | os.PathLike[str]) -> None:
    """Fail before any work when ``--report FILE`` cannot be written: FILE is a directory, or
    its directory does not exist or is not writable.

    Raises:
        UsageError: one of these.
    """
    target = Path(path).absolute()
    if target.is_dir():
        raise UsageError(f"--report {path}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"--report {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--report {path}: the directory {parent} is not writable")
