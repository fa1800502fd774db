"""Run ova2img as an unprivileged user (uid/gid 65534, no groups), the way it runs in CI
containers: a world-readable copy of the package and its dependencies, the system Python.

pytest's ``tmp_path`` and a Python under root's 0700 home are unreachable for that user, so
everything it needs is copied into a fresh 0755 directory under /tmp.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

NOBODY = 65534
#: what ``import ova2img`` (and its CLI) needs at run time
RUNTIME_PACKAGES = (
    "ova2img",
    "dissect",
    "backports",  # backports.zstd: dissect.btrfs decompresses zstd extents with it
    "defusedxml",
    "zstandard",
    "docker",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset_normalizer",
    "rich",
    "markdown_it",
    "mdurl",
    "pygments",
)
SYSTEM_PYTHON = "/usr/bin/python3"


class Unprivileged:
    """A world-readable sandbox directory with a copy of ova2img, and a runner."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="o2i-nobody-", dir="/tmp"))
        self.top.chmod(0o755)
        self.lib = self.top / "lib"
        self.lib.mkdir()
        for name in RUNTIME_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None:
                continue
            if spec.submodule_search_locations:
                for location in spec.submodule_search_locations:
                    shutil.copytree(
                        location,
                        self.lib / name,
                        ignore=shutil.ignore_patterns("__pycache__", "tests"),
                        dirs_exist_ok=True,
                    )
            elif spec.origin:
                shutil.copy2(spec.origin, self.lib)
        for path in self.lib.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.lib.chmod(0o755)
        self.work = self.top / "work"
        self.work.mkdir()
        self.work.chmod(0o777)

    def add_input(self, path: Path) -> Path:
        """Copy an input file into the sandbox, readable by everyone."""
        dest = self.top / path.name
        shutil.copyfile(path, dest)
        dest.chmod(0o644)
        return dest

    def run(self, args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        """``python -m ova2img ARGS`` as uid/gid 65534 with no supplementary groups."""
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(self.lib),
            "HOME": str(self.work),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.work),
        }
        cmd = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--",
            SYSTEM_PYTHON,
            "-m",
            "ova2img",
            *args,
        ]
        return subprocess.run(
            cmd, env=env, cwd=self.work, capture_output=True, check=False, **kwargs
        )  # type: ignore[call-overload, no-any-return]

    def close(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)


def can_drop_privileges() -> bool:
    return (
        os.geteuid() == 0 and shutil.which("setpriv") is not None and Path(SYSTEM_PYTHON).exists()
    )
