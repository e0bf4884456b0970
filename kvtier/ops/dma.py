"""Copies between pinned CPU memory and the GPU by DMA, including 2-D ones (n rows at a pitch).

    copy_rows(dst, src)   dst[i] = src[i] for every row i; rows contiguous, any row stride

A contiguous pair is one `copy_`. A strided pair -- one group of layers out of each of n
consecutive KV blocks -- is one cudaMemcpy2DAsync on the current stream: torch's `copy_` would
first make a pageable contiguous temporary on the host (slow, and it synchronizes). The CUDA
runtime is the one torch loaded (found in /proc/self/maps), called through ctypes; where it cannot
be found, `rows_available()` is False and callers keep to contiguous copies. On the CPU a strided
`copy_` is exact and cheap, so the same callers run there (tests).

This module imports nothing from kvtier.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Asynchronous on CUDA (the current stream); src and dst: same shape and dtype, each row
    (index along dim 0) one contiguous span, one of them pinned CPU memory when the other is on CUDA."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows needs equal shapes and dtypes, got {tuple(dst.shape)} {dst.dtype} "
                         f"and {tuple(src.shape)} {src.dtype}")
    if (dst.is_contiguous() and src.is_contiguous()) or not (dst.is_cuda or src.is_cuda):
        dst.copy_(src, non_blocking=True)
        return
    row = src[0].numel() * src.element_size() if src.shape[0] else 0
    for x in (dst, src):
        if x.shape[0] and not x[0].is_contiguous():
            raise ValueError(f"copy_rows: a row must be contiguous, strides {x.stride()}")
    if row == 0:
        return
    memcpy_2d = _memcpy_2d()
    if memcpy_2d is None:
        raise RuntimeError("copy_rows: the CUDA runtime's cudaMemcpy2DAsync was not found; "
                           "check rows_available() first")
    device = dst.device if dst.is_cuda else src.device
    err = memcpy_2d(dst.data_ptr(), dst.stride(0) * dst.element_size(), src.data_ptr(),
                    src.stride(0) * src.element_size(), row, src.shape[0], _CUDA_MEMCPY_DEFAULT,
                    torch.cuda.current_stream(device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")


def rows_available(device: torch.device) -> bool:
    """Whether copy_rows can move strided rows between this device and pinned memory."""
    return device.type != "cuda" or _memcpy_2d() is not None


@functools.cache
def _memcpy_2d():
    lib = _cudart()
    if lib is None:
        return None
    fn = getattr(lib, "cudaMemcpy2DAsync", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return fn


def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library already in this process (torch's), else one by its usual names."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        paths = set()
    for name in sorted(paths) + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None
