"""Top-p (nucleus) thresholds without a sort.

    top_p_threshold(probs, top_p)       (N, V) probabilities, (N,) top_p -> (N,) thresholds t
    top_p_threshold_ref(probs, top_p)   the same by sorting each row (the CPU path)

Semantics. The nucleus of a row is `probs >= t`, where t is the largest value with
sum(probs[probs >= t]) >= top_p. That is p_(k), the probability of the last token the sort-based
rule keeps (sort the row by probability, descending; keep a token while the mass before it is
below top_p): the nucleus is that rule's set plus every token tied with p_(k). Keeping all ties
leaves nothing to how a sort ordered tied tokens (common in logits from bf16), and the kernel
sums each row in one fixed order whatever the batch. Rows with top_p >= 1 (the sampler passes
inf for "no top-p") get t = 0.0, which keeps every token; so does a row whose mass falls short of
top_p by rounding.

Algorithm (the kernels). Probabilities are nonnegative fp32, and the int32 bit patterns of
nonnegative floats are ordered like the floats, so t is the largest bit pattern b in
[0, bits(1.0)] with mass(probs >= float(b)) >= top_p: a search over ~2**30 integers, whose answer
is always one of the row's own values. Each pass over the row tests K candidates at once (a
(K, BLOCK) compare per block of the row) and keeps the one of K + 1 pieces of the range that holds
the answer, so 2**30 narrows to one bit pattern in 8 passes at K = 16 (30 as a binary search):

    bit patterns     0                                                            bits(1.0)
    pass 1           lo |--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--| hi    K = 16
                           c1 c2 c3 c4 c5 c6 ...                        c16
                     mass(p >= c) >= top_p for c1..c4 only: lo = c4, hi = c5
    pass 2                       lo |-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-| hi          (1/17 as wide)
    ...
    pass 8           hi = lo + 1: t = float(lo)

Each pass is one launch over every row's chunks (chunk_cols() columns each), and a last launch
narrows once more and writes t:

    row of V columns   | chunk 0 | chunk 1 | ... | chunk S-1 |      S = ceil(V / chunk_cols())
    pass j             program (row, c): the K masses of chunk c -> partials[row, j % 2, c]
    pass j + 1         every program (row, c) first sums partials[row, j % 2, :] over the chunks
                       and narrows [lo, hi) itself: the same numbers in the same order, so the
                       row's programs agree on the candidates without talking
    finish             program row: the same narrowing, the last: t

The chunks, and so the order of every sum, depend on V alone: a row's t does not depend on the
rest of the batch, and is the same on every run. Grids and buffers are sized from host ints: no
sync, and a CUDA graph can capture the NUM_PASSES + 1 launches. After two passes [lo, hi) is
narrow (within 1.4x of t), and blocks holding no probability inside it skip the compares (see
the kernels' module).

The kernels' masses are fp32 sums in an order of their own, the reference's the cumsum of the
sorted row: where top_p lies within rounding (~1e-7) of the mass at a cut, the two may cut one
distinct value apart, far below sampling noise. tests/test_top_p.py compares them exactly at
V = 1000, 1200 (in 5 chunks) and 2500, and at V = 128256 on the rows whose cut is not within 1e-5
of top_p.

This module imports nothing from kvtier, and no Triton until a kernel launches (TRITON_INTERPRET
is read when Triton is imported; under TRITON_INTERPRET=1 the kernels also run on CPU tensors).
"""

from __future__ import annotations

import torch

from kvtier.ops import lazy_kernels

