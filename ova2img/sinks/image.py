"""Image archives: ``docker load``'s docker-archive and an OCI image layout, both as a tar.

Both hold one layer — the rootfs tar of :mod:`ova2img.sinks.tar` — a configuration blob
(:func:`ova2img.sinks.config.image_config_json`) and a manifest:

* ``docker-archive`` (moby ``image/tarexport``, "docker save" format): ``V1ID/VERSION``,
  ``V1ID/json``, ``V1ID/layer.tar``, ``HEX.json`` (the configuration, named by its digest),
  ``repositories`` and ``manifest.json``. V1ID is a deterministic name chosen before the
  layer is written (a hash of the configuration without its diffID), so the layer's member
  name is known up front.
* ``oci`` (OCI image-spec v1.1 "Image Layout"): ``oci-layout``, ``blobs/sha256/HEX`` for the
  layer (plain tar, or gzip with ``gzip_layer``), the configuration and the manifest, and
  ``index.json`` naming the manifest (``org.opencontainers.image.ref.name`` = the tag).

The layer's diffID (SHA-256 of the uncompressed tar) and digest (of the blob as stored) are
computed while it streams. A tar member needs its size — and an OCI blob its digest-named path
— in the header *before* the data; :func:`write_image` gets them in one of three ways:

* ``patch`` (a seekable, uncompressed output file): a placeholder header is written, the
  layer streams after it, and the header is rewritten in place (name, size, checksum). One
  pass, no extra space.
* ``layer_size`` (docker-archive, uncompressed layer, to a pipe): the exact size was measured
  beforehand by a metadata-only dry pass (:func:`ova2img.sinks.tar.measure_tar`, one more walk
  of the tree's metadata, no file content read); the member name does not depend on the
  content. No extra space.
* otherwise (OCI to a pipe, or a gzip'd layer to a pipe): the layer is spooled to an unnamed
  temporary file in ``$TMPDIR`` (``O_TMPFILE``/unlinked at once), then copied out. Costs the
  layer's size (compressed, with ``gzip_layer``) in ``$TMPDIR`` and one more write and read.

Members of the outer tar are written in an order that keeps a cut archive unusable: the
layer first, ``manifest.json``/``index.json`` last, and a failure in the layer leaves the
outer tar cut inside the layer's member.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, cast

from ..errors import SinkError
from .config import ImageConfig, image_config_json
from .output import write_all, write_error
from .tar import BLOCK, RECORD, TarStats, member_header

ImageFormat = Literal["docker-archive", "oci"]
FORMATS: tuple[ImageFormat, ...] = ("docker-archive", "oci")

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

#: copy size from a spool file
_CHUNK = 1 << 20

#: writes *data* at an absolute offset of the output (``os.pwrite`` on its descriptor)
Patcher = Callable[[int, bytes], None]
#: writes the layer (a rootfs tar) to the stream it is given
LayerProducer = Callable[[BinaryIO], TarStats]


@dataclass
class ImageStats:
    """What :func:`write_image` wrote.

    Attributes:
        format: ``docker-archive`` or ``oci``.
        repo_tag: the image's name (``repo:tag``), if any.
        config_digest: ``sha256:…`` of the configuration blob (the image ID).
        manifest_digest: ``sha256:…`` of the OCI manifest (``None`` for docker-archive).
        diff_id: ``sha256:…`` of the uncompressed layer.
        layer_digest: ``sha256:…`` of the layer as stored (equals ``diff_id`` uncompressed).
        layer_size: bytes of the layer as stored.
        layer_mode: how the layer's header was made: ``patch``, ``measured`` or ``spool``.
        tar: the layer's tar statistics.
        archive_bytes: bytes of the whole archive.
    """

    format: ImageFormat
    repo_tag: str | None
    config_digest: str
    manifest_digest: str | None
    diff_id: str
    layer_digest: str
    layer_size: int
    layer_mode: str
    tar: TarStats
    archive_bytes: int


class _Outer:
    """The outer (plain ustar) tar: members with known sizes, and its end."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        try:
            write_all(self.out, data)
        except OSError as exc:
            raise write_error(str(getattr(self.out, "name", "the output")), exc) from exc
        self.pos += len(data)

    def member(self, name: str, data: bytes) -> None:
        self.write(member_header(name.encode(), len(data)))
        self.write(data + bytes(-len(data) % BLOCK))

    def end(self) -> None:
        # Two zero blocks (POSIX ustar), the last record padded as GNU tar does.
        end = 2 * BLOCK
        end += -(self.pos + end) % RECORD
        self.write(bytes(end))


