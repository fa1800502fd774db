"""An image's configuration: ``--change`` instructions, defaults from the guest, and JSON.

An image made by ``docker import`` has an empty configuration ("No command specified"); ova2img
gives it defaults taken from the guest — a ``Cmd`` (root's login shell from ``/etc/passwd``),
``PATH``, labels from the OVF ProductSection and about the source, and the ``architecture``
read from the ELF header of the guest's ``/bin/sh`` — which ``--change`` instructions, as
``docker import --change`` takes them, override.

Instructions (the Dockerfile reference, "Dockerfile instructions"): ``CMD``, ``ENTRYPOINT``,
``ENV``, ``WORKDIR``, ``USER``, ``LABEL``, ``EXPOSE``, ``VOLUME``, ``STOPSIGNAL``. ``CMD``,
``ENTRYPOINT`` and ``VOLUME`` take the JSON form (``["a", "b"]``) or the shell form
(``CMD make -C /work`` becomes ``["/bin/sh", "-c", "make -C /work"]``). As in a Dockerfile,
``$VAR``/``${VAR}``/``${VAR:-word}``/``${VAR:+word}`` are replaced from the image's ``Env`` in
``ENV``, ``LABEL``, ``WORKDIR``, ``USER``, ``EXPOSE``, ``VOLUME`` and ``STOPSIGNAL``, never in
``CMD``/``ENTRYPOINT``; setting ``ENTRYPOINT`` without ``CMD`` clears the default ``Cmd``
(the Dockerfile rule for an inherited ``CMD``).

Nothing here reads the guest: :func:`default_config` takes the bytes the caller read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: the instructions :func:`apply_changes` takes (``docker import --change`` also takes
#: ``ONBUILD`` and ``HEALTHCHECK``, which make no sense for a VM's tree)
INSTRUCTIONS = (
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "LABEL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
)


@dataclass(frozen=True)
class Platform:
    """An OCI platform (image-spec ``config.json`` ``architecture``/``os``/``variant``)."""

    architecture: str
    os: str = "linux"
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass
class ImageConfig:
    """What goes into an image's configuration (OCI image-spec ``config`` object).

    Attributes:
        cmd: ``Cmd`` (``None``: none).
        entrypoint: ``Entrypoint`` (``None``: none).
        env: ``Env`` as ``KEY=VALUE`` strings, in order.
        workdir: ``WorkingDir`` (``""``: none).
        user: ``User`` (``""``: none).
        labels: ``Labels``.
        exposed_ports: ``ExposedPorts`` keys (``80/tcp``), in order.
        volumes: ``Volumes`` keys, in order.
        stop_signal: ``StopSignal`` (``""``: none).
        platform: the image's architecture/os/variant.
    """

    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""
    platform: Platform = field(default_factory=lambda: Platform("amd64"))

    def env_map(self) -> dict[str, str]:
        """``Env`` as a mapping (a later definition of a key wins)."""
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def set_env(self, key: str, value: str) -> None:
        """Set *key* in ``Env``, in place if it is already there."""
        for i, item in enumerate(self.env):
            if item.partition("=")[0] == key:
                self.env[i] = f"{key}={value}"
                return
        self.env.append(f"{key}={value}")

    def config_object(self) -> dict[str, Any]:
        """The ``config`` object of the image configuration JSON (empty fields left out)."""
        obj: dict[str, Any] = {}
        if self.user:
            obj["User"] = self.user
        if self.exposed_ports:
            obj["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.env:
            obj["Env"] = list(self.env)
        if self.entrypoint is not None:
            obj["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            obj["Cmd"] = list(self.cmd)
        if self.volumes:
            obj["Volumes"] = {v: {} for v in self.volumes}
        if self.workdir:
            obj["WorkingDir"] = self.workdir
        if self.labels:
            obj["Labels"] = dict(sorted(self.labels.items()))
        if self.stop_signal:
            obj["StopSignal"] = self.stop_signal
        return obj


def image_config_json(
    config: ImageConfig, diff_ids: Iterable[str], *, created: str, created_by: str
) -> bytes:
    """The image configuration blob (OCI image-spec ``config.json``, also what ``docker load``
    takes): canonical JSON (sorted keys, no spaces), so equal inputs give equal digests.

    Args:
        config: the configuration.
        diff_ids: ``sha256:…`` digests of each uncompressed layer, bottom first.
        created: RFC 3339 creation time.
        created_by: the history entry's ``created_by`` (what made the layer).
    """
    doc: dict[str, Any] = {
        "architecture": config.platform.architecture,
        "os": config.platform.os,
        "created": created,
        "config": config.config_object(),
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": created_by}],
    }
    if config.platform.variant:
        doc["variant"] = config.platform.variant
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- defaults from the guest ------------------------------------------------------------------


def root_shell(passwd: bytes) -> str | None:
    """Root's login shell from the text of ``/etc/passwd`` (passwd(5): ``name:password:UID:
    GID:GECOS:directory:shell``): the first entry with UID 0 named ``root``, else the first
    with UID 0. ``None`` when there is none or its shell field is empty."""
    fallback: str | None = None
    for raw in passwd.decode("utf-8", "replace").splitlines():
        fields = raw.split(":")
        if len(fields) < 7 or fields[2].strip() != "0":
            continue
        shell = fields[6].strip()
        if fields[0] == "root":
            return shell or None
        if fallback is None and shell:
            fallback = shell
    return fallback


# ELF (System V gABI, "ELF Header"): e_ident[EI_CLASS] at 4 (1 = 32-bit, 2 = 64-bit),
# e_ident[EI_DATA] at 5 (1 = little, 2 = big endian), e_machine (Elf_Half) at 18, e_flags
# at 36 (ELF32) or 48 (ELF64).
EM_386 = 3
EM_MIPS = 8
EM_PPC = 20
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243
EM_LOONGARCH = 258
#: ARM ELF ABI (IHI 0044, "ELF header"): the hard-float procedure-call variant (armhf)
EF_ARM_ABI_FLOAT_HARD = 0x400


def elf_platform(header: bytes) -> Platform | None:
    """The Go/OCI platform of an ELF executable from its first 64 bytes, or ``None`` when
    *header* is not ELF or names a machine with no OCI architecture.

    e_machine → ``386``, ``amd64``, ``arm`` (variant ``v7`` when hard-float as Debian's armhf,
    else ``v5`` as armel), ``arm64``, ``ppc64le``/``ppc64``, ``s390x``, ``riscv64``,
    ``mips64le``/``mips64``/``mipsle``/``mips``, ``loong64`` (the GOARCH names the image-spec
    uses).
    """
    if len(header) < 52 or header[:4] != b"\x7fELF":
        return None
    klass, data = header[4], header[5]
    if klass not in (1, 2) or data not in (1, 2):
        return None
    endian = "<" if data == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", header, 18)
    is64 = klass == 2
    little = data == 1
    arch: str | None = None
    variant: str | None = None
    if machine == EM_X86_64 and is64:
        arch = "amd64"
    elif machine == EM_386 and not is64:
        arch = "386"
    elif machine == EM_AARCH64 and is64:
        arch = "arm64"
    elif machine == EM_ARM and not is64:
        (flags,) = struct.unpack_from(endian + "I", header, 36)
        arch, variant = "arm", ("v7" if flags & EF_ARM_ABI_FLOAT_HARD else "v5")
    elif machine == EM_PPC64 and is64:
        arch = "ppc64le" if little else "ppc64"
    elif machine == EM_S390 and is64:
        arch = "s390x"
    elif machine == EM_RISCV and is64:
        arch = "riscv64"
    elif machine == EM_MIPS:
        arch = ("mips64" if is64 else "mips") + ("le" if little else "")
    elif machine == EM_LOONGARCH and is64:
        arch = "loong64"
    if arch is None:
        return None
    return Platform(arch, "linux", variant)


def default_config(
    *,
    shell: str | None,
    platform: Platform,
    product: Mapping[str, str],
    source_name: str,
    source_sha256: str | None,
    version: str,
) -> ImageConfig:
    """The configuration an image of a guest starts with (before ``--change``).

    Args:
        shell: root's login shell, if the guest has it (becomes ``Cmd``).
        platform: the guest's platform.
        product: the OVF ProductSection (``product``, ``vendor``, ``version``, …).
        source_name: the source's name (label ``ova2img.source``).
        source_sha256: the source file's SHA-256, if it is one file
            (label ``ova2img.source.sha256``).
        version: ova2img's version (label ``ova2img.version``).
    """
    labels: dict[str, str] = {}
    # OCI image-spec "Pre-Defined Annotation Keys", used as labels as docker buildx does.
    for key, label in (
        ("product", "org.opencontainers.image.title"),
        ("vendor", "org.opencontainers.image.vendor"),
        ("version", "org.opencontainers.image.version"),
        ("product_url", "org.opencontainers.image.url"),
    ):
        if product.get(key):
            labels[label] = product[key]
    labels["ova2img.source"] = source_name
    if source_sha256:
        labels["ova2img.source.sha256"] = source_sha256
    labels["ova2img.version"] = version
    return ImageConfig(
        cmd=[shell] if shell else None,
        env=[f"PATH={DEFAULT_PATH}"],
        labels=labels,
        platform=platform,
    )


# -- --change -----------------------------------------------------------------------------------


def apply_changes(config: ImageConfig, changes: Iterable[str]) -> ImageConfig:
    """A copy of *config* with each ``--change`` instruction applied, in order.

    Raises:
        UsageError: an unknown instruction, or one whose argument cannot be parsed; the
            message quotes it.
    """
    new = replace(
        config,
        cmd=None if config.cmd is None else list(config.cmd),
        entrypoint=None if config.entrypoint is None else list(config.entrypoint),
        env=list(config.env),
        labels=dict(config.labels),
        exposed_ports=list(config.exposed_ports),
        volumes=list(config.volumes),
    )
    cmd_set = False
    entrypoint_set = False
    for change in changes:
        instr, arg = _split_instruction(change)
        try:
            if instr == "CMD":
                new.cmd = _exec_form(arg)
                cmd_set = True
            elif instr == "ENTRYPOINT":
                new.entrypoint = _exec_form(arg)
                entrypoint_set = True
            elif instr == "ENV":
                for key, value in _pairs(arg, new.env_map(), instr):
                    new.set_env(key, value)
            elif instr == "LABEL":
                for key, value in _pairs(arg, new.env_map(), instr):
                    new.labels[key] = value
            elif instr == "WORKDIR":
                new.workdir = _one_word(arg, new.env_map(), instr)
            elif instr == "USER":
                new.user = _one_word(arg, new.env_map(), instr)
            elif instr == "STOPSIGNAL":
                new.stop_signal = _one_word(arg, new.env_map(), instr)
            elif instr == "EXPOSE":
                for word in _words(arg, new.env_map()):
                    port = _port(word)
                    if port not in new.exposed_ports:
                        new.exposed_ports.append(port)
            elif instr == "VOLUME":
                paths = (
                    _json_list(arg) if arg.lstrip().startswith("[") else _words(arg, new.env_map())
                )
                for path in paths:
                    if not path:
                        raise ValueError("empty volume path")
                    if path not in new.volumes:
                        new.volumes.append(path)
        except ValueError as exc:
            raise UsageError(f"--change {change!r}: {exc}") from exc
    if entrypoint_set and not cmd_set:
        # Dockerfile reference, ENTRYPOINT: "If CMD is defined from the base image, setting
        # ENTRYPOINT will reset CMD to an empty value."
        new.cmd = None
    return new


def changes_for(config: ImageConfig) -> list[str]:
    """*config*'s fields as ``--change`` instructions that recreate it on an empty
    configuration (what ``docker import --change`` takes). The platform is not included."""
    out: list[str] = []
    for item in config.env:
        key, _, value = item.partition("=")
        out.append(f"ENV {key}={_quote(value)}")
    for key, value in sorted(config.labels.items()):
        out.append(f"LABEL {_quote(key)}={_quote(value)}")
    if config.entrypoint is not None:
        out.append("ENTRYPOINT " + json.dumps(config.entrypoint))
    if config.cmd is not None:
        out.append("CMD " + json.dumps(config.cmd))
    if config.workdir:
        out.append(f"WORKDIR {_quote(config.workdir)}")
    if config.user:
        out.append(f"USER {_quote(config.user)}")
    for port in config.exposed_ports:
        out.append(f"EXPOSE {port}")
    if config.volumes:
        out.append("VOLUME " + json.dumps(config.volumes))
    if config.stop_signal:
        out.append(f"STOPSIGNAL {_quote(config.stop_signal)}")
    return out


def _quote(text: str) -> str:
    """A Dockerfile double-quoted word: ``\\``, ``"`` and ``$`` escaped."""
    return '"' + re.sub(r'([\\"$])', r"\\\1", text) + '"'


