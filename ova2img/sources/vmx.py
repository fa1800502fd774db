"""A VMware ``.vmx`` configuration: which ``.vmdk`` files are the VM's disks, in which order.

Format (VMware Workstation/Fusion/ESXi): one ``key = "value"`` per line, ``#`` comments, keys
case-insensitive; a value escapes a byte as ``|XX`` (two hex digits: ``|22`` is ``"``, ``|7C``
is ``|``) and is text in the ``.encoding`` the file declares (UTF-8 by default). A disk is a
device ``<bus><controller>:<unit>`` with ``.fileName``, for the buses ``scsi``, ``sata``,
``nvme`` and ``ide``. Left out:

- a device or a controller with ``present = "FALSE"`` (a device with no ``present`` key is
  taken as present: hand-written files often omit it);
- CD-ROMs: ``deviceType`` ``cdrom-image``, ``atapi-cdrom``, ``cdrom-raw`` (any ``cdrom``), or a
  ``fileName`` ending in ``.iso``;
- a ``fileName`` that is a host device (``/dev/…``: ``deviceType = "rawDisk"`` passthrough), or
  empty.

Snapshots: the ``fileName`` of a VM with snapshots already names the current delta
(``disk-000001.vmdk``); the disk layer follows its ``parentFileNameHint`` chain through
``DiskFile.resolve``, so the disks read as the VM last ran.

Disk order (``VirtualDisk.index``, what ``sda``, ``sdb`` … name): VMware defines none, and a Linux
guest names its disks in the order its storage drivers probe. The order chosen is the one of
ovftool's exports and of VMware's BIOS default boot order: SCSI, then SATA, then NVMe, then IDE;
within a bus, controllers by ``<bus>N.pciSlotNumber`` when the ``.vmx`` has it (the PCI probe
order), else by number; then by unit. A guest whose ``/etc/fstab`` uses UUIDs (all recent
installers) does not depend on it; ``--root`` picks the root by UUID or label either way.
"""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from .base import DiskFile, Source
from .files import (
    FileHandles,
    external_path,
    host_disk_file,
    is_external,
    regular_file_size,
    safe_relative_name,
)

MAX_VMX_SIZE = 1024 * 1024
BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_LINE_RE = re.compile(r'^\s*([^=\s]+)\s*=\s*"(.*)"\s*$')
_BARE_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\S*)\s*$")
_DEVICE_RE = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.filename$")
_ESCAPE_RE = re.compile(rb"\|([0-9A-Fa-f]{2})")
_VMX_STARTS = (b".encoding", b"config.version", b"#!/usr/bin/vmware", b"virtualhw.version")
_VMX_KEYS = ("config.version", "virtualhw.version", "guestos", "displayname", ".filename")


