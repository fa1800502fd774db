"""The Docker options on the command line, against the real test engine; with them the
container-ready options (``--profile``, ``--ids``, ``--report``, …)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from support.images import disk_mbr_single, make_ova, to_vmdk
from support.probes import populate_probes

from ova2img.cli import main

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"
MiB = 1 << 20


def test_convert_into_the_engine_runs_without_a_command(
    docker_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    tag = f"ova2img-cli-demo:{os.getpid()}"
    assert main(["convert", str(DEMO), "--docker", tag, "--change", "ENV GREETING=hi", "-q"]) == 0
    docker = ["docker", "-H", docker_host]
    try:
        res = subprocess.run(
            [*docker, "run", "-i", "--rm", "--network", "none", tag],
            input=". /etc/os-release; echo $GREETING from $ID\n",
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "hi from ova2img-demo"
    finally:
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True, check=False)


def test_image_archives_on_the_command_line(tmp_path: Path) -> None:
    archive = tmp_path / "demo-docker.tar"
    assert (
        main(
            [
                "convert",
                str(DEMO),
                "--format",
                "docker-archive",
                "--tag",
                "demo:1",
                "-o",
                str(archive),
                "-q",
            ]
        )
        == 0
    )
    with tarfile.open(archive) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["demo:1"]
    oci = tmp_path / "demo-oci.tar"
    assert main(["convert", str(DEMO), "--format", "oci", "-o", str(oci), "-q"]) == 0
    with tarfile.open(oci) as tf:
        assert "oci-layout" in tf.getnames() and "index.json" in tf.getnames()


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "x.tar", "--docker", "a:b"],
        ["--docker", "a:b", "--change", "FROBNICATE 1"],
        # container-ready options are checked before the engine is asked or the image read
        ["--docker", "a:b", "--op", "frobnicate"],
        ["--docker", "a:b", "--profile", "container", "--path", "/etc"],
        ["--format", "oci", "-o", "x.tar", "--op", "frobnicate"],
    ],
)
def test_docker_usage_errors(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chdir(tmp_path)
    assert main(["convert", str(DEMO), *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["UPPER/case", "a/B:t", "LOCALHOST/x"])
def test_docker_name_the_engine_refuses_is_a_usage_error(
    name: str,
    docker_host: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The engine would refuse the name only after reading the whole image, and keep it as an
    untagged image: refused here first, and nothing reaches the engine."""
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    images = ["docker", "-H", docker_host, "images", "-a", "-q", "--no-trunc"]
    before = subprocess.run(images, capture_output=True, text=True, check=True).stdout
    assert main(["convert", str(DEMO), "--docker", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower case" in err, err
    after = subprocess.run(images, capture_output=True, text=True, check=True).stdout
    assert sorted(after.split()) == sorted(before.split())


# -- container-ready options with images --------------------------------------------------------

#: /etc/machine-id of the guest (emptied by the machine-id operation)
MACHINE_ID = "0123456789abcdef0123456789abcdef\n"


@pytest.fixture(scope="module")
def ready_ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fidelity probes (files owned by 100000 and 3000000000, …) with busybox as /bin/sh,
    a machine-id, a log, and a user of uid 100000 in /etc/passwd."""
    if os.geteuid() != 0:
        pytest.skip("needs root to build an ext4 image with mke2fs -d")
    work = tmp_path_factory.mktemp("ready")

    def populate(root: Path) -> None:
        populate_probes(root)
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        with (root / "etc" / "passwd").open("a") as fh:
            fh.write("big:x:100000:100000:big:/nonexistent:/bin/false\n")
        (root / "etc" / "machine-id").write_text(MACHINE_ID)
        (root / "var" / "log").mkdir(parents=True)
        (root / "var" / "log" / "messages").write_text("booted\n" * 100)

    disk = disk_mbr_single(work, populate, name="ready", fs_size=32 * MiB)
    vmdk = to_vmdk(disk.path, work / "ready.vmdk")
    return make_ova(work / "ready.ova", [vmdk], "ready")


def _run(host: str, tag: str, script: str) -> str:
    res = subprocess.run(
        ["docker", "-H", host, "run", "-i", "--rm", "--network", "none", tag, "/bin/busybox", "sh"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _assert_ready_image(host: str, tag: str) -> None:
    """What --profile container --ids remap did, seen from a container of the image."""
    out = _run(
        host,
        tag,
        "cd /probes; busybox stat -c '%n %u:%g' owned-100000 owned-3000000000\n"
        "busybox grep '^big:' /etc/passwd\n"
        "busybox wc -c < /etc/machine-id; busybox wc -c < /var/log/messages\n",
    )
    # remap: the big ids, ascending, get the highest free ids from 65533 down (65534 is
    # nobody), in the files' owners and in /etc/passwd alike
    assert out.split("\n")[:5] == [
        "owned-100000 65533:65533",
        "owned-3000000000 65532:65532",
        "big:x:65533:65533:big:/nonexistent:/bin/false",
        "0",  # machine-id: emptied
        "0",  # logs: truncated
    ], out


def test_profile_and_ids_into_the_engine(
    docker_host: str, ready_ova: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    tag = f"ova2img-cli-ready:{os.getpid()}"
    report = tmp_path / "report.json"
    argv = ["convert", str(ready_ova), "--docker", tag, "--profile", "container"]
    try:
        assert main([*argv, "--ids", "remap", "--report", str(report), "-q"]) == 0
        _assert_ready_image(docker_host, tag)
        changes = json.loads(report.read_text())["changes"]
        done = {(c["operation"], c["path"], c["action"]) for c in changes}
        assert ("machine-id", "/etc/machine-id", "emptied") in done, changes
        # the ledger counts the writing pass only, not the walk that measured the layer
        assert sum(c["path"] == "/etc/machine-id" for c in changes) == 1
    finally:
        subprocess.run(["docker", "-H", docker_host, "rmi", "-f", tag], capture_output=True)


def test_profile_and_ids_in_an_oci_archive(
    docker_host: str, ready_ova: Path, tmp_path: Path
) -> None:
    oci = tmp_path / "ready.oci.tar"
    tag = f"ova2img-cli-ready-oci:{os.getpid()}"
    argv = ["convert", str(ready_ova), "--format", "oci", "-o", str(oci), "--tag", tag]
    assert main([*argv, "--profile", "container", "--ids", "remap", "-q"]) == 0
    info = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{oci}"], capture_output=True, text=True, check=False
    )
    assert info.returncode == 0, info.stderr
    assert len(json.loads(info.stdout)["Layers"]) == 1
    # skopeo copy checks every blob's digest; docker then runs the copy
    converted = tmp_path / "from-oci.tar"
    cp = subprocess.run(
        ["skopeo", "copy", f"oci-archive:{oci}", f"docker-archive:{converted}:{tag}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    docker = ["docker", "-H", docker_host]
    subprocess.run([*docker, "load", "-i", str(converted)], capture_output=True, check=True)
    try:
        _assert_ready_image(docker_host, tag)
    finally:
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True)


def test_dry_run_with_docker_needs_no_engine(
    ready_ova: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    argv = ["convert", str(ready_ova), "--docker", "x:1", "--profile", "container", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "machine-id: emptied /etc/machine-id (33 bytes)" in out.splitlines()
