"""Batched KV block copies between the GPU KV cache and the pinned CPU pool (either direction).

    copy_blocks(src, dst, src_block_ids, dst_block_ids)   dst[dst_block_ids[i]] = src[src_block_ids[i]]
    copy_blocks_ref(...)                                   the same in plain torch (the CPU path)

Both tensors are 4-D views (block, layer, kv, row_elems); a "row" is one (layer, kv) slab of one
block, bs * Hkv * D contiguous elements (32 KiB for Llama-3-8B in bf16). The callers' views:

    GPU cache (L, 2, Ng, bs, Hkv, D)  ->  gpu_kv.view(L, 2, Ng, -1).permute(2, 0, 1, 3)
    CPU pool  (Nc, L, 2, bs, Hkv, D)  ->  cpu_kv.view(Nc, L, 2, -1)

Why a kernel: a GPU block is L * 2 rows of 32 KiB scattered over the cache, and one DMA `copy_`
per row is launch-bound (2.4-3.4 GB/s on an H100). The kernel reads or writes the pinned pool
straight through UVA, all rows of all blocks in one launch: 51 GB/s reload and 52 GB/s store on an
H100, 92-95% of a pinned 256 MiB `copy_` (benchmarks/transfer_gpu.py). Its grid is a few
persistent programs (COPY_NUM_PROGRAMS) that loop over the rows, not one program per row.

When NOT to use it across the link: beside a running forward pass. Its programs hold SMs for the
whole transfer; on the same H100 (torch 2.11 cuBLAS) the default 8 programs slowed the matmuls of
a 2048-token Llama-3-8B prefill by 15-43% and of a batch-64 decode by 29-114% (by direction and
issue order; more programs, more slowdown), while a plain pinned DMA `copy_` slowed them by ~0%
and 3-14%. What overlapped: copy_blocks between the scattered GPU rows and a contiguous GPU
staging buffer (GPU -> GPU, a large grid, briefly the whole GPU) plus one 2 MiB DMA `copy_` per
block between staging and the pinned pool: 46-50 GB/s alone, 41-48 GB/s beside the pass, slowing
prefill 1-2% and decode 8-10% (benchmarks/transfer_gpu.py, "staged_dma"). The engine's transfer engine
(kvtier/engine/transfer_engine.py) uses that staged path, with DMA runs of consecutive blocks.

How the pinned tensor reaches the kernel: passed as is. Triton's CUDA launcher turns every tensor
argument's `data_ptr()` into a device address with cuPointerGetAttribute(DEVICE_POINTER); memory
from torch's pinned allocator is page-locked and mapped into the unified address space, so that
call succeeds and returns the same address (accepted since triton-lang/triton#1197, 2023; read in
Triton 3.9's driver.c, measured in Triton 3.6). Pageable memory fails there with "Pointer argument
cannot be accessed from Triton (cpu tensor?)" -- copy_blocks refuses it earlier with a ValueError.

Devices and streams:
- Id tensors (1-D, int32 or int64, same length) live on the CUDA device of the GPU tensor when
  either tensor is on CUDA, on the CPU otherwise. Ids on the GPU are not range-checked (that would
  sync); ids on the CPU are (range, distinct destinations).
- The kernel runs on the current stream: issue it under `with torch.cuda.stream(copy_stream):`.
  The caller orders it against the compute stream with events and keeps src, dst and the ids
  alive until it has run (`record_stream` or an event wait), as for any asynchronous copy.
- Destination ids must be distinct, and a block must not be both a source and a destination of one
  call when src and dst share memory: the rows are copied in no particular order.

The data is copied as raw bytes (viewed as the widest of int64/int32/int16/uint8 that both layouts
allow), so one kernel serves bf16, fp16, fp32 and quantized payloads of equal dtype.

This module imports nothing from kvtier. Triton is optional: without it only the torch path runs.
Under TRITON_INTERPRET=1 (set before triton is imported) the kernel also runs on CPU tensors.
"""

from __future__ import annotations

import torch

from kvtier.ops import lazy_kernels

