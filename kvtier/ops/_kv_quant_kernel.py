"""The Triton kernels behind kvtier.ops.kv_quant.quantize_blocks / dequantize_blocks (see there for
the format), imported on first launch.

One program per (block, layer, KV head) and part (grid axis 1: 0 = K, 1 = V): a (block_size,
head_dim) tile, quantized or dequantized in registers.

    tile = program_id(0) = (i * num_layers + layer) * num_heads + head      i: position in block_ids
    rows / out     ids[i] * s_block + layer * s_layer + part * s_part + t * s_token + head * s_head + c
    payload        (n, L, 2, bs, H, W) contiguous, W = head_dim * bits / 8
    K params       (n, L, H, bs / K_GROUP, D) contiguous: tile * (bs / K_GROUP * D) + g * D + c
    V params       (n, L, H, bs, D / GROUP) contiguous:   tile * (bs * D / GROUP) + t * D / GROUP + g

The arithmetic is the reference's, op for op in fp32 (div_rn for the two divisions; launches pass
enable_fp_fusion=False so that a multiply and an add are not fused into one FMA), which makes
codes, scales and dequantized values bit-identical to kv_quant's torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtier.ops.triton_attention import _saturate_fp8


# Specialization (the rule at the top of kvtier/ops/triton_attention.py): the block ids change with
# every call and may be a view at any offset, so they are not specialized on; how many blocks a
# call moves is the grid, not an argument. Everything else is fixed per model and cache: layer and
# head counts, the strides of the rows (a slice or a permuted view of one cache), and the payload
# and params, which the launcher allocates (aligned) or the caller keeps in a pool.
@triton.jit(do_not_specialize=["ids_ptr"])
def _quantize_kernel(x_ptr, ids_ptr, q_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, num_layers, num_heads,
                     s_block, s_layer, s_part, s_token, s_head,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
                     GROUP: tl.constexpr, K_GROUP: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    layer = (tile // num_heads) % num_layers
    head = tile % num_heads
    src = tl.load(ids_ptr + tile // (num_layers * num_heads)).to(tl.int64)
    tokens = tl.arange(0, BLOCK_SIZE)[:, None]
    chans = tl.arange(0, HEAD_DIM)[None, :]
    x_tile = x_ptr + src * s_block + layer * s_layer + part * s_part + head * s_head
    x = tl.load(x_tile + tokens * s_token + chans).to(tl.float32)  # (bs, D)
    codes_ptr = q_ptr + _payload_offset(tile, part, num_heads, BLOCK_SIZE, HEAD_DIM * BITS // 8)
    qmax = (1 << BITS) - 1
    if part == 0:
        codes = _k_codes(x, ks_ptr, kz_ptr, tile, BLOCK_SIZE, HEAD_DIM, K_GROUP, qmax)
        _store_codes(codes_ptr, codes, num_heads, BLOCK_SIZE, HEAD_DIM, BITS)
    else:
        codes = _v_codes(x, vs_ptr, vz_ptr, tile, BLOCK_SIZE, HEAD_DIM, GROUP, qmax)
        _store_codes(codes_ptr, codes, num_heads, BLOCK_SIZE, HEAD_DIM, BITS)


@triton.jit(do_not_specialize=["ids_ptr"])
def _dequantize_kernel(q_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, ids_ptr, out_ptr, num_layers, num_heads,
                       s_block, s_layer, s_part, s_token, s_head,
                       BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, K_GROUP: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    layer = (tile // num_heads) % num_layers
    head = tile % num_heads
    dst = tl.load(ids_ptr + tile // (num_layers * num_heads)).to(tl.int64)
    codes_ptr = q_ptr + _payload_offset(tile, part, num_heads, BLOCK_SIZE, HEAD_DIM * BITS // 8)
    codes = _load_codes(codes_ptr, num_heads, BLOCK_SIZE, HEAD_DIM, BITS).to(tl.float32)  # (bs, D)
    tokens = tl.arange(0, BLOCK_SIZE)[:, None]
    chans = tl.arange(0, HEAD_DIM)[None, :]
    out_tile = out_ptr + dst * s_block + layer * s_layer + part * s_part + head * s_head
    if part == 0:
        x = _k_values(codes, ks_ptr, kz_ptr, tile, BLOCK_SIZE, HEAD_DIM, K_GROUP)
        tl.store(out_tile + tokens * s_token + chans, _round_to(x, out_ptr.dtype.element_ty))
    else:
        x = _v_values(codes, vs_ptr, vz_ptr, tile, BLOCK_SIZE, HEAD_DIM, GROUP)
        tl.store(out_tile + tokens * s_token + chans, _round_to(x, out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------- helpers

@triton.jit
def _payload_offset(tile, part, num_heads, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr):
    """Where token 0 of this tile's codes starts in the (n, L, 2, bs, H, W) payload."""
    block_layer = tile // num_heads  # i * num_layers + layer
    head = tile % num_heads
    return ((block_layer * 2 + part) * BLOCK_SIZE * num_heads + head) * WIDTH


