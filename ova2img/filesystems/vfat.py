"""FAT12/FAT16/FAT32 (vfat), read the way a read-only Linux ``vfat`` mount shows them.

:mod:`dissect.fat` validates the boot sector (``FATFS``); everything the kernel shows is decoded
here from the raw bytes, because the library gets it wrong (see
/work/shared/design/dissect-gaps.md): it ignores the NT lowercase flags (``big.bin`` listed as
``BIG.BIN``), never checks long-name checksums (an orphaned long name is glued to the next
entry), lists the volume label and ``.``/``..`` as entries, tells FAT32 from FAT16 by cluster
count where Linux looks at the FAT size field, returns naive local times and follows cluster
chains without loop detection.

The reference is the Linux 6.1 driver (Debian 12's kernel: ``CONFIG_FAT_DEFAULT_CODEPAGE=437``,
``CONFIG_FAT_DEFAULT_IOCHARSET="ascii"``, ``CONFIG_FAT_DEFAULT_UTF8=y``):

* fs/fat/inode.c ``parse_options`` — option defaults and meanings; ``fat_fill_inode`` — mode,
  owner, size, times of a file or directory; ``fat_read_root`` — the root directory (times 0,
  ``nlink`` = subdirectories + 2); ``fat_fill_super`` — geometry (FAT32 iff the 16-bit FAT size
  is 0; FAT12 iff at most 4084 clusters);
* fs/fat/fat.h ``fat_make_mode`` — ``ATTR_RO`` removes the write bits (of directories only with
  ``rodir``), then ``fmask``/``dmask``; ``fat_checksum``;
* fs/fat/dir.c ``__fat_readdir``, ``fat_parse_long``, ``fat_parse_short``, ``fat_subdirs``;
* fs/fat/misc.c ``fat_time_fat2unix``; fs/fat/fatent.c (entries at or above ``BAD_FAT*`` end a
  chain); fs/fat/cache.c ``fat_get_cluster`` (a free entry in a chain or a chain longer than the
  volume is an I/O error);
* fs/nls/nls_base.c ``utf16s_to_utf8s`` (unpaired surrogates dropped), fs/nls/nls_cp437.c.

Handles are ``int``: 1 for the root directory (``MSDOS_ROOT_INO``), otherwise the position of
the entry's short directory entry on the volume in 32-byte units (the kernel's ``i_pos``).
They are also the inode numbers: FAT has no hardlinks, so any unique number is faithful.
"""

from __future__ import annotations

import codecs
import io
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import BinaryIO, TypeVar

from dissect.fat import FATFS
from dissect.fat.exceptions import Error as DissectFatError

from .._stream import RangeReader
from ..errors import FilesystemError, Ova2imgError, UnsupportedError
from ._runlist import RunlistReader
from .base import DECODE_ERRORS, DataRun, Entry, EntryType, Filesystem

__all__ = ["VfatFilesystem", "VfatOptions", "parse_vfat_options"]

_ROOT = 1  # MSDOS_ROOT_INO
_DIRENT = 32

# Attribute bits (include/uapi/linux/msdos_fs.h).
_ATTR_RO = 0x01
_ATTR_HIDDEN = 0x02
_ATTR_SYS = 0x04
_ATTR_VOLUME = 0x08
_ATTR_DIR = 0x10
_ATTR_EXT = 0x0F  # a long-name slot: RO | HIDDEN | SYS | VOLUME
# The NT "lcase" byte (offset 12): the base name / the extension is shown in lowercase.
_CASE_LOWER_BASE = 0x08
_CASE_LOWER_EXT = 0x10
_DELETED = 0xE5
_DOT = b".          "
_DOTDOT = b"..         "

_MAX_FAT12 = 0xFF4  # fs/fat/fat.h MAX_FAT12: at most 4084 clusters
_FAT_START_ENT = 2
_MAX_LFN_SLOTS = 20  # fat_parse_long: ceil(256 * 2 / 26)
_FAT_MAX_UNI_CHARS = 256  # fs/fat/dir.c: (MSDOS_SLOTS - 1) * 13 + 1, what utf16s_to_utf8s reads

_BLOCK = 4096
_BLOCK_CACHE = 2048
_DIR_CACHE = 256

# struct msdos_dir_entry (include/uapi/linux/msdos_fs.h) from the attribute byte on.
_SHORT = struct.Struct("<BBBHHHHHHHI")

# fs/fat/misc.c: linear day numbers of the 1sts of each month (index 1..12) in non-leap years;
# out-of-range months (13..15) count as 0, as in the kernel's table.
_DAYS_IN_YEAR = (0, 0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334, 0, 0, 0)
_DAYS_DELTA = 365 * 10 + 2  # 1970-01-01 .. 1980-01-01
_YEAR_2100 = 120