class _LayerSink(io.RawIOBase):
    """Where the layer's tar goes: hashes it (diffID), gzips it if asked, hashes what is
    stored (digest), counts, and forwards to *target*; refuses to exceed *limit* bytes."""

    def __init__(
        self, target: Callable[[bytes], None], *, gzip: bool, limit: int | None = None
    ) -> None:
        super().__init__()
        self._target = target
        self._limit = limit
        self.diff = hashlib.sha256()
        self.digest = hashlib.sha256()
        self.raw_size = 0
        self.size = 0
        # RFC 1952 via zlib (wbits 31): MTIME 0 and no name, so equal layers give equal bytes.
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        self.name = "the image layer"

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed layer")
        n = len(data)
        self.diff.update(data)
        self.raw_size += n
        self._store(self._z.compress(data) if self._z is not None else bytes(data))
        return n

    def _store(self, data: bytes) -> None:
        if not data:
            return
        if self._limit is not None and self.size + len(data) > self._limit:
            raise SinkError(
                f"the layer grew past the {self._limit} bytes measured before writing it "
                "(the guest changed between the two passes?)"
            )
        self.digest.update(data)
        self.size += len(data)
        self._target(data)

    def finish(self) -> None:
        if self._z is not None:
            self._store(self._z.flush())


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def split_repo_tag(repo_tag: str) -> tuple[str, str]:
    """``repo[:tag]`` → ``(repo, tag)``; the tag defaults to ``latest`` (a ``:`` in a
    registry's port is not a tag)."""
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        return repo_tag, "latest"
    return repo, tag


