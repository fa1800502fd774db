"""The ``ova2img`` command line: thin argument parsing over the public API.

``main(argv) -> int`` is importable and tested in-process. Every :class:`Ova2imgError` becomes
one line on stderr and the exit code of the contract (``../shared/design/architecture.md``):
0 done, 1 failed, 2 usage error, 3 ``verify`` found differences, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn, TextIO

from . import api
from ._version import __version__
from .assembly import TreeItem
from .errors import AssemblyError, Ova2imgError, UsageError
from .filesystems.base import Entry, EntryType

log = logging.getLogger("ova2img")

EPILOG_MAIN = """\
examples:
  ova2img convert appliance.ova -o rootfs.tar          # a `docker import` tarball
  ova2img convert appliance.ova -o rootfs.tar.gz       # gzip'd (.zst: zstandard)
  ova2img convert disk.vmdk -o - | docker import - myimage:1.0
  ova2img inspect appliance.ova                        # disks, partitions, filesystems
  ova2img inspect appliance.ova --json
  ova2img ls appliance.ova /etc -l                     # look inside without mounting
  ova2img cat appliance.ova /etc/os-release
  ova2img verify appliance.ova rootfs.tar              # exit 3 if anything differs

exit codes: 0 done · 1 conversion failed (one line on stderr says what and where) ·
            2 usage error · 3 verify found differences · 130 interrupted (no partial output)
"""

EPILOG_CONVERT = """\
SOURCE is an .ova (read in place, never extracted), an .ovf with its files beside it, or
one or several bare disk images (.vmdk of any subformat, .qcow2, .vhd, .vhdx, .vdi, raw)
of one guest, in disk order.
Formats are detected by content. The guest's root filesystem is found (the one whose
/etc/fstab names it as /), the other filesystems its fstab lists are mounted where it says,
and every file is streamed into a PAX tarball with owners, modes, times (ns), xattrs, ACLs,
file capabilities, hardlinks, devices and sparse files kept.