# fs/nls/nls_cp437.c charset2lower for bytes >= 0x80 where it differs from identity; 0x00 in
# the kernel's table (Γ, Θ, Ω) means "no lowercase": the byte is kept.
_CP437_LOWER_HIGH = {
    0x80: 0x87, 0x8E: 0x84, 0x8F: 0x86, 0x90: 0x82, 0x92: 0x91, 0x99: 0x94,
    0x9A: 0x81, 0xA5: 0xA4, 0xE4: 0xE5, 0xE8: 0xED,
}  # fmt: skip

_T = TypeVar("_T")


class _Corrupt(Exception):  # noqa: N818 - internal, always re-raised as FilesystemError
    """Internal: a structure failed a sanity check (turned into FilesystemError at the API)."""


@dataclass(frozen=True, slots=True)
class VfatOptions:
    """What a vfat mount's options change in what it shows (fs/fat/inode.c ``parse_options``).

    Attributes:
        uid, gid: owner of every inode (default: the mounting process, root at boot).
        fmask, dmask: permission bits removed from files / directories (default: the mounting
            process's umask, 0022 for fstab mounts at boot).
        showexec: only ``.EXE``/``.COM``/``.BAT`` files get execute bits.
        rodir: ``ATTR_RO`` on a directory removes its write bits too.
        shortname: ``mixed`` (the default since 2.6.32), ``winnt``, ``win95`` or ``lower``.
        utf8: long and short names are shown as UTF-8 (``CONFIG_FAT_DEFAULT_UTF8=y``).
        iocharset: the charset names are shown in when ``utf8`` is off.
        codepage: the OEM codepage short names are stored in.
        uni_xlate: characters the iocharset cannot show become ``:xxxx`` (turns ``utf8`` off).
        time_offset: minutes east of UTC the on-disk local times are in (``tz=UTC``: 0).
    """

    uid: int = 0
    gid: int = 0
    fmask: int = 0o022
    dmask: int = 0o022
    showexec: bool = False
    rodir: bool = False
    shortname: str = "mixed"
    utf8: bool = True
    iocharset: str = "ascii"
    codepage: int = 437
    uni_xlate: bool = False
    time_offset: int = 0


def _int(key: str, value: str, base: int) -> int:
    # match_int / match_octal (lib/parser.c): an optional sign, then digits in the base.
    try:
        return int(value, base)
    except ValueError:
        raise FilesystemError(
            f"vfat mount option {key}={value!r}: not a base-{base} number"
        ) from None


def _flag(key: str, value: str | None) -> bool:
    # fs/fat/inode.c: "utf8", "utf8=1|yes|true" and "utf8=0|no|false" (the same for uni_xlate).
    if value is None or value.lower() in ("1", "yes", "true"):
        return True
    if value.lower() in ("0", "no", "false"):
        return False
    raise FilesystemError(f"vfat mount option {key}={value!r}: expected yes or no")


def parse_vfat_options(options: Sequence[str], base: VfatOptions | None = None) -> VfatOptions:
    """Apply fstab options to *base* (default: :class:`VfatOptions`' defaults), as
    fs/fat/inode.c ``parse_options`` does (the last of repeated options wins).

    Options that do not change what a read-only mount shows (``ro``, ``noatime``, ``flush``,
    ``errors=``, ``x-systemd.*``, …) and options neither vfat nor mount(8) know are ignored.

    Raises:
        FilesystemError: an option the view depends on has a malformed value.
    """
    opts = base or VfatOptions()
    for item in ",".join(options).split(","):
        key, sep, value = item.strip().partition("=")
        val = value if sep else None
        if key in ("uid", "gid") and val is not None:
            number = _int(key, val, 10)
            if not 0 <= number < 0xFFFFFFFF:  # uid_valid(): (uid_t)-1 is invalid
                raise FilesystemError(f"vfat mount option {item!r}: invalid id")
            opts = replace(opts, uid=number) if key == "uid" else replace(opts, gid=number)
        elif key == "umask" and val is not None:
            mask = _int(key, val, 8) & 0o7777
            opts = replace(opts, fmask=mask, dmask=mask)
        elif key == "fmask" and val is not None:
            opts = replace(opts, fmask=_int(key, val, 8) & 0o7777)
        elif key == "dmask" and val is not None:
            opts = replace(opts, dmask=_int(key, val, 8) & 0o7777)
        elif key == "showexec" and val is None:
            opts = replace(opts, showexec=True)
        elif key == "rodir" and val is None:
            opts = replace(opts, rodir=True)
        elif key == "shortname" and val in ("lower", "win95", "winnt", "mixed"):
            opts = replace(opts, shortname=val)
        elif key == "utf8":
            opts = replace(opts, utf8=_flag(key, val))
        elif key == "uni_xlate":
            opts = replace(opts, uni_xlate=_flag(key, val))
        elif key == "iocharset" and val:
            opts = replace(opts, iocharset=val)
        elif key == "codepage" and val is not None:
            opts = replace(opts, codepage=_int(key, val, 10))
        elif key == "tz" and val == "UTC":
            opts = replace(opts, time_offset=0)
        elif key == "time_offset" and val is not None:
            minutes = _int(key, val, 10)
            if not -24 * 60 <= minutes <= 24 * 60:
                raise FilesystemError(f"vfat mount option {item!r}: out of -1440..1440")
            opts = replace(opts, time_offset=minutes)
    return opts


