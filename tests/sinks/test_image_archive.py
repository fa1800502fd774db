"""Image archives (docker-archive, OCI layout tar): structure, digests, file vs pipe modes,
failures. The engine-side checks (docker load, skopeo) are in tests/test_docker_images.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from ova2img.errors import UsageError
from ova2img.images import convert_to_image

FIXTURES = Path(__file__).parent.parent.parent / "fixtures"
DEMO = FIXTURES / "demo.ova"


def members(path: Path | bytes) -> dict[str, bytes]:
    """Every regular member of a tar (file or bytes) by name."""
    fh = io.BytesIO(path) if isinstance(path, bytes) else None
    with tarfile.open(fileobj=fh) if fh else tarfile.open(path) as tar:
        out = {}
        for m in tar.getmembers():
            assert m.isfile(), m.name
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_oci(files: dict[str, bytes]) -> dict[str, Any]:
    """Check an OCI layout: every blob's name is its digest, descriptors match sizes and
    digests, the config's diff_id is the uncompressed layer's digest. Returns the config."""
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/"):
            assert name == "blobs/" + sha(data).replace(":", "/")
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    (desc,) = index["manifests"]
    manifest_blob = files["blobs/" + desc["digest"].replace(":", "/")]
    assert len(manifest_blob) == desc["size"]
    manifest = json.loads(manifest_blob)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config_blob = files["blobs/" + manifest["config"]["digest"].replace(":", "/")]
    assert len(config_blob) == manifest["config"]["size"]
    config = json.loads(config_blob)
    (layer,) = manifest["layers"]
    data = files["blobs/" + layer["digest"].replace(":", "/")]
    assert len(data) == layer["size"]
    raw = gzip.decompress(data) if layer["mediaType"].endswith("+gzip") else data
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha(raw)]}
    assert desc["platform"] == {"architecture": config["architecture"], "os": config["os"]}
    with tarfile.open(fileobj=io.BytesIO(raw)) as layer_tar:
        names = layer_tar.getnames()
    assert "./bin/busybox" in names
    return config


def verify_docker_archive(files: dict[str, bytes], repo_tag: str) -> dict[str, Any]:
    (manifest,) = json.loads(files["manifest.json"])
    assert manifest["RepoTags"] == [repo_tag]
    config_blob = files[manifest["Config"]]
    assert manifest["Config"] == sha(config_blob).removeprefix("sha256:") + ".json"
    config = json.loads(config_blob)
    (layer_name,) = manifest["Layers"]
    assert config["rootfs"]["diff_ids"] == [sha(files[layer_name])]
    v1 = layer_name.split("/")[0]
    repo, tag = repo_tag.rsplit(":", 1)
    assert json.loads(files["repositories"]) == {repo: {tag: v1}}
    assert files[f"{v1}/VERSION"] == b"1.0"
    return config


@pytest.fixture(autouse=True)
def _fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def test_docker_archive_file(tmp_path: Path) -> None:
    out = tmp_path / "demo.tar"
    res = convert_to_image(DEMO, out, format="docker-archive", repo_tag="demo:1.0")
    assert res.layer_mode == "patch"
    files = members(out)
    config = verify_docker_archive(files, "demo:1.0")
    assert sha(files[f"{res.config_digest.removeprefix('sha256:')}.json"]) == res.config_digest
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["architecture"] == "amd64"
    assert config["config"]["Cmd"] == ["/bin/sh"]  # root's shell in the demo's /etc/passwd
    assert config["config"]["Labels"]["org.opencontainers.image.title"] == "demo"
    assert (
        config["config"]["Labels"]["ova2img.source.sha256"]
        == hashlib.sha256(DEMO.read_bytes()).hexdigest()
    )
    # The layer is the rootfs tar `convert` writes, but for its sparse files: plain members
    # with the same content (docker save cannot give back GNU sparse members).
    rootfs = tmp_path / "rootfs.tar"
    from ova2img import convert

    convert(DEMO, rootfs)
    (manifest,) = json.loads(files["manifest.json"])
    layer = files[manifest["Layers"][0]]
    assert b"GNU.sparse" not in layer
    with (
        tarfile.open(rootfs) as sparse_tar,
        tarfile.open(fileobj=io.BytesIO(layer)) as dense_tar,
    ):
        sparse_members, dense_members = sparse_tar.getmembers(), dense_tar.getmembers()
        assert [m.name for m in dense_members] == [m.name for m in sparse_members]
        holey = [m for m in sparse_members if m.sparse]
        assert holey, "the demo has a sparse file"
        for m, d in zip(sparse_members, dense_members, strict=True):
            assert d.sparse is None
            assert (d.type, d.mode, d.uid, d.gid, d.size, d.mtime, d.linkname) == (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.size,
                m.mtime,
                m.linkname,
            ), m.name
            if m.isreg():
                a, b = sparse_tar.extractfile(m), dense_tar.extractfile(d)
                assert a is not None and b is not None
                with a, b:
                    assert a.read() == b.read(), m.name


@pytest.mark.parametrize(("fmt", "gz"), [("docker-archive", False), ("oci", False), ("oci", True)])
def test_stdout_equals_file(tmp_path: Path, fmt: str, gz: bool) -> None:
    """A pipe (measured dry pass or spool) gives the same bytes as a file (patched header)."""
    out = tmp_path / "img.tar"
    res = convert_to_image(DEMO, out, format=fmt, repo_tag="demo:2", gzip_layer=gz)  # type: ignore[arg-type]
    code = (
        "import sys; from ova2img.images import convert_to_image as c; "
        f"r = c({str(DEMO)!r}, '-', format={fmt!r}, repo_tag='demo:2', gzip_layer={gz}); "
        "print(r.layer_mode, file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"},
    )
    expected_mode = "measured" if fmt == "docker-archive" else "spool"
    assert proc.stderr.decode().strip() == expected_mode
    assert proc.stdout == out.read_bytes()
    if fmt == "oci":
        config = verify_oci(members(out))
        assert config["architecture"] == "amd64"
        assert res.manifest_digest is not None


def test_oci_gzip_layer(tmp_path: Path) -> None:
    out = tmp_path / "oci.tar"
    res = convert_to_image(DEMO, out, format="oci", gzip_layer=True, changes=["WORKDIR /srv"])
    files = members(out)
    config = verify_oci(files)
    assert config["config"]["WorkingDir"] == "/srv"
    assert res.layer_digest != res.diff_id
    index = json.loads(files["index.json"])
    assert "annotations" not in index["manifests"][0]  # no name given


def test_failure_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "img.tar"

    def boom(done: int, entries: int) -> None:
        if done > 100_000:
            raise RuntimeError("injected")

    for fmt in ("docker-archive", "oci"):
        with pytest.raises(RuntimeError, match="injected"):
            convert_to_image(DEMO, out, format=fmt, on_progress=boom)  # type: ignore[arg-type]
        assert list(tmp_path.iterdir()) == []


def test_failure_on_stdout_cuts_inside_the_layer() -> None:
    code = (
        "from ova2img.images import convert_to_image as c\n"
        "def boom(done, entries):\n"
        "    if done > 100_000: raise SystemExit(7)\n"
        f"c({str(DEMO)!r}, '-', format='docker-archive', repo_tag='x:1', on_progress=boom)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert proc.returncode == 7
    assert len(proc.stdout) > 100_000
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for m in tar.getmembers():  # the layer member is cut: unexpected end of data
            f = tar.extractfile(m)
            assert f is not None
            f.read()
    assert b"manifest.json" not in proc.stdout


def test_usage_errors_before_reading(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ova"  # never opened: the arguments fail first
    with pytest.raises(UsageError, match="invalid image name"):
        convert_to_image(missing, tmp_path / "o.tar", repo_tag="Upper:case")
    with pytest.raises(UsageError, match="unknown instruction 'RUN'"):
        convert_to_image(missing, tmp_path / "o.tar", changes=["RUN true"])
    with pytest.raises(UsageError, match="oci only"):
        convert_to_image(missing, tmp_path / "o.tar", format="docker-archive", gzip_layer=True)
    with pytest.raises(UsageError, match="unknown image format"):
        convert_to_image(missing, tmp_path / "o.tar", format="zip")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
