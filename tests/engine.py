"""A real Docker engine for the tests: the one at DOCKER_HOST if it answers, else a private
``dockerd`` started here (root, vfs storage, no iptables, no bridge) and stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _answers(base_url: str) -> bool:
    """Does a Docker engine answer ``GET /_ping`` at this unix socket URL?"""
    if not base_url.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(base_url.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b" ", 2)[1:2] == [b"200"]
    except OSError:
        return False


@contextlib.contextmanager
def docker_engine() -> Iterator[str]:
    """Yield the ``DOCKER_HOST`` URL of a working engine; start one if none answers.

    Raises:
        RuntimeError: dockerd is not installed, not root, or did not come up in 60 s.
    """
    existing = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if _answers(existing):
        yield existing
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        raise RuntimeError("no Docker engine answers and dockerd cannot be started (needs root)")
    with private_dockerd() as url:
        yield url


@contextlib.contextmanager
def private_dockerd(extra: tuple[str, ...] = (), *, name: str = "dockerd") -> Iterator[str]:
    """Start a private ``dockerd`` (vfs, no iptables, no bridge; *extra* options too), yield its
    ``unix://`` URL, stop it and remove its directories at the end.

    Raises:
        RuntimeError: it did not come up in 60 s (the tail of its log says why).
    """
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("dockerd is not installed")
    # Unix socket paths are limited to 108 bytes: keep the directory short.
    top = Path(tempfile.mkdtemp(prefix="o2id-", dir="/tmp"))
    # a remapped root (e.g. uid 231072 with --userns-remap) must traverse the data root's parents
    top.chmod(0o711)
    sock = top / "d.sock"
    url = f"unix://{sock}"
    log = (top / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            dockerd,
            *extra,
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "-H",
            url,
            "--data-root",
            str(top / "data"),
            "--exec-root",
            str(top / "x"),
            "--pidfile",
            str(top / "d.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (top / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not come up: {tail}")
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # vfs layers are plain directories, but dockerd may leave mounts (netns, shm) behind.
        for sub in ("data", "x"):
            subprocess.run(
                ["umount", "-R", "-l", str(top / sub)], check=False, stderr=subprocess.DEVNULL
            )
        shutil.rmtree(top, ignore_errors=True)
