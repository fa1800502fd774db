"""Container images of a guest: straight into a Docker engine, or as an image archive.

Where :func:`ova2img.convert` writes a ``docker import`` rootfs tarball, these functions make a
complete image — the same tarball as its one layer, plus a configuration so that
``docker run IMAGE`` works without a command:

* :func:`convert_to_engine` streams it into the engine at ``DOCKER_HOST`` and tags it;
* :func:`convert_to_image` writes a ``docker load`` archive (``docker-archive``) or an OCI
  image layout as a tar (``oci``), to a file or stdout.

The configuration starts from the guest (:func:`guest_config`) and ``--change`` instructions
(:func:`ova2img.sinks.config.apply_changes`) override it. The container-ready options of
:func:`ova2img.convert` (``profile``, ``ops``, ``ids``, ``devices``, ``whiteouts``, ``report``)
apply to the layer the same way (:meth:`ova2img.api.ReadyOptions.plan`).

Unlike the rootfs tarball, the layer holds sparse files dense (holes as zeros, plain tar
members): Docker's layer store cannot give back (``docker save``) a layer imported from GNU
sparse members, and OCI tools do not expect them (see :mod:`ova2img.sinks.tar`).

Example::

    from ova2img.images import convert_to_engine, convert_to_image

    convert_to_engine("appliance.ova", "appliance:1.0", changes=["WORKDIR /work"])
    convert_to_image("appliance.ova", "appliance.oci.tar", format="oci", repo_tag="app:1.0")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import platform as _platform
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ._version import __version__
from .api import (
    Guest,
    PathLike,
    ReadyOptions,
    ReadyPlan,
    _Counter,
    _refuse_source_as_output,
    _WarningCollector,
    guest_path,
)
from .api import open_unsettled as open_guest
from .errors import SinkError, UsageError
from .filesystems.base import EntryType
from .report import check_report_path
from .sinks.config import (
    ImageConfig,
    Platform,
    apply_changes,
    default_config,
    elf_platform,
    root_shell,
)
from .sinks.image import ImageFormat, ImageStats, split_repo_tag, write_image
from .sinks.output import compression_for, open_output
from .sinks.tar import TarStats, measure_tar, write_tar

if TYPE_CHECKING:
    from .assembly import TreeItem
    from .report import Ledger

log = logging.getLogger("ova2img")

#: binaries whose ELF header tells the guest's architecture, in order of preference
ELF_PROBES = ("/bin/sh", "/bin/busybox", "/usr/bin/env", "/bin/ls", "/sbin/init")
#: Python's platform.machine() → GOARCH, for when the guest has no ELF to read
_HOST_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "i686": "386",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

# The docker reference grammar (distribution/reference, reference.go), without digests.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?)"
_REFERENCE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?")


@dataclass
class EngineResult:
    """What :func:`convert_to_engine` did.

    Attributes:
        repo_tag: the tag the image got (``:latest`` added when none was given).
        image_id: the engine's image ID (``sha256:…``, the configuration's digest).
        docker_host: the engine's URL.
        config: the image's configuration.
        entries: members of the layer.
        data_bytes: file-content bytes of the layer.
        layer_bytes: bytes of the layer's tar.
        warnings: the warnings raised on the way (also logged on ``ova2img``).
    """

    repo_tag: str
    image_id: str
    docker_host: str
    config: ImageConfig
    entries: int
    data_bytes: int
    layer_bytes: int
    warnings: list[str]


@dataclass
class ImageResult:
    """What :func:`convert_to_image` did.

    Attributes:
        output: the path written, or ``-``.
        format: ``docker-archive`` or ``oci``.
        repo_tag: the image's name in the archive, if any.
        config: the image's configuration.
        config_digest: ``sha256:…`` of the configuration (the image ID).
        manifest_digest: ``sha256:…`` of the OCI manifest (``None`` for docker-archive).
        diff_id: ``sha256:…`` of the uncompressed layer.
        layer_digest: ``sha256:…`` of the layer as stored.
        layer_size: bytes of the layer as stored.
        layer_mode: ``patch`` (file: header rewritten in place), ``measured`` (pipe: size from
            a metadata-only dry pass) or ``spool`` (pipe: layer spooled in ``$TMPDIR``).
        entries: members of the layer.
        data_bytes: file-content bytes of the layer.
        archive_bytes: bytes of the archive.
        warnings: the warnings raised on the way.
    """

    output: str
    format: ImageFormat
    repo_tag: str | None
    config: ImageConfig
    config_digest: str
    manifest_digest: str | None
    diff_id: str
    layer_digest: str
    layer_size: int
    layer_mode: str
    entries: int
    data_bytes: int
    archive_bytes: int
    warnings: list[str]


def normalise_repo_tag(repo_tag: str) -> str:
    """Check ``REPO[:TAG]`` against the docker reference grammar; add ``:latest``.

    Raises:
        UsageError: not a valid reference (upper case, a digest, spaces, …).
    """
    if not _REFERENCE.fullmatch(repo_tag):
        raise UsageError(
            f"invalid image name {repo_tag!r}: expected REPOSITORY[:TAG], lower case, "
            "as docker tag takes it"
        )
    from .sinks.docker import check_reference

    check_reference(repo_tag)  # what the engine refuses only after reading the whole image
    repo, tag = split_repo_tag(repo_tag)
    return f"{repo}:{tag}"


def check_changes(changes: Iterable[str]) -> list[str]:
    """Validate ``--change`` instructions before any work (raises :class:`UsageError`)."""
    items = list(changes)
    apply_changes(ImageConfig(), items)
    return items


# -- the guest's defaults -----------------------------------------------------------------------


def _regular_file(guest: Guest, path: str) -> bytes | None:
    """The canonical guest path of the regular file *path* leads to (symlinks followed inside
    the guest, across mounts: :meth:`Guest.resolve`), or ``None``."""
    try:
        item = guest.stat(path)
    except (FileNotFoundError, OSError):
        return None
    return b"/" + item.path if item.entry.type is EntryType.FILE else None


def guest_platform(guest: Guest) -> Platform:
    """The guest's platform from the ELF header of ``/bin/sh`` (or another of
    :data:`ELF_PROBES`); the host's, with a warning, when none is readable."""
    for probe in ELF_PROBES:
        resolved = _regular_file(guest, probe)
        if resolved is None:
            continue
        try:
            header = guest.read_file(resolved, 64)
        except (FileNotFoundError, OSError):
            continue
        found = elf_platform(header)
        if found is not None:
            log.debug("%s (%s): %s", probe, resolved.decode(errors="replace"), found)
            return found
    host = _HOST_ARCH.get(_platform.machine(), _platform.machine())
    log.warning(
        "no ELF executable of a known machine at %s: the image is labelled %s/%s (the host's);"
        " override the guess by converting on a host of the guest's architecture",
        ", ".join(ELF_PROBES),
        "linux",
        host,
    )
    return Platform(host)


