"""[docker] acceptance against a real engine: images with a configuration, streamed into the
engine (``convert_to_engine``) or written as docker-archive / OCI archives; nothing mocked.

Guests: the demo OVA, the seed's Vagrant LVM layout (probes + busybox), a guest whose
``/bin/sh`` is Debian's arm64 busybox, and (slow) the debootstrapped Debian guest, which also
measures the peak RSS of a streamed import."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from support.foreign import arm64_busybox
from support.images import disk_mbr_single, make_ova, to_vmdk
from support.lvm import seed_layout
from support.probes import (
    SPARSE_DATA_LEN,
    SPARSE_DATA_OFFSET,
    SPARSE_SIZE,
    populate_probes,
    sparse_probe_bytes,
)

import ova2img
from ova2img.errors import SinkError
from ova2img.images import convert_to_engine, convert_to_image

pytestmark = pytest.mark.docker
DEMO = Path(__file__).parent.parent / "fixtures" / "demo.ova"
MiB = 1 << 20


def dk(host: str, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["docker", "-H", host, *args],
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def run(
    host: str, tag: str, *cmd: str, volume: str | None = None
) -> subprocess.CompletedProcess[str]:
    extra = ["-v", volume] if volume else []
    return dk(host, "run", "--rm", "--network", "none", *extra, tag, *cmd, check=False)


def unique(name: str) -> str:
    return f"ova2img-test-{name}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tag(docker_host: str) -> Iterator[str]:
    """A fresh image name, removed after the test."""
    name = unique("img")
    yield name
    dk(docker_host, "rmi", "-f", name, check=False)


def image_ids(client: docker.DockerClient) -> set[str]:
    return {str(i.id) for i in client.images.list(all=True)}


# -- guests ---------------------------------------------------------------------------------------


def _seed_populate(root: Path) -> None:
    populate_probes(root)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")  # root's shell in the probes' /etc/passwd


@pytest.fixture(scope="module")
def seed_ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's layout (MBR, /boot, LVM root and swap) as an OVA, built as in
    tests/test_lvm_assembly.py."""
    if os.geteuid() != 0:
        pytest.skip("needs root, loop devices and lvm2 to build the seed guest")
    work = tmp_path_factory.mktemp("seed-docker")
    guest = seed_layout(work, _seed_populate)
    vmdks = [to_vmdk(d, work / f"disk{i}.vmdk") for i, d in enumerate(guest.disks)]
    return make_ova(work / "seed.ova", vmdks, "seed")


