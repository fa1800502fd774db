"""[container-ready] the container profile on the seed's LVM layout: each operation changes
exactly its paths, the result equals the faithful conversion everywhere else, runs in docker,
and the ledger counts what the tar holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.compare import compare_trees, read_tree
from support.images import make_ova, to_vmdk
from support.lvm import LvmGuest, seed_layout
from support.probes import populate_probes

import ova2img
from ova2img.assembly import TreeItem
from ova2img.errors import UsageError
from ova2img.profile import (
    OPERATIONS,
    PROFILES,
    ProfileContext,
    apply_profile,
    dry_run,
    select_operations,
    transform,
)
from ova2img.report import Ledger
from ova2img.sinks.tar import write_tar

MACHINE_ID = b"0123456789abcdef0123456789abcdef\n"


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def populate_container_junk(root: Path) -> None:
    """What a VM leaves behind that a container image should not carry (and what must stay)."""
    _write(root / "etc/machine-id", MACHINE_ID, 0o444)
    (root / "var/lib/dbus").mkdir(parents=True)
    os.symlink("/etc/machine-id", root / "var/lib/dbus/machine-id")
    for key in ("ssh_host_rsa_key", "ssh_host_ed25519_key"):
        _write(root / "etc/ssh" / key, b"-----BEGIN OPENSSH PRIVATE KEY-----\n", 0o600)
        _write(root / "etc/ssh" / f"{key}.pub", b"ssh-ed25519 AAAA host\n")
    _write(root / "etc/ssh/sshd_config", b"PermitRootLogin no\n")
    _write(root / "var/log/syslog", b"Jan  1 kernel: booted\n" * 100, 0o640, (0, 4))
    _write(root / "var/log/apt/history.log", b"Start-Date: 2024\n", 0o644)
    _write(root / "var/log/wtmp", b"\0" * 384, 0o664, (0, 43))
    _write(root / "var/log/empty.log", b"")
    (root / "var/log/journal").mkdir(mode=0o2755)
    # a log hardlinked to a file outside /var/log: emptying the log keeps the other's content
    _write(root / "srv/hl-keep", b"shared inode\n")
    os.link(root / "srv/hl-keep", root / "var/log/hl-log")
    _write(root / "var/cache/apt/pkgcache.bin", b"apt cache" * 50)
    _write(root / "var/cache/apt/srcpkgcache.bin", b"apt src cache")
    _write(root / "var/cache/apt/archives/foo_1.0_all.deb", b"!<arch>\n")
    _write(root / "var/cache/apt/archives/lock", b"")
    (root / "var/cache/apt/archives/partial").mkdir()
    _write(root / "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease", b"Origin")
    _write(root / "var/lib/apt/lists/lock", b"")
    (root / "var/lib/apt/lists/partial").mkdir()
    _write(root / "var/cache/dnf/repo/packages/x.rpm", b"rpm")
    _write(root / "tmp/junk", b"junk")
    _write(root / "tmp/build/x", b"x")
    (root / "var/tmp").mkdir(mode=0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    _write(root / "var/tmp/old", b"old")
    _write(root / "etc/udev/rules.d/70-persistent-net.rules", b'SUBSYSTEM=="net", NAME="eth0"\n')
    _write(root / "etc/udev/rules.d/99-keep.rules", b"# kept\n")
    _write(root / "var/lib/dhcp/dhclient.eth0.leases", b"lease {}\n")
    _write(root / "var/lib/NetworkManager/internal-abc.lease", b"ADDRESS=10.0.2.15\n")
    _write(root / "var/lib/NetworkManager/NetworkManager.state", b"[main]\n")
    _write(root / "root/.bash_history", b"rm -rf /\n", 0o600)
    _write(root / "home/alice/.bash_history", b"ls\n", 0o600, (1000, 1000))
    _write(root / "home/alice/.profile", b"PATH=$PATH\n", 0o644, (1000, 1000))
    _write(root / "home/alice/.local/share/fish/fish_history", b"- cmd: ls\n", 0o600)
    _write(root / "swapfile", os.urandom(64 << 10), 0o600)
    _write(root / "lib/modules/6.1.0-test/kernel/fs/x.ko", b"\x7fELF module")
    for unit in ("getty@.service", "systemd-timesyncd.service", "systemd-udevd.service"):
        _write(root / "lib/systemd/system" / unit, b"[Unit]\n")
    _write(root / "lib/systemd/system/sys-kernel-debug.mount", b"[Mount]\n")
    _write(root / "lib/systemd/system/ssh.service", b"[Unit]\n")
    wants = root / "etc/systemd/system/getty.target.wants"
    wants.mkdir(parents=True)
    os.symlink("/lib/systemd/system/getty@.service", wants / "getty@tty1.service")
    os.symlink(
        "/lib/systemd/system/systemd-timesyncd.service",
        root / "etc/systemd/system/systemd-timesyncd.service",
    )
    # a user whose id no 65536-id user namespace can map (the remap test checks passwd)
    with (root / "etc/passwd").open("a") as fh:
        fh.write("bigu:x:100000:100000:big:/nonexistent:/bin/false\n")
    with (root / "etc/group").open("a") as fh:
        fh.write("bigu:x:100000:\n")


def populate(root: Path) -> None:
    populate_probes(root)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    populate_container_junk(root)


#: what each operation changes in that guest: (action, path)
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "machine-id": {("emptied", "/etc/machine-id"), ("dropped", "/var/lib/dbus/machine-id")},
    "ssh-host-keys": {
        ("dropped", f"/etc/ssh/{k}{s}")
        for k in ("ssh_host_rsa_key", "ssh_host_ed25519_key")
        for s in ("", ".pub")
    },
    "logs": {
        ("emptied", "/var/log/syslog"),
        ("emptied", "/var/log/apt/history.log"),
        ("emptied", "/var/log/wtmp"),
        ("emptied", "/var/log/hl-log"),
    },
    "package-caches": {
        ("dropped", "/var/cache/apt/pkgcache.bin"),
        ("dropped", "/var/cache/apt/srcpkgcache.bin"),
        ("dropped", "/var/cache/apt/archives/foo_1.0_all.deb"),
        ("dropped", "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease"),
        ("dropped", "/var/cache/dnf/repo"),
    },
    "tmp": {("dropped", "/tmp/junk"), ("dropped", "/tmp/build"), ("dropped", "/var/tmp/old")},
    "udev-net-rules": {("dropped", "/etc/udev/rules.d/70-persistent-net.rules")},
    "dhcp-leases": {
        ("dropped", "/var/lib/dhcp/dhclient.eth0.leases"),
        ("dropped", "/var/lib/NetworkManager/internal-abc.lease"),
    },
    "shell-history": {
        ("dropped", "/root/.bash_history"),
        ("dropped", "/home/alice/.bash_history"),
        ("dropped", "/home/alice/.local/share/fish/fish_history"),
    },
    "swap-files": {("dropped", "/swapfile")},
    "boot-and-modules": {
        ("dropped", "/boot/grub"),
        ("dropped", "/boot/lost+found"),
        ("dropped", "/boot/vmlinuz-0.0.0-test"),
        ("dropped", "/boot/config-0.0.0-test"),
        ("dropped", "/lib/modules/6.1.0-test"),
    },
    "mask-units": {
        ("masked", "/etc/systemd/system/getty@.service"),
        ("masked", "/etc/systemd/system/systemd-udevd.service"),
        ("masked", "/etc/systemd/system/sys-kernel-debug.mount"),
        ("replaced", "/etc/systemd/system/systemd-timesyncd.service"),
    },
}
#: subtrees that go with a dropped directory
DROPPED_TREES = {
    "/tmp/build",
    "/var/cache/dnf/repo",
    "/boot/grub",
    "/boot/lost+found",
    "/lib/modules/6.1.0-test",
}


@dataclass
class Seed:
    guest: LvmGuest
    ova: Path
    faithful: Path


_SEED: list[Seed] = []


def build_seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    """The seed's layout with the probes and the container junk, once per session (the
    pre-flight tests use it too)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, loop devices and lvm2 to build the guest")
    if not _SEED:
        work = tmp_path_factory.mktemp("profile-seed")
        guest = seed_layout(work, populate)
        vmdks = [to_vmdk(d, work / f"disk{i}.vmdk") for i, d in enumerate(guest.disks)]
        ova = make_ova(work / "seed.ova", vmdks, "seed")
        for d in guest.disks:
            d.unlink()  # the OVA holds them
        faithful = work / "faithful.tar"
        ova2img.convert(ova, faithful)
        _SEED.append(Seed(guest, ova, faithful))
    return _SEED[0]


