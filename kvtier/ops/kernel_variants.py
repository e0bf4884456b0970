"""How many variants of kvtier's Triton kernels this process has compiled (see the top of
kvtier/ops/triton_attention.py for what makes a variant).

Reads each JITFunction's in-memory kernel cache, `device_caches[device][0]` (key -> kernel) in
Triton 3.6 and 3.9, `cache[device]` in older releases. Imports no Triton itself: a kernel module
that is not imported yet has compiled nothing.
"""

from __future__ import annotations

import sys

KERNEL_MODULES = ("kvtier.ops.triton_attention", "kvtier.ops._fused_kernels",
                  "kvtier.ops._kv_transfer_kernel", "kvtier.ops._top_p_kernel")


def compiled_variants() -> dict[str, int] | None:
    """"module.kernel" -> variants compiled on all devices, for every launched kernel; None when the
    kernels run in Triton's interpreter or the cache layout is unknown (a newer Triton)."""
    counts: dict[str, int] = {}
    for module in (sys.modules.get(name) for name in KERNEL_MODULES):
        if module is None:
            continue
        # imported already: the kernel module imports triton
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        for name, fn in vars(module).items():
            if isinstance(fn, InterpretedFunction):
                return None
            if isinstance(fn, JITFunction):
                num = _num_cached(fn)
                if num is None:
                    return None
                if num:
                    counts[f"{module.__name__}.{name}"] = num
    return counts


def num_compiled_variants() -> int | None:
    """All of them together (None as for compiled_variants)."""
    counts = compiled_variants()
    return None if counts is None else sum(counts.values())


def _num_cached(fn) -> int | None:
    caches = getattr(fn, "device_caches", None)
    if caches is not None:  # Triton >= 3.3: device -> (kernel_cache, key_cache, target, backend, binder)
        return sum(len(entry[0]) for entry in caches.values())
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):  # older: device -> {key: kernel}
        return sum(len(per_device) for per_device in cache.values())
    return None