def _split_instruction(change: str) -> tuple[str, str]:
    text = change.strip()
    head, _, arg = text.partition(" ")
    if "\t" in head:
        head, _, rest = head.partition("\t")
        arg = rest + " " + arg if arg else rest
    instr = head.upper()
    if not instr:
        raise UsageError("--change '': empty instruction")
    if instr not in INSTRUCTIONS:
        raise UsageError(
            f"--change {change!r}: unknown instruction {head!r} "
            f"(expected one of {', '.join(INSTRUCTIONS)})"
        )
    arg = arg.strip()
    if not arg:
        raise UsageError(f"--change {change!r}: {instr} needs an argument")
    return instr, arg


def _json_list(arg: str) -> list[str]:
    try:
        value = json.loads(arg)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON array: {exc.msg}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("the JSON form must be an array of strings")
    return value


def _exec_form(arg: str) -> list[str]:
    """JSON (exec) form, or shell form ``/bin/sh -c ARG`` (Dockerfile reference, "Shell and
    exec form": a ``[`` that does not start valid JSON is shell form)."""
    if arg.startswith("["):
        try:
            return _json_list(arg)
        except ValueError:
            pass
    return ["/bin/sh", "-c", arg]


def _one_word(arg: str, env: Mapping[str, str], instr: str) -> str:
    words = _words(arg, env)
    if len(words) != 1:
        raise ValueError(f"{instr} takes one argument, got {len(words)}")
    return words[0]


