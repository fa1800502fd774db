"""A real executable of a foreign architecture: Debian's arm64 ``busybox-static``.

Downloaded once with ``apt-get download`` from the Debian mirror the host uses, through a private
apt state (``-o APT::Architectures::=arm64`` with lists and cache under a temporary directory),
so the host's dpkg architectures and apt lists are left alone; the extracted ``busybox`` is
cached in ``$OVA2IMG_CACHE``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .guests import cache_dir


def arm64_busybox() -> Path:
    """The path of a cached arm64 (AArch64) static busybox from Debian.

    Raises:
        RuntimeError: apt-get/dpkg-deb are missing or the download failed.
    """
    out = cache_dir() / "busybox-static-arm64"
    if out.exists():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get and dpkg-deb are needed to fetch an arm64 busybox")
    with tempfile.TemporaryDirectory(prefix="ova2img-apt-", dir="/tmp") as tmp:
        t = Path(tmp)
        for d in ("lists/partial", "cache/archives/partial", "deb", "x"):
            (t / d).mkdir(parents=True)
        opts = [
            "-o", f"Dir::State::Lists={t / 'lists'}",
            "-o", f"Dir::Cache={t / 'cache'}",
            "-o", "APT::Architectures::=arm64",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", *opts, "-qq", "update"],
            ["apt-get", *opts, "-qq", "download", "busybox-static:arm64"],
        ):
            res = subprocess.run(argv, cwd=t / "deb", env=env, capture_output=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:1] + argv[-2:])}: {res.stderr.decode()}")
        debs = glob.glob(str(t / "deb" / "*.deb"))
        if not debs:
            raise RuntimeError("apt-get download busybox-static:arm64 fetched nothing")
        subprocess.run(["dpkg-deb", "-x", debs[0], str(t / "x")], check=True)
        binary = next(
            p for p in (t / "x" / "bin" / "busybox", t / "x" / "usr/bin/busybox") if p.exists()
        )
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        shutil.copyfile(binary, partial)
        partial.chmod(0o755)
        partial.replace(out)
    return out