# Untuned defaults, chosen by arithmetic and an offline sm_90a compile (Triton 3.9); never timed
# (no GPU was at hand). For Llama-3 (V = 128256) on an H200 (132 SMs):
#   K = 16         a pass narrows the range 17-fold: 8 passes (a binary search: 30 reads of the row),
#                  K compare-and-adds an element a pass (~3 instructions each, the bulk of the work);
#                  from the third pass on most blocks skip them (the kernels' module)
#   BLOCK = 512    at 8 warps, 2 elements and 32 fp32 partial sums a thread: 77 registers, no
#                  spills, 3 programs (24 warps) an SM; 4 elements a thread (1024 x 8) take 168
#   8 blocks       a chunk of 4096 columns, 32 a row: 2048 programs a pass at batch 64 (~5 rounds
#                  of 396), 8192 at 256, 32 at batch 1; each first reads its row's 32 x K partial
#                  masses (2 KB, beside 16 KB of probabilities), 32 chunks a load
#   4 stages       the software-pipelined loop keeps 3 blocks (6 KB) in flight a program, ~18 KB an
#                  SM, near HBM's bandwidth x latency (~25 KB an SM); it costs ~27 instructions a
#                  block (~160 in all with the compares)
# Sweep on the target GPU (V = 128256, batch 1, 64, 256): K in {8, 16}, BLOCK x num_warps in
# {256 x 4, 512 x 8, 1024 x 16}, BLOCKS_PER_CHUNK in {4, 8, 16}, NUM_STAGES in {2, 3, 4, 6}.
TOP_P_K = 16
TOP_P_BLOCK = 512
TOP_P_BLOCKS_PER_CHUNK = 8
TOP_P_NUM_WARPS = 8
TOP_P_CHUNKS_AT_ONCE = 32
TOP_P_NUM_STAGES = 4
_FINISH_NUM_WARPS = 1

_ONE_BITS = 0x3F800000  # the int32 bit pattern of 1.0
_BACKENDS = (None, "triton", "torch")


# the kernel module, imported on first launch; `_INTERPRETED` as a module attribute
__getattr__, _kernel_module = lazy_kernels.accessors("_top_p_kernel")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """probs (N, V) fp32, each row a distribution (last dim contiguous, any row stride);
    top_p (N,) fp32 in (0, 1], or >= 1 (inf) for rows without top-p -> (N,) fp32 t: the row's
    nucleus is `probs >= t[:, None]` (see the module docstring).

    backend None runs the kernel on CUDA tensors (the reference where Triton is not installed)
    and the reference on CPU tensors; "triton" forces the kernel (CPU tensors need
    TRITON_INTERPRET=1), "torch" the reference. Asynchronous on CUDA; never syncs.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_args(probs, top_p)
    if backend == "torch" or (backend is None and not (probs.is_cuda and _kernel_module() is not None)):
        return top_p_threshold_ref(probs, top_p)
    _check_kernel_args(probs)
    out = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)  # (N,)
    if probs.shape[0] == 0:
        return out
    if probs.is_cuda:
        with torch.cuda.device(probs.device):  # Triton launches on the current device
            _launch(probs, top_p, out)
    else:
        _launch(probs, top_p, out)
    return out


def top_p_threshold_ref(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Pure-torch top_p_threshold: sort each row, find the last token the sort-based rule keeps.
    Token i of the sorted row is kept while the mass before it, cumsum[i - 1], is below top_p:
    the kept ones are those with cumsum < top_p and the one after."""
    sorted_probs = probs.sort(dim=-1, descending=True).values  # (N, V)
    cumsum = sorted_probs.cumsum(dim=-1)  # (N, V) nondecreasing: a sum of nonnegative terms
    num_below = (cumsum < top_p[:, None]).sum(dim=-1)  # (N,)
    last_kept = num_below.clamp(max=probs.shape[-1] - 1)  # (N,) the position of p_(k)
    threshold = sorted_probs.gather(-1, last_kept[:, None]).squeeze(-1)  # (N,)
    # no top-p, or the whole row's mass is below top_p (rounding): keep every token
    return threshold.masked_fill((top_p >= 1) | (num_below == probs.shape[-1]), 0.0)


def precompile(device: torch.device) -> None:
    """Compile the kernels' one variant each now (on a CUDA device, with Triton installed), not at
    the first sampled step mid-serving: nothing that varies is specialized on (see the kernels), so
    a one-row search keys like every batch, and it launches both kernels (every pass and the
    finish). A no-op elsewhere, and Triton is not imported off CUDA."""
    if device.type != "cuda":
        return
    kernel = _kernel_module()
    if kernel is None or kernel.INTERPRETED:
        return
    probs = torch.full((1, 16), 1 / 16, dtype=torch.float32, device=device)  # (1, 16) uniform
    top_p_threshold(probs, torch.full((1,), 0.5, device=device), backend="triton")