@triton.jit
def _params(lo, hi, qmax):
    """Group min / max (fp32) -> (scale, zero) as stored: fp16, returned widened to fp32."""
    zero = lo.to(tl.float16).to(tl.float32)
    scale = tl.math.div_rn(hi - zero, qmax * 1.0).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, qmax):
    """round((x - zero) / scale) within [0, qmax] as int32; a constant group (scale 0) gives 0, its
    reciprocal taken of 1 rather than 0 (as the reference does; no inf for numpy to warn about)."""
    inv = tl.where(scale > 0, tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    q = tl.floor((x - zero) * inv + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), qmax * 1.0).to(tl.int32)


@triton.jit
def _k_codes(x, scales_ptr, zeros_ptr, tile, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
             K_GROUP: tl.constexpr, qmax):
    """K, per channel: x (bs, D) fp32 -> codes (bs, D); one (scale, zero) per K_GROUP tokens of a channel."""
    NUM_GROUPS: tl.constexpr = BLOCK_SIZE // K_GROUP
    g = tl.reshape(x, (NUM_GROUPS, K_GROUP, HEAD_DIM))
    scale, zero = _params(tl.min(g, axis=1), tl.max(g, axis=1), qmax)  # (NUM_GROUPS, D)
    offs = tile * (NUM_GROUPS * HEAD_DIM) + tl.arange(0, NUM_GROUPS)[:, None] * HEAD_DIM \
        + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(scales_ptr + offs, scale.to(tl.float16))
    tl.store(zeros_ptr + offs, zero.to(tl.float16))
    codes = _codes(g, scale[:, None, :], zero[:, None, :], qmax)
    return tl.reshape(codes, (BLOCK_SIZE, HEAD_DIM))


@triton.jit
def _v_codes(x, scales_ptr, zeros_ptr, tile, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
             GROUP: tl.constexpr, qmax):
    """V, per token: x (bs, D) fp32 -> codes (bs, D); one (scale, zero) per GROUP channels of a token."""
    NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    g = tl.reshape(x, (BLOCK_SIZE, NUM_GROUPS, GROUP))
    scale, zero = _params(tl.min(g, axis=2), tl.max(g, axis=2), qmax)  # (bs, NUM_GROUPS)
    offs = tile * (BLOCK_SIZE * NUM_GROUPS) + tl.arange(0, BLOCK_SIZE)[:, None] * NUM_GROUPS \
        + tl.arange(0, NUM_GROUPS)[None, :]
    tl.store(scales_ptr + offs, scale.to(tl.float16))
    tl.store(zeros_ptr + offs, zero.to(tl.float16))
    codes = _codes(g, scale[:, :, None], zero[:, :, None], qmax)
    return tl.reshape(codes, (BLOCK_SIZE, HEAD_DIM))