@pytest.fixture
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    return build_seed(tmp_path_factory)


def _changes(ledger: Ledger) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for c in ledger.changes:
        path = "/" + c.path.decode()
        out.setdefault(c.operation, set()).add((c.action, path))
    return out


def _profiled(seed: Seed, out: Path, ops: list[str]) -> Ledger:
    ledger = Ledger(profile="container", operations=ops)
    with ova2img.open(seed.ova) as guest, out.open("wb") as fh:
        write_tar(transform(guest.walk(), guest=guest, ops=ops, ledger=ledger), fh)
    return ledger


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_each_operation_changes_exactly_its_paths(seed: Seed, op: str) -> None:
    """dry_run with one operation lists exactly what that operation touches in the guest."""
    ledger = Ledger(operations=[op])
    with ova2img.open(seed.ova) as guest:
        lines = dry_run(guest, [op], ledger=ledger)
    assert _changes(ledger) == {op: EXPECTED[op]}
    assert len(lines) == len(EXPECTED[op])
    assert all(line.startswith(f"{op}: ") for line in lines)


def test_operations_are_documented() -> None:
    assert set(PROFILES["container"]) == set(OPERATIONS) == set(EXPECTED)
    for op in OPERATIONS.values():
        assert op.summary and op.doc and len(op.doc) >= len(op.summary) - 1, op.name
    assert select_operations("container", no_ops=["logs"]) == [n for n in OPERATIONS if n != "logs"]
    assert select_operations(None, ops=["tmp", "logs"]) == ["logs", "tmp"]
    with pytest.raises(UsageError, match="unknown operation"):
        select_operations("container", ops=["nope"])
    with pytest.raises(UsageError, match="unknown profile"):
        select_operations("vm")


