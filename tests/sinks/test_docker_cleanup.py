"""A failed or interrupted load into the Docker engine leaves nothing there: the name is
checked as the engine checks it before anything is sent, and any failure once the engine may
hold the image (an interrupt while it answers, an error inspecting the result, its refusal)
removes what it loaded, and gives a tag that named another image back to it. Against the real
test engine; the failures are injected in-process."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import APIError

from ova2img import images
from ova2img.errors import InterruptError, SinkError, UsageError
from ova2img.images import convert_to_engine
from ova2img.sinks import docker as docker_sink
from ova2img.sinks.docker import check_reference

DEMO = Path(__file__).parent.parent.parent / "fixtures" / "demo.ova"


# -- the name, as the engine parses it ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "demo:1",
        "a/b/c:latest",
        "foo_bar/x__y:t",
        "localhost/x:t",
        "host:5000/x:t",
        "HOST:5000/x:t",  # a registry host may have upper case...
        "Registry.example/x:T",  # ...so may a tag
        "Localhost:5000/x:t",
    ],
)
def test_names_the_engine_takes(name: str) -> None:
    check_reference(name)


@pytest.mark.parametrize(
    "name",
    [
        "UPPER/case:t",  # no '.' or ':' in UPPER: not a registry host, so upper case
        "UPPER:t",
        "LOCALHOST/x:t",  # only "localhost" itself is a host without '.' or ':'
        "a/B:t",
        "Registry.example/Case:t",
        "a//b:t",
        "-a:t",
        "a:-t",
        "a@sha256:" + "0" * 64,
        f"{'a' * 256}:t",
    ],
)
def test_names_the_engine_refuses(name: str) -> None:
    with pytest.raises(UsageError) as info:
        check_reference(name)
    assert "\n" not in str(info.value)


# -- the engine ---------------------------------------------------------------------------------


def _ids(client: docker.DockerClient) -> set[str]:
    return {str(i.id) for i in client.images.list(all=True)}


def _tag_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None


def _unique() -> str:
    return f"ova2img-test-cleanup:{uuid.uuid4().hex[:8]}"


def _fail_once_loaded(
    monkeypatch: pytest.MonkeyPatch, name: str, error: BaseException, *, old: str | None = None
) -> list[str]:
    """Make the check after the upload (inspecting the tag once it names a new image, not
    *old*) raise *error*, once; the calls before and after pass."""
    real = docker.APIClient.inspect_image
    raised: list[str] = []

    def inspect_image(self: docker.APIClient, image: str) -> Any:
        info = real(self, image)
        if image == name and info["Id"] != old and not raised:
            raised.append(str(info["Id"]))
            raise error
        return info

    monkeypatch.setattr(docker.APIClient, "inspect_image", inspect_image)
    return raised


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (InterruptError("interrupted by SIGTERM"), InterruptError),
        (APIError("500 Server Error: the engine went away"), SinkError),
    ],
    ids=["KeyboardInterrupt", "InterruptError", "engine-error"],
)
def test_failure_after_the_upload_removes_the_image(
    docker_host: str,
    docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    expected: type[BaseException],
) -> None:
    name = _unique()
    before = _ids(docker_client)
    raised = _fail_once_loaded(monkeypatch, name, error)
    with pytest.raises(expected):
        convert_to_engine(DEMO, name, docker_host=docker_host)
    assert raised, "the engine never held the tag: the failure was not after the upload"
    assert _tag_id(docker_client, name) is None
    assert raised[0] not in _ids(docker_client)
    assert _ids(docker_client) == before


def test_interrupt_once_the_archive_is_queued_removes_the_image(
    docker_host: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive's last bytes are queued, the end of the body is not: the engine may load
    the image whatever the client does now."""
    name = _unique()
    before = _ids(docker_client)
    real = docker_sink._HeldTail.finish
    hit: list[int] = []

    def finish(self: docker_sink._HeldTail) -> None:
        real(self)
        hit.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(docker_sink._HeldTail, "finish", finish)
    with pytest.raises(KeyboardInterrupt):
        convert_to_engine(DEMO, name, docker_host=docker_host)
    assert hit == [1]
    assert _tag_id(docker_client, name) is None
    assert _ids(docker_client) == before


def test_interrupt_once_the_engine_answered_removes_the_image(
    docker_host: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for the engine's answer returned (it loaded and tagged the image); Ctrl-C
    comes before the answer is read."""
    name = _unique()
    before = _ids(docker_client)
    real = docker_sink._Answer.failure
    hit: list[int] = []

    def failure(self: docker_sink._Answer) -> str | None:
        if self.done.is_set() and not hit:
            hit.append(1)
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(docker_sink._Answer, "failure", failure)
    with pytest.raises(KeyboardInterrupt):
        convert_to_engine(DEMO, name, docker_host=docker_host)
    assert hit == [1]
    assert _tag_id(docker_client, name) is None
    assert _ids(docker_client) == before


def test_a_tag_naming_another_image_names_it_again(
    docker_host: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _unique()
    first = convert_to_engine(DEMO, name, docker_host=docker_host)
    try:
        before = _ids(docker_client)
        raised = _fail_once_loaded(monkeypatch, name, KeyboardInterrupt(), old=first.image_id)
        with pytest.raises(KeyboardInterrupt):
            # another configuration: another image, which took the tag before the failure
            convert_to_engine(DEMO, name, docker_host=docker_host, changes=["LABEL again=1"])
        assert raised and raised[0] != first.image_id
        assert _tag_id(docker_client, name) == first.image_id
        assert _ids(docker_client) == before
    finally:
        docker_client.images.remove(name, force=True)


def test_refusal_after_the_upload_removes_the_image(
    docker_host: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name the local checks would miss: the engine reads the whole image, loads it, then
    refuses the name; the untagged image it keeps is removed."""
    monkeypatch.setattr(images, "normalise_repo_tag", lambda tag: tag)
    monkeypatch.setattr(docker_sink, "check_reference", lambda tag: None)
    before = _ids(docker_client)
    with pytest.raises(SinkError, match="must be lowercase"):
        convert_to_engine(DEMO, "UPPER/case:t", docker_host=docker_host)
    assert _ids(docker_client) == before


def test_uppercase_repository_is_a_usage_error_before_any_upload(
    docker_host: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even where the library's own name check lets it through, nothing reaches the engine."""
    monkeypatch.setattr(images, "normalise_repo_tag", lambda tag: tag)
    before = _ids(docker_client)
    with pytest.raises(UsageError, match="lower case"):
        convert_to_engine(DEMO, "UPPER/case:t", docker_host=docker_host)
    assert _ids(docker_client) == before
    out = subprocess.run(
        ["docker", "-H", docker_host, "images", "-a", "--format", "{{json .}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not [json.loads(line) for line in out.splitlines() if "UPPER" in line]


def test_interrupt_while_the_report_is_written_removes_the_image(
    docker_host: str,
    docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """--report is written once the engine holds the image, inside the clean-up: Ctrl-C
    there undoes the load too."""
    from ova2img import report as reportmod

    name = _unique()
    before = _ids(docker_client)

    def write(self: object, path: object) -> None:
        assert _tag_id(docker_client, name) is not None  # the engine holds it now
        raise KeyboardInterrupt

    monkeypatch.setattr(reportmod.Ledger, "write", write)
    with pytest.raises(KeyboardInterrupt):
        convert_to_engine(DEMO, name, docker_host=docker_host, report=tmp_path / "r.json")
    assert _tag_id(docker_client, name) is None
    assert _ids(docker_client) == before
