"""The Triton kernel behind kvtier.ops.top_p.top_p_threshold (see there), imported on first launch."""

from __future__ import annotations

import triton
import triton.language as tl

ONE_BITS = tl.constexpr(0x3F800000)  # the int32 bit pattern of 1.0, the largest probability


# Specialization (the rule at the top of kvtier/ops/triton_attention.py): nothing that can change
# between steps, or between the precompile launch and a step, is specialized on -- the vocabulary
# size, the row stride, and where the three tensors start -- so one variant serves every batch of
# every model and a one-row launch at start-up compiles it. The price: the compiler cannot prove
# rows 16-byte aligned and loads 4 bytes at a time, small beside the K compares per element.
@triton.jit(do_not_specialize=["probs_ptr", "top_p_ptr", "out_ptr", "num_cols", "row_stride"])
def _top_p_threshold_kernel(probs_ptr, top_p_ptr, out_ptr, num_cols, row_stride,
                            BLOCK: tl.constexpr, K: tl.constexpr, NUM_PASSES: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = probs_ptr + row.to(tl.int64) * row_stride
    top_p = tl.load(top_p_ptr + row)
    # The answer (a bit pattern) lies in [lo, hi); lo = 0 (t = 0.0) keeps every token, which is
    # what rows without top-p (top_p >= 1) get without a pass.
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), ONE_BITS + 1, tl.int32)
    if top_p < 1.0:
        for _ in range(NUM_PASSES):
            lo, hi = _narrow(row_ptr, num_cols, top_p, lo, hi, BLOCK, K)
    tl.store(out_ptr + row, lo.to(tl.float32, bitcast=True))


@triton.jit
def _narrow(row_ptr, num_cols, top_p, lo, hi, BLOCK: tl.constexpr, K: tl.constexpr):
    """One pass over the row: [lo, hi) -> the one of its K + 1 pieces that holds the answer.
    lo passed (or is 0), hi failed (or is past 1.0); the mass at or above a candidate only shrinks
    as the candidate grows, so the candidates that pass are the first m."""
    step = (hi - lo + K) // (K + 1)  # ceil((hi - lo) / (K + 1)) >= 1
    # (K,) increasing. Those >= hi would fail anyway on valid input (hi failed, or lies past 1.0,
    # above which a row has no mass); masking them keeps t <= 1.0 whatever the input.
    candidates = lo + step * (tl.arange(0, K) + 1)
    passed = (_mass_at_or_above(row_ptr, num_cols, candidates, BLOCK, K) >= top_p) & (candidates < hi)
    lo = lo + step * tl.sum(passed.to(tl.int32), axis=0)  # the last candidate that passed
    return lo, tl.minimum(hi, lo + step)  # the first that failed


@triton.jit
def _mass_at_or_above(row_ptr, num_cols, candidates, BLOCK: tl.constexpr, K: tl.constexpr):
    """(K,) fp32: the row's total probability at or above each candidate (an int32 bit pattern;
    bit patterns of nonnegative floats order like their values). The (K, BLOCK) fp32 partial sums
    (one per candidate and lane) are summed along the block once, after the row: a sum per chunk
    would add a cross-lane reduction of K values to every chunk."""
    offs = tl.arange(0, BLOCK)
    partial = tl.zeros((K, BLOCK), tl.float32)
    for start in range(0, num_cols, BLOCK):
        cols = start + offs
        p = tl.load(row_ptr + cols, mask=cols < num_cols, other=0.0)  # (BLOCK,); the tail adds 0
        at_or_above = p.to(tl.int32, bitcast=True)[None, :] >= candidates[:, None]  # (K, BLOCK)
        partial += tl.where(at_or_above, p[None, :], 0.0)
    return tl.sum(partial, axis=1)


INTERPRETED = not isinstance(_top_p_threshold_kernel, triton.runtime.JITFunction)