# Tuning constants, timed on an H100 80GB HBM3 (PCIe link, torch 2.11, Triton 3.6) with
# benchmarks/transfer_gpu.py, 512 MiB of scattered Llama-3-8B blocks, five runs: 8 programs are
# the fewest at the full rate (16-64 are no faster), and 32 KiB chunks keep them there (reload
# 49.5-51.0 GB/s, store 52.3-52.5 GB/s; 16 KiB chunks reloaded 45.0-51.1, 8 KiB 36-38). Fewer
# programs hold fewer SMs, which matters beside a forward pass (16 programs slowed it more than 8).
# 4 warps: 1 warp reloaded 46 GB/s at 8 programs x 16 KiB.
# GPU -> GPU copies (no link to wait on) want a large grid instead: pass num_programs = 4 x SMs.
COPY_NUM_PROGRAMS = 8
COPY_CHUNK_BYTES = 32768
COPY_NUM_WARPS = 4

_ID_DTYPES = (torch.int32, torch.int64)
_RAW_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)  # widest first
_BACKENDS = (None, "triton", "torch")


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
#
#   rows of one call, num_rows = num_pairs * num_layers * num_kv, in this order:
#
#     row r -> pair p = r // (num_layers * num_kv),  layer = (r // num_kv) % num_layers,
#              kv = r % num_kv
#     src row: src + src_ids[p] * s_block + layer * s_layer + kv * s_kv   (row_elems contiguous)
#     dst row: dst + dst_ids[p] * d_block + layer * d_layer + kv * d_kv
#
#   program i of P copies rows i, i + P, i + 2P, ...; each row in CHUNK-element pieces.

# The kernel lives in kvtier/ops/_kv_transfer_kernel.py, imported on first launch: importing
# kvtier must not import Triton (TRITON_INTERPRET is read when Triton is imported).


