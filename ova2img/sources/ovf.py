"""The OVF envelope (DMTF DSP0243, OVF 1.x and 2.x): which files are disks, in which order.

Parsed with :mod:`defusedxml` (no DTDs, no entities). What is read:

- ``References/File``: ``ovf:id``, ``ovf:href``, ``ovf:size``, ``ovf:compression``,
  ``ovf:chunkSize`` (DSP0243 §7.1).
- ``DiskSection/Disk``: ``ovf:diskId``, ``ovf:fileRef``, ``ovf:capacity`` with
  ``ovf:capacityAllocationUnits`` (a DSP0004 programmatic unit such as ``byte * 2^30``),
  ``ovf:format`` (§9.1).
- ``VirtualHardwareSection``: the disk order. Each disk ``Item`` (``rasd:ResourceType`` 17, or an
  OVF 2 ``StorageItem``) has ``HostResource`` ``ovf:/disk/<diskId>``, a ``Parent`` naming the
  ``InstanceID`` of its controller (5 IDE, 6 parallel SCSI, 20 other storage — SATA, NVMe …) and
  an ``AddressOnParent``. Disks are ordered by controller (in document order), then by address.
  Disks that no Item uses follow, in ``DiskSection`` order.
- ``ProductSection``: Product, Vendor, Version, FullVersion, ProductUrl, VendorUrl.

VirtualBox adds a ``vbox:Machine`` element; VMware adds ``vmw:`` elements: both are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as safe_fromstring

from ..errors import SourceError, UnsupportedError
from .base import DiskFile, Source
from .files import (
    FileHandles,
    directory_resolver,
    external_path,
    is_external,
    regular_file_size,
    safe_relative_name,
)
from .manifest import ManifestCheck, coverage, parse_manifest
from .packed import Concat, GzipStream, View

OVF_NAMESPACES = (
    "http://schemas.dmtf.org/ovf/envelope/1",
    "http://schemas.dmtf.org/ovf/envelope/2",
)

# An OVF descriptor is a few KiB; anything much larger is not one.
MAX_OVF_SIZE = 16 * 1024 * 1024

RESOURCE_DISK = 17
# DSP1041 / CIM_ResourceAllocationSettingData ResourceType values of storage controllers.
CONTROLLER_TYPES = {5: "IDE", 6: "SCSI", 7: "FC", 8: "iSCSI", 9: "IB", 20: "SATA/other"}

_PRODUCT_FIELDS = {
    "Product": "product",
    "Vendor": "vendor",
    "Version": "version",
    "FullVersion": "full_version",
    "ProductUrl": "product_url",
    "VendorUrl": "vendor_url",
}


@dataclass
class OvfFile:
    """A ``References/File`` of the envelope."""

    id: str
    href: str
    size: int | None = None
    compression: str | None = None
    chunk_size: int | None = None


@dataclass
class OvfDisk:
    """A ``DiskSection/Disk`` of the envelope."""

    disk_id: str
    file_ref: str | None
    capacity: int | None = None
    format: str | None = None


@dataclass
class Envelope:
    """What ova2img needs from an OVF descriptor."""

    version: int
    files: dict[str, OvfFile] = field(default_factory=dict)
    disks: list[OvfDisk] = field(default_factory=list)
    product: dict[str, str] = field(default_factory=dict)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: Element, name: str) -> list[Element]:
    return [c for c in elem if _local(c.tag) == name]


def _text(elem: Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _parse_int(value: str | None, what: str, label: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError as err:
        raise SourceError(f"{what} is not a number: {value!r}", obj=label) from err
    if n < 0:
        raise SourceError(f"{what} is negative: {value!r}", obj=label)
    return n


_UNIT_RE = re.compile(r"^byte(?:\s*\*\s*(\d+)(?:\s*\^\s*(\d+))?)?$", re.IGNORECASE)
# Pre-DSP0004 spellings found in old exports.
_OLD_UNITS = {"bytes": 1, "kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30}


def parse_capacity(capacity: str | None, units: str | None, label: str) -> int | None:
    """Bytes of ``ovf:capacity`` in ``ovf:capacityAllocationUnits`` (default: bytes).

    A capacity given as a ``${property}`` reference (DSP0243 §9.1) is unknown: ``None``.
    """
    if capacity is None or capacity.startswith("${"):
        return None
    value = _parse_int(capacity, "Disk ovf:capacity", label)
    if value is None:
        return None
    multiplier = 1
    if units:
        u = units.strip()
        m = _UNIT_RE.match(u)
        if m:
            base, exponent = m.group(1), m.group(2)
            if base is not None:
                multiplier = int(base) ** int(exponent) if exponent is not None else int(base)
        elif u.lower() in _OLD_UNITS:
            multiplier = _OLD_UNITS[u.lower()]
        else:
            raise SourceError(f"unknown ovf:capacityAllocationUnits {units!r}", obj=label)
    return value * multiplier


def parse_envelope(data: bytes, label: str) -> Envelope:
    """Parse an OVF descriptor.

    Raises:
        SourceError: not XML, not an OVF envelope, or malformed references.
        UnsupportedError: more than one virtual system (a ``VirtualSystemCollection``).
    """
    if len(data) > MAX_OVF_SIZE:
        raise SourceError(
            f"OVF descriptor is {len(data)} bytes, more than {MAX_OVF_SIZE}", obj=label
        )
    try:
        root = safe_fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as err:
        raise SourceError(f"OVF descriptor refused: {err}", obj=label) from err
    except Exception as err:  # xml.etree.ElementTree.ParseError and friends
        raise SourceError(f"OVF descriptor is not well-formed XML: {err}", obj=label) from err
    ns, _, local = root.tag[1:].partition("}") if root.tag.startswith("{") else ("", "", root.tag)
    if local != "Envelope" or ns not in OVF_NAMESPACES:
        raise SourceError(
            f"not an OVF envelope: root element is {root.tag!r}, "
            f"expected Envelope in {OVF_NAMESPACES[0]} or .../2",
            obj=label,
        )
    version = OVF_NAMESPACES.index(ns) + 1

    def attr(elem: Element, name: str) -> str | None:
        return elem.get(f"{{{ns}}}{name}")

    env = Envelope(version=version)
    for refs in _children(root, "References"):
        for f in _children(refs, "File"):
            fid, href = attr(f, "id"), attr(f, "href")
            if not fid or not href:
                raise SourceError("References/File without ovf:id or ovf:href", obj=label)
            if fid in env.files:
                raise SourceError(f"References/File ovf:id {fid!r} appears twice", obj=label)
            env.files[fid] = OvfFile(
                id=fid,
                href=href,
                size=_parse_int(attr(f, "size"), f"File {fid!r} ovf:size", label),
                compression=attr(f, "compression") or None,
                chunk_size=_parse_int(attr(f, "chunkSize"), f"File {fid!r} ovf:chunkSize", label),
            )

    disks: dict[str, OvfDisk] = {}
    for section in _children(root, "DiskSection"):
        for d in _children(section, "Disk"):
            did = attr(d, "diskId")
            if not did:
                raise SourceError("DiskSection/Disk without ovf:diskId", obj=label)
            if did in disks:
                raise SourceError(f"DiskSection/Disk ovf:diskId {did!r} appears twice", obj=label)
            disks[did] = OvfDisk(
                disk_id=did,
                file_ref=attr(d, "fileRef") or None,
                capacity=parse_capacity(
                    attr(d, "capacity"), attr(d, "capacityAllocationUnits"), label
                ),
                format=attr(d, "format"),
            )

    systems = [e for e in root.iter() if _local(e.tag) == "VirtualSystem"]
    if len(systems) > 1:
        raise UnsupportedError(
            f"the OVF describes {len(systems)} virtual systems (a VirtualSystemCollection); "
            "ova2img converts one VM",
            obj=label,
        )
    order: list[str] = []
    if systems:
        order = _disk_order(systems[0], label)
        product = next(iter(_children(systems[0], "ProductSection")), None)
        if product is not None:
            for tag, key in _PRODUCT_FIELDS.items():
                value = _text(product, tag)
                if value:
                    env.product[key] = value
    unknown = [did for did in order if did not in disks]
    if unknown:
        raise SourceError(f"hardware item names disk {unknown[0]!r}, not in DiskSection", obj=label)
    env.disks = [disks[did] for did in order] + [d for did, d in disks.items() if did not in order]
    return env


_HOST_DISK_RE = re.compile(r"^(?:ovf:)?/+disk/(.+)$")


def _disk_order(system: Element, label: str) -> list[str]:
    """Disk ids in the guest's order, from the first VirtualHardwareSection of ``system``.

    Several VirtualHardwareSections (one per platform, as VMware may write) describe the same
    disks; the first is used.
    """
    section = next(iter(_children(system, "VirtualHardwareSection")), None)
    if section is None:
        return []
    controllers: dict[str, tuple[int, int]] = {}  # InstanceID → (document index, ResourceType)
    disk_items: list[tuple[int, Element]] = []
    for index, item in enumerate(section):
        if _local(item.tag) not in ("Item", "StorageItem"):
            continue
        rtype = _parse_int(_text(item, "ResourceType"), "ResourceType", label)
        iid = _text(item, "InstanceID")
        if rtype in CONTROLLER_TYPES and iid:
            controllers[iid] = (index, rtype)
        elif rtype == RESOURCE_DISK:
            disk_items.append((index, item))
    keyed: list[tuple[tuple[int, int, int], str]] = []
    for index, item in disk_items:
        host = _text(item, "HostResource") or ""
        m = _HOST_DISK_RE.match(host)
        if not m:
            # ovf:/file/<id>: a file used directly as a disk (no DiskSection entry) is not
            # a virtual disk ova2img can decode; skip it like an ISO image.
            continue
        parent = _text(item, "Parent")
        ctrl_index = controllers[parent][0] if parent in controllers else 1 << 30
        address = _parse_int(_text(item, "AddressOnParent"), "AddressOnParent", label)
        keyed.append(((ctrl_index, address if address is not None else 1 << 30, index), m.group(1)))
    order: list[str] = []
    for _, did in sorted(keyed):
        if did not in order:
            order.append(did)
    return order


def _unpack(
    f: OvfFile,
    href: str,
    label: str,
    lookup: Callable[[str], tuple[int, Callable[[], BinaryIO]]],
) -> tuple[int, Callable[[], BinaryIO]]:
    """Size and opener of a file's bytes as the disk layer must see them: chunks joined
    (``ovf:chunkSize``, members ``href.000000000`` …) then gzip inflated (``ovf:compression``).

    Raises:
        SourceError: a chunk missing or of the wrong size, corrupt gzip data.
        UnsupportedError: a compression other than ``gzip``/``identity``.
    """
    compression = (f.compression or "identity").lower()
    if compression not in ("identity", "gzip"):
        raise UnsupportedError(
            f"disk file {f.href!r} is stored with ovf:compression={f.compression!r}", obj=label
        )
    if f.chunk_size:
        parts: list[tuple[int, Callable[[], BinaryIO]]] = []
        while True:
            name = f"{href}.{len(parts):09d}"
            try:
                parts.append(lookup(name))
            except SourceError:
                if not parts:
                    raise
                break
        for i, (psize, _) in enumerate(parts[:-1]):
            if psize != f.chunk_size:
                raise SourceError(
                    f"chunk {href}.{i:09d} is {psize} bytes, ovf:chunkSize is {f.chunk_size}",
                    obj=label,
                )
        total = sum(p[0] for p in parts)
        if f.size is not None and f.size != total:
            raise SourceError(
                f"the chunks of {href!r} hold {total} bytes, ovf:size says {f.size}", obj=label
            )

        def joined() -> BinaryIO:
            return Concat([(opener(), psize) for psize, opener in parts]).as_binary()

        size, opener = total, joined
    else:
        size, opener = lookup(href)
        if f.size is not None and f.size != size and compression == "identity":
            raise SourceError(
                f"file {href!r} is {size} bytes but the OVF declares ovf:size={f.size} "
                "(truncated or replaced?)",
                obj=label,
            )
    if compression == "identity":
        return size, opener
    gz = GzipStream(opener(), size, f"{label}:{href}")
    return gz.size, lambda: View(gz).as_binary()


def disk_files(
    env: Envelope,
    label: str,
    lookup: Callable[[str], tuple[int, Callable[[], BinaryIO]]],
    resolve: Callable[[str], BinaryIO],
    *,
    allow_external: bool = False,
) -> list[DiskFile]:
    """The envelope's disks as :class:`DiskFile` objects, in order.

    Args:
        env: the parsed envelope.
        label: the source's name, for messages.
        lookup: maps a (checked, relative) href to the file's actual size and an opener;
            raises :class:`SourceError` when the file is missing.
        resolve: the source's resolver for names used inside a disk (VMDK extents).

    Disks without ``ovf:fileRef`` are blank disks created on import: they carry no data and are
    skipped.
    """
    result: list[DiskFile] = []
    for disk in env.disks:
        if disk.file_ref is None:
            continue
        f = env.files.get(disk.file_ref)
        if f is None:
            raise SourceError(
                f"Disk {disk.disk_id!r} refers to file {disk.file_ref!r}, not in References",
                obj=label,
            )
        if allow_external and is_external(f.href):
            href = f.href
        else:
            href = safe_relative_name(f.href, context=f"{label}: File {f.id!r}")
        size, opener = _unpack(f, href, label, lookup)
        result.append(
            DiskFile(name=href, size=size, open=opener, resolve=resolve, capacity=disk.capacity)
        )
    return result


def open_ovf(
    path: Path, name: str, *, verify_manifest: bool = True, allow_external: bool = False
) -> Source:
    """Open an ``.ovf`` descriptor whose files are beside it.

    The manifest is ``<stem>.mf`` beside it, the certificate ``<stem>.cert`` (DSP0243 §5.1);
    ``verify_manifest`` and ``allow_external`` are as for :func:`~ova2img.sources.ova.open_ova`.

    Raises:
        SourceError: malformed envelope, a referenced disk file missing or of the wrong size.
    """
    size = regular_file_size(path, what="OVF descriptor")
    if size > MAX_OVF_SIZE:
        raise SourceError(f"OVF descriptor is {size} bytes, more than {MAX_OVF_SIZE}", obj=name)
    env = parse_envelope(path.read_bytes(), name)
    handles = FileHandles()
    pending: ManifestCheck | None = None
    try:
        directory = path.parent
        resolve = directory_resolver(directory, handles, name, allow_external=allow_external)

        def lookup(href: str) -> tuple[int, Callable[[], BinaryIO]]:
            target = external_path(directory, href)
            fsize = regular_file_size(target, what=f"disk file {href!r} referenced by the OVF")

            def opener() -> BinaryIO:
                return handles.window(target, href).as_binary()

            return fsize, opener

        status = "absent"
        mf_path = path.with_suffix(".mf")
        if mf_path.is_file():
            status = "skipped"
            if verify_manifest:
                if mf_path.stat().st_size > MAX_OVF_SIZE:
                    raise SourceError("manifest is too large", obj=str(mf_path))
                digests = parse_manifest(mf_path.read_bytes(), str(mf_path))
                package = [path.name, *(f.href for f in env.files.values())]
                pending = ManifestCheck(digests, resolve, name, coverage(digests, package, name))
                status = "checking"
        disks = disk_files(env, name, lookup, resolve, allow_external=allow_external)
        files = {path.name: size}
        for f in env.files.values():
            try:
                rel = safe_relative_name(f.href, context=name)
                files[rel] = (directory / rel).stat().st_size
            except (SourceError, OSError):
                continue  # a non-disk reference (ISO, nvram) may legitimately be left out
    except BaseException as exc:
        try:
            if pending is not None:
                pending.prefer_mismatch(exc)
        finally:
            handles.close()
        raise
    return Source(
        name=name,
        kind="ovf",
        disks=disks,
        product=env.product,
        files=files,
        manifest=status,
        certificate=path.with_suffix(".cert").is_file(),
        check=pending,
        _closers=[handles.close],
    )
