"""The Triton kernel behind kvtier.ops.kv_transfer.copy_blocks (see there), imported on first use."""

from __future__ import annotations

import triton
import triton.language as tl

next_power_of_2 = triton.next_power_of_2

# Per-call ints and the id tensors (views at any offset) are not specialized on: see the top of
# kvtier/ops/triton_attention.py. The row layout (num_layers, num_kv, row_elems, strides) is fixed
# per cache, so one variant serves each direction's views.
@triton.jit(do_not_specialize=["src_ids_ptr", "dst_ids_ptr", "num_rows"])
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
                        num_rows, num_layers, num_kv, row_elems,
                        s_block, s_layer, s_kv, d_block, d_layer, d_kv,
                        CHUNK: tl.constexpr, EVEN: tl.constexpr):
    rows_per_pair = num_layers * num_kv
    offs = tl.arange(0, CHUNK)
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        pair = row // rows_per_pair
        layer = ((row // num_kv) % num_layers).to(tl.int64)
        kv = (row % num_kv).to(tl.int64)
        src_id = tl.load(src_ids_ptr + pair).to(tl.int64)
        dst_id = tl.load(dst_ids_ptr + pair).to(tl.int64)
        src_row = src_ptr + (src_id * s_block + layer * s_layer + kv * s_kv)
        dst_row = dst_ptr + (dst_id * d_block + layer * d_layer + kv * d_kv)
        for start in range(0, row_elems, CHUNK):
            if EVEN:
                tl.store(dst_row + start + offs, tl.load(src_row + start + offs))
            else:
                mask = start + offs < row_elems
                tl.store(dst_row + start + offs, tl.load(src_row + start + offs, mask=mask),
                         mask=mask)

INTERPRETED = not isinstance(_copy_blocks_kernel, triton.runtime.JITFunction)