def write_image(
    produce_layer: LayerProducer,
    out: BinaryIO,
    *,
    format: ImageFormat,
    config: ImageConfig,
    created: str,
    created_by: str,
    repo_tag: str | None = None,
    gzip_layer: bool = False,
    patch: Patcher | None = None,
    layer_size: int | None = None,
) -> ImageStats:
    """Write an image archive of one layer to *out*.

    Args:
        produce_layer: writes the rootfs tar to the stream it is given (and returns its
            statistics); called once.
        out: the output stream (only ``write`` is used, plus *patch*).
        format: ``docker-archive`` or ``oci``.
        config: the image configuration.
        created: RFC 3339 creation time.
        created_by: the history entry of the layer.
        repo_tag: ``repo:tag`` to name the image (docker-archive ``RepoTags``, OCI
            ``org.opencontainers.image.ref.name`` = the tag).
        gzip_layer: store the layer gzip'd (OCI only: ``docker load`` wants plain tars).
        patch: positional writes into *out* (a seekable file written from offset 0): the
            layer's header is patched after it, in one pass.
        layer_size: the exact length of the layer's tar (from
            :func:`~ova2img.sinks.tar.measure_tar`), for docker-archive to a pipe.

    Returns:
        Digests and sizes of what was written.

    Raises:
        SinkError: the output could not be written, or the layer was not the measured size.
        Ova2imgError: whatever *produce_layer* raised; the archive is then cut inside the
            layer's member (and a file output is discarded by its ``open_output``).
    """
    if format not in FORMATS:
        raise SinkError(f"unknown image format {format!r} (expected {' or '.join(FORMATS)})")
    if gzip_layer and format != "oci":
        raise SinkError("a gzip'd layer is for --format oci only (docker load wants a tar)")
    outer = _Outer(out)
    if format == "oci":
        outer.member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    # docker-archive: the layer's directory is named before its content is known.
    v1_id = hashlib.sha256(
        b"ova2img-v1\0" + image_config_json(config, [], created=created, created_by=created_by)
    ).hexdigest()
    fixed_name = f"{v1_id}/layer.tar" if format == "docker-archive" else None

    if patch is not None:
        mode = "patch"
        header_at = outer.pos
        outer.write(bytes(BLOCK))  # placeholder: an all-zero block, rewritten below
        sink = _LayerSink(outer.write, gzip=gzip_layer)
        stats = _produce(produce_layer, sink)
        outer.write(bytes(-sink.size % BLOCK))
        name = fixed_name or f"blobs/sha256/{sink.digest.hexdigest()}"
        patch(header_at, member_header(name.encode(), sink.size))
    elif layer_size is not None and fixed_name is not None and not gzip_layer:
        mode = "measured"
        outer.write(member_header(fixed_name.encode(), layer_size))
        sink = _LayerSink(outer.write, gzip=False, limit=layer_size)
        stats = _produce(produce_layer, sink)
        if sink.size != layer_size:
            raise SinkError(
                f"the layer is {sink.size} bytes, {layer_size} were measured before writing it"
            )
        outer.write(bytes(-sink.size % BLOCK))
    else:
        mode = "spool"
        with tempfile.TemporaryFile(prefix="ova2img-layer-") as spool:

            def to_spool(data: bytes) -> None:
                try:
                    spool.write(data)
                except OSError as exc:
                    where = f"the layer's spool file in {tempfile.gettempdir()}"
                    raise write_error(where, exc) from exc

            sink = _LayerSink(to_spool, gzip=gzip_layer)
            stats = _produce(produce_layer, sink)
            name = fixed_name or f"blobs/sha256/{sink.digest.hexdigest()}"
            outer.write(member_header(name.encode(), sink.size))
            spool.seek(0)
            while chunk := spool.read(_CHUNK):
                outer.write(chunk)
            outer.write(bytes(-sink.size % BLOCK))

    diff_id = "sha256:" + sink.diff.hexdigest()
    layer_digest = "sha256:" + sink.digest.hexdigest()
    config_blob = image_config_json(config, [diff_id], created=created, created_by=created_by)
    config_digest = _sha(config_blob)
    manifest_digest: str | None = None
    if format == "docker-archive":
        outer.member(f"{config_digest.removeprefix('sha256:')}.json", config_blob)
        outer.member(f"{v1_id}/VERSION", b"1.0")
        v1: dict[str, Any] = {
            "id": v1_id,
            "created": created,
            "os": config.platform.os,
            "architecture": config.platform.architecture,
            "config": config.config_object(),
        }
        outer.member(f"{v1_id}/json", _json(v1))
        tags = [repo_tag] if repo_tag else []
        if repo_tag:
            repo, tag = split_repo_tag(repo_tag)
            outer.member("repositories", _json({repo: {tag: v1_id}}))
        manifest = [
            {
                "Config": f"{config_digest.removeprefix('sha256:')}.json",
                "RepoTags": tags,
                "Layers": [f"{v1_id}/layer.tar"],
            }
        ]
        outer.member("manifest.json", _json(manifest))
    else:
        outer.member(f"blobs/sha256/{config_digest.removeprefix('sha256:')}", config_blob)
        manifest_blob = _json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": {
                    "mediaType": MEDIA_CONFIG,
                    "digest": config_digest,
                    "size": len(config_blob),
                },
                "layers": [
                    {
                        "mediaType": MEDIA_LAYER_GZIP if gzip_layer else MEDIA_LAYER,
                        "digest": layer_digest,
                        "size": sink.size,
                    }
                ],
            }
        )
        manifest_digest = _sha(manifest_blob)
        outer.member(f"blobs/sha256/{manifest_digest.removeprefix('sha256:')}", manifest_blob)
        platform: dict[str, str] = {
            "architecture": config.platform.architecture,
            "os": config.platform.os,
        }
        if config.platform.variant:
            platform["variant"] = config.platform.variant
        descriptor: dict[str, Any] = {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_blob),
            "platform": platform,
        }
        if repo_tag:
            # image-spec "Pre-Defined Annotation Keys": ref.name is the tag; containerd
            # (and docker save) keep the full name in io.containerd.image.name.
            descriptor["annotations"] = {
                "io.containerd.image.name": repo_tag,
                "org.opencontainers.image.ref.name": split_repo_tag(repo_tag)[1],
            }
        outer.member(
            "index.json",
            _json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [descriptor]}),
        )
    outer.end()
    return ImageStats(
        format=format,
        repo_tag=repo_tag,
        config_digest=config_digest,
        manifest_digest=manifest_digest,
        diff_id=diff_id,
        layer_digest=layer_digest,
        layer_size=sink.size,
        layer_mode=mode,
        tar=stats,
        archive_bytes=outer.pos,
    )


def _produce(produce_layer: LayerProducer, sink: _LayerSink) -> TarStats:
    try:
        stats = produce_layer(cast(BinaryIO, sink))
        sink.finish()
    finally:
        with contextlib.suppress(Exception):
            sink.close()
    return stats


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


__all__ = [
    "FORMATS",
    "MEDIA_CONFIG",
    "MEDIA_INDEX",
    "MEDIA_LAYER",
    "MEDIA_LAYER_GZIP",
    "MEDIA_MANIFEST",
    "ImageFormat",
    "ImageStats",
    "LayerProducer",
    "Patcher",
    "split_repo_tag",
    "write_image",
]
