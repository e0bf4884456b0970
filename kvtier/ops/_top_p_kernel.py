"""The Triton kernels behind kvtier.ops.top_p.top_p_threshold (see there), imported on first launch.

A search is NUM_PASSES launches of `_top_p_pass_kernel`, grid (rows, chunks), then one of
`_top_p_finish_kernel`, grid (rows,). They pass the search on in two small buffers, each with a
slot per pass parity (pass j reads slot (j - 1) % 2 and writes slot j % 2, so no launch reads what
it writes):

    bounds    (rows, 2, 2) int32           [row, parity] = (lo, hi) the pass searched in
    partials  (rows, 2, chunks, K) fp32    [row, parity, chunk] = the chunk's mass at or above
                                           each of the pass's K candidates
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE_BITS = tl.constexpr(0x3F800000)  # the int32 bit pattern of 1.0, the largest probability


# Specialization (the rule at the top of kvtier/ops/triton_attention.py): nothing that can change
# between steps, or between the precompile launch and a step, is specialized on -- the vocabulary
# size, the row stride, the number of chunks (1 for a tiny vocabulary), the pass index (0, then 1)
# and where the tensors start -- so one variant of each kernel serves every batch of every model,
# and the one-row search at start-up compiles both. The price: the compiler cannot prove rows
# 16-byte aligned and loads 4 bytes at a time, small beside the K compares per element.
@triton.jit(do_not_specialize=["probs_ptr", "top_p_ptr", "bounds_ptr", "partials_ptr", "num_cols",
                               "row_stride", "num_chunks", "pass_index"])
def _top_p_pass_kernel(probs_ptr, top_p_ptr, bounds_ptr, partials_ptr, num_cols, row_stride,
                       num_chunks, pass_index, BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
                       K: tl.constexpr, CHUNKS_AT_ONCE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (row, chunk) of pass `pass_index`: the row's bounds for this pass, then the chunk's
    mass at or above each of their K candidates."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1.0:  # rows without top-p are never searched: the finish gives them t = 0
        row_state = row.to(tl.int64) * 2  # [row, parity 0] in units of one parity slot
        lo, hi = _bounds_of_pass(bounds_ptr, partials_ptr, row_state, top_p, num_chunks, pass_index,
                                 K, CHUNKS_AT_ONCE)
        this_slot = row_state + pass_index % 2
        if chunk == 0:  # one program of the row keeps the bounds for the next pass
            tl.store(bounds_ptr + this_slot * 2, lo)
            tl.store(bounds_ptr + this_slot * 2 + 1, hi)
        chunk_start = chunk * (BLOCK * BLOCKS_PER_CHUNK)
        row_ptr = probs_ptr + row.to(tl.int64) * row_stride
        masses = _chunk_mass_at_or_above(row_ptr, chunk_start, num_cols, lo, hi, BLOCK,
                                         BLOCKS_PER_CHUNK, K, NUM_STAGES)
        tl.store(partials_ptr + (this_slot * num_chunks + chunk) * K + tl.arange(0, K), masses)


@triton.jit(do_not_specialize=["top_p_ptr", "bounds_ptr", "partials_ptr", "out_ptr", "num_chunks",
                               "num_passes"])
def _top_p_finish_kernel(top_p_ptr, bounds_ptr, partials_ptr, out_ptr, num_chunks, num_passes,
                         K: tl.constexpr, CHUNKS_AT_ONCE: tl.constexpr):
    """Program row: the last pass's narrowing, which leaves [t, t + 1) as bit patterns."""
    row = tl.program_id(0)
    top_p = tl.load(top_p_ptr + row)
    t = tl.full((), 0, tl.int32)  # 0.0 keeps every token: rows without top-p
    if top_p < 1.0:
        t = _bounds_of_pass(bounds_ptr, partials_ptr, row.to(tl.int64) * 2, top_p, num_chunks,
                            num_passes, K, CHUNKS_AT_ONCE)[0]
    tl.store(out_ptr + row, t.to(tl.float32, bitcast=True))


@triton.jit
def _bounds_of_pass(bounds_ptr, partials_ptr, row_state, top_p, num_chunks, pass_index,
                    K: tl.constexpr, CHUNKS_AT_ONCE: tl.constexpr):
    """[lo, hi) (bit patterns) holding the answer, as pass `pass_index` starts: lo passed (or is
    0), hi failed (or is past 1.0). Pass 0 searches everything; a later pass narrows what the one
    before searched, by its candidates' masses. Every program of the row computes this from the
    same numbers in the same order, so all of them agree to the bit without talking."""
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), ONE_BITS + 1, tl.int32)
    if pass_index > 0:
        last_slot = row_state + (pass_index - 1) % 2
        lo = tl.load(bounds_ptr + last_slot * 2)
        hi = tl.load(bounds_ptr + last_slot * 2 + 1)
        masses = _row_mass(partials_ptr + last_slot * num_chunks * K, num_chunks, K, CHUNKS_AT_ONCE)
        lo, hi = _narrow(lo, hi, masses, top_p, K)
    return lo, hi