@pytest.fixture(scope="module")
def arm64_ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guest whose /bin/sh is a real arm64 binary (Debian's busybox-static:arm64)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to build an ext4 image with mke2fs -d")
    busybox = arm64_busybox()
    work = tmp_path_factory.mktemp("arm64")

    def populate(root: Path) -> None:
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("/bin/busybox")  # absolute: resolved in the guest
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")

    disk = disk_mbr_single(work, populate, name="arm64", fs_size=16 * MiB)
    vmdk = to_vmdk(disk.path, work / "arm64.vmdk")
    return make_ova(work / "arm64.ova", [vmdk], "arm64")


# -- engine: demo ---------------------------------------------------------------------------------


def test_engine_image_runs_without_a_command(docker_host: str, tag: str) -> None:
    res = convert_to_engine(DEMO, tag, docker_host=docker_host)
    assert res.repo_tag == tag
    info = json.loads(dk(docker_host, "image", "inspect", tag).stdout)[0]
    assert info["Id"] == res.image_id
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    assert info["Config"]["Env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ]
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "demo"
    assert labels["org.opencontainers.image.vendor"] == "ova2img tests"
    assert labels["org.opencontainers.image.version"] == "1.0"
    assert labels["ova2img.source"] == "demo.ova"
    assert labels["ova2img.version"] == ova2img.__version__
    # No command: the default Cmd (root's shell) runs, reads EOF on stdin and exits 0.
    out = run(docker_host, tag)
    assert out.returncode == 0, out.stderr
    out = run(docker_host, tag, "cat", "/etc/os-release")
    assert out.returncode == 0 and out.stdout, out.stderr


def test_engine_changes(docker_host: str, tag: str) -> None:
    convert_to_engine(
        DEMO,
        tag,
        docker_host=docker_host,
        changes=[
            "ENV GREETING=hello PATH=/opt/bin:$PATH",
            "WORKDIR /tmp",
            'LABEL note="a \\"quoted\\" $value"',
            "EXPOSE 8080",
            "USER 65534",
            'CMD ["sh", "-c", "echo $GREETING from $(pwd) as $(id -u)"]',
        ],
    )
    info = json.loads(dk(docker_host, "image", "inspect", tag).stdout)[0]["Config"]
    assert info["Labels"]["note"] == 'a "quoted" '
    assert info["ExposedPorts"] == {"8080/tcp": {}}
    assert (
        "PATH=/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in info["Env"]
    )
    out = run(docker_host, tag)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from /tmp as 65534"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_stream_leaves_no_image(
    docker_host: str, docker_client: docker.DockerClient, error: type[BaseException]
) -> None:
    name = unique("failed")
    before = image_ids(docker_client)
    sent: list[int] = []

    def fail(done: int, entries: int) -> None:
        sent.append(done)
        if done > 200_000:
            raise error("injected")

    with pytest.raises(error):
        convert_to_engine(DEMO, name, docker_host=docker_host, on_progress=fail)
    assert max(sent) > 200_000  # the failure came after data was streamed
    res = dk(docker_host, "image", "inspect", name, check=False)
    assert res.returncode != 0 and "No such image" in res.stderr
    assert image_ids(docker_client) == before


def test_no_engine_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/nothing.sock"
    monkeypatch.setenv("DOCKER_HOST", url)
    with pytest.raises(SinkError) as info:
        convert_to_engine(DEMO, "x:1")
    text = str(info.value)
    assert "\n" not in text
    assert f"no Docker engine answers at {url} (DOCKER_HOST={url})" in text
    with pytest.raises(SinkError, match=f"no Docker engine answers at {url}"):
        convert_to_engine(DEMO, "x:1", docker_host=url)


# -- engine: the seed's layout --------------------------------------------------------------------


def _capability_xattr(host: str, tag: str, tmp_path: Path) -> bytes:
    """security.capability of /probes/capability as the container's filesystem holds it:
    ``docker export`` of a created container (moby's archive package reads the
    ``security.capability`` xattr of each file into a PAX SCHILY.xattr record)."""
    cid = dk(host, "create", "--network", "none", tag).stdout.strip()
    exported = tmp_path / "exported.tar"
    try:
        dk(host, "export", "-o", str(exported), cid)
    finally:
        dk(host, "rm", "-f", cid, check=False)
    with tarfile.open(exported) as tar:
        for m in tar:
            if m.name.lstrip("./") == "probes/capability":
                value = m.pax_headers.get("SCHILY.xattr.security.capability")
                assert value is not None, m.pax_headers
                return value.encode("utf-8", "surrogateescape")
    raise AssertionError("probes/capability not in the exported filesystem")


def test_seed_layout_in_the_engine(
    docker_host: str, tag: str, seed_ova: Path, tmp_path: Path
) -> None:
    convert_to_engine(seed_ova, tag, docker_host=docker_host)
    out = run(docker_host, tag)
    assert out.returncode == 0, out.stderr
    # /boot (an ext2 on sda1, by UUID in the guest's fstab) is in the image.
    out = run(docker_host, tag, "/bin/busybox", "ls", "/boot")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    # setuid bit survives in the container.
    out = run(docker_host, tag, "/bin/busybox", "stat", "-c", "%a %u", "/probes/setuid-busybox")
    assert out.stdout.split() == ["4755", "0"], out.stderr
    # File capabilities: what the engine stored equals what the guest holds, and it is
    # `setcap cap_net_raw+ep` (vfs_cap_data revision 2: effective flag, CAP_NET_RAW = 13).
    stored = _capability_xattr(docker_host, tag, tmp_path)
    with ova2img.open(seed_ova) as guest:
        assert stored == guest.stat("/probes/capability").entry.xattrs["security.capability"]
    magic, permitted = struct.unpack_from("<II", stored)
    assert magic == 0x02000001
    assert permitted == 1 << 13


def test_arm64_guest_is_labelled_arm64(
    docker_host: str, tag: str, arm64_ova: Path, tmp_path: Path
) -> None:
    res = convert_to_engine(arm64_ova, tag, docker_host=docker_host)
    assert res.config.platform.architecture == "arm64"
    info = json.loads(dk(docker_host, "image", "inspect", tag).stdout)[0]
    assert (info["Architecture"], info["Os"]) == ("arm64", "linux")
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    oci = tmp_path / "arm64.oci.tar"
    convert_to_image(arm64_ova, oci, format="oci", repo_tag=tag)
    out = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{oci}"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["Architecture"] == "arm64"


# -- sparse files: dense in image layers --------------------------------------------------------


def _sparse_probe_sha256() -> str:
    """SHA-256 of /probes/sparse read whole: 8 MiB, 64 KiB of data at 3 MiB, zeros elsewhere."""
    tail = SPARSE_SIZE - SPARSE_DATA_OFFSET - SPARSE_DATA_LEN
    content = bytes(SPARSE_DATA_OFFSET) + sparse_probe_bytes() + bytes(tail)
    return hashlib.sha256(content).hexdigest()


def test_sparse_file_survives_docker_save(
    docker_host: str, tag: str, seed_ova: Path, tmp_path: Path
) -> None:
    """A layer with GNU sparse members loads, but `docker save` then fails ("could not verify
    layer data": the layer store re-tars it and gets another diffID); a dense one round-trips."""
    convert_to_engine(seed_ova, tag, docker_host=docker_host)
    saved = tmp_path / "saved.tar"
    dk(docker_host, "save", "-o", str(saved), tag)
    dk(docker_host, "rmi", tag)
    assert f"Loaded image: {tag}" in dk(docker_host, "load", "-i", str(saved)).stdout
    out = run(docker_host, tag, "/bin/busybox", "sha256sum", "/probes/sparse")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == _sparse_probe_sha256()


def _layer_of(archive: Path, fmt: str) -> bytes:
    """The (uncompressed) layer blob of a one-layer image archive."""
    with tarfile.open(archive) as outer:

        def read(name: str) -> bytes:
            fh = outer.extractfile(name)
            assert fh is not None, name
            with fh:
                return fh.read()

        if fmt == "docker-archive":
            (manifest,) = json.loads(read("manifest.json"))
            (layer,) = manifest["Layers"]
            return read(layer)
        index = json.loads(read("index.json"))
        manifest = json.loads(read("blobs/" + index["manifests"][0]["digest"].replace(":", "/")))
        (desc,) = manifest["layers"]
        return read("blobs/" + desc["digest"].replace(":", "/"))


@pytest.mark.parametrize("fmt", ["docker-archive", "oci"])
def test_image_layers_hold_sparse_files_dense(seed_ova: Path, tmp_path: Path, fmt: str) -> None:
    archive = tmp_path / "image.tar"
    convert_to_image(seed_ova, archive, format=fmt)  # type: ignore[arg-type]
    layer = _layer_of(archive, fmt)
    assert b"GNU.sparse" not in layer and b"GNUSparseFile" not in layer
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("./probes/sparse")
        assert member.isreg() and member.sparse is None and member.size == SPARSE_SIZE
        fh = tar.extractfile(member)
        assert fh is not None
        with fh:
            assert hashlib.sha256(fh.read()).hexdigest() == _sparse_probe_sha256()
    # the rootfs tarball keeps it sparse (as tar --sparse does: the fidelity reference)
    rootfs = tmp_path / "rootfs.tar"
    ova2img.convert(seed_ova, rootfs)
    with tarfile.open(rootfs) as tar:
        assert tar.getmember("./probes/sparse").sparse is not None


# -- archives -------------------------------------------------------------------------------------


def test_docker_archive_loads_and_runs(docker_host: str, tag: str, tmp_path: Path) -> None:
    archive = tmp_path / "demo.tar"
    convert_to_image(DEMO, archive, format="docker-archive", repo_tag=tag)
    res = dk(docker_host, "load", "-i", str(archive))
    assert f"Loaded image: {tag}" in res.stdout
    out = run(docker_host, tag)
    assert out.returncode == 0, out.stderr
    dk(docker_host, "rmi", tag)
    # The same through a pipe: convert ... -o - | docker load
    code = (
        "from ova2img.images import convert_to_image as c; "
        f"c({str(DEMO)!r}, '-', format='docker-archive', repo_tag={tag!r})"
    )
    pipeline = f"{sys.executable} -c {_sh(code)} | docker -H {docker_host} load"
    res2 = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, check=False
    )
    assert res2.returncode == 0, res2.stderr
    assert f"Loaded image: {tag}" in res2.stdout
    out = run(docker_host, tag, "cat", "/etc/passwd")
    assert out.stdout.startswith("root:x:0:0:"), out.stderr


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.mark.parametrize("gz", [False, True])
def test_oci_archive_with_skopeo(
    docker_host: str, tag: str, seed_ova: Path, tmp_path: Path, gz: bool
) -> None:
    oci = tmp_path / "seed.oci.tar"
    res = convert_to_image(seed_ova, oci, format="oci", repo_tag=tag, gzip_layer=gz)
    out = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{oci}"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["Digest"] == res.manifest_digest
    assert info["Layers"] == [res.layer_digest]
    assert info["Architecture"] == "amd64"
    # skopeo copy verifies every blob's digest while copying.
    converted = tmp_path / "from-oci.tar"
    cp = subprocess.run(
        ["skopeo", "copy", f"oci-archive:{oci}", f"docker-archive:{converted}:{tag}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    dk(docker_host, "load", "-i", str(converted))
    run_out = run(docker_host, tag)
    assert run_out.returncode == 0, run_out.stderr
    run_out = run(docker_host, tag, "/bin/busybox", "stat", "-c", "%a", "/probes/setuid-busybox")
    assert run_out.stdout.strip() == "4755"


# -- the Debian guest: make, and memory --------------------------------------------------------


@pytest.mark.slow
def test_debian_guest_streamed_into_the_engine(
    docker_host: str, tag: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("needs root and debootstrap to build the Debian guest")
    from support.guests import debian_guest

    guest = debian_guest(tmp_path_factory.mktemp("debian-docker"))
    # Converted in a child process, so that its peak RSS is the conversion's alone. Not
    # ru_maxrss: Linux (fs/exec.c exec_mmap) folds the high-water RSS of the mm that exec
    # replaces -- the forked copy of this pytest process -- into the child's ru_maxrss, so it
    # reported pytest's own size (394 MiB once in a full CI run). VmHWM is the peak of the
    # child's own address space, which exec made new.
    code = textwrap.dedent(
        f"""
        import json, re
        from ova2img.images import convert_to_engine
        r = convert_to_engine({str(guest.ova)!r}, {tag!r}, docker_host={docker_host!r})
        with open("/proc/self/status") as fh:
            hwm = int(re.search(r"^VmHWM:\\s+(\\d+) kB", fh.read(), re.M).group(1))
        print(json.dumps({{"rss_kib": hwm, "layer": r.layer_bytes, "data": r.data_bytes}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"debian import: layer {stats['layer'] / MiB:.0f} MiB, "
        f"peak RSS {stats['rss_kib'] / 1024:.0f} MiB"
    )
    assert stats["layer"] > 150 * MiB  # several hundred MB of tar, not a toy
    assert stats["rss_kib"] < 256 * 1024  # the [docker] issue's bound (measured: ~65 MiB)

    info = json.loads(dk(docker_host, "image", "inspect", tag).stdout)[0]
    assert info["Config"]["Cmd"] == ["/bin/bash"]  # root's shell in Debian's /etc/passwd
    out = run(docker_host, tag)
    assert out.returncode == 0, out.stderr
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text(
        "all:\n\t@echo built-with-$$(cat /etc/debian_version)\n"
        "\t@test -u /usr/bin/passwd && echo setuid-ok\n\t@touch /work/made\n"
    )
    out = run(docker_host, tag, "make", "-C", "/work", volume=f"{src}:/work")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "built-with-12." in out.stdout and "setuid-ok" in out.stdout
    assert (src / "made").exists()