def _fat_checksum(name: bytes) -> int:
    # fs/fat/fat.h fat_checksum(): rotate right by one, add the next byte, modulo 256.
    s = 0
    for c in name[:11]:
        s = (((s & 1) << 7) + (s >> 1) + c) & 0xFF
    return s


def _fat2unix_s(time: int, date: int, offset_s: int) -> int:
    """fs/fat/misc.c ``fat_time_fat2unix``: seconds since the epoch, out-of-range fields
    accepted as the kernel accepts them (month 0 → 1, day 0 → 1, hours up to 31)."""
    year = date >> 9
    month = max(1, (date >> 5) & 0xF)
    day = max(1, date & 0x1F) - 1
    leap_day = (year + 3) // 4
    if year > _YEAR_2100:  # 2100 is not a leap year
        leap_day -= 1
    if not year & 3 and year != _YEAR_2100 and month > 2:
        leap_day += 1
    second = (time & 0x1F) << 1
    second += ((time >> 5) & 0x3F) * 60
    second += (time >> 11) * 3600
    second += (year * 365 + leap_day + _DAYS_IN_YEAR[month] + day + _DAYS_DELTA) * 86400
    return second + offset_s


def _utf16_to_utf8(units: Sequence[int]) -> bytes:
    """fs/nls/nls_base.c ``utf16s_to_utf8s``: stops at a 0 unit; unpaired surrogates are
    dropped (Python would raise or substitute)."""
    out = bytearray()
    i = 0
    n = len(units)
    while i < n:
        u = units[i]
        if not u:
            break
        i += 1
        if 0xD800 <= u <= 0xDFFF:
            if u >= 0xDC00 or i >= n:  # a lone low surrogate, or a high one at the end
                continue
            v = units[i]
            if not 0xDC00 <= v <= 0xDFFF:
                continue
            u = 0x10000 + ((u & 0x3FF) << 10) + (v & 0x3FF)
            i += 1
        out += chr(u).encode("utf-8")
    return bytes(out)


@dataclass(slots=True, frozen=True)
class _Record:
    """One name of a directory as ``__fat_readdir`` emits it, before charset conversion."""

    pos: int  # the short entry's position in 32-byte units (the handle)
    raw: bytes  # the 32-byte short entry
    long: tuple[int, ...] | None  # UTF-16 units of a valid long name (up to its NUL)