def test_profile_differs_from_faithful_only_where_it_says(seed: Seed, tmp_path: Path) -> None:
    out = tmp_path / "profiled.tar"
    ops = select_operations("container")
    ledger = _profiled(seed, out, ops)
    assert _changes(ledger) == {**EXPECTED, "tar": {("dropped", "/probes/socket")}}
    touched = {path for changes in EXPECTED.values() for _, path in changes}
    ignore = touched | {f"{top}/*" for top in DROPPED_TREES}
    ours, faithful = read_tree(out), read_tree(seed.faithful)
    assert not ours.problems
    diffs = compare_trees(ours, faithful, ignore=ignore)
    # The emptied log is split off its inode: the other name keeps the content, alone.
    assert diffs == [
        "'/srv/hl-keep': hardlink group {/srv/hl-keep} != ref {/srv/hl-keep, /var/log/hl-log}"
    ]
    entries = ours.entries
    mid = entries["/etc/machine-id"]
    assert (mid.kind, mid.size, mid.mode, mid.uid) == ("file", 0, 0o444, 0)
    assert "/var/lib/dbus/machine-id" not in entries and "/var/lib/dbus" in entries
    assert not [p for p in entries if p.startswith("/etc/ssh/ssh_host_")]
    assert "/etc/ssh/sshd_config" in entries
    logs = [e for p, e in entries.items() if p.startswith("/var/log/") and e.kind == "file"]
    assert logs and all(e.size == 0 for e in logs)
    wtmp = entries["/var/log/wtmp"]
    assert (wtmp.mode, wtmp.uid, wtmp.gid) == (0o664, 0, 43)
    assert entries["/var/log/journal"].kind == "dir"
    assert ours.resolved("/srv/hl-keep").size == len(b"shared inode\n")
    assert not [p for p in entries if p.endswith((".bin", ".deb"))]
    assert "/var/lib/apt/lists/lock" in entries and "/var/lib/apt/lists/partial" in entries
    assert "/var/cache/apt/archives/partial" in entries and "/var/cache/dnf" in entries
    assert [p for p in entries if p.startswith("/tmp/")] == []
    assert entries["/tmp"].mode == 0o1777 and entries["/var/tmp"].mode == 0o1777
    assert [p for p in entries if p.startswith("/boot/")] == []
    for unit in ("getty@.service", "systemd-timesyncd.service", "sys-kernel-debug.mount"):
        link = entries[f"/etc/systemd/system/{unit}"]
        assert (link.kind, link.link) == ("symlink", "/dev/null"), unit
    assert "/etc/systemd/system/ssh.service" not in entries  # not in the list: not masked
    # the ledger's counts agree with the tar
    report = ledger.to_dict()
    with tarfile.open(out) as tf:
        members = len(tf.getmembers())
    totals = report["totals"]
    written = totals["kept"] + totals["transformed"] + totals["added"]
    assert written == members
    assert totals["added"] == 3 and report["categories"]["symlink"]["transformed"] == 1
    assert report["categories"]["socket"] == {
        "kept": 0,
        "transformed": 0,
        "added": 0,
        "dropped": 1,
    }
    dropped_paths = set(faithful.entries) - set(entries)
    assert totals["dropped"] == len(dropped_paths) + 1  # + the socket tar cannot hold
    json_path = tmp_path / "ledger.json"
    ledger.write(json_path)
    assert json.loads(json_path.read_text())["changes"][0]["operation"]


