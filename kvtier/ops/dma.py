"""Copies between pinned CPU memory and the GPU by DMA, including 2-D ones (n rows at a pitch).

    copy_rows(dst, src)   dst[i] = src[i] for every row i; rows contiguous, any row stride

A contiguous pair is one `copy_`. A strided pair -- one group of layers out of each of n
consecutive KV blocks -- is one cudaMemcpy2DAsync on the current stream: torch's `copy_` would
first make a pageable contiguous temporary on the host (slow, and it synchronizes). torch does not
expose that call, so it goes through a maintained binding of the CUDA runtime, the first of
BINDINGS that imports; its errors become DMAError. Neither binding is a dependency of kvtier (the
`cuda` extra installs one). Where none imports, `rows_available()` is False, one warning says so,
and callers keep to contiguous copies. On the CPU a strided `copy_` is exact and cheap, so the
same callers run there (tests) and no binding is imported.

This module imports nothing from kvtier.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch

# (dst, dst_pitch, src, src_pitch, row_bytes, num_rows, stream): addresses and sizes in bytes, the
# stream a raw cudaStream_t; the direction comes from the pointers (cudaMemcpyDefault, UVA)
Memcpy2D = Callable[[int, int, int, int, int, int, int], None]


class DMAError(RuntimeError):
    """A CUDA runtime error returned by cudaMemcpy2DAsync, whichever binding made the call."""

    def __init__(self, code: int, name: str):
        super().__init__(f"cudaMemcpy2DAsync failed: {name} (CUDA error {code})")
        self.code, self.name = code, name


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
    copy_2d(dst.data_ptr(), dst.stride(0) * dst.element_size(), src.data_ptr(), src.stride(0) * src.element_size(),
            row, src.shape[0], dst.device if dst.is_cuda else src.device)


def copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int, num_rows: int,
            device: torch.device) -> None:
    """copy_rows from raw addresses (pinned host or device memory, CUDA's unified addressing) on the
    current stream of `device`: for callers that issue many copies and would spend more host time
    slicing tensors than issuing them."""
    memcpy_2d = _memcpy_2d()
    if memcpy_2d is None:
        raise RuntimeError("copy_rows: no CUDA runtime binding (CuPy or cuda-python) imports; "
                           "check rows_available() first")
    memcpy_2d(dst, dst_pitch, src, src_pitch, row_bytes, num_rows, torch.cuda.current_stream(device).cuda_stream)


def rows_available(device: torch.device) -> bool:
    """Whether copy_rows can move strided rows between this device and pinned memory."""
    return device.type != "cuda" or _memcpy_2d() is not None


def _cupy() -> Memcpy2D:
    runtime = importlib.import_module("cupy.cuda.runtime")
    kind, error = runtime.memcpyDefault, runtime.CUDARuntimeError

    def memcpy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int, num_rows: int,
                  stream: int) -> None:
        try:
            runtime.memcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, num_rows, kind, stream)
        except error as e:  # its message is "<cudaError name>: <description>"
            raise DMAError(e.status, str(e).split(":")[0]) from e
    return memcpy_2d


def _cuda_python() -> Memcpy2D:
    runtime = importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6
    kind, success = runtime.cudaMemcpyKind.cudaMemcpyDefault, runtime.cudaError_t.cudaSuccess

    def memcpy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int, num_rows: int,
                  stream: int) -> None:
        (err,) = runtime.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, num_rows, kind, stream)
        if err != success:
            raise DMAError(int(err), runtime.cudaGetErrorName(err)[1].decode())
    return memcpy_2d


# In order of preference, by call overhead per copy on the H200 (torch 2.11+cu130, one small 2-D copy,
# arguments bound): CuPy 14.2 1.75 us, cuda-bindings 13.3 2.10 us (ctypes as before: 3.18 us). A
# 256-block layer-group load moves at the link's rate through either (55.2 GB/s in one copy, 48.0
# in 256). Importing CuPy's runtime costs ~0.1 s, once, when the transfer engine starts (rows_available).
BINDINGS: tuple[tuple[str, Callable[[], Memcpy2D]], ...] = (("cupy", _cupy), ("cuda-python", _cuda_python))


@functools.cache
def _memcpy_2d() -> Memcpy2D | None:
    """The first binding that imports; None (and one warning) when none does."""
    reasons = []
    for name, load in BINDINGS:
        try:
            return load()
        except (ImportError, OSError, AttributeError) as e:  # absent, no CUDA library, or too old
            reasons.append(f"{name}: {e}")
    warnings.warn("kvtier.ops.dma: no CUDA runtime binding imports (" + "; ".join(reasons) + "), so "
                  "strided copies are off and KV blocks load whole, not layer group by layer group; "
                  "install kvtier[cuda] for them", RuntimeWarning, stacklevel=3)
    return None