def looks_like_vmx(head: bytes) -> bool:
    """Whether the first bytes of a file are a ``.vmx`` (by content, not by name).

    The file starts with ``.encoding``, ``config.version`` or VMware's ``#!`` line, or every
    line of the first 4 KiB is a ``key = "value"`` line (or a comment) and one key is a
    ``.vmx`` key (``virtualHW.version``, ``guestOS``, ``displayName``, ``*.fileName``).
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.lower().startswith(_VMX_STARTS):
        return True
    lines = text.split(b"\n")
    if len(head) >= 4096:
        lines = lines[:-1]  # the last line may be cut
    known = False
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        m = _LINE_RE.match(line.decode("latin-1"))
        if m is None:
            return False
        known = known or any(k in m.group(1).lower() for k in _VMX_KEYS)
    return known


def parse_vmx(data: bytes, label: str) -> dict[str, str]:
    """The ``.vmx`` as a dict with lower-case keys and unescaped values (the last one wins,
    as VMware reads it).

    Raises:
        SourceError: too large, or a line that is not ``key = "value"``.
    """
    if len(data) > MAX_VMX_SIZE:
        raise SourceError(f".vmx of {len(data)} bytes is too large for one", obj=label)
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    encoding = "utf-8"
    for raw in lines:
        m = _LINE_RE.match(raw.decode("latin-1"))
        if m and m.group(1).lower() == ".encoding":
            try:
                encoding = codecs.lookup(m.group(2)).name
            except LookupError:
                encoding = "utf-8"
    config: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        m = _LINE_RE.match(line.decode("latin-1")) or _BARE_RE.match(line.decode("latin-1"))
        if m is None:
            raise SourceError(f"line {number} is not 'key = \"value\"': {line[:80]!r}", obj=label)
        value = _ESCAPE_RE.sub(lambda e: bytes([int(e.group(1), 16)]), m.group(2).encode("latin-1"))
        config[m.group(1).lower()] = value.decode(encoding, errors="replace")
    return config


@dataclass(frozen=True)
class VmxDisk:
    """One disk device of a ``.vmx``."""

    device: str  # e.g. scsi0:1
    file_name: str


def _false(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("false", "0", "no")


def vmx_disks(config: dict[str, str]) -> list[VmxDisk]:
    """The disk devices of a parsed ``.vmx``, in disk order (see the module docstring)."""
    keyed: list[tuple[tuple[int, int, int, int], VmxDisk]] = []
    for key, file_name in config.items():
        m = _DEVICE_RE.match(key)
        if m is None:
            continue
        bus, ctrl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        device = f"{bus}{ctrl}:{unit}"
        if _false(config.get(f"{bus}{ctrl}.present")) or _false(config.get(f"{device}.present")):
            continue
        device_type = config.get(f"{device}.devicetype", "").lower()
        name = file_name.strip()
        if "cdrom" in device_type or name.lower().endswith(".iso"):
            continue
        if not name or name.startswith("/dev/"):
            continue
        slot_text = config.get(f"{bus}{ctrl}.pcislotnumber", "")
        try:
            slot = int(slot_text)
        except ValueError:
            slot = 1 << 30
        if slot < 0:  # -1: not assigned yet
            slot = 1 << 30
        keyed.append(((BUS_ORDER[bus], slot, ctrl, unit), VmxDisk(device, name)))
    return [d for _, d in sorted(keyed, key=lambda kd: kd[0])]


def open_vmx(path: Path, name: str, *, allow_external: bool = False) -> Source:
    """Open the disks of a ``.vmx`` that lie beside it (a VMware VM folder).

    Args:
        path: the ``.vmx``.
        name: what the user called it.
        allow_external: let a ``fileName`` that is absolute or has ``..`` open that file
            (relative to the folder); refused otherwise.

    Raises:
        SourceError: malformed ``.vmx``, no disk, a disk file missing or outside the folder.
    """
    size = regular_file_size(path, what=".vmx")
    if size > MAX_VMX_SIZE:
        raise SourceError(f".vmx of {size} bytes is too large for one", obj=name)
    config = parse_vmx(path.read_bytes(), name)
    devices = vmx_disks(config)
    if not devices:
        raise SourceError(
            "the .vmx names no disk (no present scsi/sata/nvme/ide fileName)", obj=name
        )
    directory = path.parent
    handles = FileHandles()
    try:
        disks: list[DiskFile] = []
        for dev in devices:
            context = f"{name}: {dev.device}.fileName"
            if is_external(dev.file_name):
                if not allow_external:
                    raise SourceError(
                        f"{dev.device}.fileName {dev.file_name!r} is outside the VM's folder "
                        "(--allow-external-files to read it)",
                        obj=name,
                    )
                target = external_path(directory, dev.file_name)
                disks.append(host_disk_file(target, dev.file_name, handles, allow_external=True))
                continue
            rel = safe_relative_name(dev.file_name, context=context)
            disks.append(
                host_disk_file(directory / rel, rel, handles, allow_external=allow_external)
            )
        files = _folder_files(directory)
    except BaseException:
        handles.close()
        raise
    product = {k: config[key] for k, key in (("product", "displayname"),) if key in config}
    return Source(
        name=name,
        kind="vmx",
        disks=disks,
        product=product,
        files=files,
        _closers=[handles.close],
    )


def _folder_files(directory: Path) -> dict[str, int]:
    """The regular files of the VM's folder with their sizes."""
    files: dict[str, int] = {}
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                files[entry.name] = entry.stat(follow_symlinks=False).st_size
    return dict(sorted(files.items()))