def chunk_cols() -> int:
    """Columns of a row that one program of a pass reads: the chunks are fixed by this and the
    vocabulary alone, and so is the order of every sum (never by the batch)."""
    return TOP_P_BLOCK * TOP_P_BLOCKS_PER_CHUNK


def num_passes(k: int = TOP_P_K) -> int:
    """Passes of a (k + 1)-way search to narrow [0, bits(1.0) + 1) to one bit pattern."""
    width, passes = _ONE_BITS + 1, 0
    while width > 1:
        width, passes = -(-width // (k + 1)), passes + 1
    return passes


# ---------------------------------------------------------------------------------------------
# launcher and checks
# ---------------------------------------------------------------------------------------------

def _launch(probs: torch.Tensor, top_p: torch.Tensor, out: torch.Tensor) -> None:
    """The search's NUM_PASSES + 1 launches (the kernel module's docstring): fixed grids and
    buffers sized from host ints, so no sync, and a CUDA graph can capture them."""
    kernel = _kernel_module()
    num_rows, num_cols = probs.shape
    num_chunks = -(-num_cols // chunk_cols())
    top_p = top_p.contiguous()
    bounds = torch.empty((num_rows, 2, 2), dtype=torch.int32, device=probs.device)
    partials = torch.empty((num_rows, 2, num_chunks, TOP_P_K), dtype=torch.float32, device=probs.device)
    for pass_index in range(_NUM_PASSES):
        kernel._top_p_pass_kernel[(num_rows, num_chunks)](
            probs, top_p, bounds, partials, num_cols, probs.stride(0), num_chunks, pass_index,
            BLOCK=TOP_P_BLOCK, BLOCKS_PER_CHUNK=TOP_P_BLOCKS_PER_CHUNK, K=TOP_P_K,
            CHUNKS_AT_ONCE=TOP_P_CHUNKS_AT_ONCE, NUM_STAGES=TOP_P_NUM_STAGES, num_warps=TOP_P_NUM_WARPS)
    kernel._top_p_finish_kernel[(num_rows,)](
        top_p, bounds, partials, out, num_chunks, _NUM_PASSES, K=TOP_P_K,
        CHUNKS_AT_ONCE=TOP_P_CHUNKS_AT_ONCE, num_warps=_FINISH_NUM_WARPS)


def _check_args(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"probs must be a 2-D tensor (rows, vocab), got {getattr(probs, 'shape', type(probs))}")
    if not isinstance(top_p, torch.Tensor) or top_p.dim() != 1 or top_p.shape[0] != probs.shape[0]:
        raise ValueError(f"top_p must be a 1-D tensor with one value per row of probs ({probs.shape[0]}), "
                         f"got {getattr(top_p, 'shape', type(top_p))}")
    for name, x in (("probs", probs), ("top_p", top_p)):
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {x.dtype}")
    if probs.shape[1] == 0:
        raise ValueError("probs has no columns: a distribution needs at least one token")
    if probs.shape[1] > 1 and probs.stride(1) != 1:
        raise ValueError(f"probs' last dim must be contiguous, strides {probs.stride()}")
    if probs.device.type not in ("cpu", "cuda"):
        raise ValueError(f"probs is on {probs.device}; only CPU and CUDA tensors are supported")
    if top_p.device != probs.device:
        raise ValueError(f"top_p is on {top_p.device} but probs on {probs.device}: both must be on one device")


def _check_kernel_args(probs: torch.Tensor) -> None:
    kernel = _kernel_module()
    if kernel is None:
        raise ValueError("backend 'triton' needs the triton package")
    interpreted = lazy_kernels.interpreted(globals(), "_top_p_kernel")  # tests may pin it
    if not probs.is_cuda and not interpreted:
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run it on the CPU)")
    if probs.shape[1] > 2**31 - chunk_cols() or probs.stride(0) >= 2**31:
        raise ValueError(f"probs of shape {tuple(probs.shape)}, strides {probs.stride()}: the kernel "
                         "indexes a row with int32")


_NUM_PASSES = num_passes(TOP_P_K)  # per launch: computed once
