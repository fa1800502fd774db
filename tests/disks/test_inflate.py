"""The two inflate backends (isal from the ``fast`` extra, stdlib zlib as the fallback) decode
a streamOptimized VMDK and a compressed qcow2 to the same bytes as ``qemu-img convert -O raw``,
and a corrupt grain is a DiskError with either."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from support.images import to_vmdk

MiB = 1 << 20

_DIGEST = """
import hashlib, json, sys
from ova2img.disks import _inflate, open_disk
from ova2img.sources import open_source
with open_source([sys.argv[1]]) as src:
    disk = open_disk(src.disks[0])
    h = hashlib.sha256()
    pos = 0
    while pos < disk.size:
        data = disk.stream.pread(pos, 3 * 65536 + 517)  # reads straddling grains
        h.update(data)
        pos += len(data)
    print(json.dumps({"backend": _inflate.BACKEND, "sha256": h.hexdigest()}))
"""


@pytest.fixture(scope="module")
def vmdk(compressed: dict[str, tuple[Path, str]]) -> tuple[Path, str]:
    return compressed["vmdk"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """A streamOptimized VMDK and a ``qemu-img -c`` qcow2 of one disk, with its digest."""
    d = tmp_path_factory.mktemp("inflate")
    raw = d / "disk.raw"
    rnd = random.Random(7)
    words = [bytes(rnd.choices(b"abcdefghij klmnop\n", k=rnd.randint(3, 12))) for _ in range(500)]
    with raw.open("wb") as f:
        f.truncate(6 * MiB + 3 * 512)
        for off in (0, 700_000, 2 * MiB + 5, 6 * MiB - 4096):
            f.seek(off)
            f.write(b" ".join(rnd.choices(words, k=20_000))[:300_000])
    out = to_vmdk(raw, d / "disk.vmdk", "streamOptimized")
    qcow2 = d / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", raw, qcow2], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", out, d / "oracle.raw"], check=True)
    oracle = hashlib.sha256((d / "oracle.raw").read_bytes()).hexdigest()
    return {"vmdk": (out, oracle), "qcow2": (qcow2, oracle)}


def _digest(path: Path, backend: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OVA2IMG_INFLATE", None)
    if backend:
        env["OVA2IMG_INFLATE"] = backend
    proc = subprocess.run(
        [sys.executable, "-c", _DIGEST, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("kind", ["vmdk", "qcow2"])
def test_isal_backend_is_used_when_installed(
    compressed: dict[str, tuple[Path, str]], kind: str
) -> None:
    pytest.importorskip("isal", reason="the [fast] extra (isal) is part of the [test] extra")
    path, oracle = compressed[kind]
    got = _digest(path, None)
    assert got == {"backend": "isal", "sha256": oracle}


@pytest.mark.parametrize("kind", ["vmdk", "qcow2"])
def test_zlib_fallback_gives_the_same_bytes(
    compressed: dict[str, tuple[Path, str]], kind: str
) -> None:
    path, oracle = compressed[kind]
    assert _digest(path, "zlib") == {"backend": "zlib", "sha256": oracle}


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_corrupt_grain_is_a_disk_error(
    vmdk: tuple[Path, str], tmp_path: Path, backend: str
) -> None:
    if backend == "isal":
        pytest.importorskip("isal", reason="the [fast] extra (isal) is part of the [test] extra")
    path, _ = vmdk
    bad = tmp_path / "bad.vmdk"
    data = bytearray(path.read_bytes())
    # qemu-img puts the first grain (with its 12-byte LBA marker) after the header, the
    # descriptor and the grain directory/tables: find the zlib header of the first grain.
    first = data.index(b"\x78", 0x10000)
    data[first + 12 : first + 40] = bytes(28)
    bad.write_bytes(bytes(data))
    env = dict(os.environ, OVA2IMG_INFLATE=backend)
    proc = subprocess.run(
        [sys.executable, "-m", "ova2img", "inspect", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "disk" in proc.stderr and "inflate" in proc.stderr, proc.stderr
