"""Import the dissect modules ova2img uses without the eager ``__init__`` of their packages.

``dissect.hypervisor/__init__.py`` imports every format it knows (VHD, VHDX, qcow2, VDI, HDD,
ASIF, Hyper-V, OVF, VirtualBox, …), ``dissect.volume.disk`` every partition scheme (APM, BSD,
GPT, MBR), ``dissect.extfs`` its journal reader and ``dissect.util`` every decompressor and hash
it has. Each of those format modules parses its C structure
definitions with dissect.cstruct at import, so ``import dissect.hypervisor.disk.vmdk`` costs
about 115 ms, of which the VMDK module needs 40: a quarter of a small conversion's wall time.

:func:`defer_package_inits` puts each such package in ``sys.modules`` *before* its
``__init__`` runs, as a bare package module (its ``__path__`` set, so submodules import as
usual). Its own names load on first use: a module ``__getattr__`` runs the real ``__init__``
the first time an attribute the package does not yet have is asked for. So a tool that imports
ova2img and then ``from dissect.hypervisor import vhdx`` or ``dissect.hypervisor.ovf`` still gets
what it expects; it only pays for it when it asks.

:func:`load_uncompiled` does the same for the C definitions ova2img reads only a few times per
image (a VMDK header, an ext superblock, a partition table, a journal header): dissect.cstruct
compiles each structure into Python code when its module is imported, half of that import's
time (about 20 ms for the modules of :data:`UNCOMPILED`). Loaded with ``compiled=False`` (a
documented option of its parser), they parse the same, a little slower per call.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

#: packages whose ``__init__`` imports far more than ova2img uses, parents before children
DEFERRED = (
    "dissect.hypervisor",
    "dissect.volume.disk",
    "dissect.volume.disk.schemes",
    "dissect.extfs",
    "dissect.util",
)

#: dissect modules whose C definitions ova2img parses a few times per image: loaded uncompiled
UNCOMPILED = frozenset(
    {
        "dissect.extfs.c_ext",
        "dissect.extfs.c_jdb2",
        "dissect.hypervisor.disk.c_vmdk",
        "dissect.volume.disk.schemes.gpt",
        "dissect.volume.disk.schemes.mbr",
    }
)


def defer_package_inits(names: tuple[str, ...] = DEFERRED) -> None:
    """Register each package of *names* not imported yet with its ``__init__`` deferred."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            continue  # not installed, or not a package: nothing to defer
        module = importlib.util.module_from_spec(spec)
        module.__getattr__ = _completer(module)  # type: ignore[method-assign]
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def _completer(module: ModuleType) -> Any:
    """The ``__getattr__`` of a deferred package: run its ``__init__`` once, then look again;
    a submodule (``from package import submodule``) is imported without it."""
    lock = threading.RLock()
    state = {"done": False}

    def __getattr__(attr: str) -> Any:  # noqa: N807 - the module protocol's name
        if attr.startswith("__") and attr != "__all__":
            # dunder look-ups come from the import machinery and from tools probing modules:
            # never worth running the whole package for
            raise AttributeError(attr)
        if not state["done"]:
            full = f"{module.__name__}.{attr}"
            try:
                found = importlib.util.find_spec(full) is not None
            except (ImportError, ValueError):
                found = False
            if found:
                return importlib.import_module(full)
        with lock:
            if not state["done"]:
                state["done"] = True
                spec = module.__spec__
                assert spec is not None and spec.loader is not None
                spec.loader.exec_module(module)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None

    return __getattr__


def load_uncompiled(names: frozenset[str] = UNCOMPILED) -> None:
    """Have the modules of *names*, when imported, load their C definitions uncompiled."""
    if not any(isinstance(f, _UncompiledFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _UncompiledFinder(names))


class _UncompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of *names* as usual, with a loader that runs them with
    ``cstruct.load(..., compiled=False)`` as the default."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # anything unusual (a zip, a frozen module): as it is
        spec.loader = _UncompiledLoader(spec.loader.name, spec.loader.path)
        return spec


class _UncompiledLoader(importlib.machinery.SourceFileLoader):
    """A source loader whose module runs with uncompiled C definitions."""

    def exec_module(self, module: ModuleType) -> None:
        with _uncompiled_loads():
            super().exec_module(module)


@contextlib.contextmanager
def _uncompiled_loads() -> Iterator[None]:
    from dissect.cstruct import cstruct

    original = cstruct.load

    def load(self: Any, definition: str, deftype: int | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("compiled", False)
        return original(self, definition, deftype, **kwargs)

    cstruct.load = load
    try:
        yield
    finally:
        cstruct.load = original
