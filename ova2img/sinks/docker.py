"""Stream an image into a Docker engine, with no temporary file and bounded memory.

The image goes in as a docker-archive (:mod:`ova2img.sinks.image`) through the engine's
``POST /images/load`` (Docker Engine API, "Import images"), not ``/images/create?fromSrc=-``
(``docker import``): an imported image's configuration can only be set by ``--change``
instructions, and engines before API 1.43 ignore the ``platform`` of an import, so an arm64
guest would be labelled with the engine's architecture. A load takes our configuration
blob as it is (architecture, variant, labels, history).

The caller's producer writes the archive in the calling thread (so ``KeyboardInterrupt`` and
progress callbacks stay there) into a bounded queue (:data:`QUEUE_CHUNKS` chunks of at most
:data:`CHUNK` bytes, 8 MiB in all); a helper thread sends the queue's chunks as the HTTP body
(chunked transfer encoding, the docker SDK's ``APIClient`` session over the engine's socket;
urllib3 sends each chunk with one ``sendall`` and keeps nothing). A slow engine blocks the
producer; memory does not grow with the image (the peak RSS of a 200 MiB Debian layer is
about 65 MiB, see ``tests/test_docker_images.py``).

Failures never leave a tagged image behind: the engine tags the image only after it read a
complete archive. When the producer fails, the body generator raises, so the connection is
aborted without the last chunk, and the archive is cut inside the layer's member anyway; the
engine's load then fails with "unexpected EOF". Should the engine still report a loaded image,
it is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast

from ..errors import SinkError

if TYPE_CHECKING:
    from docker import APIClient

#: the API version of the first request (``GET /version``), which every engine takes
_MIN_API = "1.24"
#: chunks queued between the archive writer and the HTTP sender
QUEUE_CHUNKS = 8
#: the largest chunk queued: a longer write is split
CHUNK = 1 << 20
#: seconds to wait for the engine's answer after a failure cut the stream
_ABORT_WAIT = 120.0

T = TypeVar("T")


def engine_url(docker_host: str | None) -> str:
    """The engine URL used: *docker_host*, else ``$DOCKER_HOST``, else the default socket."""
    return docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(docker_host: str | None = None, *, timeout: int = 60) -> APIClient:
    """A docker SDK ``APIClient`` on the engine, after checking that it answers.

    Args:
        docker_host: the engine's URL (``unix:///…``, ``tcp://…``, ``ssh://…``); default
            ``$DOCKER_HOST`` (with ``$DOCKER_TLS_VERIFY``/``$DOCKER_CERT_PATH``) or
            ``unix:///var/run/docker.sock``.
        timeout: seconds for each API call other than the load itself.

    Raises:
        SinkError: no engine answers there (one line, naming the URL and DOCKER_HOST).
    """
    try:
        import docker
        from docker.errors import DockerException
        from docker.utils import kwargs_from_env, version_lt
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise SinkError("cannot talk to a Docker engine: the 'docker' module is missing") from exc
    url = engine_url(docker_host)
    where = (
        f"{url} (DOCKER_HOST={os.environ['DOCKER_HOST']})"
        if not docker_host and ("DOCKER_HOST" in os.environ)
        else url
    )
    kwargs = kwargs_from_env() if docker_host is None else {"base_url": docker_host}
    hint = "" if docker_host or "DOCKER_HOST" in os.environ else "; set DOCKER_HOST"
    for prefix in ("unix://", "http+unix://"):
        if url.startswith(prefix):
            # Connect once ourselves: the SDK's unix connection leaks its socket when the
            # connect fails (docker-py 7.1 transport/unixconn.py).
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(timeout)
                    sock.connect(url.removeprefix(prefix))
            except OSError as exc:
                raise SinkError(
                    f"no Docker engine answers at {where}{hint}: {_reason(exc)}"
                ) from exc
            break
    try:
        # A fixed old version first, so nothing is sent from the constructor (with
        # version="auto" a failed probe leaves the session's socket unclosed), then the
        # newest version both sides speak.
        probe = docker.APIClient(version=_MIN_API, timeout=timeout, **kwargs)
    except DockerException as exc:
        raise SinkError(f"cannot use the Docker engine at {where}: {_reason(exc)}") from exc
    try:
        server = str(probe.version(api_version=False)["ApiVersion"])
    except Exception as exc:
        raise SinkError(f"no Docker engine answers at {where}{hint}: {_reason(exc)}") from exc
    finally:
        probe.close()
    ours = docker.constants.DEFAULT_DOCKER_API_VERSION
    version = server if version_lt(server, ours) else ours
    client = docker.APIClient(version=version, timeout=timeout, **kwargs)
    return client


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection error, in a few words."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = cast(BaseException, exc.__cause__ or exc.__context__)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text.replace("\n", " ")[:200]


@dataclass
class _Answer:
    """What the sending thread learnt."""

    done: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    messages: list[dict[str, object]] = field(default_factory=list)
    error: BaseException | None = None

    def failure(self) -> str | None:
        """The engine's error, in one line, if it reported one."""
        if self.error is not None:
            return _reason(self.error)
        for msg in self.messages:
            detail = msg.get("errorDetail")
            if isinstance(detail, dict) and detail.get("message"):
                return str(detail["message"])
            if msg.get("error"):
                return str(msg["error"])
            if self.status is not None and self.status >= 400 and msg.get("message"):
                return str(msg["message"])
        if self.status is not None and self.status >= 400:
            return f"HTTP {self.status}"
        return None

    def loaded(self) -> list[str]:
        """Names (or IDs) the engine says it loaded: docker load answers one
        ``{"stream": "Loaded image: NAME\\n"}`` per name."""
        out = []
        for msg in self.messages:
            text = msg.get("stream")
            if not isinstance(text, str):
                continue
            for line in text.splitlines():
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if line.startswith(prefix):
                        out.append(line.removeprefix(prefix).strip())
        # docker load answers one {"stream": "Loaded image: NAME\n"} per name (quiet or not).
        return out