@triton.jit
def _candidates(lo, hi, K: tl.constexpr):
    """The width of the K + 1 pieces [lo, hi) is cut into, and the (K,) int32 cuts, increasing."""
    step = (hi - lo + K) // (K + 1)  # ceil((hi - lo) / (K + 1)) >= 1
    return step, lo + step * (tl.arange(0, K) + 1)


@triton.jit
def _narrow(lo, hi, masses, top_p, K: tl.constexpr):
    """[lo, hi) -> the one of its K + 1 pieces that holds the answer, from the row's mass at or
    above each candidate. That mass only shrinks as the candidate grows, so the candidates that
    pass are the first m."""
    step, candidates = _candidates(lo, hi, K)
    # Candidates >= hi would fail anyway on valid input (hi failed, or lies past 1.0, above which a
    # row has no mass); masking them keeps t <= 1.0 whatever the input.
    passed = (masses >= top_p) & (candidates < hi)
    lo = lo + step * tl.sum(passed.to(tl.int32), axis=0)  # the last candidate that passed
    return lo, tl.minimum(hi, lo + step)  # the first that failed


@triton.jit
def _row_mass(partials_ptr, num_chunks, K: tl.constexpr, CHUNKS_AT_ONCE: tl.constexpr):
    """(K,) fp32: the sum of a row's (num_chunks, K) partial masses over its chunks, in an order
    fixed by num_chunks alone (so by the vocabulary, never by the batch). Padding chunks add 0.0,
    which changes no sum."""
    chunks = tl.arange(0, CHUNKS_AT_ONCE)
    total = tl.zeros((K,), tl.float32)
    for first in range(0, num_chunks, CHUNKS_AT_ONCE):
        offsets = (first + chunks)[:, None] * K + tl.arange(0, K)[None, :]  # (CHUNKS_AT_ONCE, K)
        part = tl.load(partials_ptr + offsets, mask=(first + chunks < num_chunks)[:, None], other=0.0)
        total += tl.sum(part, axis=0)
    return total


@triton.jit
def _chunk_mass_at_or_above(row_ptr, chunk_start, num_cols, lo, hi, BLOCK: tl.constexpr,
                            BLOCKS_PER_CHUNK: tl.constexpr, K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """(K,) fp32: the chunk's total probability at or above each candidate of [lo, hi) (int32 bit
    patterns; those of nonnegative floats order like their values), as the mass at or above hi,
    which every candidate counts, plus the mass in [candidate, hi).

    Only probabilities in [first candidate, hi) need the (K, BLOCK) compare. From the third pass
    on, [lo, hi) lies within a factor 1.4 of t, and most blocks hold no such probability: they skip
    the compare, which would add only zeros, so skipping changes no sum. The (K, BLOCK) partial
    sums (one per candidate and lane) are summed along the block once, after the chunk: a sum per
    block would add a cross-lane reduction of K values to every block. NUM_STAGES - 1 blocks are
    in flight while one is summed (the compiler's software pipelining)."""
    step, candidates = _candidates(lo, hi, K)
    offs = tl.arange(0, BLOCK)
    at_or_above_hi = tl.zeros((BLOCK,), tl.float32)  # per lane
    in_range = tl.zeros((K, BLOCK), tl.float32)  # per candidate and lane: the mass in [candidate, hi)
    # the row's last chunk may hold fewer blocks; past them the loads would all be masked
    num_blocks = tl.minimum(tl.cdiv(num_cols - chunk_start, BLOCK), BLOCKS_PER_CHUNK)
    for b in tl.range(0, num_blocks, num_stages=NUM_STAGES):
        cols = chunk_start + b * BLOCK + offs
        p = tl.load(row_ptr + cols, mask=cols < num_cols, other=0.0)  # (BLOCK,); past the row: 0
        bits = p.to(tl.int32, bitcast=True)
        at_or_above_hi += tl.where(bits >= hi, p, 0.0)
        below_hi = bits < hi
        if tl.max(tl.where(below_hi, bits, -1), axis=0) >= lo + step:  # the first candidate
            at_or_above = bits[None, :] >= candidates[:, None]  # (K, BLOCK)
            in_range += tl.where(at_or_above, tl.where(below_hi, p, 0.0)[None, :], 0.0)
    return tl.sum(in_range, axis=1) + tl.sum(at_or_above_hi, axis=0)


INTERPRETED = not isinstance(_top_p_pass_kernel, triton.runtime.JITFunction)
