"""The Docker options on the command line, against the real test engine."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from ova2img.cli import main

DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"


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
        ["--docker", "a:b", "--profile", "container"],
        ["--docker", "a:b", "--change", "FROBNICATE 1"],
    ],
)
def test_docker_usage_errors(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chdir(tmp_path)
    assert main(["convert", str(DEMO), *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