# the kernel module, imported on first launch; `_INTERPRETED` as a module attribute
__getattr__, _kernel_module = lazy_kernels.accessors("_kv_transfer_kernel")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_block_ids: torch.Tensor,
                dst_block_ids: torch.Tensor, *, backend: str | None = None,
                num_programs: int = COPY_NUM_PROGRAMS, chunk_bytes: int = COPY_CHUNK_BYTES) -> None:
    """dst[dst_block_ids[i]] = src[src_block_ids[i]] for every i: all layers, K and V.

    src (Ns, L, K, E), dst (Nd, L, K, E): any strides on the first three dims, E contiguous,
    equal dtypes. src_block_ids, dst_block_ids (n,) int32/int64 on the GPU tensor's CUDA device
    when either tensor is on CUDA (the other must then be pinned), on the CPU otherwise.

    backend None picks the Triton kernel when either tensor is on CUDA and copy_blocks_ref when
    both are on the CPU; "triton" forces the kernel (CPU tensors need TRITON_INTERPRET=1), "torch"
    the reference. num_programs and chunk_bytes tune the kernel (see COPY_NUM_PROGRAMS).
    Asynchronous on CUDA (the current stream); never syncs.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_tensors(src, dst)
    _check_ids(src_block_ids, dst_block_ids, _ids_device(src, dst), src.shape[0], dst.shape[0])
    use_triton = backend == "triton" or (backend is None and _ids_device(src, dst).type == "cuda")
    if not use_triton:
        copy_blocks_ref(src, dst, src_block_ids, dst_block_ids)
        return
    _check_kernel_args(src, dst, num_programs, chunk_bytes)
    if src_block_ids.numel() == 0:
        return
    device = _ids_device(src, dst)
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device
            _launch(src, dst, src_block_ids, dst_block_ids, num_programs, chunk_bytes)
    else:
        _launch(src, dst, src_block_ids, dst_block_ids, num_programs, chunk_bytes)


def copy_blocks_ref(src: torch.Tensor, dst: torch.Tensor, src_block_ids: torch.Tensor,
                    dst_block_ids: torch.Tensor) -> None:
    """Pure-torch copy_blocks: one gather, one scatter (ids and rows follow the tensors' devices)."""
    rows = src.index_select(0, src_block_ids.to(src.device, torch.int64))  # (n, L, K, E)
    dst.index_copy_(0, dst_block_ids.to(dst.device, torch.int64), rows.to(dst.device))


# ---------------------------------------------------------------------------------------------
# launcher and checks
# ---------------------------------------------------------------------------------------------

def _launch(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor,
            num_programs: int, chunk_bytes: int) -> None:
    raw = _raw_dtype(src, dst)
    src_raw, dst_raw = src.view(raw), dst.view(raw)  # same bytes, wider elements
    _, num_layers, num_kv, row_elems = src_raw.shape
    num_rows = src_ids.numel() * num_layers * num_kv
    kernel = _kernel_module()
    chunk = min(max(chunk_bytes // raw.itemsize, 1), kernel.next_power_of_2(row_elems))
    kernel._copy_blocks_kernel[(min(num_programs, num_rows),)](
        src_raw, dst_raw, src_ids, dst_ids, num_rows, num_layers, num_kv, row_elems,
        *src_raw.stride()[:3], *dst_raw.stride()[:3],
        CHUNK=chunk, EVEN=row_elems % chunk == 0, num_warps=COPY_NUM_WARPS)


def _raw_dtype(src: torch.Tensor, dst: torch.Tensor) -> torch.dtype:
    """The widest integer dtype both tensors can be viewed as (stride-1 last dim is checked)."""
    return next(raw for raw in _RAW_DTYPES if _can_view(src, raw) and _can_view(dst, raw))


def _can_view(x: torch.Tensor, raw: torch.dtype) -> bool:
    ratio = raw.itemsize // x.element_size()
    if ratio <= 1:
        return True
    return (x.data_ptr() % raw.itemsize == 0 and x.shape[-1] % ratio == 0
            and all(s % ratio == 0 for s in x.stride()[:-1]))


def _ids_device(src: torch.Tensor, dst: torch.Tensor) -> torch.device:
    """Where the ids live: the CUDA device of either tensor, else the CPU."""
    return src.device if src.device.type == "cuda" else dst.device


def _check_tensors(src: torch.Tensor, dst: torch.Tensor) -> None:
    for name, x in (("src", src), ("dst", dst)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (block, layer, kv, row_elems), "
                             f"got {getattr(x, 'shape', type(x))}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim (row elements) must be contiguous, strides {x.stride()}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {x.device}; only CPU and CUDA tensors are supported")
    if src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"src rows {tuple(src.shape[1:])} != dst rows {tuple(dst.shape[1:])} "
                         "(layer, kv, row_elems)")
    if src.dtype != dst.dtype:
        raise ValueError(f"src dtype {src.dtype} != dst dtype {dst.dtype}: the copy is byte for byte")
    if src.device.type == "cuda" and dst.device.type == "cuda" and src.device != dst.device:
        raise ValueError(f"src on {src.device} and dst on {dst.device}: one GPU per copy")


def _check_ids(src_ids: torch.Tensor, dst_ids: torch.Tensor, device: torch.device,
               num_src_blocks: int, num_dst_blocks: int) -> None:
    for name, ids in (("src_block_ids", src_ids), ("dst_block_ids", dst_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in _ID_DTYPES:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got "
                             f"{getattr(ids, 'dtype', type(ids))} of shape {getattr(ids, 'shape', None)}")
        if ids.device != device:
            raise ValueError(f"{name} is on {ids.device}, expected {device} (the GPU tensor's "
                             "device when either tensor is on CUDA, else the CPU)")
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(f"{src_ids.numel()} src_block_ids but {dst_ids.numel()} dst_block_ids")
    if device.type == "cpu" and src_ids.numel() > 0:  # on the GPU a check would sync
        _check_range("src_block_ids", src_ids, num_src_blocks)
        _check_range("dst_block_ids", dst_ids, num_dst_blocks)
        if torch.unique(dst_ids).numel() != dst_ids.numel():
            raise ValueError("dst_block_ids must be distinct")


def _check_range(name: str, ids: torch.Tensor, num_blocks: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"{name} must lie in [0, {num_blocks}), got min {lo} max {hi}")


def _check_kernel_args(src: torch.Tensor, dst: torch.Tensor, num_programs: int, chunk_bytes: int) -> None:
    if _kernel_module() is None:
        raise ValueError("backend 'triton' needs the triton package")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    if chunk_bytes < 1 or chunk_bytes & (chunk_bytes - 1):
        raise ValueError(f"chunk_bytes must be a power of two, got {chunk_bytes}")
    on_cuda = src.device.type == "cuda" or dst.device.type == "cuda"
    interpreted = lazy_kernels.interpreted(globals(), "_kv_transfer_kernel")  # tests may pin it
    if not on_cuda and not interpreted:
        raise ValueError("the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run it on the CPU)")
    for name, x in (("src", src), ("dst", dst)):
        if on_cuda and x.device.type == "cpu" and not x.is_pinned():
            raise ValueError(f"{name} is in pageable CPU memory: the kernel reads and writes the "
                             "CPU pool through UVA, which needs pinned memory (pin_memory=True)")