def _port(word: str) -> str:
    """``80`` → ``80/tcp``; ``53/udp`` stays; ``8000-8001`` (a range) is refused."""
    port, _, proto = word.partition("/")
    proto = proto.lower() or "tcp"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port {word!r}")
    if proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"invalid protocol in {word!r} (tcp, udp or sctp)")
    return f"{int(port)}/{proto}"


def _pairs(arg: str, env: Mapping[str, str], instr: str) -> list[tuple[str, str]]:
    """``KEY=VALUE …`` pairs, or the legacy form ``KEY VALUE…`` (one pair, the rest of the
    line is the value)."""
    words = _words(arg, env)
    if words and "=" not in words[0]:
        key, _, rest = arg.partition(" ")
        if not rest.strip():
            raise ValueError(f"{instr} {key}: missing value (KEY=VALUE or KEY VALUE)")
        return [(key, " ".join(_words(rest, env)))]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"{word!r} is not KEY=VALUE")
        pairs.append((key, value))
    return pairs


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*)")


def _words(arg: str, env: Mapping[str, str]) -> list[str]:
    """Split *arg* into words as the Dockerfile shell lexer does: whitespace separates,
    ``'…'`` quotes literally, ``"…"`` quotes with ``\\`` escaping ``"``, ``\\``, ``$``; outside
    quotes ``\\`` escapes any character; ``$VAR`` expands (not inside single quotes)."""
    words: list[str] = []
    cur: list[str] = []
    have = False
    i, n = 0, len(arg)
    while i < n:
        ch = arg[i]
        if ch.isspace():
            if have:
                words.append("".join(cur))
                cur, have = [], False
            i += 1
            continue
        have = True
        if ch == "'":
            end = arg.find("'", i + 1)
            if end < 0:
                raise ValueError("unmatched single quote")
            cur.append(arg[i + 1 : end])
            i = end + 1
        elif ch == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unmatched double quote")
                c = arg[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and arg[i + 1] in '"\\$':
                    cur.append(arg[i + 1])
                    i += 2
                elif c == "$":
                    text, i = _expand(arg, i, env)
                    cur.append(text)
                else:
                    cur.append(c)
                    i += 1
        elif ch == "\\":
            if i + 1 < n:
                cur.append(arg[i + 1])
            i += 2
        elif ch == "$":
            text, i = _expand(arg, i, env)
            cur.append(text)
        else:
            cur.append(ch)
            i += 1
    if have:
        words.append("".join(cur))
    return words


def _expand(arg: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Expand the variable at ``arg[i] == "$"``; return its text and the index after it."""
    m = _VAR.match(arg, i + 1)
    if m is None:
        return "$", i + 1
    if m.group(4) is not None:
        return env.get(m.group(4), ""), m.end()
    name, op, word = m.group(1), m.group(2), m.group(3) or ""
    value = env.get(name, "")
    if op == "-":
        return (value or word), m.end()
    if op == "+":
        return (word if value else ""), m.end()
    return value, m.end()


__all__ = [
    "DEFAULT_PATH",
    "INSTRUCTIONS",
    "ImageConfig",
    "Platform",
    "apply_changes",
    "changes_for",
    "default_config",
    "elf_platform",
    "image_config_json",
    "root_shell",
]
