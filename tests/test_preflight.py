"""[container-ready] pre-flight report on a guest with a uid 100000 file, device nodes and a
``.wh.`` name; the id remap makes a tarball that a userns-remapped dockerd imports and runs
where the faithful one fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine import private_dockerd
from support.compare import read_tree
from test_profile import Seed, build_seed

import ova2img
from ova2img.preflight import Preflight, preflight
from ova2img.profile import plan_ids, transform, whiteout_names
from ova2img.report import Ledger
from ova2img.sinks.tar import write_tar


@pytest.fixture
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    return build_seed(tmp_path_factory)


def _tar_oracle(path: Path) -> dict[str, int]:
    """Counts read back from the faithful tarball with tarfile (independent of our walk)."""
    counts = {"big_ids": 0, "devices": 0, "whiteouts": 0, "pax_ids": 0, "sparse": 0}
    linked: set[str] = set()
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.islnk():
                linked.add(m.linkname)
            if m.uid > 65535 or m.gid > 65535:
                counts["big_ids"] += 1
            if m.ischr() or m.isblk():
                counts["devices"] += 1
            if any(p.startswith(".wh.") for p in m.name.split("/")):
                counts["whiteouts"] += 1
            if "uid" in m.pax_headers or "gid" in m.pax_headers:
                counts["pax_ids"] += 1
            if m.issparse() or "GNU.sparse.realsize" in m.pax_headers:
                counts["sparse"] += 1
    counts["link_groups"] = len(linked)
    return counts


def test_preflight_report_on_probed_guest(seed: Seed) -> None:
    with ova2img.open(seed.ova) as guest:
        report = preflight(guest)
    oracle = _tar_oracle(seed.faithful)
    # probes: owned-100000, owned-3000000000; char-1-3 (two names), block-8-1;
    # .wh.not-a-whiteout; socket
    assert report.big_ids.count == oracle["big_ids"] == 2
    assert report.big_uids == [100000, 3_000_000_000] == report.big_gids
    assert report.devices.count == oracle["devices"] == 3
    assert report.whiteouts.count == oracle["whiteouts"] == 1
    assert report.whiteouts.examples == ["/probes/.wh.not-a-whiteout"]
    assert report.sockets.count == 1
    assert report.pax["id ≥ 2^21"].count == oracle["pax_ids"] == 1
    assert report.pax["mtime outside 1970..2242"].count == 2  # mtime-1960 and its symlink
    assert report.sparse_files.count == oracle["sparse"] >= 1
    # the probes' pair and /srv/hl-keep + /var/log/hl-log; a FIFO or a device node with two
    # names is no tar hardlink, and mke2fs -d gives a symlink's second name an inode of its own
    assert (report.hardlink_groups, oracle["link_groups"]) == (2, 2)
    assert report.hardlinks_across_mounts.count == 0
    assert report.hardlinks_outside.count == 0
    assert not report.userns_ok
    assert len(report.blockers) == 2
    text = report.to_text()
    assert "rootless podman / userns-remap (ids 0-65535): NO" in text
    assert "/probes/owned-100000 (100000:100000)" in text
    data = json.loads(report.to_json())
    assert data["userns"]["ok"] is False and data["devices"]["count"] == 3


def test_preflight_after_remedies_is_clean(seed: Seed) -> None:
    """Remap ids, drop devices, rename whiteouts: the report over the result has no blocker."""
    with ova2img.open(seed.ova) as guest:
        ledger = Ledger()
        collector = Preflight()
        stream = transform(
            guest.walk(),
            guest=guest,
            ids=plan_ids(guest, "remap"),
            devices="drop",
            whiteouts="rename",
            ledger=ledger,
        )
        for _ in collector.watch(stream):
            pass
    report = collector.report()
    assert report.userns_ok, report.blockers
    assert report.whiteouts.count == 0 and report.devices.count == 0
    lines = ledger.lines()
    assert "whiteout-names: renamed /probes/_.wh.not-a-whiteout (was .wh.not-a-whiteout)" in lines
    assert "drop-devices: dropped /probes/char-1-3 (1:3)" in lines
    assert "remap-ids: remapped /probes/owned-100000 (uid 100000→65533, gid 100000→65533)" in lines


def test_whiteout_refuse(seed: Seed) -> None:
    with ova2img.open(seed.ova) as guest, pytest.raises(ova2img.Ova2imgError, match=r"\.wh\."):
        for _ in whiteout_names(guest.walk(), "refuse"):
            pass


def test_clamp_and_remap_keep_passwd_consistent(seed: Seed, tmp_path: Path) -> None:
    for mode, expect in (("remap", 65533), ("clamp", 65534)):
        out = tmp_path / f"{mode}.tar"
        with ova2img.open(seed.ova) as guest, out.open("wb") as fh:
            write_tar(transform(guest.walk(), guest=guest, ids=plan_ids(guest, mode)), fh)
        tree = read_tree(out)
        assert not tree.problems
        owned = tree.entries["/probes/owned-100000"]
        assert (owned.uid, owned.gid) == (expect, expect)
        assert max(e.uid for e in tree.entries.values()) <= 65535
        with tarfile.open(out) as tf:
            passwd = tf.extractfile("./etc/passwd").read().decode()  # type: ignore[union-attr]
            group = tf.extractfile("./etc/group").read().decode()  # type: ignore[union-attr]
        assert f"bigu:x:{expect}:{expect}:big:/nonexistent:/bin/false" in passwd.splitlines()
        assert f"bigu:x:{expect}:" in group.splitlines()
        assert "root:x:0:0:root:/root:/bin/sh" in passwd.splitlines()


# --------------------------------------------------------------------------------------------
# A second, userns-remapped dockerd


def _ensure_dockremap() -> None:
    """``--userns-remap=default`` maps through the user ``dockremap`` and its /etc/subuid and
    /etc/subgid ranges: create them (idempotently) as root."""
    if subprocess.run(["id", "dockremap"], capture_output=True).returncode != 0:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "dockremap",
            ],
            check=True,
            capture_output=True,
        )
    for name in ("/etc/subuid", "/etc/subgid"):
        path = Path(name)
        text = path.read_text() if path.exists() else ""
        if not any(line.startswith("dockremap:") for line in text.splitlines()):
            with path.open("a") as fh:
                fh.write("dockremap:231072:65536\n")


@contextlib.contextmanager
def remapped_engine() -> Iterator[str]:
    """A private dockerd with ``--userns-remap=default`` (vfs, no networking); its URL."""
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("needs root and dockerd for a userns-remapped engine")
    _ensure_dockremap()
    with private_dockerd(("--userns-remap=default",), name="userns-remapped dockerd") as url:
        yield url


def test_remapped_ids_import_under_userns_remap(seed: Seed, tmp_path: Path) -> None:
    remapped = tmp_path / "remapped.tar"
    with ova2img.open(seed.ova) as guest, remapped.open("wb") as fh:
        write_tar(transform(guest.walk(), guest=guest, ids=plan_ids(guest, "remap")), fh)
    with remapped_engine() as url:
        docker = ["docker", "-H", url]
        res = subprocess.run(
            [*docker, "import", str(seed.faithful), "o2i-faithful:1"],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0
        assert "cannot be mapped to a host ID" in res.stderr, res.stderr
        res = subprocess.run(
            [*docker, "import", str(remapped), "o2i-remapped:1"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        script = "stat -c '%u:%g' /probes/owned-100000; grep '^bigu:' /etc/passwd; id -u"
        res = subprocess.run(
            [
                *docker,
                "run",
                "--rm",
                "--network",
                "none",
                "o2i-remapped:1",
                "/bin/busybox",
                "sh",
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n")[:3] == [
            "65533:65533",
            "bigu:x:65533:65533:big:/nonexistent:/bin/false",
            "0",
        ]


def test_text_says_how_many_examples_are_left_out() -> None:
    from ova2img.preflight import PreflightReport

    report = PreflightReport()
    for i in range(7):
        report.big_ids.add(b"f%d" % i, "x")
    lines = report.to_text().splitlines()
    at = lines.index("ids above 65535: 7")
    assert lines[at + 1 : at + 7] == [*(f"  /f{i} (x)" for i in range(5)), "  … and 2 more"]
