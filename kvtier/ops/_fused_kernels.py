"""Triton kernels behind kvtier.ops.fused (see there); imported only when a kernel runs.

Specialization follows the rule at the top of kvtier/ops/triton_attention.py: every int here is
model-constant (hidden sizes, head counts, row strides), the only per-step pointer is the rotary
kernel's positions (a view at any 8-byte offset of the runner's metadata buffer), so each kernel
has one variant per model (rmsnorm two: with and without a residual).
"""

import triton
import triton.language as tl

next_power_of_2 = triton.next_power_of_2


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps,
                    stride_x, stride_r, stride_o, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    # All arithmetic in fp32, rounded to the model dtype where HF rounds (after the add, after
    # normalizing, after the scale): one fp32 op on two bf16 values rounds like the bf16 op.
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RES:
        xf = xf + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = xf.to(dtype)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(dtype), mask=mask)


@triton.jit
def _rotate_heads(ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF)
    offs = h[:, None] * stride_h + d[None, :]
    mask = (h < num_heads)[:, None]
    x1 = tl.load(ptr + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos.to(dtype).to(tl.float32)[None, :]  # HF rounds cos/sin to the model dtype
    s = sin.to(dtype).to(tl.float32)[None, :]
    tl.store(ptr + offs, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(ptr + offs + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


@triton.jit(do_not_specialize=["pos_ptr"])
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    """One program per token: all heads of q and k rotated in place."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + d)
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + d)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, HEADS_PAD)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, HEADS_PAD)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    gate = gate.to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # HF rounds silu, then multiplies
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dtype), mask=mask)
