"""LVM2: physical volumes found on partitions or whole disks become logical volumes.

dissect.volume parses the on-disk label, PV header and metadata text; the mapping from LV to PV
bytes is done here, because dissect's is silently wrong for striped LVs (stripes concatenated
instead of interleaved, see ``shared/design/dissect-gaps.md``) and cannot refuse what it cannot
read. Reference: LVM2's ``lib/format_text/layout.h`` (label, PV header, mda header, raw_locn)
and ``lvm(8)``'s metadata format (``/etc/lvm/backup`` files have the same syntax).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, BinaryIO

from .._stream import PositionedReader, pread_of
from ..errors import UnsupportedError, VolumeError
from .base import Volume

log = logging.getLogger("ova2img.volumes")

SECTOR = 512
#: the mda header occupies the first sector of a metadata area; text wraps around to just after it
MDA_HEADER_SIZE = 512
#: metadata text larger than this is not LVM's (lvm.conf caps a metadata area far lower)
MAX_METADATA = 16 << 20
#: segment types whose data is plain extents on PVs
_LINEAR = {"linear", "striped"}


@dataclass
class PhysicalVolumeInfo:
    """One PV found on a volume: its identity and its newest metadata."""

    volume: Volume
    pv_uuid: str  # without dashes, as the label stores it
    metadata: dict[str, Any]
    seqno: int
    vg_name: str


def _metadata_text(dev: Any, fh: BinaryIO, size: int, where: str) -> str | None:
    """Read the current metadata text of a PV, following a wrap-around of the circular
    buffer (LVM2 format_text: text past the area's end continues after the mda header)."""
    for header, locns in dev._metadata_areas:
        if header.magic != b" LVM2 x[5A%r0N*>":
            raise VolumeError(f"{where}: LVM metadata area has a bad magic", offset=header.start)
        if not locns:
            continue
        loc = locns[0]
        if loc.flags & 1 or loc.size == 0:  # RAW_LOCN_IGNORED
            continue
        if loc.size > MAX_METADATA or loc.offset >= header.size or header.size > size:
            raise VolumeError(
                f"{where}: LVM metadata location out of range "
                f"(offset {loc.offset}, size {loc.size}, area {header.size})",
                offset=header.start,
            )
        first = min(loc.size, header.size - loc.offset)
        fh.seek(header.start + loc.offset)
        data = fh.read(first)
        if first < loc.size:
            fh.seek(header.start + MDA_HEADER_SIZE)
            data += fh.read(loc.size - first)
        if len(data) != loc.size:
            raise VolumeError(f"{where}: LVM metadata is truncated", offset=header.start)
        return data.rstrip(b"\0").decode("utf-8", "replace")
    return None


def read_pv(volume: Volume) -> PhysicalVolumeInfo | None:
    """Parse the LVM label and metadata of a PV, or ``None`` for a PV without metadata
    (``pvcreate --metadatacopies 0``: its VG is described by the other PVs)."""
    # Imported here: dissect.volume.lvm takes ~50 ms to import, paid only for LVM disks.
    from dissect.volume.lvm.physical import LVM2Device, parse_metadata

    where = volume.name
    try:
        dev = LVM2Device(volume.stream)
        text = _metadata_text(dev, volume.stream, volume.size, where)
    except VolumeError:
        raise
    except Exception as exc:  # dissect raises struct, EOF and LVM2Error alike on bad data
        raise VolumeError(f"{where}: unreadable LVM physical volume label: {exc}") from exc
    if text is None:
        return PhysicalVolumeInfo(volume, dev.id, {}, -1, "") if dev.id else None
    try:
        meta = parse_metadata(text)
    except Exception as exc:
        raise VolumeError(f"{where}: malformed LVM metadata text: {exc}") from exc
    vgs = [(k, v) for k, v in meta.items() if isinstance(v, dict)]
    if len(vgs) != 1:
        raise VolumeError(f"{where}: LVM metadata describes {len(vgs)} volume groups, expected 1")
    name, vg = vgs[0]
    return PhysicalVolumeInfo(volume, dev.id, vg, int(vg.get("seqno", 0)), name)


class _Piece:
    __slots__ = ("length", "lv_offset", "stripe_bytes", "stripes")

    def __init__(
        self, lv_offset: int, length: int, stripes: list[tuple[BinaryIO, int]], stripe_bytes: int
    ) -> None:
        self.lv_offset = lv_offset
        self.length = length
        self.stripes = stripes  # (pv stream, byte offset of this segment's first extent)
        self.stripe_bytes = stripe_bytes  # chunk size; 0 for a single (linear) stripe


class LogicalVolumeStream(PositionedReader):
    """The bytes of an LV: its segments mapped onto PV extents, stripes interleaved as the
    kernel's dm-stripe target does (chunk *i* of a segment lives on stripe ``i % n``, at row
    ``i // n``)."""

    def __init__(self, pieces: list[_Piece], size: int, label: str = "") -> None:
        super().__init__(size, label)
        self._pieces = sorted(pieces, key=lambda p: p.lv_offset)
        self._starts = [p.lv_offset for p in self._pieces]
        self._preads = {id(fh): pread_of(fh) for p in self._pieces for fh, _ in p.stripes}

    def pread(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = min(offset + length, self.size)
        while offset < end:
            idx = bisect_right(self._starts, offset) - 1
            piece = self._pieces[idx] if idx >= 0 else None
            if piece is None or offset >= piece.lv_offset + piece.length:
                raise VolumeError(f"LV offset {offset} is mapped by no segment", obj=self.label)
            rel = offset - piece.lv_offset
            if piece.stripe_bytes == 0:
                fh, base = piece.stripes[0]
                n = min(end, piece.lv_offset + piece.length) - offset
                pv_off = base + rel
            else:
                chunk, within = divmod(rel, piece.stripe_bytes)
                row, stripe = divmod(chunk, len(piece.stripes))
                fh, base = piece.stripes[stripe]
                n = min(end - offset, piece.stripe_bytes - within)
                pv_off = base + row * piece.stripe_bytes + within
            data = self._preads[id(fh)](pv_off, n)
            if len(data) != n:
                raise VolumeError(
                    f"LV data beyond the end of its physical volume at {pv_off}", obj=self.label
                )
            parts.append(data)
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _mapper_name(vg: str, lv: str) -> str:
    # device-mapper names double every '-' inside VG and LV names (dm_build_dm_name).
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def assemble_lvm(pvs: list[Volume]) -> tuple[list[Volume], list[tuple[str, str]]]:
    """Turn the volumes that hold LVM PVs into logical-volume :class:`Volume` objects.

    Returns:
        ``(volumes, refused)``: readable LVs in metadata order, and ``(name, reason)`` for
        visible LVs that cannot be read (snapshots, thin, RAID, cache, …).

    Raises:
        VolumeError: malformed metadata, or an LV that needs a PV that is not on any disk
            (naming the VG and the missing PV).
    """
    infos = [info for v in pvs if (info := read_pv(v)) is not None]
    for info in infos:
        if info.vg_name:
            info.volume.extra["vg"] = info.vg_name
    by_uuid = {i.pv_uuid: i for i in infos}
    vgs: dict[str, PhysicalVolumeInfo] = {}
    for info in infos:
        if info.vg_name and (info.vg_name not in vgs or info.seqno > vgs[info.vg_name].seqno):
            vgs[info.vg_name] = info
    out: list[Volume] = []
    refused: list[tuple[str, str]] = []
    for vg_name, newest in vgs.items():
        vg = newest.metadata
        try:
            extent_bytes = int(vg["extent_size"]) * SECTOR
            pv_meta: dict[str, dict[str, Any]] = vg.get("physical_volumes", {})
            lv_meta: dict[str, dict[str, Any]] = vg.get("logical_volumes", {})
        except (KeyError, TypeError, ValueError) as exc:
            raise VolumeError(f"volume group {vg_name}: malformed metadata ({exc})") from exc
        if extent_bytes <= 0:
            raise VolumeError(f"volume group {vg_name}: extent size {extent_bytes} is invalid")
        for lv_name, lv in lv_meta.items():
            name = f"{vg_name}/{lv_name}"
            if "VISIBLE" not in lv.get("status", []):
                continue  # internal LVs: pool metadata, mirror legs, snapshot COW stores
            try:
                volume = _open_lv(vg_name, lv_name, lv, pv_meta, by_uuid, extent_bytes)
            except UnsupportedError as exc:
                refused.append((name, exc.message))
                continue
            out.append(volume)
    return out, refused


def _open_lv(
    vg_name: str,
    lv_name: str,
    lv: dict[str, Any],
    pv_meta: dict[str, dict[str, Any]],
    by_uuid: dict[str, PhysicalVolumeInfo],
    extent_bytes: int,
) -> Volume:
    name = f"{vg_name}/{lv_name}"
    pieces: list[_Piece] = []
    types: list[str] = []
    first_pv: PhysicalVolumeInfo | None = None
    segments = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
    if not segments:
        raise VolumeError(f"logical volume {name} has no segments")
    total = 0
    for seg in segments:
        seg_type = str(seg.get("type", "?")).split("+", 1)[0]
        if seg_type not in _LINEAR:
            what = {
                "snapshot": "a classic snapshot",
                "thin": "a thin volume",
                "thin-pool": "a thin pool",
                "mirror": "a mirror",
                "cache": "a cached volume",
                "writecache": "a write-cached volume",
                "vdo": "a VDO volume",
                "integrity": "an integrity volume",
            }.get(seg_type, f"a {seg_type} volume")
            raise UnsupportedError(
                f"logical volume {name} is {what} (segment type {seg_type}); ova2img reads "
                "linear and striped LVs only"
            )
        try:
            start = int(seg["start_extent"]) * extent_bytes
            length = int(seg["extent_count"]) * extent_bytes
            stripe_list = seg["stripes"]
            count = int(seg.get("stripe_count", len(stripe_list) // 2))
            chunk = int(seg.get("stripe_size", 0)) * SECTOR
        except (KeyError, TypeError, ValueError) as exc:
            raise VolumeError(f"logical volume {name}: malformed segment ({exc})") from exc
        if count < 1 or len(stripe_list) != 2 * count or (count > 1 and chunk <= 0):
            raise VolumeError(f"logical volume {name}: inconsistent stripe list")
        stripes: list[tuple[BinaryIO, int]] = []
        for pv_name, first_extent in zip(stripe_list[0::2], stripe_list[1::2], strict=True):
            pv = pv_meta.get(pv_name)
            if pv is None:
                raise VolumeError(f"logical volume {name} names an unknown PV {pv_name}")
            uuid = str(pv.get("id", "")).replace("-", "")
            info = by_uuid.get(uuid)
            if info is None:
                raise VolumeError(
                    f"volume group {vg_name} is missing physical volume {pv_name} "
                    f"(UUID {pv.get('id')}, last seen as {pv.get('device', '?')}), which "
                    f"{name} needs; give every disk of the VM"
                )
            first_pv = first_pv or info
            pe_start = int(pv.get("pe_start", 0)) * SECTOR
            stripes.append((info.volume.stream, pe_start + int(first_extent) * extent_bytes))
        pieces.append(_Piece(start, length, stripes, chunk if count > 1 else 0))
        # lvm2 writes linear segments as "striped" with one stripe; lvs calls them linear.
        types.append("linear" if count == 1 else "striped")
        total = max(total, start + length)
    assert first_pv is not None
    stream = LogicalVolumeStream(pieces, total, f"LV {vg_name}/{lv_name}").as_binary()
    kinds = "+".join(dict.fromkeys(types))
    return Volume(
        name=name,
        disk_index=first_pv.volume.disk_index,
        number=0,
        offset=0,
        size=total,
        stream=stream,
        scheme="lvm",
        type=kinds,
        extra={
            "vg": vg_name,
            "lv": lv_name,
            "mapper": _mapper_name(vg_name, lv_name),
            "lv_uuid": str(lv.get("id", "")),
            "segments": str(len(segments)),
        },
    )
