"""Import the dissect modules ova2img uses without the eager ``__init__`` of their packages.

``dissect.hypervisor/__init__.py`` imports every format it knows (VHD, VHDX, qcow2, VDI, HDD,
ASIF, Hyper-V, OVF, VirtualBox, …), ``dissect.volume.disk`` every partition scheme (APM, BSD,
GPT, MBR) and ``dissect.extfs`` its journal reader. Each of those modules parses its C structure
definitions with dissect.cstruct at import, so ``import dissect.hypervisor.disk.vmdk`` costs
about 115 ms, of which the VMDK module needs 40: a quarter of a small conversion's wall time.

:func:`defer_package_inits` puts each such package in ``sys.modules`` *before* its
``__init__`` runs, as a bare package module (its ``__path__`` set, so submodules import as
usual). Its own names load on first use: a module ``__getattr__`` runs the real ``__init__``
the first time an attribute the package does not yet have is asked for. So a tool that imports
ova2img and then ``from dissect.hypervisor import vhdx`` or ``dissect.hypervisor.ovf`` still gets
what it expects; it only pays for it when it asks.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

#: packages whose ``__init__`` imports far more than ova2img uses, parents before children
DEFERRED = (
    "dissect.hypervisor",
    "dissect.volume.disk",
    "dissect.volume.disk.schemes",
    "dissect.extfs",
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
    """The ``__getattr__`` of a deferred package: run its ``__init__`` once, then look again."""
    lock = threading.RLock()
    state = {"done": False}

    def __getattr__(attr: str) -> Any:  # noqa: N807 - the module protocol's name
        if attr.startswith("__") and attr != "__all__":
            # dunder look-ups come from the import machinery and from tools probing modules:
            # never worth running the whole package for
            raise AttributeError(attr)
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
