"""Triton kernels for the paged KV cache: the fused K/V write and paged attention (decode, prefill).

Same semantics as the pure-torch references in `kvtier.ops.attention` (`write_kv_ref`,
`paged_attention_ref`); the cache layout and `AttentionMetadata` are defined there.

    write_kv(k, v, k_cache, v_cache, slot_mapping)            one program per token
    paged_decode_attention(q, k_cache, v_cache, meta, scale)   one query per sequence, split-K
    paged_prefill_attention(q, k_cache, v_cache, meta, scale)  variable-length causal, any q_len
    paged_attention(...)                                       picks one of the two by meta

Every attention launcher takes `far_kv=(k_ring, v_ring)`, one layer's staging ring: with meta.far
(`FarPrefix`) each sequence's first far_blocks[b] blocks are read from ring slots ring_start[b] + j
instead of the cache. The kernels then have HAS_FAR=True; without a far prefix their far arguments
are None (constexpr) and HAS_FAR=False compiles exactly today's kernels.

Every launcher checks shapes, dtypes and devices on the host (ValueError) and never reads a device
tensor: no `.item()`, `.tolist()` or other sync, and every grid size comes from host ints
(`meta.max_seq_len`, `meta.max_query_len`, tensor shapes). Under CUDA-graph capture, pass the
graph's fixed caps in those two fields.

Keys are read through the block table position by position: key position p lives in page
`block_tables[b, p // block_size]` at offset `p % block_size`, so tiles need not align with pages
and any block size works. Scores, softmax statistics and the output accumulator are fp32.

To run on CPU tensors, set TRITON_INTERPRET=1 before anything imports triton: Triton reads it in
each `@triton.jit` decorator, including those of its own tl.sum/tl.max, at import time.

Compiled variants. A launch finds its compiled kernel by a key (Triton 3.6 and 3.9 alike:
`create_function_from_signature` in triton/runtime/jit.py, `native_specialize_impl` in libtriton)
made of the launch options (num_warps, num_stages), the value of every tl.constexpr, the type of
every other argument (pointer dtype; int -> i32/i64/u64 by range; float -> fp32; bool -> u1), and,
unless the argument is in `do_not_specialize`:

    int      == 1 (compiled in as a constant), else whether it is a multiple of 16
    tensor   whether data_ptr() is a multiple of 16 bytes

(`do_not_specialize_on_alignment` drops only the multiple-of-16 part; floats and bools are never
specialized.) A key new to the process compiles a variant: ~1-1.5 s on an H100, a stall for every
request in flight when it happens mid-serving. The rule here:

  - every int or pointer that can change from one engine step to the next is in
    `do_not_specialize`: lengths, counts, the window, the split count, the block-table row stride,
    and the metadata tensors (the model runner passes them as views at any 8-byte offset of one
    int64 buffer);
  - model-constant ints stay specialized: head counts, cache strides, and the token/head strides of
    q, k, v and out, which are multiples of head_dim (a power of two >= 16) in every layout;
  - every constexpr takes a bounded set of values for a given cache; `precompile` launches them all:
    write_kv 1, prefill 4 (BLOCK_M 16/32/64/128), decode 2 (one split or several) + its reduce 1,
    and given a staging ring the same prefill and decode variants again with HAS_FAR (a far
    prefix); the ring's strides and pointer alignment are model constants, specialized like the
    cache's, and its far_blocks / ring_start tensors are metadata (not specialized).
    The metadata's index dtype is part of the key too: the runner's int64 tensors and the CUDA
    graphs' int32 buffers give the decode kernel a second set (compiled at graph capture).

This module imports nothing from kvtier beyond the metadata type in `kvtier.ops.attention`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvtier.ops.attention import (
    CACHE_DTYPES,
    FP8_CACHE_DTYPES,
    AttentionMetadata,
    FarKV,
    FarPrefix,
    check_paged_cache,
    check_query,
)

# Tuning constants, NOT yet timed on a GPU: the usual Triton flash-attention settings for head_dim
# 128 on an H100 (sm_90). Compiled ahead of time for sm_90 with Triton 3.6 and 3.9, bf16, Llama-3-8B
# shape, they do not spill: decode ~107 registers x 4 warps and 38 KB shared memory (4 programs fit
# an SM, hence DECODE_PROGRAMS_PER_SM), prefill ~202 registers x 8 warps and 96 KB. Time them with
# benchmarks/kernels_gpu.py (--sweep-splits for the split heuristic) and record the GPU here.
# H200 (benchmarks/decode_sweep.py, 2026-12-01; block n {32,64,128} x warps {2,4,8} x stages {2,3,4}
# x programs per SM {2,4,8}, Llama-3-8B bf16): at 64 x 2048, 2 programs per SM (one split: no reduce
# kernel) read the KV at 4.28 TB/s against 3.83 at 4 (125.6 against 140.2 us a layer); at 256 x 512
# (one split either way) 4.10 TB/s, the rest within 2% of it. The other constants stay.
H100_NUM_SMS = 132  # used when there is no CUDA device to ask (interpreter on CPU)
DECODE_BLOCK_N = 64  # keys per tile in the decode kernel (also for short contexts: one variant)
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_PROGRAMS_PER_SM = 2  # split until batch x kv_heads x splits reaches this many per SM (H200 sweep)
DECODE_MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, partial store) dominates
DECODE_MAX_SPLITS = 64
PREFILL_BLOCK_M = 128  # queries per program (16, 32 or 64 when max_query_len is smaller)
PREFILL_BLOCK_N = 64  # keys per tile
PREFILL_NUM_STAGES = 2

_INDEX_DTYPES = (torch.int32, torch.int64)
_NO_WINDOW = 1 << 30  # a window longer than any context; keeps the kernels free of a window branch
_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_MAX_HEAD_DIM = 128  # 256 would need smaller prefill tiles to stay in registers


# ---------------------------------------------------------------------------------------------
# write_kv
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["slot_ptr"])
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                     HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     FP8_MAX: tl.constexpr, FP8_MANTISSA: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
                     FP8_BY_HAND: tl.constexpr):
    """One program per token: all KV heads of token t to slot slot_mapping[t] (skipped if < 0).
    FP8_MAX > 0 (an fp8 cache; _fp8_args): values saturate before the cast, as
    attention.to_cache_dtype."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < tl.where(slot >= 0, num_kv_heads, 0)  # (HEADS_PAD, 1); padding token: all off
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8_MAX > 0:
        k = _saturate_fp8(k.to(tl.float32), FP8_MAX, FP8_MANTISSA, FP8_MIN_EXP, FP8_BY_HAND)
        v = _saturate_fp8(v.to(tl.float32), FP8_MAX, FP8_MANTISSA, FP8_MIN_EXP, FP8_BY_HAND)
    k_dst = k_cache_ptr + page * stride_kcb + offset * stride_kco + h * stride_kch + d
    v_dst = v_cache_ptr + page * stride_vcb + offset * stride_vco + h * stride_vch + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _saturate_fp8(x, LIMIT: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 x clamped to +-LIMIT; BY_HAND: also rounded to the fp8 format's nearest value (ties to
    even), so the cast after it is exact. The GPU's cast rounds so itself (cvt.rn.satfinite);
    Triton 3.9's interpreter does not (it gave 1.0 for 1.97), hence BY_HAND there: the value's
    step is 2^(max(exponent, MIN_EXP) - MANTISSA), and x / step is rounded by fp32's own addition."""
    x = tl.clamp(x, -LIMIT, LIMIT)
    if BY_HAND:
        exponent = ((x.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        step_bits = (tl.maximum(exponent, MIN_EXP) - MANTISSA + 127).to(tl.uint32) << 23
        step = step_bits.to(tl.float32, bitcast=True)
        x = ((x / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: ties to even at step 1
    return x


def _fp8_args(dtype: torch.dtype) -> dict[str, float | int | bool]:
    """write_kv's FP8_* constexprs for a cache dtype: largest value, mantissa bits, smallest normal
    exponent, round by hand (the interpreter); FP8_MAX 0 when the cache is not fp8."""
    if dtype not in FP8_CACHE_DTYPES:
        return {"FP8_MAX": 0.0, "FP8_MANTISSA": 0, "FP8_MIN_EXP": 0, "FP8_BY_HAND": False}
    info = torch.finfo(dtype)
    return {"FP8_MAX": info.max, "FP8_MANTISSA": {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype],
            "FP8_MIN_EXP": int(math.log2(info.tiny)), "FP8_BY_HAND": _INTERPRETED}


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, Hkv, D) -> k_cache, v_cache (num_blocks, block_size, Hkv, D) at slot_mapping (T,).

    Slots < 0 (padding tokens) are skipped; values are cast to the cache dtype (an fp8 cache
    saturates, as attention.to_cache_dtype).
    """
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = _check_kv(k, v, k_cache)
    _check_1d(slot_mapping, "slot_mapping", num_tokens, _INDEX_DTYPES)
    _check_devices(k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        **_fp8_args(k_cache.dtype), num_warps=4)


# ---------------------------------------------------------------------------------------------
# decode: split-K ("flash decoding")
# ---------------------------------------------------------------------------------------------
#
#   context of sequence b, split into num_splits ranges of split_len = ceil(seq_len / num_splits)
#   keys rounded up to BLOCK_N: each sequence's own length, so splits stay even when the grid is
#   sized for a larger max_seq_len (CUDA graphs):
#
#     pos  0 ........ split_len ........ 2*split_len ...... seq_len       max_seq_len
#          |  split 0  |      split 1     |     split 2    |  (empty split 3)  |
#
#   grid (B, Hkv, num_splits): each program reads its split's K/V once for the G = Hq / Hkv query
#   heads of its KV head and stores unnormalized (max, sum, acc) per query head; the reduce kernel
#   (grid (B, Hq)) rescales them to the global max and divides. One split writes `out` directly.

@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # fp32 inputs would silently use tf32 on tensor cores: ask for full precision. The launchers
    # also set FP32_DOT for bf16 under the interpreter, whose bf16 tl.dot multiplies raw bit
    # patterns (triton-lang/triton#11584, Triton 3.9).
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_softmax(s, v, acc, m_i, l_i, FP32_DOT: tl.constexpr):
    """Fold one tile of log2-domain scores s (M, N) and values v (N, D) into (acc, max, sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
    return acc, m_new, l_i


# Far prefix (Pie): a sequence's first far_len positions are read from the layer's staging ring.
#
#     pos    0 ......... far_len = far_blocks[b] * BLOCK_SIZE .......... seq_len
#            | ring slot ring_start[b] + pos // BLOCK_SIZE | table[pos // BLOCK_SIZE] |
#
# A key tile may straddle far_len, so each key picks its source: both addresses are computed and
# tl.where selects one per key; the far keys' table entries are never loaded (they may be garbage).
# The select takes whole (N, D) address tiles: selecting (N, 1) row bases and adding d after lost
# the contiguity along D in Triton's axis analysis (sm_90, Triton 3.9: scalar 2-byte loads, no
# cp.async pipelining, 255 registers and spills); this way the far variants load like the others.

@triton.jit
def _far_source(far_blocks_ptr, ring_start_ptr, k_ring_ptr, v_ring_ptr, b, kv_head,
                stride_rkb, stride_rko, stride_rkh, stride_rvb, stride_rvo, stride_rvh,
                BLOCK_SIZE: tl.constexpr):
    """Sequence b's far prefix for one KV head: (far_len, first ring slot, K and V ring bases,
    ring block and offset strides), one tuple for _far_kv_ptrs."""
    far_len = tl.load(far_blocks_ptr + b) * BLOCK_SIZE
    ring_start = tl.load(ring_start_ptr + b)
    return (far_len, ring_start, k_ring_ptr + kv_head * stride_rkh, v_ring_ptr + kv_head * stride_rvh,
            stride_rkb, stride_rko, stride_rvb, stride_rvo)


@triton.jit
def _far_kv_ptrs(pos, valid, table, far, k_base, v_base, stride_kb, stride_ko, stride_vb, stride_vo, d,
                 BLOCK_SIZE: tl.constexpr):
    """K and V addresses (N, D) of key positions pos (N,): the ring below far_len, else the cache
    page in the block table (loaded only where valid and not far)."""
    far_len, ring_start, kr_base, vr_base, stride_rkb, stride_rko, stride_rvb, stride_rvo = far
    is_far = (pos < far_len)[:, None]
    block = pos // BLOCK_SIZE
    page = tl.load(table + block, mask=valid & (pos >= far_len), other=0).to(tl.int64)[:, None]
    slot = (ring_start + block).to(tl.int64)[:, None]
    offset = (pos % BLOCK_SIZE)[:, None]
    k_ptrs = tl.where(is_far, kr_base + slot * stride_rkb + offset * stride_rko + d[None, :],
                      k_base + page * stride_kb + offset * stride_ko + d[None, :])
    v_ptrs = tl.where(is_far, vr_base + slot * stride_rvb + offset * stride_rvo + d[None, :],
                      v_base + page * stride_vb + offset * stride_vo + d[None, :])
    return k_ptrs, v_ptrs


# Per-step ints and metadata pointers are not specialized on (see the top of this module).
@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "far_blocks_ptr", "ring_start_ptr",
                               "window", "num_splits", "stride_qb", "stride_ob", "stride_bt"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                         out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                         qk_scale, window, num_splits,
                         stride_qb, stride_qh, stride_ob, stride_oh,
                         stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
                         far_blocks_ptr, ring_start_ptr, k_ring_ptr, v_ring_ptr,
                         stride_rkb, stride_rko, stride_rkh, stride_rvb, stride_rvo, stride_rvh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT_OUT: tl.constexpr,
                         FP32_DOT: tl.constexpr, HAS_FAR: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # (G_PAD,) query heads of this KV head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # (G_PAD, D)
    # Each sequence splits its own length evenly: under a CUDA graph the grid is sized for
    # max_model_len, and a fixed split length would leave one split doing all the work.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.maximum(split * split_len, seq_len - window)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum((split + 1) * split_len, seq_len)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    if HAS_FAR:
        far = _far_source(far_blocks_ptr, ring_start_ptr, k_ring_ptr, v_ring_ptr, b, kv_head,
                          stride_rkb, stride_rko, stride_rkh, stride_rvb, stride_rvo, stride_rvh, BLOCK_SIZE)

    m_i = tl.full([GROUP_PAD], -1e30, tl.float32)  # finite: an empty split gives exp2(-inf) = 0
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        if HAS_FAR:
            k_ptrs, v_ptrs = _far_kv_ptrs(pos, valid, table, far, k_base, v_base, stride_kb, stride_ko,
                                          stride_vb, stride_vo, d, BLOCK_SIZE)
            k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offset = pos % BLOCK_SIZE
            k = tl.load(k_base + page[:, None] * stride_kb + offset[:, None] * stride_ko + d[None, :],
                        mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_base + page[:, None] * stride_vb + offset[:, None] * stride_vo + d[None, :],
                        mask=valid[:, None], other=0.0)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache converts on load (a no-op otherwise)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (G_PAD, BLOCK_N), log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax(s, v, acc, m_i, l_i, FP32_DOT)

    _store_split(acc, m_i, l_i, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, b, split, num_splits, g, heads, d,
                 stride_ob, stride_oh, GROUP, HEAD_DIM, DIRECT_OUT)


@triton.jit
def _store_split(acc, m_i, l_i, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, b, split, num_splits, g, heads, d,
                 stride_ob, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT_OUT: tl.constexpr):
    """One split's result: the normalized output when it is the only split, else its (max, sum, acc)."""
    row_mask = (g < GROUP)[:, None]
    if DIRECT_OUT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (padding): acc = 0 -> zeros
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        part = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split  # (G_PAD,)
        tl.store(part_m_ptr + part, m_i, mask=g < GROUP)
        tl.store(part_l_ptr + part, l_i, mask=g < GROUP)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * HEAD_DIM + d[None, :], acc, mask=row_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_ob"])
def _decode_reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, num_splits,
                          stride_ob, stride_oh, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """grid (B, Hq): combine the splits' (max, sum, acc) of one query head."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    row = (b * tl.num_programs(1) + head).to(tl.int64) * num_splits
    s = tl.arange(0, SPLITS_PAD)
    m = tl.load(part_m_ptr + row + s, mask=s < num_splits, other=float("-inf"))
    l_split = tl.load(part_l_ptr + row + s, mask=s < num_splits, other=0.0)
    m_max = tl.max(m, 0)
    l_sum = tl.sum(l_split * tl.exp2(m - m_max), 0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for i in range(0, num_splits):
        weight = tl.exp2(tl.load(part_m_ptr + row + i) - m_max)
        acc += tl.load(part_acc_ptr + (row + i) * HEAD_DIM + d) * weight
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)  # seq_len 0 (padding): acc = 0 -> zeros
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many context splits the decode kernel uses (host ints only, so CUDA-graph safe).

    Enough programs (batch x kv_heads x splits) for DECODE_PROGRAMS_PER_SM per SM, so that a few
    long sequences still fill the GPU, but no split shorter than DECODE_MIN_TOKENS_PER_SPLIT and
    at most DECODE_MAX_SPLITS. E.g. on 132 SMs with 8 KV heads: 64 x 2048 -> 1 split,
    16 x 2048 -> 3, 8 x 512 -> 4, 1 x 32768 -> 33.
    """
    wanted = -(-DECODE_PROGRAMS_PER_SM * num_sms // max(num_seqs * num_kv_heads, 1))
    longest = -(-max_seq_len // DECODE_MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, longest, DECODE_MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                           num_splits: int | None = None, *, far_kv: FarKV | None = None) -> torch.Tensor:
    """q (B, Hq, D), one query per sequence at position seq_len - 1 -> (B, Hq, D) in q's dtype.

    The context is split into `num_splits` ranges (default: `num_decode_splits`) sized from
    meta.max_seq_len, which must bound every seq_len. Sequences with seq_len 0 give zeros.
    With meta.far and far_kv, far blocks are read from the ring (see the top of this module).
    """
    num_seqs, num_heads, head_dim, num_kv_heads = _check_attention(q, k_cache, v_cache, meta,
                                                                   scale, sliding_window, far_kv)
    if q.shape[0] != num_seqs:
        raise ValueError(f"decode needs one query per sequence: q has {q.shape[0]} rows, "
                         f"meta has {num_seqs} sequences")
    if meta.max_query_len != 1:
        raise ValueError(f"decode needs meta.max_query_len == 1, got {meta.max_query_len}")
    if num_splits is None:
        num_splits = num_decode_splits(num_seqs, num_kv_heads, meta.max_seq_len, _num_sms(q.device))
    elif not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    num_splits = _effective_splits(meta.max_seq_len, num_splits)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    _launch_decode(q, k_cache, v_cache, meta, scale, sliding_window, out, num_splits, far_kv)
    return out


def _effective_splits(max_seq_len: int, num_splits: int) -> int:
    """Splits left once each is rounded up to whole DECODE_BLOCK_N tiles (rounding may leave fewer).

    The tile stays DECODE_BLOCK_N even for contexts shorter than it: masked keys cost a few idle
    lanes, while a tile shrunk to the context would be a compiled variant per size."""
    per_split = -(-max(max_seq_len, 1) // num_splits)
    split_len = -(-per_split // DECODE_BLOCK_N) * DECODE_BLOCK_N
    return max(1, -(-max_seq_len // split_len))


def _launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, sliding_window: int | None,
                   out: torch.Tensor, num_splits: int, far_kv: FarKV | None) -> None:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    direct = num_splits == 1
    f32 = dict(dtype=torch.float32, device=q.device)
    part_m = out if direct else torch.empty(num_seqs, num_heads, num_splits, **f32)
    part_l = out if direct else torch.empty(num_seqs, num_heads, num_splits, **f32)
    part_acc = out if direct else torch.empty(num_seqs, num_heads, num_splits, head_dim, **f32)
    far_args = _far_args(meta, far_kv)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, part_m, part_l, part_acc,
        scale * _LOG2E, _window(sliding_window), num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], meta.block_tables.stride(0), *far_args,
        GROUP=group, GROUP_PAD=max(_MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=DECODE_BLOCK_N, DIRECT_OUT=direct,
        FP32_DOT=_fp32_dot(q.dtype), HAS_FAR=far_args[0] is not None,
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES)
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_m, part_l, part_acc, out, num_splits, out.stride(0), out.stride(1),
            SPLITS_PAD=_splits_pad(num_splits), HEAD_DIM=head_dim, num_warps=4)


def _splits_pad(num_splits: int) -> int:
    """One value for every split count the heuristic picks (<= DECODE_MAX_SPLITS): one variant."""
    return triton.next_power_of_2(max(num_splits, DECODE_MAX_SPLITS))


# ---------------------------------------------------------------------------------------------
# prefill: variable-length causal attention over cached prefix + new tokens
# ---------------------------------------------------------------------------------------------
#
#   sequence b: context = seq_len - q_len cached tokens, then q_len new ones (already in the cache)
#
#     keys   0 ............. context ............................ seq_len
#     tile of BLOCK_M queries at positions [first_q, last_q]:
#            [ window-masked | no mask: k <= first_q and inside every row's window | causal ]
#            lo            f_lo                                                  f_hi      hi
#
#   grid (cdiv(max_query_len, BLOCK_M), B, Hq); programs past a sequence's q_len exit at once.

@triton.jit
def _prefill_tiles(acc, m_i, l_i, q, k_base, v_base, table, far, q_pos, lo, hi, seq_len, window,
                   qk_scale, stride_kb, stride_ko, stride_vb, stride_vo, d,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   FP32_DOT: tl.constexpr, HAS_FAR: tl.constexpr):
    """Online softmax over key tiles [lo, hi); MASKED applies causal, window and length masks;
    `far` from _far_source when HAS_FAR."""
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < seq_len  # all true in unmasked tiles
        if HAS_FAR:
            k_ptrs, v_ptrs = _far_kv_ptrs(pos, valid, table, far, k_base, v_base, stride_kb, stride_ko,
                                          stride_vb, stride_vo, d, BLOCK_SIZE)
        else:
            if MASKED:
                page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            else:
                page = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
            offset = pos % BLOCK_SIZE
            k_ptrs = k_base + page[:, None] * stride_kb + offset[:, None] * stride_ko + d[None, :]
            v_ptrs = v_base + page[:, None] * stride_vb + offset[:, None] * stride_vo + d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache converts on load (a no-op otherwise)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            keep = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(keep & valid[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax(s, v, acc, m_i, l_i, FP32_DOT)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "far_blocks_ptr",
                               "ring_start_ptr", "window", "stride_qt", "stride_ot", "stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_loc_ptr, out_ptr, qk_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
                    far_blocks_ptr, ring_start_ptr, k_ring_ptr, v_ring_ptr,
                    stride_rkb, stride_rko, stride_rkh, stride_rvb, stride_rvo, stride_rvh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
                    HAS_FAR: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = context + rows  # (BLOCK_M,) positions of this tile's queries
    d = tl.arange(0, HEAD_DIM)
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=(rows < q_len)[:, None], other=0.0)

    first_q = context + tile * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, seq_len) - 1
    hi = last_q + 1
    lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
    f_hi = (first_q + 1) // BLOCK_N * BLOCK_N
    f_lo = tl.minimum(tl.maximum(lo, (tl.maximum(last_q - window + 1, 0) + BLOCK_N - 1)
                                 // BLOCK_N * BLOCK_N), f_hi)
    kv_head = head // GROUP
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    if HAS_FAR:
        far = _far_source(far_blocks_ptr, ring_start_ptr, k_ring_ptr, v_ring_ptr, b, kv_head,
                          stride_rkb, stride_rko, stride_rkh, stride_rvb, stride_rvo, stride_rvh, BLOCK_SIZE)
    else:
        far = None

    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _prefill_tiles(acc, m_i, l_i, q, k_base, v_base, table, far, q_pos, lo, f_lo,
                                   seq_len, window, qk_scale, stride_kb, stride_ko, stride_vb,
                                   stride_vo, d, BLOCK_SIZE, BLOCK_N, True, FP32_DOT, HAS_FAR)
    acc, m_i, l_i = _prefill_tiles(acc, m_i, l_i, q, k_base, v_base, table, far, q_pos, f_lo, f_hi,
                                   seq_len, window, qk_scale, stride_kb, stride_ko, stride_vb,
                                   stride_vo, d, BLOCK_SIZE, BLOCK_N, False, FP32_DOT, HAS_FAR)
    acc, m_i, l_i = _prefill_tiles(acc, m_i, l_i, q, k_base, v_base, table, far, q_pos, f_hi, hi,
                                   seq_len, window, qk_scale, stride_kb, stride_ko, stride_vb,
                                   stride_vo, d, BLOCK_SIZE, BLOCK_N, True, FP32_DOT, HAS_FAR)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # only rows past q_len can have l = 0
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                            *, far_kv: FarKV | None = None) -> torch.Tensor:
    """q (T, Hq, D), sequences flattened by meta.query_start_loc -> (T, Hq, D) in q's dtype.

    Query j of a sequence with q_len new tokens sits at position seq_len - q_len + j and attends
    causally to keys 0..that position, read from the cache (this step's K/V must be written), or
    from far_kv's ring for the far prefix of meta.far.
    meta.max_query_len must bound every q_len. Rows of q outside every sequence are left unset.
    """
    num_seqs, num_heads, head_dim, num_kv_heads = _check_attention(q, k_cache, v_cache, meta,
                                                                   scale, sliding_window, far_kv)
    if meta.query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"meta.query_start_loc must have {num_seqs + 1} entries, "
                         f"got {meta.query_start_loc.shape[0]}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or q.shape[0] == 0 or meta.max_query_len < 1:
        return out
    block_m = _prefill_block_m(meta.max_query_len)
    grid = (triton.cdiv(meta.max_query_len, block_m), num_seqs, num_heads)
    far_args = _far_args(meta, far_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        scale * _LOG2E, _window(sliding_window),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], meta.block_tables.stride(0), *far_args,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=PREFILL_BLOCK_N, FP32_DOT=_fp32_dot(q.dtype),
        HAS_FAR=far_args[0] is not None, num_warps=8 if block_m >= 128 else 4,
        num_stages=PREFILL_NUM_STAGES)
    return out


def _prefill_block_m(max_query_len: int) -> int:
    """Queries per program: a power of two in [16, PREFILL_BLOCK_M], so at most 4 variants."""
    return min(PREFILL_BLOCK_M, max(_MIN_DOT, triton.next_power_of_2(max_query_len)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    *, far_kv: FarKV | None = None) -> torch.Tensor:
    """q (T, Hq, D) -> (T, Hq, D); decode kernel when every sequence has one query (or when the
    step comes with a per-token decode view), else prefill. far_kv: see the top of this module."""
    if meta.is_decode_only:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, far_kv=far_kv)
    if meta.per_token is not None:
        if far_kv is not None and meta.far is not None and meta.per_token.far is None:
            # the per-token rows would read the far blocks' (garbage) table entries
            raise ValueError("meta.far is set but meta.per_token.far is not (see per_token_far)")
        return paged_decode_attention(q, k_cache, v_cache, meta.per_token, scale, sliding_window,
                                      far_kv=far_kv)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window, far_kv=far_kv)


# ---------------------------------------------------------------------------------------------
# start-up: compile every variant before serving
# ---------------------------------------------------------------------------------------------

def precompile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
               index_dtype: torch.dtype = torch.int64, far_kv: FarKV | None = None,
               compute_dtype: torch.dtype | None = None) -> None:
    """Compile every variant that steps over this cache can launch (see the top of this module).

    k_cache, v_cache: one layer's (num_blocks, block_size, Hkv, D); every layer has the same key.
    index_dtype: that of the step metadata (block tables, seq_lens, query_start_loc, and a far
    prefix's tensors); the model runner's are int64. far_kv: a layer's staging ring as the layers
    will pass it (same views: its strides and alignment are in the key): also compiles the far
    (HAS_FAR) variants, which a step with meta.far launches. Launches tiny problems that read
    block 0 and write nothing (slot -1); q and out are contiguous, which keys like the model's qkv
    views (strides are multiples of D). compute_dtype: the model's (q, k, v), when the cache's is
    another (fp8). A no-op under the interpreter, which compiles nothing.
    """
    if not _INTERPRETED:
        dtype = compute_dtype or k_cache.dtype
        _launch_each_variant(k_cache, v_cache, num_heads, index_dtype, None, dtype)
        if far_kv is not None:
            _launch_each_variant(k_cache, v_cache, num_heads, index_dtype, far_kv, dtype)


def _launch_each_variant(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                         index_dtype: torch.dtype, far_kv: FarKV | None = None,
                         dtype: torch.dtype | None = None) -> None:
    """The attention variants without (far_kv None, and write_kv) or with a far prefix; q, k and v in
    dtype (default: the cache's)."""
    _check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    like_cache = dict(dtype=dtype or k_cache.dtype, device=k_cache.device)
    if far_kv is None:
        kv = torch.zeros(1, num_kv_heads, head_dim, **like_cache)
        write_kv(kv, kv, k_cache, v_cache, torch.full((1,), -1, dtype=torch.int64, device=k_cache.device))
    far = far_kv is not None
    for block_m in sorted({_prefill_block_m(1 << i) for i in range(PREFILL_BLOCK_M.bit_length())}):
        q = torch.zeros(block_m, num_heads, head_dim, **like_cache)
        meta = _dummy_meta(block_m, block_m, block_size, index_dtype, k_cache.device, far)
        paged_prefill_attention(q, k_cache, v_cache, meta, 1.0, far_kv=far_kv)
    for num_splits in (1, 2):  # one split writes out directly; more go through the reduce kernel
        q = torch.zeros(1, num_heads, head_dim, **like_cache)
        meta = _dummy_meta(1, num_splits * DECODE_BLOCK_N, block_size, index_dtype, k_cache.device, far)
        paged_decode_attention(q, k_cache, v_cache, meta, 1.0, num_splits=num_splits, far_kv=far_kv)


def _dummy_meta(query_len: int, seq_len: int, block_size: int, index_dtype: torch.dtype,
                device: torch.device, far: bool = False) -> AttentionMetadata:
    """One sequence of seq_len keys, all in block 0, whose last query_len tokens are queries;
    with `far`, a far prefix of no blocks (the far variant, reading nothing from the ring)."""
    index = dict(dtype=index_dtype, device=device)
    return AttentionMetadata(
        slot_mapping=torch.full((query_len,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(1, -(-seq_len // block_size), **index),
        seq_lens=torch.tensor([seq_len], **index),
        query_start_loc=torch.tensor([0, query_len], **index),
        max_query_len=query_len, max_seq_len=seq_len,
        seq_lens_list=[seq_len], query_lens_list=[query_len],
        far=FarPrefix(torch.zeros(1, **index), torch.zeros(1, **index), [0], [0]) if far else None)


# ---------------------------------------------------------------------------------------------
# host-side checks (no device reads)
# ---------------------------------------------------------------------------------------------

def _far_args(meta: AttentionMetadata, far_kv: FarKV | None) -> tuple:
    """The kernels' far arguments, far_blocks_ptr .. stride_rvh: all None without a far prefix
    (None is a constexpr to Triton, so the HAS_FAR=False variant is today's kernel)."""
    if meta.far is None or far_kv is None:
        return (None,) * 10
    k_ring, v_ring = far_kv
    return (meta.far.far_blocks, meta.far.ring_start, k_ring, v_ring, *k_ring.stride()[:3],
            *v_ring.stride()[:3])


def _fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRETED and dtype == torch.bfloat16)


def _window(sliding_window: int | None) -> int:
    return _NO_WINDOW if sliding_window is None else sliding_window


@functools.cache
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_NUM_SMS
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check_paged_cache(k_cache, v_cache)
    head_dim = k_cache.shape[3]
    if head_dim < _MIN_DOT or head_dim > _MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [{_MIN_DOT}, {_MAX_HEAD_DIM}], "
                         f"got {head_dim}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (head_dim) dimension")


def _check_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (T, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"k (T, Hkv, D) = {tuple(k.shape)} does not match the cache's "
                         f"(Hkv, D) = {tuple(k_cache.shape[2:])}")
    if k.dtype not in CACHE_DTYPES or v.dtype not in CACHE_DTYPES:
        raise ValueError(f"k and v must be one of {CACHE_DTYPES}, got {k.dtype} and {v.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v need a contiguous last (head_dim) dimension")
    return k.shape[0], k.shape[1], k.shape[2]


def _check_1d(x: torch.Tensor, name: str, length: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must be ({length},), got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {x.dtype}")


def _check_devices(first: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device}, expected {first.device} like the inputs")
    if first.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"Triton kernels need CUDA tensors, got {first.device} "
                         "(set TRITON_INTERPRET=1 before importing kvtier.ops.triton_attention "
                         "to run them on the CPU)")


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, sliding_window: int | None,
                     far_kv: FarKV | None = None) -> tuple[int, int, int, int]:
    """-> (num_seqs, num_heads, head_dim, num_kv_heads) after checking everything on the host."""
    _check_cache(k_cache, v_cache)
    check_query(q, k_cache)
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(2) != 1:
        raise ValueError("q needs a contiguous last (head_dim) dimension")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number, got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    num_seqs = _check_meta(meta, block_size)
    _check_devices(q, k_cache=k_cache, v_cache=v_cache, block_tables=meta.block_tables,
                   seq_lens=meta.seq_lens, query_start_loc=meta.query_start_loc)
    if meta.far is not None and far_kv is not None:
        _check_far(q, k_cache, meta.far, far_kv, num_seqs)
    return num_seqs, num_heads, head_dim, num_kv_heads


def _check_far(q: torch.Tensor, k_cache: torch.Tensor, far: FarPrefix, far_kv: FarKV, num_seqs: int) -> None:
    _check_1d(far.far_blocks, "meta.far.far_blocks", num_seqs, _INDEX_DTYPES)
    _check_1d(far.ring_start, "meta.far.ring_start", num_seqs, _INDEX_DTYPES)
    if not isinstance(far_kv, tuple) or len(far_kv) != 2:
        raise ValueError("far_kv must be a (k_ring, v_ring) tuple")
    k_ring, v_ring = far_kv
    for name, ring in (("k_ring", k_ring), ("v_ring", v_ring)):
        if ring.dim() != 4 or tuple(ring.shape[1:]) != tuple(k_cache.shape[1:]):
            raise ValueError(f"{name} must be (ring_slots, {', '.join(map(str, k_cache.shape[1:]))}) "
                             f"like the cache's blocks, got {tuple(ring.shape)}")
        if ring.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {ring.dtype} must equal the cache dtype {k_cache.dtype}")
        if ring.stride(3) != 1:
            raise ValueError(f"{name} needs a contiguous last (head_dim) dimension")
    _check_devices(q, far_blocks=far.far_blocks, ring_start=far.ring_start, k_ring=k_ring, v_ring=v_ring)


def _check_meta(meta: AttentionMetadata, block_size: int) -> int:
    if meta.seq_lens.dim() != 1 or meta.seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"meta.seq_lens must be (B,) int32/int64, got "
                         f"{tuple(meta.seq_lens.shape)} {meta.seq_lens.dtype}")
    num_seqs = meta.seq_lens.shape[0]
    tables = meta.block_tables
    if tables.dim() != 2 or tables.shape[0] != num_seqs or tables.dtype not in _INDEX_DTYPES:
        raise ValueError(f"meta.block_tables must be ({num_seqs}, max_blocks) int32/int64, "
                         f"got {tuple(tables.shape)} {tables.dtype}")
    if tables.stride(1) != 1:
        raise ValueError("meta.block_tables needs contiguous rows")
    if meta.query_start_loc.dtype not in _INDEX_DTYPES or meta.query_start_loc.dim() != 1:
        raise ValueError(f"meta.query_start_loc must be 1-D int32/int64, got "
                         f"{tuple(meta.query_start_loc.shape)} {meta.query_start_loc.dtype}")
    if tables.shape[1] * block_size < meta.max_seq_len:
        raise ValueError(f"meta.block_tables has {tables.shape[1]} blocks of {block_size} tokens, "
                         f"fewer than meta.max_seq_len = {meta.max_seq_len}")
    return num_seqs


# True when TRITON_INTERPRET=1 was set at import: kernels then run on CPU tensors, and bf16 dots
# go through fp32 (see _dot).
_INTERPRETED = not isinstance(_write_kv_kernel, triton.runtime.JITFunction)