examples:
  ova2img convert vm.ova -o rootfs.tar
  ova2img convert vm.ova -o rootfs.tar.zst --exclude '/var/cache/apt/*' --exclude '*.pyc'
  ova2img convert disk1.vmdk disk2.vmdk --root UUID=0a1b… -o rootfs.tar
  ova2img convert vm.ova -o - | docker import - vm:1.0
  ova2img convert vm.ova --docker vm:1.0              # straight into the engine, with a config
  ova2img convert vm.ova --format docker-archive -o - | docker load
  ova2img convert vm.ova --format oci -o vm.oci.tar   # skopeo copy oci-archive:vm.oci.tar …
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: usage error: {message}\n(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ova2img`` command."""
    parser = _Parser(
        prog="ova2img",
        description="Turn a VM image (OVA, OVF, VMDK, raw) into a faithful container rootfs "
        "tarball, in pure Python, without root, loop devices or mounts.",
        epilog=EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ova2img {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="say more about each step")
    common.add_argument(
        "--debug", action="store_true", help="debug logging, and a traceback on errors"
    )
    common.add_argument(
        "--root",
        metavar="SPEC",
        help="the root filesystem, when the guest's fstab cannot tell: UUID=…, LABEL=…, "
        "PARTUUID=…, or a volume name such as sda2",
    )
    common.add_argument(
        "--no-fstab",
        action="store_true",
        help="do not mount what the guest's /etc/fstab lists; the root filesystem only",
    )
    common.add_argument(
        "--no-manifest-check",
        action="store_true",
        help="do not verify the digests of the OVA's/OVF's .mf manifest (verified by default)",
    )
    common.add_argument(
        "--allow-external-files",
        action="store_true",
        help="let an OVF href, a VMDK extent or a backing file name a file outside the "
        "OVA/folder (absolute or ..); refused by default",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from .profile import OPERATIONS

    operations = "\n".join(
        f"  {name:<18} {op.summary.replace('``', '')}" for name, op in OPERATIONS.items()
    )
    conv = sub.add_parser(
        "convert",
        parents=[common],
        help="write the guest's tree as a docker-import tarball",
        description="Convert a VM image into a `docker import` rootfs tarball.",
        epilog=EPILOG_CONVERT
        + "\noperations of --profile container (--op/--no-op NAME):\n"
        + operations,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("sources", nargs="+", metavar="SOURCE", help="the VM image (see below)")
    conv.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        help="the tarball to write, or - for stdout; a name ending in .gz/.tgz, .zst, .xz or "
        ".bz2 is compressed. Written under a temporary name and renamed when complete.",
    )
    conv.add_argument(
        "--docker",
        metavar="REPO[:TAG]",
        help="stream the image into the Docker engine at DOCKER_HOST instead of writing -o "
        "(with a useful config: Cmd from root's shell, PATH, labels, the guest's architecture)",
    )
    conv.add_argument(
        "--format",
        choices=["rootfs", "docker-archive", "oci"],
        default="rootfs",
        help="rootfs = a `docker import` tarball (default); docker-archive = what `docker load` "
        "takes; oci = an OCI image layout as a tar (skopeo oci-archive:)",
    )
    conv.add_argument(
        "--change",
        action="append",
        default=[],
        metavar="INSTR",
        help="a Dockerfile instruction for the image config, as docker import takes them: CMD, "
        "ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL. Repeatable.",
    )
    conv.add_argument("--tag", metavar="REPO[:TAG]", help="the name recorded in an image archive")
    conv.add_argument(
        "--gzip-layer", action="store_true", help="--format oci: compress the layer blob"
    )
    conv.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out guest paths matching GLOB, as `tar --exclude` does (a pattern with a "
        "leading / is anchored at the guest root; '*' matches '/' too). Repeatable.",
    )
    conv.add_argument(
        "--path",
        metavar="PATH",
        help="convert only this directory of the guest (e.g. /opt/toolchain); its contents "
        "become the tarball's root",
    )
    conv.add_argument(
        "--lenient",
        action="store_true",
        help="skip files and directories that cannot be read (damaged inode, extent tree or "
        "directory block), each with a warning and a summary at the end, instead of failing; "
        "a file whose data fails midway is kept at its size, the rest written as zeros. "
        "Superblock, partition and disk damage stays fatal. Default: strict (any damage fails)",
    )
    ready = conv.add_argument_group(
        "container-ready (opt-in; the default is a faithful copy)",
        "Operations applied while streaming, never to the source. `ova2img convert --help` "
        "lists them below; --dry-run shows exactly what they would change.",
    )
    ready.add_argument(
        "--profile", choices=["container"], help="apply every cleaning operation listed below"
    )
    ready.add_argument("--op", action="append", default=[], metavar="NAME", help="add one")
    ready.add_argument("--no-op", action="append", default=[], metavar="NAME", help="leave one out")
    ready.add_argument(
        "--dry-run",
        action="store_true",
        help="list what the operations would change; write nothing",
    )
    ready.add_argument(
        "--ids",
        choices=["remap", "clamp"],
        help="rewrite uids/gids above 65535 for rootless engines (remap: each to its own free id "
        "below 65534; clamp: all to 65534), /etc/passwd and /etc/group alike",
    )
    ready.add_argument("--drop-devices", action="store_true", help="leave device nodes out")
    ready.add_argument(
        "--whiteouts",
        choices=["rename", "refuse"],
        help="names starting with .wh. (docker import drops them): rename to _.wh.… or fail",
    )
    ready.add_argument("--report", metavar="FILE", help="write a JSON ledger of every change")
    prog = conv.add_mutually_exclusive_group()
    prog.add_argument(
        "--progress", action="store_true", help="show progress even when stderr is no terminal"
    )
    prog.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    ls = sub.add_parser(
        "ls",
        parents=[common],
        help="list a directory of the guest",
        description="List a directory of the guest's assembled tree (symlinks are followed "
        "inside the guest, never on the host). PATH defaults to /.",
        epilog="examples:\n  ova2img ls vm.ova /etc\n  ova2img ls vm.ova /boot -l",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument(
        "args",
        nargs="+",
        metavar="SOURCE... [PATH]",
        help="the VM image, then a guest path (with two or more arguments the last one is the "
        "path)",
    )
    ls.add_argument("-l", "--long", action="store_true", help="mode, owner, size, time, target")
    cat = sub.add_parser(
        "cat",
        parents=[common],
        help="print a file of the guest",
        description="Write a file of the guest to stdout (symlinks followed inside the guest).",
        epilog="example:\n  ova2img cat vm.ova /etc/os-release",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cat.add_argument("args", nargs="+", metavar="SOURCE... PATH", help="the VM image, then a path")

    ver = sub.add_parser(
        "verify",
        parents=[common],
        help="compare a tarball with the image it was converted from",
        description="Re-read TARBALL and compare it with the guest tree of SOURCE entry by "
        "entry: type, mode, owner, mtime (ns), xattrs, symlink targets, devices, hardlinks and "
        "content. Prints each difference; exits 3 if there is any, 0 if none.",
        epilog="example:\n  ova2img convert vm.ova -o vm.tar && ova2img verify vm.ova vm.tar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ver.add_argument("args", nargs="+", metavar="SOURCE... TARBALL", help="the image, then the tar")
    ver.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="paths the conversion excluded (the same patterns as for convert)",
    )
    ver.add_argument("--path", metavar="PATH", help="the subtree the conversion was made of")

    insp = sub.add_parser(
        "inspect",
        parents=[common],
        help="show disks, partitions, filesystems and mounts",
        description="Show what a VM image holds: its disks, their partitions, the filesystems "
        "on them, and where the guest's fstab mounts each.",
    )
    insp.add_argument("sources", nargs="+", metavar="SOURCE", help="the VM image")
    insp.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    insp.add_argument(
        "--container",
        action="store_true",
        help="the pre-flight report: big ids, devices, sockets, .wh. names, PAX needs, sparse "
        "files, and whether the image will import under rootless podman / userns-remap",
    )
    return parser


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning" if record.levelno >= logging.WARNING else record.levelname.lower()
        text = record.getMessage().replace("\n", " ")
        return f"ova2img: {level}: {text}" if record.levelno != logging.INFO else f"ova2img: {text}"


def _setup_logging(args: argparse.Namespace, stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_OneLineFormatter())
    level = logging.WARNING
    if getattr(args, "quiet", False):
        level = logging.ERROR
    if args.verbose:
        level = logging.INFO
    if args.debug:
        level = logging.DEBUG
    log.addHandler(handler)
    log.setLevel(level)
    return handler


class _PlainProgress:
    """``--progress`` into a file or a CI log: a plain line every :attr:`EVERY` seconds and
    one at the end, instead of a terminal's redrawn bar (escape codes, carriage returns)."""

    EVERY = 5.0

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._start = time.monotonic()
        self._next = self._start + self.EVERY
        self._done = self._entries = 0

    def __call__(self, done: int, entries: int) -> None:
        self._done, self._entries = done, entries
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.EVERY
            self._line(now)

    def _line(self, now: float) -> None:
        took = now - self._start
        rate = self._done / took / 1e6 if took > 0 else 0.0
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(
                f"ova2img: converting: {self._done / 1e6:,.1f} MB, {self._entries:,} entries, "
                f"{rate:,.1f} MB/s, {took:,.0f} s\n"
            )
            self._stream.flush()

    def close(self) -> None:
        self._line(time.monotonic())


def _progress(stream: TextIO, *, force: bool) -> _Progress | _PlainProgress:
    """The progress display: a live bar on a terminal, plain lines elsewhere (--progress)."""
    if force and not stream.isatty():
        return _PlainProgress(stream)
    return _Progress(stream, force=force)


class _Progress:
    """Progress on stderr (rich): file data written, rate, entries, elapsed time.

    Shown when stderr is a terminal, or always with ``--progress`` (as plain lines, see
    :class:`_PlainProgress`, when stderr is not a terminal); never with ``-q``.
    """

    def __init__(self, stream: TextIO, *, force: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        console = Console(file=stream, force_terminal=force or None, stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]converting[/]"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[entries]:,} entries"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=5,
        )
        self._task = self._progress.add_task("convert", total=None, entries=0)
        self._progress.start()

    def __call__(self, done: int, entries: int) -> None:
        self._progress.update(self._task, completed=done, entries=entries)

    def close(self) -> None:
        self._progress.stop()


def _ready_options(args: argparse.Namespace) -> dict[str, Any]:
    """The container-ready options as :class:`ova2img.api.ReadyOptions` (and
    :func:`ova2img.convert`) name them."""
    return {
        "profile": args.profile,
        "ops": args.op,
        "no_ops": args.no_op,
        "ids": args.ids,
        "devices": "drop" if args.drop_devices else "keep",
        "whiteouts": args.whiteouts or "keep",
    }


def _cmd_convert(args: argparse.Namespace, stderr: TextIO) -> int:
    if not args.docker and args.format == "rootfs":
        # options that only an image has a place for: say so rather than drop them
        given = [
            flag
            for flag, value in (
                ("--change", args.change),
                ("--tag", args.tag),
                ("--gzip-layer", args.gzip_layer),
            )
            if value
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only for images (--docker, or --format "
                "docker-archive|oci); a rootfs tarball has no image config"
            )
    if args.dry_run and args.report:
        raise UsageError("--dry-run writes nothing, not even --report: drop one of them")
    if args.dry_run:
        # The same plan as the conversion (profile operations, --ids, --drop-devices,
        # --whiteouts, and their checks, --path included), walked without writing: the lines
        # are what --report would record.
        ready = api.ReadyOptions(**_ready_options(args))
        ready.check(args.path)
        with _open_guest(args, args.sources) as guest:
            plan = ready.plan(guest, args.path)
            ledger = plan.ledger()
            walk = guest.walk(exclude=args.exclude, path=api.guest_path(guest, args.path))
            for _ in plan.apply(guest, walk, ledger):
                pass
            for line in ledger.lines():
                sys.stdout.write(line + "\n")
        return 0
    if args.docker and args.output:
        raise UsageError("give either -o OUTPUT or --docker REPO[:TAG], not both")
    if not args.output and not args.docker:
        raise UsageError("convert needs -o OUTPUT (a path, or - for stdout) or --docker REPO[:TAG]")
    if args.lenient and (args.docker or args.format != "rootfs"):
        raise UsageError("--lenient works with --format rootfs for now")
    if args.docker or args.format != "rootfs":
        return _convert_image(args, stderr)
    progress: _Progress | _PlainProgress | None = None
    if not args.quiet and (args.progress or stderr.isatty()):
        progress = _progress(stderr, force=args.progress)
    try:
        result = api.convert(
            args.sources,
            args.output,
            exclude=args.exclude,
            path=args.path,
            root=args.root,
            use_fstab=not args.no_fstab,
            verify_manifest=not args.no_manifest_check,
            allow_external=args.allow_external_files,
            on_progress=progress,
            **_ready_options(args),
            report=args.report,
            lenient=args.lenient,
        )
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        where = "stdout" if args.output == "-" else args.output
        log.info(
            "wrote %s: %d entries, %.1f MB of file data, %d warning(s)",
            where,
            result.entries,
            result.data_bytes / 1e6,
            len(result.warnings),
        )
    return 0


def _convert_image(args: argparse.Namespace, stderr: TextIO) -> int:
    from . import images

    common: dict[str, Any] = {
        "changes": args.change,
        "exclude": args.exclude,
        "path": args.path,
        "root": args.root,
        "use_fstab": not args.no_fstab,
        "verify_manifest": not args.no_manifest_check,
        "allow_external": args.allow_external_files,
        **_ready_options(args),
        "report": args.report,
    }
    progress: _Progress | _PlainProgress | None = None
    if not args.quiet and (args.progress or stderr.isatty()):
        progress = _progress(stderr, force=args.progress)
    try:
        if args.docker:
            engine = images.convert_to_engine(
                args.sources, args.docker, on_progress=progress, **common
            )
            log.info("loaded %s (%s) into %s", engine.repo_tag, engine.image_id, engine.docker_host)
        else:
            image = images.convert_to_image(
                args.sources,
                args.output,
                format=args.format,
                repo_tag=args.tag,
                gzip_layer=args.gzip_layer,
                on_progress=progress,
                **common,
            )
            log.info("wrote %s image %s", image.format, image.manifest_digest)
    finally:
        if progress is not None:
            progress.close()
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _volume_line(vol: dict[str, Any], indent: str) -> str:
    line = f"{indent}{vol['name']}"
    if vol.get("scheme") == "lvm":
        line += f" (LV {vol['type']}, {vol['lvm']['segments']} segment(s))"
    elif vol.get("scheme") not in (None, "none"):
        line += f" ({vol['scheme']} {vol['type']})"
    if "size" in vol:
        line += f" {_human(vol['size'])}: {vol['content']}"
    fs = vol.get("filesystem")
    if fs:
        if fs["uuid"]:
            line += f" UUID={fs['uuid']}"
        if fs["label"]:
            line += f" LABEL={fs['label']}"
        if fs["mountpoints"]:
            line += f" → mounted at {', '.join(fs['mountpoints'])}"
    if vol.get("lvm", {}).get("pv"):
        line += f" (PV of {vol['lvm']['vg']})"
    if "skipped" in vol:
        line += f" (skipped: {vol['skipped']})"
    return line


def _print_inspect(info: dict[str, Any], out: TextIO) -> None:
    src = info["source"]
    out.write(f"{src['name']} ({src['kind']}; manifest {src['manifest']})\n")
    for key, value in src["product"].items():
        out.write(f"  {key}: {value}\n")
    for disk in info["disks"]:
        sub = f" {disk['subformat']}" if disk["subformat"] else ""
        out.write(f"disk {disk['name']}: {disk['format']}{sub}, {_human(disk['size'])}\n")
        for vol in disk["volumes"]:
            out.write(_volume_line(vol, "  ├─ ") + "\n")
    for vg in info["volume_groups"]:
        out.write(f"volume group {vg['name']} on {', '.join(vg['pvs']) or '?'}\n")
        for lv in vg["lvs"]:
            out.write(_volume_line(lv, "  ├─ ") + "\n")
    osi = info["os"]
    if osi["pretty_name"] or osi["architecture"]:
        arch = osi["architecture"] or "unknown architecture"
        if osi["variant"]:
            arch += f"/{osi['variant']}"
        out.write(f"guest: {osi['pretty_name'] or 'unknown OS'} ({arch})\n")
    out.write(f"root: {info['root']}\n")
    for m in info["mounts"]:
        opts = f" ({','.join(m['options'])})" if m["options"] else ""
        out.write(f"  {m['path']:<20} {m['volume']} {m['fstype']}{opts}\n")


def _cmd_inspect(args: argparse.Namespace, stdout: TextIO) -> int:
    with _open_guest(args, args.sources) as guest:
        if args.container:
            from .preflight import preflight

            found = preflight(guest)
            stdout.write((found.to_json() if args.json else found.to_text()) + "\n")
            return 0
        info = guest.inspect()
    if args.json:
        json.dump(info, stdout, indent=2)
        stdout.write("\n")
    else:
        _print_inspect(info, stdout)
    return 0


def _split_sources(args: list[str], *, path_required: bool) -> tuple[list[str], str]:
    """``SOURCE... [PATH]``: with two or more arguments the last one is the guest path (to
    list the root of a guest given as several disk images, end with ``/``)."""
    if len(args) >= 2:
        return args[:-1], args[-1]
    if path_required:
        raise UsageError("give the VM image, then the guest path")
    return args, "/"


def _open_guest(args: argparse.Namespace, sources: list[str]) -> api.Guest:
    return api.open(
        sources,
        root=args.root,
        use_fstab=not args.no_fstab,
        verify_manifest=not args.no_manifest_check,
        allow_external=args.allow_external_files,
    )


_TYPE_CHAR = {
    EntryType.FILE: "-",
    EntryType.DIR: "d",
    EntryType.SYMLINK: "l",
    EntryType.CHAR: "c",
    EntryType.BLOCK: "b",
    EntryType.FIFO: "p",
    EntryType.SOCKET: "s",
}


def _mode_string(entry: Entry) -> str:
    return _TYPE_CHAR[entry.type] + stat.filemode(entry.mode)[1:]


def _ls_line(item: TreeItem, long: bool) -> str:
    name = os.fsdecode(item.path.rsplit(b"/", 1)[-1]) or "/"
    if not long:
        return name
    e = item.entry
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    size = (
        f"{e.rdev_major}, {e.rdev_minor}"
        if e.type in (EntryType.CHAR, EntryType.BLOCK)
        else str(e.size)
    )
    target = f" -> {os.fsdecode(e.link_target)}" if e.type is EntryType.SYMLINK else ""
    return f"{_mode_string(e)} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {size:>10} {when} {name}{target}"


def _cmd_ls(args: argparse.Namespace, stdout: TextIO) -> int:
    sources, path = _split_sources(args.args, path_required=False)
    with _open_guest(args, sources) as guest:
        try:
            top = guest.stat(path)
            if top.entry.type is EntryType.DIR:
                items = guest.listdir(path)
            else:  # like ls: a symlink to a file is listed as the link itself
                items = [guest.stat(path, follow=False)]
        except FileNotFoundError as exc:
            raise AssemblyError(str(exc)) from None
        for item in items:
            stdout.write(_ls_line(item, args.long) + "\n")
    return 0


def _cmd_cat(args: argparse.Namespace, stdout: TextIO) -> int:
    sources, path = _split_sources(args.args, path_required=True)
    with _open_guest(args, sources) as guest:
        try:
            item = guest.stat(path)
        except FileNotFoundError as exc:
            raise AssemblyError(str(exc)) from None
        if item.entry.type is not EntryType.FILE:
            raise AssemblyError(f"{path}: not a regular file in the guest")
        stdout.flush()
        out = stdout.buffer if hasattr(stdout, "buffer") else None
        with item.open() as fh:
            while chunk := fh.read(1 << 20):
                if out is not None:
                    out.write(chunk)
                else:
                    stdout.write(chunk.decode("utf-8", "replace"))
        if out is not None:
            out.flush()
    return 0


def _cmd_verify(args: argparse.Namespace, stdout: TextIO) -> int:
    from .verify import verify

    if len(args.args) < 2:
        raise UsageError("give the VM image, then the tarball")
    diffs = verify(
        args.args[:-1],
        args.args[-1],
        exclude=args.exclude,
        path=args.path,
        root=args.root,
        use_fstab=not args.no_fstab,
        verify_manifest=not args.no_manifest_check,
        allow_external=args.allow_external_files,
    )
    for line in diffs:
        stdout.write(line + "\n")
    if diffs:
        log.error("%d difference(s) between the image and %s", len(diffs), args.args[-1])
        return 3
    log.info("%s matches the image", args.args[-1])
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ova2img`` command with *argv* (default: ``sys.argv[1:]``); return its exit code."""
    stdout, stderr = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse ends a list of positionals at the first option: `ls vm.raw --no-fstab
        # /var` leaves /var over. Positionals after options belong to the same list.
        listed = "sources" if hasattr(args, "sources") else "args"
        if extra and all(not e.startswith("-") for e in extra) and hasattr(args, listed):
            getattr(args, listed).extend(extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(stderr)
        return 2
    level = log.level  # put back at the end: main() may run in a longer-lived process
    handler = _setup_logging(args, stderr)
    previous: Callable[..., Any] | int | None = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not in the main thread (an embedding program): leave signals alone
        previous = None
    try:
        if args.command == "convert":
            return _cmd_convert(args, stderr)
        if args.command == "ls":
            return _cmd_ls(args, stdout)
        if args.command == "cat":
            return _cmd_cat(args, stdout)
        if args.command == "verify":
            return _cmd_verify(args, stdout)
        return _cmd_inspect(args, stdout)
    except Ova2imgError as exc:
        if args.debug:
            traceback.print_exc(file=stderr)
        stderr.write(f"ova2img: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write("ova2img: interrupted; no output was left behind\n")
        return 130
    except BrokenPipeError:
        # Our stdout's reader went away (`ova2img ls … | head`); stop quietly like ls and cat,
        # but a conversion that could not write its output has failed.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command != "convert":
            return 0
        stderr.write("ova2img: error: output: the reader closed the pipe\n")
        return 1
    except OSError as exc:
        # Printing a listing or a report failed (stdout on a full disk, /dev/full, …); the
        # library turns its own I/O errors into Ova2imgError.
        if args.debug:
            traceback.print_exc(file=stderr)
        stderr.write(f"ova2img: error: cannot write the output: {exc.strerror or exc}\n")
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> NoReturn:
    """The process entry point (the ``ova2img`` command and ``python -m ova2img``): run
    :func:`main`, flush stdout and stderr, and end the process at once.

    The interpreter's teardown (freeing every cached inode, grain and module) takes 35-45 ms,
    a tenth of a small conversion, and nothing ova2img holds needs it: an output is committed
    or removed inside :func:`main`, temporary files have no name, child processes are reaped.
    Code that calls :func:`main` in-process gets its return value as usual.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # None when fd 1 is closed
            stream.flush()
    os._exit(code)