class _CutError(Exception):
    """Raised inside the body generator to abort the upload (the producer failed)."""


_END = object()
_FAIL = object()


class _QueueStream:
    """The write-only stream the producer writes the archive to; it feeds the queue."""

    def __init__(self, q: queue.Queue[object], answer: _Answer, url: str) -> None:
        self._q = q
        self._answer = answer
        self.name = f"the Docker engine at {url}"
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # Queued pieces are copies (the caller may reuse its buffer) of at most CHUNK bytes,
        # whatever the caller writes at once: the queue holds QUEUE_CHUNKS * CHUNK at most.
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            piece = bytes(view[start : start + CHUNK])
            self._put(piece)
            self.bytes += len(piece)
        return len(view)

    def _put(self, item: object) -> None:
        while True:
            if self._answer.done.is_set():
                reason = self._answer.failure() or "it closed the connection"
                raise SinkError(f"{self.name} stopped reading: {reason}")
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def flush(self) -> None:
        pass


def load_stream(
    produce: Callable[[BinaryIO], T],
    *,
    repo_tag: str,
    client: APIClient,
    url: str,
) -> tuple[T, str]:
    """Run *produce* (writing a docker-archive naming *repo_tag*) into the engine's load.

    Args:
        produce: writes the whole archive to the stream it is given; its result is returned.
        repo_tag: the ``repo:tag`` the archive names (checked in the engine's answer).
        client: from :func:`connect`.
        url: the engine's URL, for messages.

    Returns:
        *produce*'s result and the image ID (``sha256:…``) the tag now names.

    Raises:
        SinkError: the engine refused the archive or went away (its message quoted).
        BaseException: whatever *produce* raised (after the upload was aborted and any image
            the engine might still have loaded removed).
    """
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
    answer = _Answer()

    def body() -> Iterator[bytes]:
        while True:
            item = q.get()
            if item is _END:
                return
            if item is _FAIL:
                raise _CutError("the conversion failed")
            yield cast(bytes, item)

    def send() -> None:
        try:
            resp = client.post(
                client._url("/images/load"),
                params={"quiet": "1"},
                data=body(),
                headers={"Content-Type": "application/x-tar"},
                stream=True,
                timeout=None,
            )
            answer.status = resp.status_code
            with resp:
                for line in resp.iter_lines():
                    if line.strip():
                        try:
                            answer.messages.append(json.loads(line))
                        except json.JSONDecodeError:
                            answer.messages.append({"message": line.decode(errors="replace")})
        except BaseException as exc:  # reported to the producer's thread
            answer.error = exc
        finally:
            answer.done.set()
            # Unblock a producer waiting on a full queue.
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    sender = threading.Thread(target=send, name="ova2img-docker-load", daemon=True)
    stream = _QueueStream(q, answer, url)
    sender.start()
    try:
        result = produce(cast(BinaryIO, stream))
        stream._put(_END)
    except BaseException:
        _abort(q, answer)
        sender.join(_ABORT_WAIT)
        _remove_if_loaded(client, answer)
        raise
    sender.join()
    reason = answer.failure()
    if reason is not None:
        raise SinkError(f"the Docker engine at {url} refused the image: {reason}")
    try:
        image_id = str(client.inspect_image(repo_tag)["Id"])
    except Exception as exc:
        raise SinkError(
            f"the Docker engine at {url} did not load {repo_tag}: "
            f"{'; '.join(answer.loaded()) or 'no image named'} ({_reason(exc)})"
        ) from exc
    return result, image_id


def _abort(q: queue.Queue[object], answer: _Answer) -> None:
    """Make the body generator raise (aborting the upload) without blocking."""
    while not answer.done.is_set():
        try:
            q.put(_FAIL, timeout=0.2)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):  # drop a chunk: the upload is abandoned
                q.get_nowait()


def _remove_if_loaded(client: APIClient, answer: _Answer) -> None:
    """After a failed conversion: if the engine loaded something anyway, remove it."""
    for name in answer.loaded():
        try:
            client.remove_image(name, force=True, noprune=False)
        except Exception:  # noqa: S112 - best effort, the original error matters
            continue


__all__ = ["CHUNK", "QUEUE_CHUNKS", "connect", "engine_url", "load_stream"]