def test_profiled_image_runs(seed: Seed, docker_host: str, tmp_path: Path) -> None:
    out = tmp_path / "profiled.tar"
    _profiled(seed, out, select_operations("container"))
    tag = f"ova2img-test-profile:{os.getpid()}"
    docker = ["docker", "-H", docker_host]
    res = subprocess.run([*docker, "import", str(out), tag], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    script = (
        "test -f /etc/machine-id && ! test -s /etc/machine-id && echo machine-id-empty; "
        "ls /etc/ssh; ls /boot | wc -l; "
        "readlink /etc/systemd/system/getty@.service; wc -c < /var/log/syslog"
    )
    try:
        res = subprocess.run(
            [*docker, "run", "--rm", "--network", "none", tag, "/bin/busybox", "sh", "-c", script],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["machine-id-empty", "sshd_config", "0", "/dev/null", "0"]


def test_swap_file_named_in_fstab(seed: Seed) -> None:
    """A swap file is found through fstab (the seed's fstab has none: the context says so)."""
    ctx = ProfileContext(swap_files=frozenset({b"srv/hl-keep"}))
    with ova2img.open(seed.ova) as guest:
        items = [i for i in guest.walk() if i.path.startswith(b"srv")]
        ledger = Ledger()
        kept = list(apply_profile(items, ["swap-files"], ledger=ledger, context=ctx))
    assert [i.path for i in kept] == [b"srv"]
    assert ledger.lines() == ["swap-files: dropped /srv/hl-keep"]


def test_hardlinked_emptied_names_stay_linked(seed: Seed, tmp_path: Path) -> None:
    """Two names of one inode both emptied stay one inode; a third, kept, keeps the data."""
    with ova2img.open(seed.ova) as guest:
        items = [i for i in guest.walk() if i.path in (b"srv/hl-keep", b"var/log/hl-log")]
        a, b = items
        # the same inode under a second log name (as logrotate's hardlinks would be)
        twin = TreeItem(b"var/log/hl-twin", b.entry, b.fs, b.fs_id, b.handle)
        out = tmp_path / "links.tar"
        with out.open("wb") as fh:
            write_tar(apply_profile([a, b, twin], ["logs"], context=ProfileContext()), fh)
    tree = read_tree(out)
    assert not tree.problems
    assert tree.groups["/var/log/hl-log"] == frozenset({"/var/log/hl-log", "/var/log/hl-twin"})
    assert tree.resolved("/var/log/hl-twin").size == 0
    assert tree.resolved("/srv/hl-keep").size == len(b"shared inode\n")


def test_dry_run_lists_what_the_report_records(
    seed: Seed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --dry-run plans what the conversion plans: --ids, --drop-devices and --whiteouts
    # included (it listed the profile's operations only), line for line what --report holds.
    from ova2img.cli import main

    flags = ["--profile", "container", "--ids", "remap", "--drop-devices", "--whiteouts", "rename"]
    assert main(["convert", str(seed.ova), "--dry-run", *flags]) == 0
    listed = capsys.readouterr().out.splitlines()
    report = tmp_path / "r.json"
    out = tmp_path / "out.tar"
    assert (
        main(["convert", str(seed.ova), "-o", str(out), "-q", "--report", str(report), *flags]) == 0
    )
    recorded = ova2img_report_lines(report)
    assert listed == recorded
    assert any("remap" in line or "ids" in line for line in listed)
    assert any("dev" in line for line in listed)


def ova2img_report_lines(path: Path) -> list[str]:
    """The report's changes as Change.line() writes them (from the JSON fields)."""
    lines = []
    for c in json.loads(path.read_text())["changes"]:
        extra = [c["detail"]] if c.get("detail") else []
        if c.get("entries", 1) > 1:
            extra.append(f"{c['entries']} entries")
        tail = f" ({', '.join(extra)})" if extra else ""
        lines.append(f"{c['operation']}: {c['action']} {c['path']}{tail}")
    return lines
