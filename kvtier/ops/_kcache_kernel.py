"""The Triton kernels behind kvtier.ops.kcache (see there), imported on first launch."""

from __future__ import annotations

import triton
import triton.language as tl

# The one copy of the fp32/tf32 and interpreted-bf16 dot workaround (see its comment there).
from kvtier.ops.triton_attention import _dot

next_power_of_2 = triton.next_power_of_2


# Specialization follows the rule at the top of kvtier/ops/triton_attention.py: what changes from
# one step to the next (the metadata tensors, max_seq_len and the strides that follow from it, the
# number of selected rows) is not specialized on; the cache's strides and head counts are.
@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "max_seq_len", "stride_qb", "stride_bt",
                               "stride_sb", "stride_sh"])
def _scores_kernel(q_ptr, k_cache_ptr, block_tables_ptr, seq_lens_ptr, scores_ptr, scale, max_seq_len,
                   stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_bt, stride_sb, stride_sh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
    """grid (B, Hkv, cdiv(max_seq_len, BLOCK_N)): scores[b, heads of kv_head, tile's positions],
    -inf past seq_len. K is read once for the GROUP query heads that share it."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    pos = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    seq_len = tl.load(seq_lens_ptr + b)
    valid = pos < seq_len
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # (G_PAD,)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # (G_PAD, D)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    k_rows = k_cache_ptr + kv_head * stride_kh + page[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ko
    k = tl.load(k_rows + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
    s = _dot(q, tl.trans(k), FP32_DOT) * scale  # (G_PAD, BLOCK_N) fp32
    s = tl.where(valid[None, :], s, float("-inf"))
    out = scores_ptr + b.to(tl.int64) * stride_sb + heads[:, None].to(tl.int64) * stride_sh + pos[None, :]
    tl.store(out, s, mask=(g < GROUP)[:, None] & (pos < max_seq_len)[None, :])


# The V store may be pinned host memory: the launcher passes it as is, and the loads below go over
# the link through UVA (see kvtier/ops/kv_transfer.py). A masked-off lane issues no request, so an
# unused slot (-1) costs no link traffic.
@triton.jit(do_not_specialize=["block_tables_ptr", "positions_ptr", "num_rows", "stride_bt", "stride_pb",
                               "stride_ph", "stride_ob", "stride_oh"])
def _gather_v_rows_kernel(v_store_ptr, block_tables_ptr, positions_ptr, out_ptr, num_rows,
                          stride_vb, stride_vo, stride_vh, stride_bt, stride_pb, stride_ph,
                          stride_ob, stride_oh, stride_on,
                          HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr):
    """grid (B, Hkv, cdiv(num_rows, BLOCK_R)): out[b, kv_head, r] = V of position positions[b, kv_head, r]
    (zeros where it is -1), read through sequence b's block table."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) slots of the position list
    in_range = r < num_rows
    pos = tl.load(positions_ptr + b * stride_pb + kv_head * stride_ph + r, mask=in_range, other=-1)
    valid = pos >= 0
    page = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    src = v_store_ptr + page[:, None] * stride_vb + (pos % BLOCK_SIZE)[:, None] * stride_vo + kv_head * stride_vh
    rows = tl.load(src + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_R, D)
    dst = out_ptr + b * stride_ob + kv_head * stride_oh + r[:, None].to(tl.int64) * stride_on + d[None, :]
    tl.store(dst, rows, mask=in_range[:, None])


INTERPRETED = not isinstance(_scores_kernel, triton.runtime.JITFunction)
