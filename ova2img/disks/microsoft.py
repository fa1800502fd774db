"""VHD (Virtual PC / Hyper-V v1) and VHDX through :mod:`dissect.hypervisor`, headers checked.

Specifications: "Virtual Hard Disk Image Format Specification" 1.0 (VHD: a 512-byte footer at
the end, copied at offset 0 of a dynamic disk; a dynamic header ``cxsparse`` and a block
allocation table of big-endian sector numbers) and [MS-VHDX] (a file identifier, two headers,
two region tables, a metadata region and a BAT of 64-bit entries).

Fixed and dynamic VHD and fixed/dynamic VHDX are decoded. Differencing disks of both formats
are refused: dissect reads a differencing VHD as a plain dynamic one (the parent's sectors come
back as zeros, silently), and opens a differencing VHDX's parent by host path, so neither may be
trusted; no tool in the test environment (qemu-img cannot write either) makes one to test with.
A VHDX whose log is not empty must be replayed first (qemu-img refuses it read-only too).
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

from dissect.hypervisor.disk import vhd as _vhd
from dissect.hypervisor.disk import vhdx as _vhdx
from dissect.hypervisor.disk.c_vhdx import BAT_REGION_GUID, FILE_PARAMETERS_GUID

from ..errors import DiskError, Ova2imgError, UnsupportedError
from .stream import DECODE_ERRORS, DiskStream, ForeignStream, describe

SECTOR = 512
MAX_VIRTUAL_SIZE = 64 * 2**40
VHD_COOKIE = b"conectix"
VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4
VHDX_SIGNATURE = b"vhdxfile"
_VHDX_REGION_OFFSETS = (192 * 1024, 256 * 1024)  # [MS-VHDX] 2.2: two copies of the region table
_VHDX_MAX_REGIONS = 2047


def _read_at(fh: BinaryIO, offset: int, length: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def _wrap(err: BaseException, what: str, name: str) -> DiskError:
    return DiskError(f"cannot open {what}: {describe(err)}", obj=name)


def vhd_subformat(fh: BinaryIO, file_size: int, name: str) -> tuple[int, bytes]:
    """The disk type and footer of a VHD, checked against the file size.

    Raises:
        DiskError: no footer at the end, or fields that do not fit the file.
        UnsupportedError: a differencing disk, or an unknown disk type.
    """
    if file_size < SECTOR:
        raise DiskError("VHD shorter than its footer", obj=name)
    footer = _read_at(fh, file_size - SECTOR, SECTOR)
    if not footer.startswith(VHD_COOKIE):
        # Virtual PC before 2004 wrote a 511-byte footer (dissect's read_footer handles it).
        footer = _read_at(fh, file_size - SECTOR + 1, SECTOR - 1)
        if not footer.startswith(VHD_COOKIE):
            raise DiskError(
                "no VHD footer in the last sector (a truncated dynamic VHD?)",
                obj=name,
                offset=file_size - SECTOR,
            )
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    if current_size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"VHD virtual size of {current_size} bytes is absurd", obj=name)
    if disk_type == VHD_DIFFERENCING:
        raise UnsupportedError(
            "differencing VHD (a snapshot): merge it into its parent first", obj=name
        )
    if disk_type == VHD_FIXED:
        if file_size < current_size + SECTOR - 1:
            raise DiskError(
                f"fixed VHD of {current_size} bytes in a {file_size}-byte file (truncated?)",
                obj=name,
            )
        return disk_type, footer
    if disk_type != VHD_DYNAMIC:
        raise UnsupportedError(f"VHD disk type {disk_type}", obj=name)
    if data_offset + 1024 > file_size:
        raise DiskError(f"VHD dynamic header at {data_offset:#x} lies beyond the end", obj=name)
    header = _read_at(fh, data_offset, 1024)
    if not header.startswith(b"cxsparse"):
        raise DiskError("no VHD dynamic header (cxsparse)", obj=name, offset=data_offset)
    table_offset, _, max_entries, block_size = struct.unpack_from(">QIII", header, 16)
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > 2**28:
        raise DiskError(f"VHD block size {block_size} is not a power of two", obj=name)
    if max_entries * block_size < current_size:
        raise DiskError(
            f"VHD block table of {max_entries} entries cannot map {current_size} bytes", obj=name
        )
    if table_offset + 4 * max_entries > file_size:
        raise DiskError(f"VHD block table at {table_offset:#x} lies beyond the end", obj=name)
    return disk_type, footer


def open_vhd(fh: BinaryIO, file_size: int, name: str) -> tuple[str, DiskStream]:
    """Open a fixed or dynamic VHD: (subformat, stream).

    Raises:
        DiskError: malformed footer or tables; UnsupportedError: differencing disks.
    """
    disk_type, _ = vhd_subformat(fh, file_size, name)
    try:
        disk: Any = _vhd.VHD(fh)
    except Ova2imgError:
        raise
    except DECODE_ERRORS as err:
        raise _wrap(err, "VHD", name) from err
    subformat = "fixed" if disk_type == VHD_FIXED else "dynamic"
    return subformat, ForeignStream(disk, disk.size, name)


def _check_vhdx(fh: BinaryIO, file_size: int, name: str) -> None:
    if file_size < 1024 * 1024:
        raise DiskError(f"VHDX of {file_size} bytes is shorter than its headers", obj=name)
    for offset in _VHDX_REGION_OFFSETS:
        head = _read_at(fh, offset, 16)
        if head[:4] != b"regi":
            raise DiskError("VHDX region table signature missing", obj=name, offset=offset)
        (count,) = struct.unpack_from("<I", head, 8)
        if count > _VHDX_MAX_REGIONS:
            raise DiskError(f"VHDX region table of {count} entries (at most 2047)", obj=name)


def open_vhdx(fh: BinaryIO, file_size: int, name: str) -> tuple[str, DiskStream]:
    """Open a fixed or dynamic VHDX: (subformat, stream).

    Raises:
        DiskError: malformed headers or tables; UnsupportedError: differencing, log to replay.
    """
    _check_vhdx(fh, file_size, name)
    fh.seek(0)
    try:
        disk: Any = _vhdx.VHDX(fh)
    except Ova2imgError:
        raise
    except (
        *DECODE_ERRORS,
        AttributeError,
        _vhdx.InvalidSignature,
        _vhdx.InvalidVirtualDisk,
    ) as err:
        if "parent" in str(err).lower():
            raise UnsupportedError("differencing VHDX (a snapshot)", obj=name) from err
        raise _wrap(err, "VHDX", name) from err
    if disk.has_parent:
        raise UnsupportedError("differencing VHDX (a snapshot): merge it first", obj=name)
    if disk.header.log_guid != bytes(16):
        raise UnsupportedError(
            "VHDX log is not empty: replay it first (qemu-img check -r all, or Hyper-V)", obj=name
        )
    if disk.size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"VHDX virtual size of {disk.size} bytes is absurd", obj=name)
    bs = disk.block_size
    if bs < 2**20 or bs > 2**28 or bs & (bs - 1) or disk.sector_size not in (512, 4096):
        raise DiskError(f"VHDX block size {bs} or sector size {disk.sector_size} invalid", obj=name)
    bat = disk.region_table.get(BAT_REGION_GUID)
    if bat.file_offset + disk.bat.entry_count * 8 > file_size:
        raise DiskError("VHDX block allocation table lies beyond the end of the file", obj=name)
    params = disk.metadata.get(FILE_PARAMETERS_GUID)
    subformat = "fixed" if params.leave_block_allocated else "dynamic"
    return subformat, ForeignStream(disk, disk.size, name)