def _source_label(source: PathLike | Sequence[PathLike]) -> tuple[str, str | None]:
    """The source's name(s) and, for one regular file, its SHA-256 (read once, in chunks)."""
    paths = (
        [os.fspath(source)]
        if isinstance(source, str | os.PathLike)
        else [os.fspath(s) for s in source]
    )
    name = ",".join(Path(p).name or p for p in paths)
    if len(paths) != 1 or paths[0] == "-":
        return name, None
    try:
        if not stat.S_ISREG(Path(paths[0]).stat().st_mode):
            return name, None
        digest = hashlib.sha256()
        with open(paths[0], "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return name, None
    return name, digest.hexdigest()


def guest_config(
    guest: Guest,
    *,
    source_name: str,
    source_sha256: str | None = None,
    changes: Iterable[str] = (),
) -> ImageConfig:
    """The image configuration of *guest*: defaults from its data, then *changes*.

    Defaults: ``Cmd`` = root's login shell from ``/etc/passwd`` when the guest has it (else
    ``/bin/sh`` if present), ``Env`` = ``PATH=…``, labels from the OVF ProductSection
    (``org.opencontainers.image.title``/``vendor``/``version``), ``ova2img.source``,
    ``ova2img.source.sha256``, ``ova2img.version``; platform from :func:`guest_platform`.
    """
    shell: str | None = None
    try:
        shell = root_shell(guest.read_file("/etc/passwd"))
    except (FileNotFoundError, OSError):
        shell = None
    candidates = [s for s in (shell, "/bin/sh") if s]
    chosen = None
    for candidate in candidates:
        if _regular_file(guest, candidate) is not None:
            chosen = candidate
            break
        log.debug("%s: not in the guest", candidate)
    if chosen is None:
        log.warning(
            "no shell for root in the guest (%s): the image has no default command",
            ", ".join(candidates) or "no /etc/passwd entry",
        )
    config = default_config(
        shell=chosen,
        platform=guest_platform(guest),
        product=guest.source.product,
        source_name=source_name,
        source_sha256=source_sha256,
        version=__version__,
    )
    return apply_changes(config, changes)


def _created() -> str:
    """Now (or ``$SOURCE_DATE_EPOCH``, for reproducible archives), RFC 3339 UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        _dt.datetime.fromtimestamp(int(epoch), _dt.UTC)
        if epoch and epoch.isdigit()
        else _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the two conversions ------------------------------------------------------------------------


def convert_to_engine(
    source: PathLike | Sequence[PathLike],
    repo_tag: str,
    *,
    changes: Iterable[str] = (),
    docker_host: str | None = None,
    exclude: Iterable[str] = (),
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
    path: str | bytes | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    profile: str | None = None,
    ops: Sequence[str] = (),
    no_ops: Sequence[str] = (),
    ids: str | None = None,
    devices: str = "keep",
    whiteouts: str = "keep",
    report: PathLike | None = None,
) -> EngineResult:
    """Convert a VM image into an image of a Docker engine, tagged *repo_tag*.

    The layer streams into the engine's ``/images/load`` as a docker-archive (no temporary
    file; memory bounded). Its size must be in the archive before it, so the guest's tree is
    walked twice: once for metadata only (:func:`~ova2img.sinks.tar.measure_tar`), once to
    send it.

    Args:
        source: see :func:`ova2img.open`.
        repo_tag: ``REPOSITORY[:TAG]`` (``:latest`` by default).
        changes: ``--change`` instructions (``CMD``, ``ENTRYPOINT``, ``ENV``, ``WORKDIR``,
            ``USER``, ``LABEL``, ``EXPOSE``, ``VOLUME``, ``STOPSIGNAL``) over the defaults.
        docker_host: the engine's URL; default ``$DOCKER_HOST`` or the local socket.
        exclude: GNU-tar-style globs of guest paths to leave out.
        root: see :func:`ova2img.open`.
        use_fstab: see :func:`ova2img.open`.
        verify_manifest: see :func:`ova2img.open`.
        allow_external: see :func:`ova2img.open`.
        path: convert only this subtree of the guest (see :func:`ova2img.convert`).
        on_progress: called now and then with the file-content bytes and the entries sent
            so far.
        profile: see :func:`ova2img.convert` (the container-ready options).
        ops: see :func:`ova2img.convert`.
        no_ops: see :func:`ova2img.convert`.
        ids: see :func:`ova2img.convert`.
        devices: see :func:`ova2img.convert`.
        whiteouts: see :func:`ova2img.convert`.
        report: see :func:`ova2img.convert`; written once the engine loaded the image.

    Raises:
        UsageError: an invalid *repo_tag* or change (before anything is read).
        SinkError: no engine answers (naming ``DOCKER_HOST``), or it refused the image.
        Ova2imgError: the conversion failed; the engine then holds no new image by that tag.
    """
    from .sinks.docker import connect, engine_url, load_stream

    tag = normalise_repo_tag(repo_tag)
    change_list = check_changes(changes)
    ready = ReadyOptions(profile, ops, no_ops, ids, devices, whiteouts)
    ready.check(path)
    if report is not None:
        check_report_path(report)
    client = connect(docker_host)
    url = engine_url(docker_host)
    warnings: list[str] = []
    try:
        with _guest_layer(
            source,
            root=root,
            use_fstab=use_fstab,
            verify_manifest=verify_manifest,
            allow_external=allow_external,
            changes=change_list,
            exclude=exclude,
            path=path,
            ready=ready,
            report=report,
            warnings=warnings,
        ) as (layer, config, name):
            size = layer.measure()

            def produce(out: BinaryIO) -> ImageStats:
                return write_image(
                    lambda sink: layer.write(sink, on_progress),
                    out,
                    format="docker-archive",
                    config=config,
                    created=_created(),
                    created_by=f"ova2img {__version__} convert {name}",
                    repo_tag=tag,
                    layer_size=size,
                )

            stats, image_id = load_stream(
                produce, repo_tag=tag, client=client, url=url, finish=layer.write_report
            )
    finally:
        client.close()
    return EngineResult(
        repo_tag=tag,
        image_id=image_id,
        docker_host=url,
        config=config,
        entries=stats.tar.entries,
        data_bytes=stats.tar.data_bytes,
        layer_bytes=stats.layer_size,
        warnings=warnings,
    )


def convert_to_image(
    source: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    format: ImageFormat = "docker-archive",
    repo_tag: str | None = None,
    changes: Iterable[str] = (),
    gzip_layer: bool = False,
    exclude: Iterable[str] = (),
    root: str | None = None,
    use_fstab: bool = True,
    verify_manifest: bool = True,
    allow_external: bool = False,
    path: str | bytes | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    profile: str | None = None,
    ops: Sequence[str] = (),
    no_ops: Sequence[str] = (),
    ids: str | None = None,
    devices: str = "keep",
    whiteouts: str = "keep",
    report: PathLike | None = None,
) -> ImageResult:
    """Convert a VM image into an image archive: ``docker-archive`` or ``oci``.

    A file is written under a temporary name and renamed when complete, its layer in one pass
    (the layer's tar header is rewritten once its size and digest are known). On stdout
    (``-``), a docker-archive's layer size comes from a metadata-only first walk of the tree;
    an OCI layer (named by its digest) or a gzip'd one is spooled to an unnamed file in
    ``$TMPDIR`` first (the layer's size in temporary space).

    Args:
        source: see :func:`ova2img.open`.
        output: a path, or ``"-"`` for stdout. The archive itself is not compressed.
        format: ``docker-archive`` (``docker load``) or ``oci`` (an OCI image layout tar, as
            ``skopeo``/``podman load`` take with ``oci-archive:``).
        repo_tag: ``REPOSITORY[:TAG]`` naming the image in the archive (none by default).
        changes: ``--change`` instructions over the defaults (see :func:`convert_to_engine`).
        gzip_layer: store the layer gzip'd (``oci`` only).
        exclude: GNU-tar-style globs of guest paths to leave out.
        root: see :func:`ova2img.open`.
        use_fstab: see :func:`ova2img.open`.
        verify_manifest: see :func:`ova2img.open`.
        allow_external: see :func:`ova2img.open`.
        path: convert only this subtree of the guest (see :func:`ova2img.convert`).
        on_progress: called now and then with the file-content bytes and the entries
            written so far.
        profile: see :func:`ova2img.convert` (the container-ready options).
        ops: see :func:`ova2img.convert`.
        no_ops: see :func:`ova2img.convert`.
        ids: see :func:`ova2img.convert`.
        devices: see :func:`ova2img.convert`.
        whiteouts: see :func:`ova2img.convert`.
        report: see :func:`ova2img.convert`; written once the archive is complete.

    Raises:
        UsageError: an invalid *repo_tag*, change, format or option (before anything is read).
        Ova2imgError: the conversion failed; no output file is left behind, and stdout is cut
            inside the layer so that ``docker load`` fails.
    """
    if format not in ("docker-archive", "oci"):
        raise UsageError(f"unknown image format {format!r}: docker-archive or oci")
    if gzip_layer and format != "oci":
        raise UsageError("a gzip'd layer is for --format oci only (docker load takes a tar)")
    tag = normalise_repo_tag(repo_tag) if repo_tag else None
    change_list = check_changes(changes)
    ready = ReadyOptions(profile, ops, no_ops, ids, devices, whiteouts)
    ready.check(path)
    if report is not None:
        check_report_path(report)
    out_path = os.fspath(output)
    if out_path != "-" and compression_for(out_path) != "none":
        # the archive is written with positional writes (its index comes first), so it
        # cannot go through a compressor: say so rather than write a plain tar under that name
        raise UsageError(
            f"--format {format} writes an uncompressed archive: name it .tar, not "
            f"{Path(out_path).name} (compress it afterwards if you like)"
        )
    _refuse_source_as_output(source, out_path)
    warnings: list[str] = []
    with _guest_layer(
        source,
        root=root,
        use_fstab=use_fstab,
        verify_manifest=verify_manifest,
        allow_external=allow_external,
        changes=change_list,
        exclude=exclude,
        path=path,
        ready=ready,
        report=report,
        warnings=warnings,
    ) as (layer, config, name):
        size: int | None = None
        if out_path == "-" and format == "docker-archive":
            size = layer.measure()
        with open_output(out_path, compression="none") as out:
            stats = write_image(
                lambda sink: layer.write(sink, on_progress),
                out,
                format=format,
                config=config,
                created=_created(),
                created_by=f"ova2img {__version__} convert {name}",
                repo_tag=tag,
                gzip_layer=gzip_layer,
                patch=None if out_path == "-" else _patcher(out),
                layer_size=size,
            )
        layer.write_report()
    return ImageResult(
        output=out_path,
        format=format,
        repo_tag=tag,
        config=config,
        config_digest=stats.config_digest,
        manifest_digest=stats.manifest_digest,
        diff_id=stats.diff_id,
        layer_digest=stats.layer_digest,
        layer_size=stats.layer_size,
        layer_mode=stats.layer_mode,
        entries=stats.tar.entries,
        data_bytes=stats.tar.data_bytes,
        archive_bytes=stats.archive_bytes,
        warnings=warnings,
    )


@contextlib.contextmanager
def _guest_layer(
    source: PathLike | Sequence[PathLike],
    *,
    root: str | None,
    use_fstab: bool,
    verify_manifest: bool,
    allow_external: bool,
    changes: list[str],
    exclude: Iterable[str],
    path: str | bytes | None,
    ready: ReadyOptions,
    report: PathLike | None,
    warnings: list[str],
) -> Iterator[tuple[_Layer, ImageConfig, str]]:
    """The opened guest's layer (the container-ready plan on it), its image config and the
    source's name, for both conversions; the warnings logged meanwhile go to *warnings*."""
    collector = _WarningCollector()
    collector.messages = warnings
    log.addHandler(collector)
    try:
        with open_guest(
            source,
            root=root,
            use_fstab=use_fstab,
            verify_manifest=verify_manifest,
            allow_external=allow_external,
        ) as guest:
            name, digest = _source_label(source)
            config = guest_config(guest, source_name=name, source_sha256=digest, changes=changes)
            plan = ready.plan(guest, path)
            yield _Layer(guest, exclude, guest_path(guest, path), plan, report), config, name
    finally:
        log.removeHandler(collector)


class _Layer:
    """The image's one layer: the guest's walk with the container-ready plan applied, as a
    tar with sparse files dense. Walked once more by :meth:`measure` when its size must be
    known before it is written (the plan's ledger records the writing pass only)."""

    def __init__(
        self,
        guest: Guest,
        exclude: Iterable[str],
        start: bytes | None,
        ready: ReadyPlan,
        report: PathLike | None,
    ) -> None:
        self._guest = guest
        self._exclude = list(exclude)
        self._start = start
        self._ready = ready
        self._report = report
        self._ledger: Ledger | None = ready.ledger() if report is not None else None

    def _items(self, ledger: Ledger | None) -> Iterator[TreeItem]:
        walk = self._guest.walk(exclude=self._exclude, path=self._start)
        return self._ready.apply(self._guest, walk, ledger)

    def measure(self) -> int:
        """The exact length of the layer's tar, from a metadata-only walk."""
        return measure_tar(self._items(None), sparse=False).archive_bytes

    def write(self, sink: BinaryIO, on_progress: Callable[[int, int], None] | None) -> TarStats:
        """Write the layer's tar to *sink*."""
        counter = _Counter(on_progress)
        return write_tar(
            counter.count(self._items(self._ledger)),
            sink,
            on_warning=lambda message: log.warning("%s", message),
            on_progress=counter.data if on_progress else None,
            sparse=False,
            workers=2,
        )

    def write_report(self) -> None:
        """Write the ``--report`` ledger, once the image is complete."""
        if self._ledger is not None and self._report is not None:
            self._ledger.write(self._report)


def _patcher(out: BinaryIO) -> Callable[[int, bytes], None] | None:
    """Positional writes into the temporary file :func:`open_output` writes (uncompressed,
    from offset 0, unbuffered), or ``None`` when *out* is something else.

    ``OutputStream`` keeps its file as ``_raw``; a public accessor would be better (see the
    report of the ``[docker]`` work)."""
    raw = getattr(out, "_raw", None)
    if raw is None or getattr(out, "_codec", None) is not None:
        return None
    try:
        fd = raw.fileno()
        if not raw.seekable():
            return None
    except (OSError, ValueError):
        return None

    def patch(offset: int, data: bytes) -> None:
        try:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(5, "short positional write")
        except OSError as exc:
            raise SinkError(f"cannot rewrite a header of {out.name}: {exc.strerror}") from exc

    return patch


__all__ = [
    "ELF_PROBES",
    "EngineResult",
    "ImageResult",
    "check_changes",
    "convert_to_engine",
    "convert_to_image",
    "guest_config",
    "guest_platform",
    "normalise_repo_tag",
]
