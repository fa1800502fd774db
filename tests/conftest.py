"""Suite-wide pytest configuration.

In CI (``OVA2IMG_NO_SKIP=1``, set by ``.ci/run``) a skipped test is a failed test: everything
this machine can run must run.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest

if TYPE_CHECKING:
    from unpriv import Unprivileged

# tests/ holds shared helpers (engine.py, support/): importable from any test module.
sys.path.insert(0, str(Path(__file__).parent))

NO_SKIP = os.environ.get("OVA2IMG_NO_SKIP") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI (OVA2IMG_NO_SKIP=1), which is a failure: {reason}"
    return report


def have_root() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


@pytest.fixture
def require_root() -> None:
    """Skip (fatal in CI) unless we are root with loop devices (to build references)."""
    if not have_root():
        pytest.skip("needs root and loop devices to build a reference")


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """``DOCKER_HOST`` of a real engine (started for the session when none answers)."""
    from engine import docker_engine

    try:
        with docker_engine() as url:
            yield url
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def docker_client(docker_host: str) -> Iterator[docker.DockerClient]:
    """A docker SDK client on the test engine."""
    client = docker.DockerClient(base_url=docker_host, timeout=300)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def nobody() -> Iterator[Unprivileged]:
    """A sandbox running ova2img as uid 65534 (``tests/unpriv.py``), one per test module."""
    from unpriv import Unprivileged, can_drop_privileges

    if not can_drop_privileges():
        pytest.skip("needs root (to drop to uid 65534 with setpriv) and /usr/bin/python3")
    sandbox = Unprivileged()
    try:
        yield sandbox
    finally:
        sandbox.close()
