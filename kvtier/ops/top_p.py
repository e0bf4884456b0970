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

Algorithm (the kernel, one program per row). Probabilities are nonnegative fp32, and the int32
bit patterns of nonnegative floats are ordered like the floats, so t is the largest bit pattern
b in [0, bits(1.0)] with mass(probs >= float(b)) >= top_p: a search over ~2**30 integers, whose
answer is always one of the row's own values. Each pass over the row tests K candidates at once
(a (K, BLOCK) compare per chunk of the row) and keeps the one of K + 1 pieces of the range that
holds the answer, so 2**30 narrows to one bit pattern in 8 passes at K = 16 (30 as a binary
search):

    bit patterns     0                                                            bits(1.0)
    pass 1           lo |--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--| hi    K = 16
                           c1 c2 c3 c4 c5 c6 ...                        c16
                     mass(p >= c) >= top_p for c1..c4 only: lo = c4, hi = c5
    pass 2                       lo |-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-| hi          (1/17 as wide)
    ...
    pass 8           hi = lo + 1: t = float(lo)

The kernel's masses are fp32 sums in an order of its own, the reference's the cumsum of the
sorted row: where top_p lies within rounding (~1e-7) of the mass at a cut, the two may cut one
distinct value apart, far below sampling noise. tests/test_top_p.py compares them exactly at
V = 1000 and 2500, and at V = 128256 on the rows whose cut is not within 1e-5 of top_p.

This module imports nothing from kvtier, and no Triton until a kernel launches (TRITON_INTERPRET
is read when Triton is imported; under TRITON_INTERPRET=1 the kernel also runs on CPU tensors).
"""

from __future__ import annotations

import torch

from kvtier.ops import lazy_kernels

# Untuned defaults, chosen by arithmetic; never timed (no GPU was at hand). At K = 16 a pass
# narrows the range 17-fold: 8 passes, each element costing K compare-and-adds a pass (128 in
# all; a binary search: 30 passes of 1, but 30 reads of the row). The (K, BLOCK) fp32 partial
# sums are K * BLOCK / (32 * num_warps) = 64 registers a thread at 1024 x 8 warps; compiled
# offline for sm_90a (Triton 3.9, ptxas 13.4) the kernel uses 109 registers, spills none, and a
# warp issues ~215 instructions a chunk, about as long as an L2 round trip (~250 cycles), which
# the loop (not software-pipelined) waits for once a chunk: a much smaller K leaves that wait
# exposed. Sweep on the target GPU (V = 128256, batch 1 to 256): K in {4, 8, 16, 32}, BLOCK in
# {512, 1024, 2048}, num_warps in {4, 8, 16}.
# H200, 2026-12-01 (Llama-3-8B decode, profiled in the engine): 0.46 ms at 64 rows, 0.89 ms at 256.
# A variant that split each row over 32 programs (a launch per pass, partial masses per 4096-column
# chunk, blocks outside [candidate, hi) skipping the compares) took 0.39 ms at 64 rows and 1.41 ms
# at 256 (benchmarks/results/h200-2026-12-01/issue12/run7/top_p.json): slower where sampling costs
# most, so not kept.
TOP_P_K = 16
TOP_P_BLOCK = 1024
TOP_P_NUM_WARPS = 8

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
    """Compile the kernel's one variant now (on a CUDA device, with Triton installed), not at the
    first sampled step mid-serving: nothing that varies is specialized on (see the kernel), so a
    one-row launch keys like every batch. A no-op elsewhere, and Triton is not imported off CUDA."""
    if device.type != "cuda":
        return
    kernel = _kernel_module()
    if kernel is None or kernel.INTERPRETED:
        return
    probs = torch.full((1, 16), 1 / 16, dtype=torch.float32, device=device)  # (1, 16) uniform
    top_p_threshold(probs, torch.full((1,), 0.5, device=device), backend="triton")


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
    kernel = _kernel_module()
    kernel._top_p_threshold_kernel[(probs.shape[0],)](
        probs, top_p.contiguous(), out, probs.shape[1], probs.stride(0),
        BLOCK=TOP_P_BLOCK, K=TOP_P_K, NUM_PASSES=_NUM_PASSES, num_warps=TOP_P_NUM_WARPS)


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
    if probs.shape[1] >= 2**31 or probs.stride(0) >= 2**31:
        raise ValueError(f"probs of shape {tuple(probs.shape)}, strides {probs.stride()}: the kernel "
                         "indexes a row with int32")


_NUM_PASSES = num_passes(TOP_P_K)  # per launch: computed once
