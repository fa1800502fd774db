"""POSIX ACL conversions to the kernel's ``system.posix_acl_*`` xattr format.

Userspace (``getxattr``, GNU tar ``--acls``, ``setfacl``) sees POSIX ACLs in one format only:
the kernel's ``posix_acl_xattr`` layout (include/uapi/linux/posix_acl_xattr.h): a little-endian
``u32 a_version = 2`` header, then one 8-byte entry per ACL entry
(``u16 e_tag, u16 e_perm, u32 e_id``), with ``e_id = ACL_UNDEFINED_ID (0xFFFFFFFF)`` for the
tags that carry no id (USER_OBJ, GROUP_OBJ, MASK, OTHER). Filesystems store ACLs in their own
formats; this module turns each of them into that one.
"""

from __future__ import annotations

import struct

__all__ = [
    "ACL_GROUP",
    "ACL_GROUP_OBJ",
    "ACL_MASK",
    "ACL_OTHER",
    "ACL_UNDEFINED_ID",
    "ACL_USER",
    "ACL_USER_OBJ",
    "POSIX_ACL_XATTR_VERSION",
    "AclFormatError",
    "ext_acl_to_xattr",
    "xattr_acl",
]

ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
POSIX_ACL_XATTR_VERSION = 2

#: fs/ext4/acl.h: EXT4_ACL_VERSION
EXT4_ACL_VERSION = 1

_SHORT_TAGS = frozenset({ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER})
_LONG_TAGS = frozenset({ACL_USER, ACL_GROUP})

_U32 = struct.Struct("<I")
_SHORT = struct.Struct("<HH")
_LONG = struct.Struct("<HHI")
_XATTR_ENTRY = struct.Struct("<HHI")


class AclFormatError(ValueError):
    """An on-disk ACL does not follow its format (the caller turns it into its layer's error)."""


def xattr_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """Encode ``(tag, perm, id)`` entries in the kernel's version-2 xattr format.

    Short-form tags get ``ACL_UNDEFINED_ID`` whatever id they were given, as
    ``posix_acl_to_xattr`` (fs/posix_acl.c) writes them.
    """
    out = [_U32.pack(POSIX_ACL_XATTR_VERSION)]
    for tag, perm, ident in entries:
        if tag in _SHORT_TAGS:
            ident = ACL_UNDEFINED_ID
        out.append(_XATTR_ENTRY.pack(tag, perm, ident))
    return b"".join(out)


def ext_acl_to_xattr(value: bytes) -> bytes:
    """Convert an ext2/3/4 on-disk ACL (``ext4_acl_header`` version 1) to the xattr format.

    ext stores ``u32 a_version = 1`` then variable-size entries: ``ext4_acl_entry_short``
    (``u16 e_tag, u16 e_perm``) for USER_OBJ/GROUP_OBJ/MASK/OTHER and ``ext4_acl_entry``
    (``u16 e_tag, u16 e_perm, u32 e_id``) for USER/GROUP (fs/ext4/acl.c ``ext4_acl_from_disk``).

    Raises:
        AclFormatError: wrong version, unknown tag, or a truncated entry.
    """
    if len(value) < 4:
        raise AclFormatError(f"ext ACL of {len(value)} bytes is shorter than its header")
    (version,) = _U32.unpack_from(value, 0)
    if version != EXT4_ACL_VERSION:
        raise AclFormatError(f"ext ACL version {version}, expected {EXT4_ACL_VERSION}")
    entries: list[tuple[int, int, int]] = []
    pos = 4
    end = len(value)
    while pos < end:
        if pos + 4 > end:
            raise AclFormatError(f"ext ACL truncated at byte {pos}")
        tag, perm = _SHORT.unpack_from(value, pos)
        if tag in _SHORT_TAGS:
            entries.append((tag, perm, ACL_UNDEFINED_ID))
            pos += 4
        elif tag in _LONG_TAGS:
            if pos + 8 > end:
                raise AclFormatError(f"ext ACL truncated at byte {pos}")
            _, _, ident = _LONG.unpack_from(value, pos)
            entries.append((tag, perm, ident))
            pos += 8
        else:
            raise AclFormatError(f"ext ACL entry with unknown tag {tag:#x} at byte {pos}")
    return xattr_acl(entries)