@triton.jit
def _k_values(codes, scales_ptr, zeros_ptr, tile, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
              K_GROUP: tl.constexpr):
    """codes (bs, D) fp32 -> K values (bs, D) fp32: code * scale + zero, params per channel group."""
    NUM_GROUPS: tl.constexpr = BLOCK_SIZE // K_GROUP
    offs = tile * (NUM_GROUPS * HEAD_DIM) + tl.arange(0, NUM_GROUPS)[:, None] * HEAD_DIM \
        + tl.arange(0, HEAD_DIM)[None, :]
    scale = tl.load(scales_ptr + offs).to(tl.float32)[:, None, :]  # (NUM_GROUPS, 1, D)
    zero = tl.load(zeros_ptr + offs).to(tl.float32)[:, None, :]
    x = tl.reshape(codes, (NUM_GROUPS, K_GROUP, HEAD_DIM)) * scale + zero
    return tl.reshape(x, (BLOCK_SIZE, HEAD_DIM))


@triton.jit
def _v_values(codes, scales_ptr, zeros_ptr, tile, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
              GROUP: tl.constexpr):
    """codes (bs, D) fp32 -> V values (bs, D) fp32: code * scale + zero, params per token group."""
    NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    offs = tile * (BLOCK_SIZE * NUM_GROUPS) + tl.arange(0, BLOCK_SIZE)[:, None] * NUM_GROUPS \
        + tl.arange(0, NUM_GROUPS)[None, :]
    scale = tl.load(scales_ptr + offs).to(tl.float32)[:, :, None]  # (bs, NUM_GROUPS, 1)
    zero = tl.load(zeros_ptr + offs).to(tl.float32)[:, :, None]
    x = tl.reshape(codes, (BLOCK_SIZE, NUM_GROUPS, GROUP)) * scale + zero
    return tl.reshape(x, (BLOCK_SIZE, HEAD_DIM))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, to nearest even. bf16 is rounded by hand on the bits: the same result as the
    GPU's cvt.rn.bf16.f32 for finite values, where Triton 3.9's interpreter truncates, or rounds
    half up without carrying a full mantissa into the exponent (off by up to 2x). fp8 (an fp8 GPU
    cache) saturates and is rounded by hand too (triton_attention._saturate_fp8)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float8e4nv:
        y = _saturate_fp8(x, 448.0, 3, -6, True).to(dtype)
    elif dtype == tl.float8e5:
        y = _saturate_fp8(x, 57344.0, 2, -14, True).to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _store_codes(ptr, codes, num_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BITS: tl.constexpr):
    """codes (bs, D) int32 -> the tile's payload rows (a token's row every num_heads * W bytes);
    int4: channel 2j in the low nibble of byte j, channel 2j + 1 in the high one."""
    WIDTH: tl.constexpr = HEAD_DIM * BITS // 8
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * (num_heads * WIDTH) + tl.arange(0, WIDTH)[None, :]
    if BITS == 8:
        tl.store(ptr + offs, codes.to(tl.uint8))
    else:
        even, odd = tl.split(tl.reshape(codes, (BLOCK_SIZE, WIDTH, 2)))
        tl.store(ptr + offs, (even | (odd << 4)).to(tl.uint8))


@triton.jit
def _load_codes(ptr, num_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """The tile's payload rows -> codes (bs, D) int32 (the inverse of _store_codes)."""
    WIDTH: tl.constexpr = HEAD_DIM * BITS // 8
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * (num_heads * WIDTH) + tl.arange(0, WIDTH)[None, :]
    packed = tl.load(ptr + offs).to(tl.int32)  # (bs, W)
    if BITS == 8:
        codes = packed
    else:
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_SIZE, HEAD_DIM))
    return codes


INTERPRETED = not isinstance(_quantize_kernel, triton.runtime.JITFunction)
