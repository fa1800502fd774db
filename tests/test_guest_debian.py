"""The foundation's acceptance test: a real Debian guest (debootstrapped minbase with make, MBR,
one ext4 root, streamOptimized VMDK in an OVA), converted as an unprivileged user, equals root's
reference; docker import of it builds with make against a real dockerd; the demo runs too."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.compare import assert_same_tree
from support.guests import DebianGuest, debian_guest
from support.reference import make_reference
from unpriv import Unprivileged

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> DebianGuest:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("needs root and debootstrap to build the Debian guest")
    return debian_guest(tmp_path_factory.mktemp("debian"))


@pytest.fixture(scope="module")
def reference(guest: DebianGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("debian-ref") / "ref.tar"
    make_reference(guest.raw, ref, guest.disk.mounts())
    return ref


@pytest.fixture(scope="module")
def converted(
    guest: DebianGuest, nobody: Unprivileged, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The guest converted as uid 65534 (the output is copied out of the sandbox)."""
    ova = nobody.add_input(guest.ova)
    out = nobody.work / "debian.tar"
    t0 = time.monotonic()
    res = nobody.run(["convert", str(ova), "-o", str(out)])
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    size_mb = guest.ova.stat().st_size / 1e6
    print(f"unprivileged conversion of a {size_mb:.0f} MB OVA: {elapsed:.1f} s")
    dest = tmp_path_factory.mktemp("debian-out") / "debian.tar"
    shutil.copyfile(out, dest)
    yield dest


def test_debian_guest_equals_reference(converted: Path, reference: Path) -> None:
    assert_same_tree(converted, reference)


def _docker(host: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", host, *args],
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


def test_docker_import_and_make(converted: Path, docker_host: str, tmp_path: Path) -> None:
    tag = f"ova2img-test-debian:{os.getpid()}"
    res = _docker(docker_host, "import", str(converted), tag)
    assert res.returncode == 0, res.stderr
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "hello.c").write_text("int main(void) { return 0; }\n")
        (src / "Makefile").write_text(
            "all:\n\t@echo built-with-$$(cat /etc/debian_version)\n\t@test -u /usr/bin/passwd"
            " && echo setuid-ok\n\t@touch /work/made\n"
        )
        res = _docker(
            docker_host,
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{src}:/work",
            tag,
            "make",
            "-C",
            "/work",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "built-with-12." in res.stdout
        assert "setuid-ok" in res.stdout
        assert (src / "made").exists()
        # File capabilities survive into the container's filesystem.
        res = _docker(
            docker_host, "run", "--rm", "--network", "none", tag, "cat", "/etc/os-release"
        )
        assert "Debian GNU/Linux 12" in res.stdout
    finally:
        _docker(docker_host, "rmi", "-f", tag)


def test_demo_appliance_runs(docker_host: str, tmp_path: Path) -> None:
    from ova2img.cli import main

    out = tmp_path / "demo.tar"
    assert main(["convert", str(FIXTURES / "demo.ova"), "-o", str(out), "-q"]) == 0
    tag = f"ova2img-test-demo:{os.getpid()}"
    res = _docker(docker_host, "import", str(out), tag)
    assert res.returncode == 0, res.stderr
    try:
        res = _docker(
            docker_host,
            "run",
            "--rm",
            "--network",
            "none",
            tag,
            "/bin/sh",
            "-c",
            "cat /etc/os-release; echo $((6*7))",
        )
        assert res.returncode == 0, res.stderr
        assert "ova2img demo" in res.stdout
        assert "42" in res.stdout
    finally:
        _docker(docker_host, "rmi", "-f", tag)
