"""[lvm-assembly] acceptance: guests spread over partitions, LVM and disks become one tree,
identical to root's reference (filesystems mounted where the guest's fstab says)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.compare import assert_same_tree, read_tree
from support.images import make_ova, to_vmdk
from support.lvm import LvmGuest, make_reference_from, multi_pv_layout, seed_layout, two_disk_layout
from support.probes import populate_probes
from unpriv import Unprivileged

import ova2img
from ova2img.cli import main

LAYOUTS: dict[str, Callable[[Path, Callable[[Path], None] | None], LvmGuest]] = {
    "seed": seed_layout,
    "two-disks": two_disk_layout,
    "multi-pv": multi_pv_layout,
}


def _populate(root: Path) -> None:
    """The fidelity probes, plus a static busybox as /bin/busybox to run in the container."""
    populate_probes(root)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")


@dataclass
class Built:
    guest: LvmGuest
    ova: Path
    vmdks: list[Path]
    ref: Path


_BUILT: dict[str, Built] = {}


def _build(name: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build a layout once per session (several tests use the same guest)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, loop devices and lvm2 to build the guest and its reference")
    if name not in _BUILT:
        work = tmp_path_factory.mktemp(name)
        guest = LAYOUTS[name](work, _populate)
        vmdks = [to_vmdk(d, work / f"disk{i}.vmdk") for i, d in enumerate(guest.disks)]
        ova = make_ova(work / f"{name}.ova", vmdks, name)
        ref = work / "ref.tar"
        make_reference_from(ref, guest.mounts)
        _BUILT[name] = Built(guest, ova, vmdks, ref)
    return _BUILT[name]


@pytest.fixture(params=sorted(LAYOUTS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(request.param, tmp_path_factory)


@pytest.fixture
def seed(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build("seed", tmp_path_factory)


@pytest.fixture
def two_disks(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build("two-disks", tmp_path_factory)


def test_unprivileged_conversion_equals_reference(built: Built, nobody: Unprivileged) -> None:
    ova = nobody.add_input(built.ova)
    out = nobody.work / "out.tar"
    res = nobody.run(["convert", str(ova), "-o", str(out)])
    try:
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        assert_same_tree(out, built.ref)
    finally:
        out.unlink(missing_ok=True)
        ova.unlink()


def test_inspect_shows_lvm_and_mounts(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    with ova2img.open(built.ova) as guest:
        info = guest.inspect()
    vg = built.guest.vg
    lvs = {v["name"]: v for g in info["volume_groups"] for v in g["lvs"]}
    mounts = {m["path"]: m["volume"] for m in info["mounts"]}
    if vg.startswith("seed"):
        assert lvs[f"{vg}/root"]["filesystem"]["mountpoints"] == ["/"]
        assert lvs[f"{vg}/swap_1"]["content"] == "swap"
        assert mounts == {"/": f"{vg}/root", "/boot": "sda1"}
    elif vg.startswith("data"):
        assert mounts == {"/": "sda1", "/srv": f"{vg}/srv"}
    else:
        assert lvs[f"{vg}/root"]["type"] == "linear"
        assert lvs[f"{vg}/root"]["lvm"]["segments"] == 2
        assert mounts == {"/": f"{vg}/root"}
    assert main(["inspect", str(built.ova)]) == 0
    text = capsys.readouterr().out
    assert f"{vg}/" in text and "mounted at /" in text


def test_missing_nofail_disk_is_a_warning(two_disks: Built, tmp_path: Path) -> None:
    ova = make_ova(tmp_path / "first-only.ova", two_disks.vmdks[:1], "first-only")
    out = tmp_path / "out.tar"
    result = ova2img.convert(ova, out)
    assert any("/srv" in w and "nofail" in w for w in result.warnings), result.warnings
    tree = read_tree(out)
    assert "/srv" in tree.entries and not any(p.startswith("/srv/") for p in tree.entries)


def test_seed_layout_runs_in_docker(seed: Built, docker_host: str, tmp_path: Path) -> None:
    out = tmp_path / "seed.tar"
    ova2img.convert(seed.ova, out)
    tag = f"ova2img-test-seed:{os.getpid()}"
    docker = ["docker", "-H", docker_host]
    res = subprocess.run([*docker, "import", str(out), tag], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    try:
        res = subprocess.run(
            [
                *docker,
                "run",
                "--rm",
                "--network",
                "none",
                tag,
                "/bin/busybox",
                "sh",
                "-c",
                "cat /boot/grub/grub.cfg; ls /boot; test -u /probes/setuid-busybox && echo ok",
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "ova2img test /boot" in res.stdout
        assert "vmlinuz-0.0.0-test" in res.stdout
        assert res.stdout.strip().endswith("ok")
    finally:
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True)
