"""Triton kernel modules imported on first launch, not when kvtier is imported: TRITON_INTERPRET is
read when Triton is imported, and a CPU-only install has no Triton at all.

A launcher module (kv_transfer.py, top_p.py) keeps its kernel in a private `_*_kernel.py` that
defines INTERPRETED, and reads it through `load`; its `_INTERPRETED` attribute (whether kernels run
in Triton's interpreter) comes from `interpreted`, and tests may pin it with monkeypatch.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType


@functools.cache
def load(name: str) -> ModuleType | None:
    """kvtier.ops.<name>, or None without Triton."""
    try:
        return importlib.import_module(f"kvtier.ops.{name}")
    except ImportError:
        return None


def interpreted(module_globals: dict, name: str) -> bool:
    """The launcher's `_INTERPRETED`: pinned in its globals by a test, else the kernel module's."""
    if "_INTERPRETED" in module_globals:
        return bool(module_globals["_INTERPRETED"])
    kernel = load(name)
    return kernel is not None and bool(kernel.INTERPRETED)


def accessors(name: str) -> tuple[Callable[[str], bool], Callable[[], ModuleType | None]]:
    """A launcher module's `__getattr__` (serving `_INTERPRETED`) and its `_kernel_module()`:

        __getattr__, _kernel_module = lazy_kernels.accessors("_top_p_kernel")
    """
    def module_getattr(attr: str) -> bool:
        if attr == "_INTERPRETED":  # whether the kernel runs in Triton's interpreter (tests, CPU)
            return interpreted({}, name)
        raise AttributeError(f"module has no attribute {attr!r}")

    return module_getattr, lambda: load(name)
