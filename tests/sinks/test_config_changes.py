"""Image configuration: --change parsing (Dockerfile forms), defaults, ELF platforms."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.foreign import arm64_busybox

from ova2img.errors import UsageError
from ova2img.sinks.config import (
    DEFAULT_PATH,
    EM_AARCH64,
    EM_ARM,
    EM_MIPS,
    EM_PPC64,
    EM_RISCV,
    EM_S390,
    ImageConfig,
    Platform,
    apply_changes,
    changes_for,
    default_config,
    elf_platform,
    image_config_json,
    root_shell,
)


def base() -> ImageConfig:
    return default_config(
        shell="/bin/bash",
        platform=Platform("amd64"),
        product={"product": "App", "vendor": "ACME", "version": "2.1"},
        source_name="app.ova",
        source_sha256="ab" * 32,
        version="9.9",
    )


def test_defaults() -> None:
    cfg = base()
    assert cfg.cmd == ["/bin/bash"]
    assert cfg.env == [f"PATH={DEFAULT_PATH}"]
    assert cfg.labels == {
        "org.opencontainers.image.title": "App",
        "org.opencontainers.image.vendor": "ACME",
        "org.opencontainers.image.version": "2.1",
        "ova2img.source": "app.ova",
        "ova2img.source.sha256": "ab" * 32,
        "ova2img.version": "9.9",
    }


def test_cmd_json_and_shell_forms() -> None:
    assert apply_changes(base(), ['CMD ["make", "-C", "/work"]']).cmd == ["make", "-C", "/work"]
    assert apply_changes(base(), ["CMD make -C /work"]).cmd == ["/bin/sh", "-c", "make -C /work"]
    # A "[" that is not valid JSON is the shell form (Dockerfile reference).
    assert apply_changes(base(), ["CMD [ -f x ]"]).cmd == ["/bin/sh", "-c", "[ -f x ]"]
    # CMD never expands variables.
    assert apply_changes(base(), ["CMD echo $PATH"]).cmd == ["/bin/sh", "-c", "echo $PATH"]


def test_entrypoint_resets_default_cmd_unless_cmd_given() -> None:
    cfg = apply_changes(base(), ['ENTRYPOINT ["/usr/bin/tini", "--"]'])
    assert cfg.entrypoint == ["/usr/bin/tini", "--"]
    assert cfg.cmd is None
    cfg = apply_changes(base(), ['CMD ["x"]', 'ENTRYPOINT ["/e"]'])
    assert cfg.cmd == ["x"]


def test_env_forms_and_expansion() -> None:
    cfg = apply_changes(
        base(),
        [
            "ENV A=1 B=\"two words\" C='$A literal'",
            "ENV PATH=/opt/bin:$PATH",
            "ENV D ${A:-x}-${NOPE:-dflt}-${A:+set}",
            "env e=lower-case-instruction",
        ],
    )
    env = cfg.env_map()
    assert env["A"] == "1"
    assert env["B"] == "two words"
    assert env["C"] == "$A literal"
    assert env["PATH"] == f"/opt/bin:{DEFAULT_PATH}"
    assert cfg.env[0].startswith("PATH=")  # replaced in place
    assert env["D"] == "1-dflt-set"
    assert env["e"] == "lower-case-instruction"


def test_label_workdir_user_expose_volume_stopsignal() -> None:
    cfg = apply_changes(
        base(),
        [
            'LABEL org.opencontainers.image.version=3 "a b"="c \\"d\\""',
            "WORKDIR /work",
            "USER 1000:1000",
            "EXPOSE 80 53/udp 8080/TCP",
            "EXPOSE 80",
            'VOLUME ["/data", "/var/log"]',
            "VOLUME /cache",
            "STOPSIGNAL SIGINT",
        ],
    )
    assert cfg.labels["org.opencontainers.image.version"] == "3"
    assert cfg.labels["a b"] == 'c "d"'
    assert cfg.workdir == "/work"
    assert cfg.user == "1000:1000"
    assert cfg.exposed_ports == ["80/tcp", "53/udp", "8080/tcp"]
    assert cfg.volumes == ["/data", "/var/log", "/cache"]
    assert cfg.stop_signal == "SIGINT"
    obj = cfg.config_object()
    assert obj["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}
    assert obj["Volumes"] == {"/data": {}, "/var/log": {}, "/cache": {}}
    assert obj["WorkingDir"] == "/work"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("RUN make", "unknown instruction 'RUN'"),
        ("FROM scratch", "unknown instruction"),
        ("", "empty instruction"),
        ("CMD", "CMD needs an argument"),
        ("EXPOSE http", "invalid port"),
        ("EXPOSE 70000", "invalid port"),
        ("EXPOSE 80/icmp", "invalid protocol"),
        ("ENV A", "missing value"),
        ('ENV A="open', "unmatched double quote"),
        ("WORKDIR /a /b", "WORKDIR takes one argument"),
        ('VOLUME ["/a", 1]', "array of strings"),
        ("LABEL =x", "is not KEY=VALUE"),
    ],
)
def test_invalid_changes_are_usage_errors(change: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        apply_changes(base(), [change])
    assert "\n" not in str(info.value)


def test_changes_for_recreates_the_config() -> None:
    cfg = apply_changes(
        base(),
        [
            'LABEL tricky="$HOME \\"q\\" \\\\back \\$X"',
            'ENV W="with space" Q=\'it"s\'',
            'ENTRYPOINT ["/bin/sh", "-c"]',
            'CMD ["echo \\"hi\\""]',
            'WORKDIR "/w d"',
            "USER nobody",
            "EXPOSE 22",
            "VOLUME /v",
            "STOPSIGNAL 9",
        ],
    )
    assert cfg.labels["tricky"] == ' "q" \\back $X'  # $HOME is not set in Env: empty
    again = apply_changes(ImageConfig(platform=cfg.platform), changes_for(cfg))
    assert again == cfg


def test_root_shell() -> None:
    passwd = b"daemon:x:1:1::/:/usr/sbin/nologin\nroot:x:0:0:root:/root:/bin/bash\n"
    assert root_shell(passwd) == "/bin/bash"
    assert root_shell(b"toor:x:0:0::/root:/bin/zsh\n") == "/bin/zsh"
    assert root_shell(b"root:x:0:0:root:/root:\n") is None
    assert root_shell(b"# nothing\nuser:x:1000:1000::/home/u:/bin/sh\n") is None


def test_config_json_is_canonical() -> None:
    cfg = base()
    blob = image_config_json(
        cfg, ["sha256:" + "0" * 64], created="2020-01-01T00:00:00Z", created_by="t"
    )
    assert b" " not in blob.replace(b"image.title", b"")  # compact separators
    assert blob == image_config_json(
        base(), ["sha256:" + "0" * 64], created="2020-01-01T00:00:00Z", created_by="t"
    )
    assert b'"architecture":"amd64"' in blob and b'"os":"linux"' in blob
    assert b'"Cmd":["/bin/bash"]' in blob


# -- ELF ----------------------------------------------------------------------------------------


def test_elf_platform_of_host_binaries() -> None:
    header = Path("/bin/busybox").read_bytes()[:64]
    machine = struct.unpack_from("<H", header, 18)[0]
    expected = {62: "amd64", 183: "arm64"}[machine]
    assert elf_platform(header) == Platform(expected)
    assert elf_platform(Path("/bin/ls").read_bytes()[:64]) == Platform(expected)


def test_elf_platform_of_a_real_arm64_binary() -> None:
    # Debian's busybox-static:arm64, fetched with apt-get download (see support.foreign).
    assert elf_platform(arm64_busybox().read_bytes()[:64]) == Platform("arm64")


def _header(machine: int, *, is64: bool = True, little: bool = True, flags: int = 0) -> bytes:
    """An ELF header with the documented fields set (System V gABI layout)."""
    endian = "<" if little else ">"
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + bytes(9)
    head = ident + struct.pack(endian + "HHI", 2, machine, 1)
    head = head.ljust(64, b"\0")
    flags_at = 48 if is64 else 36
    return head[:flags_at] + struct.pack(endian + "I", flags) + head[flags_at + 4 :]


@pytest.mark.parametrize(
    ("header", "platform"),
    [
        (_header(EM_AARCH64), Platform("arm64")),
        (_header(EM_ARM, is64=False, flags=0x05000400), Platform("arm", variant="v7")),
        (_header(EM_ARM, is64=False, flags=0x05000200), Platform("arm", variant="v5")),
        (_header(3, is64=False), Platform("386")),
        (_header(EM_PPC64), Platform("ppc64le")),
        (_header(EM_PPC64, little=False), Platform("ppc64")),
        (_header(EM_S390, little=False), Platform("s390x")),
        (_header(EM_RISCV), Platform("riscv64")),
        (_header(EM_MIPS), Platform("mips64le")),
        (_header(EM_MIPS, is64=False, little=False), Platform("mips")),
    ],
)
def test_elf_platform_constants(header: bytes, platform: Platform) -> None:
    assert elf_platform(header) == platform


def test_elf_platform_rejects_non_elf() -> None:
    assert elf_platform(b"#!/bin/sh\n" + bytes(60)) is None
    assert elf_platform(b"\x7fELF") is None
    assert elf_platform(_header(0x1234)) is None
    assert str(Platform("arm", variant="v7")) == "linux/arm/v7"