class _Volume:
    """Geometry, caches and the option-independent decoding of one FAT volume."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.name = name
        self.fh = stream
        try:
            self.size = stream.seek(0, io.SEEK_END)
            boot = self._read_raw(0, 512)
        except (OSError, _Corrupt) as exc:
            raise FilesystemError(f"cannot read the boot sector: {exc}", obj=name) from exc
        try:
            # dissect.fat validates the BPB the way fatgen103 asks (jump, sizes, media).
            fatfs = FATFS(stream)
        except (DissectFatError, EOFError, struct.error, ValueError, ZeroDivisionError) as exc:
            raise FilesystemError(f"invalid FAT boot sector: {exc}", offset=0, obj=name) from exc
        bpb = fatfs.bpb
        self.sector_size = int(bpb.BPB_BytsPerSec)
        sec_per_clus = int(bpb.BPB_SecPerClus)
        reserved = int(bpb.BPB_RsvdSecCnt)
        fats = int(bpb.BPB_NumFATs)
        fat_length = int(bpb.BPB_FATSz16)
        # fat_fill_super(): FAT32 iff the 16-bit FAT size is 0 (dissect decides by cluster
        # count, so a small FAT32 made by mkfs.vfat -F 32 is read as FAT16 there).
        self.fat32 = fat_length == 0
        if self.fat32:
            (fat_length,) = struct.unpack_from("<I", boot, 36)
            (self.root_cluster,) = struct.unpack_from("<I", boot, 44)
            self.root_cluster &= 0x0FFFFFFF
        else:
            self.root_cluster = 0
        if fat_length == 0:
            raise FilesystemError("FAT size is 0", offset=0x16, obj=name)
        self.cluster_size = self.sector_size * sec_per_clus
        self.fat_offset = reserved * self.sector_size
        self.dir_entries = int(bpb.BPB_RootEntCnt)
        dir_start = reserved + fats * fat_length
        self.root_offset = dir_start * self.sector_size
        rootdir_sectors = self.dir_entries * _DIRENT // self.sector_size
        data_start = dir_start + rootdir_sectors
        self.data_offset = data_start * self.sector_size
        total_sectors = int(bpb.BPB_TotSec16) or int(bpb.BPB_TotSec32)
        if total_sectors <= data_start:
            raise FilesystemError(
                f"{total_sectors} sectors do not reach the data area at sector {data_start}",
                offset=0x13,
                obj=name,
            )
        total_clusters = (total_sectors - data_start) // sec_per_clus
        if self.fat32:
            self.fat_bits = 32
        else:
            self.fat_bits = 16 if total_clusters > _MAX_FAT12 else 12
        # fat_fill_super(): the FAT must have room for every cluster; otherwise the count is
        # what the FAT can describe (calc_fat_clusters).
        fat_clusters = fat_length * self.sector_size * 8 // self.fat_bits
        total_clusters = min(total_clusters, fat_clusters - _FAT_START_ENT)
        self.max_cluster = total_clusters + _FAT_START_ENT
        if self.fat32 and not _FAT_START_ENT <= self.root_cluster < self.max_cluster:
            raise FilesystemError(
                f"FAT32 root cluster {self.root_cluster} outside 2..{self.max_cluster - 1}",
                offset=44,
                obj=name,
            )
        self.bad = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}[self.fat_bits]  # BAD_FAT*: EOF
        self.fstype_version = f"FAT{self.fat_bits}"
        self._block: Callable[[int], bytes] = lru_cache(_BLOCK_CACHE)(self._load_block)
        self.uuid, self.label = self._blkid_ids(boot)

        self.records: Callable[[int], tuple[list[_Record], int]] = lru_cache(_DIR_CACHE)(
            self._load_dir
        )

    # -- low-level reads -------------------------------------------------------------------------

    def _read_raw(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise _Corrupt(f"read of {length} bytes at {offset:#x} beyond the volume end")
        self.fh.seek(offset)
        data = self.fh.read(length)
        if len(data) != length:
            raise _Corrupt(f"short read at {offset:#x}: {len(data)} of {length} bytes")
        return bytes(data)

    def _load_block(self, block: int) -> bytes:
        start = block * _BLOCK
        return self._read_raw(start, min(_BLOCK, self.size - start))

    def read(self, offset: int, length: int) -> bytes:
        """Read through the block cache (metadata only)."""
        if offset < 0 or offset + length > self.size:
            raise _Corrupt(f"read of {length} bytes at {offset:#x} beyond the volume end")
        out = bytearray()
        while length:
            block, off = divmod(offset, _BLOCK)
            chunk = self._block(block)[off : off + length]
            out += chunk
            offset += len(chunk)
            length -= len(chunk)
        return bytes(out)

    # -- identity ---------------------------------------------------------------------------------

    def _blkid_ids(self, boot: bytes) -> tuple[str, str | None]:
        """UUID and LABEL as libblkid 2.38 prints them (superblocks/vfat.c ``probe_vfat``):
        the serial as ``%02X%02X-%02X%02X`` of its bytes 3..0; the label of a volume-label
        entry in the root directory, else the boot sector's, ``NO NAME`` meaning none."""
        serial_at, label_at = (67, 71) if self.fat32 else (39, 43)
        serial = boot[serial_at : serial_at + 4]
        uuid = f"{serial[3]:02X}{serial[2]:02X}-{serial[1]:02X}{serial[0]:02X}"
        label: bytes | None = None
        try:
            if self.fat32:
                # libblkid follows at most 99 clusters of the root directory's chain.
                cluster = self.root_cluster
                for _ in range(99):
                    label = self._label_in(self._cluster_offset(cluster), self.cluster_size)
                    if label is not None or not cluster:
                        break
                    cluster = self.fat_entry(cluster)
                    if not _FAT_START_ENT <= cluster < self.max_cluster:
                        break
            else:
                label = self._label_in(self.root_offset, self.dir_entries * _DIRENT)
        except _Corrupt:
            label = None
        if label is None or label == b"NO NAME    ":
            label = boot[label_at : label_at + 11]
        if label == b"NO NAME    ":
            return uuid, None
        # blkid_probe_set_label(): trailing whitespace and NULs are cut.
        text = label.rstrip(b" \0").decode("utf-8", "surrogateescape")
        return uuid, text or None

    def _label_in(self, offset: int, length: int) -> bytes | None:
        # libblkid search_fat_label(): stop at a 0x00 entry; skip free entries, entries with a
        # cluster, long-name slots; the first VOLUME_ID entry that is not a directory wins.
        data = self._read_raw(offset, length)
        for off in range(0, len(data) - _DIRENT + 1, _DIRENT):
            ent = data[off : off + _DIRENT]
            if ent[0] == 0:
                break
            attr = ent[11]
            if ent[0] == _DELETED or ent[20:22] != b"\0\0" or ent[26:28] != b"\0\0":
                continue
            if attr & 0x3F == _ATTR_EXT:
                continue
            if attr & (_ATTR_VOLUME | _ATTR_DIR) == _ATTR_VOLUME:
                return ent[:11]
        return None

    # -- the FAT ---------------------------------------------------------------------------------

    def _cluster_offset(self, cluster: int) -> int:
        return self.data_offset + (cluster - _FAT_START_ENT) * self.cluster_size

    def fat_entry(self, cluster: int) -> int:
        """The FAT entry of *cluster* (first FAT, as Linux reads it), 0 for free, -1 for EOF."""
        if not _FAT_START_ENT <= cluster < self.max_cluster:
            # fat_ent_read(): "invalid access to FAT"
            raise _Corrupt(f"cluster {cluster} outside 2..{self.max_cluster - 1}")
        if self.fat_bits == 12:
            raw = self.read(self.fat_offset + cluster + cluster // 2, 2)
            value = int.from_bytes(raw, "little")
            value = value >> 4 if cluster & 1 else value & 0xFFF
        elif self.fat_bits == 16:
            value = int.from_bytes(self.read(self.fat_offset + cluster * 2, 2), "little")
        else:
            value = int.from_bytes(self.read(self.fat_offset + cluster * 4, 4), "little")
            value &= 0x0FFFFFFF
        return -1 if value >= self.bad else value

    def chain(self, start: int) -> list[int]:
        """The clusters of a chain from *start* (fs/fat/cache.c ``fat_get_cluster``)."""
        clusters: list[int] = []
        cluster = start
        while True:
            clusters.append(cluster)
            if len(clusters) > self.max_cluster:
                raise _Corrupt(f"cluster chain from {start} loops")
            nxt = self.fat_entry(cluster)
            if nxt == -1:
                return clusters
            if nxt == 0:
                raise _Corrupt(f"cluster chain from {start} runs into free cluster {cluster}")
            cluster = nxt

    def runs(self, start: int) -> list[tuple[int, int]]:
        """The chain as ``(cluster - 2, count)`` runs of the data area, merged."""
        runs: list[tuple[int, int]] = []
        for cluster in self.chain(start):
            index = cluster - _FAT_START_ENT
            if runs and runs[-1][0] + runs[-1][1] == index:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((index, 1))
        return runs

    def data_stream(self) -> BinaryIO:
        return RangeReader(self.fh, self.data_offset, self.size - self.data_offset).as_binary()

    # -- directories -----------------------------------------------------------------------------

    def dir_slots(self, handle: int, raw: bytes | None) -> Iterator[tuple[int, bytes]]:
        """Every 32-byte slot of a directory, with its position (in 32-byte units)."""
        if handle == _ROOT and not self.fat32:
            data = self.read(self.root_offset, self.dir_entries * _DIRENT)
            base = self.root_offset // _DIRENT
            for i in range(self.dir_entries):
                yield base + i, data[i * _DIRENT : (i + 1) * _DIRENT]
            return
        start = self.root_cluster if handle == _ROOT else self.start_cluster(raw or b"")
        for cluster in self.chain(start):
            offset = self._cluster_offset(cluster)
            data = self.read(offset, self.cluster_size)
            base = offset // _DIRENT
            for i in range(self.cluster_size // _DIRENT):
                yield base + i, data[i * _DIRENT : (i + 1) * _DIRENT]

    def start_cluster(self, raw: bytes) -> int:
        """fat_get_start(): the high 16 bits count only on FAT32."""
        lo = int.from_bytes(raw[26:28], "little")
        hi = int.from_bytes(raw[20:22], "little") if self.fat32 else 0
        return hi << 16 | lo

    def _load_dir(self, handle: int) -> tuple[list[_Record], int]:
        """The names ``__fat_readdir`` emits (``.``/``..`` left out) and ``fat_subdirs``."""
        raw = None if handle == _ROOT else self.read(handle * _DIRENT, _DIRENT)
        slots = list(self.dir_slots(handle, raw))
        subdirs = sum(
            1
            for _, s in slots
            if s[0] not in (0, _DELETED) and not s[11] & _ATTR_VOLUME and s[11] & _ATTR_DIR
        )
        records: list[_Record] = []
        n = len(slots)
        i = 0
        while i < n:
            de = slots[i][1]
            # parse_record: (vfat) skip deleted entries, volume labels, free entries.
            if de[0] == _DELETED or (de[11] != _ATTR_EXT and (de[11] & _ATTR_VOLUME or not de[0])):
                i += 1
                continue
            long: tuple[int, ...] | None = None
            if de[11] == _ATTR_EXT:
                status, i, long = _parse_long(slots, i)
                if status == _EOF:
                    break
                if status == _INVALID:
                    i += 1
                    continue
                if status == _NOT_LONGNAME:
                    continue  # re-parse the entry that interrupted the slots
            pos, de = slots[i]
            i += 1
            if de[:11] in (_DOT, _DOTDOT):
                continue
            records.append(_Record(pos, de, long))
        return records, subdirs


_OK, _INVALID, _NOT_LONGNAME, _EOF = 0, 1, 2, 3


def _parse_long(slots: list[tuple[int, bytes]], i: int) -> tuple[int, int, tuple[int, ...] | None]:
    """fs/fat/dir.c ``fat_parse_long``: gather the slots of a long name ending at a short entry.

    Returns ``(status, index, units)``: for ``_OK`` *index* is the short entry and *units* the
    name (``None`` when the checksum does not match the short name: the short name is shown);
    ``_INVALID`` skips the entry at *index*; ``_NOT_LONGNAME`` re-parses it.
    """
    n = len(slots)
    unicode = [0] * (_MAX_LFN_SLOTS * 13 + 1)
    while True:  # parse_long:
        ds = slots[i][1]
        ident = ds[0]
        if not ident & 0x40:
            return _INVALID, i, None
        count = ident & 0xBF
        if count > _MAX_LFN_SLOTS or not count:
            return _INVALID, i, None
        checksum = ds[13]
        slot = count
        restart = False
        while True:
            slot -= 1
            offset = slot * 13
            # name0_4 (5 units at 1), name5_10 (6 at 14), name11_12 (2 at 28): fat16_towchar
            units = struct.unpack_from("<5H", ds, 1) + struct.unpack_from("<6H", ds, 14)
            units += struct.unpack_from("<2H", ds, 28)
            unicode[offset : offset + 13] = units
            if ds[0] & 0x40:
                unicode[offset + 13] = 0
            i += 1
            if i >= n:
                return _EOF, i, None
            if slot == 0:
                break
            ds = slots[i][1]
            if ds[11] != _ATTR_EXT:
                return _NOT_LONGNAME, i, None
            if ds[0] & 0xBF != slot or ds[13] != checksum:
                restart = True
                break
        if restart:
            continue
        de = slots[i][1]
        if de[0] == _DELETED:
            return _INVALID, i, None
        if de[11] == _ATTR_EXT:
            continue
        if de[0] in (0, _DELETED) or de[11] & _ATTR_VOLUME:
            return _INVALID, i, None
        if _fat_checksum(de[:11]) != checksum:
            return _OK, i, None
        end = unicode.index(0) if 0 in unicode else len(unicode)
        return _OK, i, tuple(unicode[: min(end, _FAT_MAX_UNI_CHARS)])


class VfatFilesystem(Filesystem):
    """A read-only view of a FAT12/16/32 filesystem as a Linux ``vfat`` mount shows it.

    Args:
        stream: the volume (seekable).
        name: how error messages name this filesystem (e.g. the partition).
        options: fstab mount options (``uid=``, ``gid=``, ``umask=``, ``fmask=``, ``dmask=``,
            ``showexec``, ``rodir``, ``shortname=``, ``utf8``, ``iocharset=``, ``codepage=``,
            ``uni_xlate``, ``tz=UTC``, ``time_offset=``); see :class:`VfatOptions` for the
            defaults, which are those of a mount at boot by root with umask 0022.

    Raises:
        FilesystemError: not FAT, or a malformed boot sector / option value.
        UnsupportedError: a multi-byte codepage for short names.
    """

    fstype = "vfat"

    def __init__(self, stream: BinaryIO, *, name: str = "", options: Sequence[str] = ()) -> None:
        self._init(_Volume(stream, name or "vfat"), parse_vfat_options(options))

    def _init(self, volume: _Volume, opts: VfatOptions) -> None:
        self._vol = volume
        self._name = volume.name
        self.options = opts
        self.uuid = volume.uuid
        self.label = volume.label
        #: ``FAT12``, ``FAT16`` or ``FAT32`` (blkid's ``VERSION``)
        self.version = volume.fstype_version
        self._codec = f"cp{opts.codepage}"
        try:
            codecs.lookup(self._codec)
        except LookupError:
            raise UnsupportedError(
                f"codepage={opts.codepage}: no such single-byte codepage", obj=self._name
            ) from None
        if opts.codepage in (932, 936, 949, 950):
            raise UnsupportedError(
                f"codepage={opts.codepage}: multi-byte short names are not supported",
                obj=self._name,
            )
        self._utf8 = opts.utf8 and not opts.uni_xlate
        io_name = "utf-8" if opts.iocharset == "utf8" else opts.iocharset
        try:
            self._io_codec = codecs.lookup(io_name).name
        except LookupError:
            raise UnsupportedError(
                f"iocharset={opts.iocharset}: unknown charset", obj=self._name
            ) from None
        self._offset_s = -opts.time_offset * 60  # fat_tz_offset() with tz_set

    def mount(self, options: Sequence[str]) -> VfatFilesystem:
        """The view a mount with these fstab options shows (the volume's caches are shared)."""
        view = object.__new__(VfatFilesystem)
        view._init(self._vol, parse_vfat_options(options))
        return view

    # -- Filesystem API ------------------------------------------------------------------------

    def root(self) -> object:
        """The root directory's handle (``MSDOS_ROOT_INO``, 1)."""
        return _ROOT

    def stat(self, handle: object) -> Entry:
        """Metadata as ``lstat`` shows it through the mount (fat_fill_inode/fat_read_root)."""
        pos = self._handle(handle)
        return self._wrap(lambda: self._stat(pos), self._what(pos))

    def iterdir(self, handle: object) -> Iterator[tuple[bytes, object]]:
        """``(name, handle)`` of a directory's entries as readdir shows them."""
        pos = self._handle(handle)
        return iter(self._wrap(lambda: self._listdir(pos), self._what(pos)))

    def open(self, handle: object) -> BinaryIO:
        """A seekable stream over a regular file's content (its cluster chain)."""
        pos = self._handle(handle)
        return self._wrap(lambda: self._open(pos), self._what(pos))

    def data_runs(self, handle: object) -> list[DataRun] | None:
        """FAT has no holes: a file is data from 0 to its size."""
        pos = self._handle(handle)
        size = self.stat(pos).size
        return [(0, size)] if size else []

    # -- internals -----------------------------------------------------------------------------

    def _handle(self, handle: object) -> int:
        if not isinstance(handle, int) or isinstance(handle, bool) or handle < 1:
            raise FilesystemError(f"not a vfat handle: {handle!r}", obj=self._name)
        return handle

    @staticmethod
    def _what(pos: int) -> str:
        return "root directory" if pos == _ROOT else f"directory entry at {pos * _DIRENT:#x}"

    def _wrap(self, func: Callable[[], _T], context: str) -> _T:
        try:
            return func()
        except Ova2imgError:
            raise
        except (_Corrupt, DissectFatError, OSError, *DECODE_ERRORS) as exc:
            raise FilesystemError(f"{context}: {exc}", obj=self._name) from exc

    def _dirent(self, pos: int) -> bytes:
        raw = self._vol.read(pos * _DIRENT, _DIRENT)
        if raw[0] in (0, _DELETED) or raw[11] == _ATTR_EXT or raw[11] & _ATTR_VOLUME:
            raise _Corrupt("not a file or directory entry")
        return raw

    def _stat(self, pos: int) -> Entry:
        vol = self._vol
        opts = self.options
        if pos == _ROOT:
            # fat_read_root(): mode from dmask, times 0, nlink = subdirectories + 2; the size
            # is the fixed root area (FAT12/16) or the chain (FAT32, fat_calc_dir_size).
            _, subdirs = vol.records(_ROOT)
            if vol.fat32:
                size = len(vol.chain(vol.root_cluster)) * vol.cluster_size
            else:
                size = vol.dir_entries * _DIRENT
            return Entry(
                type=EntryType.DIR,
                mode=0o777 & ~opts.dmask,
                uid=opts.uid,
                gid=opts.gid,
                size=size,
                mtime_ns=0,
                atime_ns=0,
                ctime_ns=0,
                nlink=subdirs + 2,
                inode=_ROOT,
            )
        raw = self._dirent(pos)
        attr, _lcase, _ctime_cs, _ctime, _cdate, adate, _hi, time, date, _lo, size = _SHORT.unpack(
            raw[11:]
        )
        is_dir = bool(attr & _ATTR_DIR)
        if is_dir:
            mode = 0o777
        elif opts.showexec and raw[8:11] not in (b"EXE", b"COM", b"BAT"):
            mode = 0o666  # is_exec(): the stored (upper-case) extension only
        else:
            mode = 0o777
        # fat_make_mode(): ATTR_RO drops the write bits (a directory's only with rodir).
        if attr & _ATTR_RO and not (is_dir and not opts.rodir):
            mode &= ~0o222
        mode &= ~(opts.dmask if is_dir else opts.fmask)
        if is_dir:
            start = vol.start_cluster(raw)
            # fat_validate_dir(): a directory must have a cluster of its own.
            if start == 0 or start == vol.root_cluster:
                raise _Corrupt(f"directory with invalid start cluster {start}")
            size = len(vol.chain(start)) * vol.cluster_size  # fat_calc_dir_size()
            _, nlink = vol.records(pos)
            if nlink < 2:
                raise _Corrupt("directory without '.' and '..'")
        else:
            nlink = 1
        # fat_fill_inode(): mtime from time/date (2 s resolution), ctime = mtime, atime from
        # the access date; the creation time (with its 10 ms field) is only statx's btime.
        mtime = _fat2unix_s(time, date, self._offset_s) * 1_000_000_000
        atime = _fat2unix_s(0, adate, self._offset_s) * 1_000_000_000
        return Entry(
            type=EntryType.DIR if is_dir else EntryType.FILE,
            mode=mode,
            uid=opts.uid,
            gid=opts.gid,
            size=size,
            mtime_ns=mtime,
            atime_ns=atime,
            ctime_ns=mtime,
            nlink=nlink,
            inode=pos,
        )

    def _listdir(self, pos: int) -> list[tuple[bytes, object]]:
        if pos != _ROOT and not self._dirent(pos)[11] & _ATTR_DIR:
            raise _Corrupt("not a directory")
        records, _ = self._vol.records(pos)
        out: list[tuple[bytes, object]] = []
        for rec in records:
            name = self._long_name(rec.long) if rec.long is not None else self._short_name(rec.raw)
            if name:
                out.append((name, rec.pos))
        return out

    def _open(self, pos: int) -> BinaryIO:
        raw = self._dirent(pos)
        if raw[11] & _ATTR_DIR:
            raise _Corrupt("is a directory")
        size = int.from_bytes(raw[28:32], "little")
        start = self._vol.start_cluster(raw)
        if size == 0:
            return io.BytesIO(b"")
        if start == 0:
            raise _Corrupt(f"{size}-byte file without a cluster")
        runs = self._vol.runs(start)
        clusters = sum(count for _, count in runs)
        if clusters * self._vol.cluster_size < size:
            # fat_bmap_cluster(): "request beyond EOF"
            raise _Corrupt(f"{size}-byte file has only {clusters} clusters")
        return RunlistReader(
            self._vol.data_stream(), runs, size, self._vol.cluster_size
        ).as_binary()

    # -- names ---------------------------------------------------------------------------------

    def _uni_to_x8(self, units: Sequence[int]) -> bytes:
        """fs/fat/dir.c ``fat_uni_to_x8``: UTF-8, or the iocharset with ``?`` (``:xxxx`` with
        uni_xlate) for what it cannot show."""
        if self._utf8:
            return _utf16_to_utf8(units[:_FAT_MAX_UNI_CHARS])
        out = bytearray()
        for u in units:
            if not u:
                break
            try:
                if 0xD800 <= u <= 0xDFFF:
                    raise UnicodeEncodeError("x", "", 0, 1, "surrogate")
                out += chr(u).encode(self._io_codec)
            except UnicodeEncodeError:
                out += f":{u >> 8:02x}{u & 0xFF:02x}".encode() if self.options.uni_xlate else b"?"
        return bytes(out)

    def _long_name(self, units: tuple[int, ...]) -> bytes:
        return self._uni_to_x8(units)

    def _short_char(self, c: int, lower: bool) -> int:
        # fat_shortname2uni(): shortname=lower always lowers, win95 never, winnt/mixed (the
        # default) when the entry's lcase flag says so; lowering uses the codepage's
        # charset2lower table (fs/nls/nls_cp437.c), then char2uni.
        mode = self.options.shortname
        if mode == "lower" or (mode in ("winnt", "mixed") and lower):
            if 0x41 <= c <= 0x5A:
                c += 0x20
            elif c >= 0x80:
                if self.options.codepage == 437:
                    c = _CP437_LOWER_HIGH.get(c, c)
                else:  # other single-byte codepages: Unicode lowercase within the codepage
                    ch = bytes([c]).decode(self._codec, "replace").lower()
                    try:
                        low = ch.encode(self._codec)
                    except UnicodeEncodeError:
                        low = b""
                    c = low[0] if len(low) == 1 else c
        ch = bytes([c]).decode(self._codec, "replace")
        return 0x3F if ch == "\ufffd" else ord(ch)

    def _short_name(self, raw: bytes) -> bytes:
        """fs/fat/dir.c ``fat_parse_short`` (vfat): base and extension up to a NUL, trailing
        spaces cut, a dot only before a non-empty extension; 0x05 stands for 0xE5."""
        work = bytearray(raw[:11])
        if work[0] == 0x05:
            work[0] = 0xE5
        lcase = raw[12]
        uni: list[int] = []
        uni_len = 0
        for c in work[:8]:
            if not c:
                break
            uni.append(self._short_char(c, bool(lcase & _CASE_LOWER_BASE)))
            if c != 0x20:
                uni_len = len(uni)
        named = uni_len > 0
        del uni[uni_len:]
        uni.append(0x2E)
        for c in work[8:11]:
            if not c:
                break
            uni.append(self._short_char(c, bool(lcase & _CASE_LOWER_EXT)))
            if c != 0x20:
                uni_len = len(uni)
                named = True
        if not named:
            return b""
        return self._uni_to_x8(uni[:uni_len])
