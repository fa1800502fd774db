"""The dissect packages whose ``__init__`` imports every format are imported lazily
(ova2img/_imports.py): a conversion does not pay for formats it does not meet, and a tool that
imports ova2img and then uses those packages still finds every name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "fixtures" / "demo.ova"


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_vmdk_conversion_imports_no_other_disk_format() -> None:
    out = _run(
        """
        import sys
        import ova2img, ova2img.cli
        from ova2img.disks.detect import open_disk
        from ova2img.filesystems.ext import ExtFilesystem
        from ova2img.volumes.table import find_volumes
        print(sorted(m for m in sys.modules if m.startswith("dissect.")))
        """
    )
    loaded = eval(out)  # a list of module names
    assert "dissect.hypervisor.disk.c_vmdk" in loaded
    assert "dissect.extfs.c_ext" in loaded
    for other in (
        "dissect.hypervisor.disk.c_vhdx",
        "dissect.hypervisor.disk.c_qcow2",
        "dissect.hypervisor.disk.c_vdi",
        "dissect.hypervisor.descriptor.c_hyperv",
        "dissect.volume.disk.schemes.bsd",
        "dissect.volume.disk.schemes.apm",
        "dissect.util.compression",  # dissect.util's __init__: every decompressor
    ):
        assert other not in loaded


def test_deferred_packages_still_give_every_name() -> None:
    out = _run(
        """
        import ova2img
        from ova2img.disks.vmdk import open_vmdk
        import dissect.hypervisor
        from dissect.hypervisor import vhdx, qcow2
        from dissect.volume.disk import Disk
        from dissect.volume.disk.schemes import BSD
        from dissect.extfs import ExtFS, JDB2
        print(dissect.hypervisor.ovf.__name__, vhdx.VHDX.__name__, qcow2.QCow2.__name__)
        print(Disk.__name__, BSD.__name__, ExtFS.__name__, JDB2.__name__)
        print(sorted(dissect.hypervisor.__all__)[:2])
        from dissect.util import ts, lznt1, crc32c  # a submodule, then __init__'s names
        print(ts.__name__, lznt1.__name__, type(crc32c).__name__)
        try:
            dissect.hypervisor.no_such_thing
        except AttributeError as exc:
            print("AttributeError", exc)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "dissect.hypervisor.descriptor.ovf VHDX QCow2"
    assert lines[1] == "Disk BSD ExtFS JDB2"
    assert lines[2] == "['asif', 'envelope']"
    assert lines[3] == "dissect.util.ts dissect.util.compression.lznt1 module"
    assert lines[4] == "AttributeError module 'dissect.hypervisor' has no attribute 'no_such_thing'"


def test_packages_imported_before_ova2img_are_left_alone() -> None:
    out = _run(
        """
        import dissect.hypervisor
        full = dissect.hypervisor
        import ova2img
        import sys
        print(sys.modules["dissect.hypervisor"] is full, "__getattr__" in vars(full))
        """
    )
    assert out.split() == ["True", "False"]


def test_an_ova_conversion_loads_no_datastore_vmx_or_spool_code(tmp_path: Path) -> None:
    # sources.vmfs (with uuid and platform), sources.vmx and sources.spool are for other
    # kinds of source: an OVA does not pay for importing them.
    out = _run(
        f"""
        import sys
        from ova2img.cli import main
        main(["convert", {str(DEMO)!r}, "-o", {str(tmp_path / "out.tar")!r}, "-q"])
        print(sorted(m for m in sys.modules if m.startswith("ova2img.sources.")))
        """
    )
    loaded = eval(out.splitlines()[-1])
    assert "ova2img.sources.ova" in loaded
    for other in ("ova2img.sources.vmfs", "ova2img.sources.vmx", "ova2img.sources.spool"):
        assert other not in loaded


def test_header_definitions_load_uncompiled_and_parse_the_same() -> None:
    # The C definitions read a few times per image are loaded without cstruct's compilation
    # (half their import time); they must parse exactly as compiled ones, and the switch must
    # not outlive their import.
    out = _run(
        """
        import os, random
        import ova2img, ova2img.disks.vmdk, ova2img.filesystems.ext, ova2img.volumes.table
        from ova2img._imports import UNCOMPILED
        import dissect.extfs.c_ext as ext_mod
        import dissect.hypervisor.disk.c_vmdk as vmdk_mod
        from dissect.cstruct import cstruct

        print(sorted(type(sys.modules[n].__loader__).__name__ for n in UNCOMPILED))
        print(cstruct.load.__qualname__)
        rng = random.Random(7)
        for uncompiled, compiled, name in (
            (ext_mod.c_ext, cstruct().load(ext_mod.ext_def), "ext4_super_block"),
            (ext_mod.c_ext, cstruct().load(ext_mod.ext_def), "ext4_inode"),
            (vmdk_mod.c_vmdk, cstruct().load(vmdk_mod.vmdk_def), "VMDKSparseExtentHeader"),
        ):
            a, b = getattr(uncompiled, name), getattr(compiled, name)
            assert a is not b and list(a.fields) == list(b.fields)
            for _ in range(20):
                raw = bytes(rng.getrandbits(8) for _ in range(1024))
                x, y = a(raw), b(raw)
                assert [repr(getattr(x, f)) for f in a.fields] == [
                    repr(getattr(y, f)) for f in b.fields
                ], name
        print("same")
        """.replace("import os, random", "import os, random, sys")
    )
    loaders, load, same = out.split("\n")[:3]
    assert loaders == str(["_UncompiledLoader"] * 5)
    assert load == "cstruct.load"  # the library's own, restored
    assert same == "same"
