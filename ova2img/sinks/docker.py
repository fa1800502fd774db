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

Failures leave nothing behind in the engine, tagged or not:

* The name is checked first as the engine checks it (:func:`check_reference`), so a name it
  would refuse after reading the whole image (``UPPER/case``) is a usage error before any byte
  is sent.
* When the producer fails, the body generator raises, so the connection is aborted without the
  last chunk; the archive's last :data:`_TAIL` bytes (its end-of-archive blocks) are only sent
  once the producer returned, so a cut archive never looks complete to the engine, whose load
  fails with "unexpected EOF".
* Any failure once the engine may hold the image (an interrupt while it answers, its refusal
  of the image, an error inspecting the result) waits for its answer (at most
  :data:`_ABORT_WAIT` seconds) and undoes the load: the image it added is removed by its ID
  (the configuration's digest, or what the engine reports or the tag now names), an image that
  was there before only loses the tag, and a tag that named another image names it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast

from ..errors import Ova2imgError, SinkError, UsageError
from .image import ImageStats, split_repo_tag

if TYPE_CHECKING:
    from docker import APIClient

#: the API version of the first request (``GET /version``), which every engine takes
_MIN_API = "1.24"
#: chunks queued between the archive writer and the HTTP sender
QUEUE_CHUNKS = 8
#: the largest chunk queued: a longer write is split
CHUNK = 1 << 20
#: seconds to wait for the engine's answer after a failure (before undoing the load)
_ABORT_WAIT = 120.0
#: bytes at the end of the archive (its two end-of-archive blocks) held back until the producer
#: returned: an archive cut by a failure never ends like a complete one
_TAIL = 1024

T = TypeVar("T")
log = logging.getLogger("ova2img")

# The reference grammar of the engine (distribution/reference: reference.go, normalize.go),
# without digests. The first component is a registry host only if it has a '.' or a ':' or is
# "localhost" (splitDockerDomain); otherwise it belongs to the repository path, which must be
# lower case: the engine refuses "UPPER/case" ("repository name must be lowercase"), but only
# after it read the whole image.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
#: the longest repository name (domain and path) the engine takes
_NAME_MAX = 255


def check_reference(repo_tag: str) -> None:
    """Check ``REPOSITORY[:TAG]`` as the Docker engine parses it (``ParseNormalizedNamed``).

    Raises:
        UsageError: the engine would refuse it; one line.
    """
    first, slash, rest = repo_tag.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, remainder = first, rest
    else:
        domain, remainder = "", repo_tag
    path, colon, tag = remainder.rpartition(":") if ":" in remainder else (remainder, "", "")
    bad = ""
    if domain and not _DOMAIN.fullmatch(domain):
        bad = f"{domain!r} is not a registry host"
    elif not _PATH.fullmatch(path):
        bad = (
            "the repository name must be lower case (a first component with upper case is a "
            "registry host only with a '.' or ':' in it, as in Registry.example/name)"
            if _PATH.fullmatch(path.lower())
            else "expected REPOSITORY[:TAG] (lower-case letters, digits, '.', '_', '-', '/')"
        )
    elif colon and not _TAG.fullmatch(tag):
        bad = (
            "the tag must be up to 128 letters, digits, '_', '.', '-', not starting with '.' or '-'"
        )
    elif len(domain) + len(slash if domain else "") + len(path) > _NAME_MAX:
        bad = f"the repository name is longer than {_NAME_MAX} characters"
    if bad:
        raise UsageError(f"invalid image name {repo_tag!r}: {bad}")


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


class _HeldTail:
    """What the producer writes to: passes everything on to the queue but the last
    :data:`_TAIL` bytes, which :meth:`finish` sends once the producer returned."""

    def __init__(self, stream: _QueueStream) -> None:
        self._stream = stream
        self._tail = b""
        self.name = stream.name

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _TAIL:
            self._stream.write(self._tail)
            self._stream.write(view[: n - _TAIL])
            self._tail = bytes(view[n - _TAIL :])
        else:
            tail = self._tail + bytes(view)
            if len(tail) > _TAIL:
                self._stream.write(tail[: len(tail) - _TAIL])
                tail = tail[len(tail) - _TAIL :]
            self._tail = tail
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Send the held-back end of the archive."""
        tail, self._tail = self._tail, b""
        self._stream.write(tail)


@dataclass(frozen=True)
class _Before:
    """What the engine held before the load, to undo it exactly."""

    #: the image the tag named, if any
    tag_id: str | None
    #: every image ID
    ids: frozenset[str]


def _snapshot(client: APIClient, repo_tag: str, url: str) -> _Before:
    try:
        tag_id = _image_id(client, repo_tag)  # the load's answer will say why, if it fails
        ids = frozenset(str(i) for i in client.images(all=True, quiet=True))
    except Exception as exc:
        raise SinkError(
            f"cannot list the images of the Docker engine at {url}: {_reason(exc)}"
        ) from exc
    return _Before(tag_id, ids)


def _image_id(client: APIClient, name: str) -> str | None:
    """The ID of the image *name* names, or None (no such image, or the engine said no)."""
    try:
        return str(client.inspect_image(name)["Id"])
    except Exception:
        return None


def load_stream(
    produce: Callable[[BinaryIO], T],
    *,
    repo_tag: str,
    client: APIClient,
    url: str,
    finish: Callable[[], object] | None = None,
) -> tuple[T, str]:
    """Run *produce* (writing a docker-archive naming *repo_tag*) into the engine's load.

    Args:
        produce: writes the whole archive to the stream it is given; its result is returned
            (an :class:`~ova2img.sinks.image.ImageStats` tells the image ID to remove should
            the engine refuse the image).
        repo_tag: the ``repo:tag`` the archive names (checked in the engine's answer).
        client: from :func:`connect`.
        url: the engine's URL, for messages.
        finish: the caller's last step once the engine holds the image (writing a report):
            run inside the clean-up, so that its failure or an interrupt undoes the load too.

    Returns:
        *produce*'s result and the image ID (``sha256:…``) the tag now names.

    Raises:
        UsageError: the engine would refuse *repo_tag* (before anything is sent).
        SinkError: the engine refused the archive or went away (its message quoted).
        BaseException: whatever *produce* raised, or an interrupt while the engine answers.
            In every failure the load is undone: the upload is aborted if it can still be,
            and whatever the engine loaded is removed (see the module's docstring).
    """
    check_reference(repo_tag)
    before = _snapshot(client, repo_tag, url)
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
    queued = _QueueStream(q, answer, url)
    stream = _HeldTail(queued)
    # complete: the whole archive may have reached the engine, which may load it whatever
    # happens next; ended: the end of the body is queued too.
    complete = ended = False
    digest: str | None = None
    sender.start()
    try:
        result = produce(cast(BinaryIO, stream))
        if isinstance(result, ImageStats):
            digest = result.config_digest
        complete = True
        stream.finish()
        queued._put(_END)
        ended = True
        # Not sender.join(): a join interrupted by Ctrl-C may leave the thread marked as
        # stopped while it runs (CPython 3.11, bpo-45274), so that the wait below would not wait.
        answer.done.wait()
        reason = answer.failure()
        if reason is not None:
            raise SinkError(f"the Docker engine at {url} refused the image: {reason}")
        try:
            image_id = str(client.inspect_image(repo_tag)["Id"])
        except Ova2imgError:  # an interrupt (InterruptError) stays what it is
            raise
        except Exception as exc:
            raise SinkError(
                f"the Docker engine at {url} did not load {repo_tag}: "
                f"{'; '.join(answer.loaded()) or 'no image named'} ({_reason(exc)})"
            ) from exc
        if finish is not None:
            finish()
    except BaseException:
        _settle(q, queued, answer, url, repo_tag, complete=complete, ended=ended)
        _undo(client, repo_tag, before, answer, digest)
        raise
    return result, image_id


def _settle(
    q: queue.Queue[object],
    queued: _QueueStream,
    answer: _Answer,
    url: str,
    repo_tag: str,
    *,
    complete: bool,
    ended: bool,
) -> None:
    """After a failure: cut the upload if the archive is not complete (the engine's load then
    fails), else end it; then wait for the engine's answer, so that what it loaded can be
    removed. A second interrupt stops the wait."""
    try:
        if not complete:
            _abort(q, answer)
        elif not ended:
            with contextlib.suppress(SinkError):  # the engine stopped reading: it answered
                queued._put(_END)
        answer.done.wait(_ABORT_WAIT)
    except KeyboardInterrupt:
        pass
    if complete and not answer.done.is_set():
        log.warning(
            "the Docker engine at %s did not answer in time; it may still load %s",
            url,
            repo_tag,
        )


def _abort(q: queue.Queue[object], answer: _Answer) -> None:
    """Make the body generator raise (aborting the upload) without blocking."""
    while not answer.done.is_set():
        try:
            q.put(_FAIL, timeout=0.2)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):  # drop a chunk: the upload is abandoned
                q.get_nowait()


def _undo(
    client: APIClient, repo_tag: str, before: _Before, answer: _Answer, digest: str | None
) -> None:
    """After a failure: remove what the load added, give the tag back to the image it named.

    Our image is known by the configuration's digest (the image ID, when the archive was
    complete), by what the engine said it loaded, or as the image the tag moved to. An image
    that was there before the load is kept (the load only tagged it).
    """
    ours: set[str] = set()
    if digest is not None:
        ours.add(digest)
    for name in answer.loaded():
        if name.startswith("sha256:"):
            ours.add(name)
        elif name != repo_tag and (found := _image_id(client, name)) is not None:
            ours.add(found)
    now = _image_id(client, repo_tag)
    if now is not None and now != before.tag_id:
        ours.add(now)
    for image_id in ours:
        with contextlib.suppress(Exception):  # best effort: the original error matters
            if image_id not in before.ids:
                client.remove_image(image_id, force=True, noprune=False)
            elif now == image_id and before.tag_id is None:
                # The image was there, the load only tagged it: untag it. (Were that its only
                # name, the engine deletes it: it was then an untagged image before.)
                client.remove_image(repo_tag, noprune=True)
    if before.tag_id is not None and now != before.tag_id:
        # The tag named another image, left untagged by the load: it names it again.
        repo, tag = split_repo_tag(repo_tag)
        with contextlib.suppress(Exception):
            client.tag(before.tag_id, repo, tag, force=True)


__all__ = ["CHUNK", "QUEUE_CHUNKS", "check_reference", "connect", "engine_url", "load_stream"]
