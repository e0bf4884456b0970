"""Quantized KV: fp8 e4m3 for the GPU tier, int8 / int4 blocks for the CPU tier.

    fp8 (vLLM's `--kv-cache-dtype fp8`; pure torch: the attention kernels will dequantize on load)
      fp8_scales(x, per_head=False)                 amax / 448: one scale () or one per KV head (H,)
      quantize_fp8(x, scale)                        x (..., H, D) -> float8_e4m3fn, saturated at +-448
      dequantize_fp8(q, scale, dtype)               back to dtype

    int8 / int4 blocks (KIVI, arXiv 2402.02750), for the CPU tier
      QuantSpec.for_block(block_shape, bits, group_size, k_group_size)   the format, validated once
      quantized_block_bytes(block_shape, bits, group_size, k_group_size) bytes of one block
      quantize_blocks(rows, bits, group_size)       rows (n, L, 2, bs, H, D) -> QuantizedBlocks
      dequantize_blocks(q, out)                     QuantizedBlocks -> out (m, L, 2, bs, H, D), in place
      quantize_blocks_ref / dequantize_blocks_ref   the same in plain torch

fp8: x / scale rounded to e4m3 (3 mantissa bits: relative error <= 2^-4 for normal values,
|x / scale| >= 2^-6), clamped first because torch's cast overflows to NaN where vLLM's saturates.

int8 / int4 (KIVI's recipe). K has a few outlier channels, fixed across tokens: quantizing K per
channel keeps one channel's range from widening its neighbours'. V has no such channels, and the
attention output mixes V by token, so V is quantized per token: an error stays in its token's row.
One (layer, KV head) of one block, bs tokens x D channels (Gk = k_group_size, G = group_size):

    K, per channel                                 V, per token
             ch 0  ch 1  ...  ch D-1                        ch 0 .. G-1   ch G .. 2G-1   ...
    tok 0     |     |          |                   tok 0    [ group   ]   [ group    ]
     ..       |     |          |   one group:       ..
    tok Gk-1  v     v          v   Gk tokens of    tok bs-1 [ group   ]   [ group    ]
    tok Gk    |  ...                a channel                one group: G channels of a token

Each group is quantized asymmetrically to b bits (qmax = 2^b - 1) with a (scale, zero) pair:

    zero = fp16(min)     scale = fp16((max - zero) / qmax)
    code = clamp(floor((x - zero) * (1 / scale) + 0.5), 0, qmax)     (0 when scale == 0)
    x^   = code * scale + zero                                      (fp32, then the output dtype)

Codes are rounded with the stored (fp16) scale and zero, so |x - x^| <= scale / 2, the stored
scale being (max - min) / qmax to 2^-11. Two roundings add to it: the zero's (none for bf16 and
fp16 data in fp16's normal range [6.1e-5, 65504], whose 8 or 11 significant bits fit fp16's 11;
at most |min| * 2^-11 for fp32 data), and, in groups so narrow that the scale is an fp16
subnormal (< 6.1e-5: a range below 0.0156 at int8, 9.2e-4 at int4), the scale's 2^-25, which can
push the top codes past qmax: at most qmax * 2^-25 more (7.6e-6 at int8).

The defaults follow KIVI (G = 32) with K groups as large as a block allows (Gk = bs): a group may
not cross blocks, which move, are evicted and shared one at a time.

Scales and zeros are fp16, not fp32: at int4 they are a quarter of a Llama-3-8B block even so
(192 KiB of 704), and fp32 would add 192 KiB more per block (2.33x smaller than bf16 instead of
2.91x) for no accuracy a bf16 cache can use (the zero of bf16 data is exact in fp16 either way).
Inputs must lie within fp16's range (|x| < 65504), as any fp16 model's KV does.

Tensors of n quantized blocks (QuantizedBlocks), block-major like the CPU tier, each contiguous:

    payload            (n, L, 2, bs, H, D * bits / 8)   uint8 codes; int4 packs two per byte:
                                                         channel 2j low nibble, 2j + 1 high
    k_scales, k_zeros  (n, L, H, bs / Gk, D)            fp16: per channel, per group of Gk tokens
    v_scales, v_zeros  (n, L, H, bs, D / G)             fp16: per token, per group of G channels

Llama-3-8B blocks (32 layers, 8 KV heads, head_dim 128, 16 tokens): bf16 2 MiB = 2097152 bytes;
int8 at G = 32, Gk = 16 1245184 bytes (1.68x smaller); int4 720896 (2.91x smaller).

The Triton kernels (`_kv_quant_kernel.py`) do the reference's arithmetic op for op in fp32 and
match it bit for bit under the interpreter. Compiled, they keep to it by construction: launches
pass enable_fp_fusion=False (no multiply-add fused into an FMA) and divide with div_rn; compiled
offline for sm_90 (Triton 3.9) the PTX has no fma, only div.rn.f32, 16-byte loads of the rows,
85 registers a thread; not yet run on a GPU. They read rows through any strides
(e.g. the GPU cache's layer-major (L, 2, Ng, bs, H, D) permuted to block rows) and gather
`block_ids`; dequantize_blocks scatters into `out` at `block_ids`: the GPU cache itself, after the
DMA from pinned memory brought the compact blocks back.

This module imports nothing from kvtier outside ops/. Triton is optional; the kernels are imported
on first launch and run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported),
which is also when the default backend picks them for CPU tensors (as tests/conftest.py sets it
on a machine without a GPU: CPU callers that want the reference there pass backend="torch").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch

from kvtier.ops import lazy_kernels
from kvtier.ops.attention import CACHE_DTYPES, to_cache_dtype

# ---------------------------------------------------------------------------------------------
# fp8 e4m3
# ---------------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# vLLM's floor (min_scaling_factor in its fp8 kernels): an all-zero tensor gets a finite scale.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fp8_scales(x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """x (..., H, D) -> fp32 scales that map x's largest magnitude to e4m3's 448: amax / 448 over
    the whole tensor (shape ()) or over each KV head (shape (H,)), at least FP8_MIN_SCALE."""
    _check_float_kv("x", x)
    magnitudes = x.detach().float().abs()
    if per_head:  # every dim but the head's
        amax = magnitudes.amax(dim=(*range(x.dim() - 2), x.dim() - 1))  # (H,)
    else:
        amax = magnitudes.amax()  # ()
    return (amax / FP8_MAX).clamp_min(FP8_MIN_SCALE)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) bf16/fp16/fp32, scale () or (H,) fp32 -> float8_e4m3fn of x's shape:
    x / scale, saturated at +-448 (torch's cast alone would turn overflow into NaN)."""
    _check_float_kv("x", x)
    scale = _fp8_scale_view(scale, x)
    return to_cache_dtype(x.float() / scale, FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q (..., H, D) float8_e4m3fn, scale () or (H,) fp32 -> q * scale in `dtype`, q's shape."""
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE or q.dim() < 2:
        raise ValueError(f"q must be a float8_e4m3fn tensor (..., num_kv_heads, head_dim), got "
                         f"{getattr(q, 'dtype', type(q))} of shape {getattr(q, 'shape', None)}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    return (q.float() * _fp8_scale_view(scale, q)).to(dtype)


def _fp8_scale_view(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scale as it broadcasts over x (..., H, D): () as is, (H,) as (H, 1)."""
    num_heads = x.shape[-2]
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or (
            scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != num_heads)):
        raise ValueError(f"scale must be an fp32 tensor of shape () (per tensor) or ({num_heads},) "
                         f"(per KV head), got {getattr(scale, 'dtype', type(scale))} of shape "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    if scale.device != x.device:
        raise ValueError(f"scale is on {scale.device} but the data on {x.device}")
    return scale if scale.dim() == 0 else scale[:, None]


def _check_float_kv(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty bf16/fp16/fp32 tensor (..., num_kv_heads, "
                         f"head_dim), got {getattr(x, 'dtype', type(x))} of shape {getattr(x, 'shape', None)}")


# ---------------------------------------------------------------------------------------------
# int8 / int4 blocks: the format
# ---------------------------------------------------------------------------------------------

ALLOWED_BITS = (8, 4)
DEFAULT_GROUP_SIZE = 32  # KIVI's G
PARAM_DTYPE = torch.float16  # scales and zeros (see the module docstring for why not fp32)
_BACKENDS = (None, "triton", "torch")
_ID_DTYPES = (torch.int32, torch.int64)

# Untuned: one 4-warp program per (block, layer, head, part) tile, bs x D = 2048 elements at
# Llama-3-8B (16 a thread); never timed (no GPU at hand). benchmarks/kv_quant_gpu.py times it.
QUANT_NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """int8 / int4 blocks of one model: the block's shape and the format, validated once.
    `bytes_per_block` is the one formula for a quantized block's bytes (payload and params)."""
    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    bits: int  # 8 or 4
    group_size: int  # V: channels of one token's row that share a (scale, zero)
    k_group_size: int  # K: tokens of one channel, within a block, that share a (scale, zero)

    def __post_init__(self) -> None:
        dims = (self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"block dims (num_layers, block_size, num_kv_heads, head_dim) must be "
                             f"positive ints, got {dims}")
        if not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 4 and self.head_dim % 2:
            raise ValueError(f"int4 packs two channels a byte: head_dim must be even, got {self.head_dim}")
        _check_group("group_size (V channels per scale)", self.group_size, "head_dim", self.head_dim)
        _check_group("k_group_size (K tokens per scale)", self.k_group_size, "block_size", self.block_size)

    @classmethod
    def for_block(cls, block_shape: tuple[int, ...], bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                  k_group_size: int | None = None) -> QuantSpec:
        """block_shape (L, 2, bs, H, D), i.e. rows.shape[1:]; k_group_size None = the whole block."""
        if len(block_shape) != 5 or block_shape[1] != 2:
            raise ValueError(f"a block is (num_layers, 2, block_size, num_kv_heads, head_dim) with K and V "
                             f"as parts 0 and 1, got {tuple(block_shape)}")
        num_layers, _, block_size, num_kv_heads, head_dim = (int(d) for d in block_shape)
        k_group = block_size if k_group_size is None else k_group_size
        return cls(num_layers, block_size, num_kv_heads, head_dim, bits, group_size, k_group)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def shapes(self, num_blocks: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of `num_blocks` quantized blocks, by QuantizedBlocks field."""
        n, num_layers, heads = num_blocks, self.num_layers, self.num_kv_heads
        k_params = (n, num_layers, heads, self.block_size // self.k_group_size, self.head_dim)
        v_params = (n, num_layers, heads, self.block_size, self.head_dim // self.group_size)
        return {"payload": (n, *self.block_shape[:-1], self.head_dim * self.bits // 8),
                "k_scales": k_params, "k_zeros": k_params, "v_scales": v_params, "v_zeros": v_params}

    @property
    def bytes_per_block(self) -> int:
        sizes = {name: math.prod(shape) for name, shape in self.shapes(1).items()}
        return sizes.pop("payload") + sum(sizes.values()) * PARAM_DTYPE.itemsize  # payload: uint8


def _check_group(name: str, group: int, dim_name: str, dim: int) -> None:
    allowed = [1 << i for i in range(dim.bit_length()) if dim % (1 << i) == 0]
    if not isinstance(group, int) or group not in allowed:
        raise ValueError(f"{name} must be a power of two dividing {dim_name} {dim}: one of {allowed}, "
                         f"got {group!r}")


def quantized_block_bytes(block_shape: tuple[int, ...], bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                          k_group_size: int | None = None) -> int:
    """Bytes of one quantized block, payload and params: block_shape (L, 2, bs, H, D)."""
    return QuantSpec.for_block(block_shape, bits, group_size, k_group_size).bytes_per_block


@dataclasses.dataclass(frozen=True)
class QuantizedBlocks:
    """n int8 / int4 blocks (shapes in the module docstring and QuantSpec.shapes)."""
    spec: QuantSpec
    payload: torch.Tensor  # (n, L, 2, bs, H, D * bits / 8) uint8
    k_scales: torch.Tensor  # (n, L, H, bs / Gk, D) fp16
    k_zeros: torch.Tensor  # (n, L, H, bs / Gk, D) fp16
    v_scales: torch.Tensor  # (n, L, H, bs, D / G) fp16
    v_zeros: torch.Tensor  # (n, L, H, bs, D / G) fp16

    @classmethod
    def empty(cls, spec: QuantSpec, num_blocks: int, device: torch.device | str = "cpu",
              pin_memory: bool = False) -> QuantizedBlocks:
        """Uninitialized tensors for `num_blocks` blocks (a pool, a staging buffer, an output)."""
        tensors = {name: torch.empty(shape, dtype=torch.uint8 if name == "payload" else PARAM_DTYPE,
                                     device=device, pin_memory=pin_memory)
                   for name, shape in spec.shapes(num_blocks).items()}
        return cls(spec, **tensors)

    @property
    def num_blocks(self) -> int:
        return self.payload.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.payload, self.k_scales, self.k_zeros, self.v_scales, self.v_zeros)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


# ---------------------------------------------------------------------------------------------
# int8 / int4 blocks: public API
# ---------------------------------------------------------------------------------------------

# the kernel module, imported on first launch; `_INTERPRETED` as a module attribute
__getattr__, _kernel_module = lazy_kernels.accessors("_kv_quant_kernel")


def quantize_blocks(rows: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, *,
                    k_group_size: int | None = None, block_ids: torch.Tensor | None = None,
                    backend: str | None = None) -> QuantizedBlocks:
    """rows (N, L, 2, bs, H, D) bf16/fp16/fp32, K as part 0 and V as part 1, any strides but a
    contiguous last dim -> QuantizedBlocks of rows[block_ids] (all N blocks when None), in order.

    block_ids (n,) int32/int64 on rows' device (checked against N on the CPU only: on the GPU a
    check would sync). backend None runs the Triton kernel on CUDA tensors and under
    TRITON_INTERPRET=1, the reference otherwise; "triton" / "torch" force one. Asynchronous on
    CUDA (the current stream); never syncs.
    """
    _check_backend(backend)
    _check_rows("rows", rows)
    spec = QuantSpec.for_block(tuple(rows.shape[1:]), bits, group_size, k_group_size)
    if block_ids is not None:
        _check_ids(block_ids, rows.device, rows.shape[0], distinct=False)
    if not _use_triton(backend, rows.device):
        return _quantize_ref(rows if block_ids is None else rows.index_select(0, block_ids.long()), spec)
    _check_kernel_args(rows.device, spec)
    ids = _ids_or_all(block_ids, rows)
    out = QuantizedBlocks.empty(spec, ids.numel(), rows.device)
    if ids.numel():
        with _on_device(rows.device):
            _launch_quantize(rows, ids, out)
    return out


def dequantize_blocks(q: QuantizedBlocks, out: torch.Tensor, *, block_ids: torch.Tensor | None = None,
                      backend: str | None = None) -> None:
    """out[block_ids[i]] = block i of q, dequantized (out[i] when block_ids is None).

    out (M, L, 2, bs, H, D) bf16/fp16/fp32 on q's device, any strides but a contiguous last dim
    (e.g. the GPU cache viewed as block rows); block_ids (n,) int32/int64, distinct, on that device.
    Backends as for quantize_blocks. Asynchronous on CUDA; never syncs.
    """
    _check_backend(backend)
    _check_quantized(q)
    _check_rows("out", out)
    if tuple(out.shape[1:]) != q.spec.block_shape or out.device != q.payload.device:
        raise ValueError(f"out of shape {tuple(out.shape)} on {out.device} does not hold blocks of shape "
                         f"{q.spec.block_shape} on {q.payload.device}, the quantized blocks' device")
    if block_ids is None and out.shape[0] != q.num_blocks:
        raise ValueError(f"out has {out.shape[0]} blocks for {q.num_blocks} quantized ones; pass block_ids "
                         "to write a subset")
    if block_ids is not None:
        _check_ids(block_ids, out.device, out.shape[0], distinct=True, count=q.num_blocks)
    if not _use_triton(backend, out.device):
        values = to_cache_dtype(_dequantize_ref(q), out.dtype)  # (n, L, 2, bs, H, D)
        if block_ids is None:
            out.copy_(values)
        else:
            out.index_copy_(0, block_ids.long(), values)
        return
    _check_kernel_args(out.device, q.spec)
    if q.num_blocks:
        with _on_device(out.device):
            _launch_dequantize(q, _ids_or_all(block_ids, out), out)


def quantize_blocks_ref(rows: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                        k_group_size: int | None = None) -> QuantizedBlocks:
    """Pure-torch quantize_blocks of every block of rows (N, L, 2, bs, H, D)."""
    _check_rows("rows", rows)
    return _quantize_ref(rows, QuantSpec.for_block(tuple(rows.shape[1:]), bits, group_size, k_group_size))


def dequantize_blocks_ref(q: QuantizedBlocks, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Pure-torch dequantize: QuantizedBlocks of n blocks -> (n, L, 2, bs, H, D) in `dtype`."""
    _check_quantized(q)
    return _dequantize_ref(q).to(dtype)


# ---------------------------------------------------------------------------------------------
# the reference (the kernels match it op for op, in fp32)
# ---------------------------------------------------------------------------------------------

def _quantize_ref(rows: torch.Tensor, spec: QuantSpec) -> QuantizedBlocks:
    x = rows.float()  # (n, L, 2, bs, H, D)
    qmax = (1 << spec.bits) - 1
    k = x[:, :, 0].unflatten(2, (spec.block_size // spec.k_group_size, spec.k_group_size))  # (n, L, T, Gk, H, D)
    k_scale, k_zero = _params_ref(k.amin(3, keepdim=True), k.amax(3, keepdim=True), qmax)  # (n, L, T, 1, H, D)
    k_codes = _codes_ref(k, k_scale, k_zero, qmax).flatten(2, 3)  # (n, L, bs, H, D)
    v = x[:, :, 1].unflatten(-1, (spec.head_dim // spec.group_size, spec.group_size))  # (n, L, bs, H, D/G, G)
    v_scale, v_zero = _params_ref(v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), qmax)  # (.., D/G, 1)
    v_codes = _codes_ref(v, v_scale, v_zero, qmax).flatten(-2)  # (n, L, bs, H, D)

    def k_params(p: torch.Tensor) -> torch.Tensor:  # (n, L, T, 1, H, D) -> (n, L, H, T, D) fp16
        return p.squeeze(3).permute(0, 1, 3, 2, 4).to(PARAM_DTYPE).contiguous()

    def v_params(p: torch.Tensor) -> torch.Tensor:  # (n, L, bs, H, D/G, 1) -> (n, L, H, bs, D/G) fp16
        return p.squeeze(-1).permute(0, 1, 3, 2, 4).to(PARAM_DTYPE).contiguous()

    payload = _pack_ref(torch.stack([k_codes, v_codes], dim=2), spec.bits)  # (n, L, 2, bs, H, W)
    return QuantizedBlocks(spec, payload, k_params(k_scale), k_params(k_zero), v_params(v_scale),
                           v_params(v_zero))


def _params_ref(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group min / max (fp32) -> (scale, zero) as stored: fp16 values, returned in fp32."""
    zero = lo.to(PARAM_DTYPE).float()
    scale = ((hi - zero) / float(qmax)).to(PARAM_DTYPE).float()
    return scale, zero


def _codes_ref(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """round((x - zero) / scale) within [0, qmax], int32; 0 for a constant group (scale 0), whose
    reciprocal is taken of 1, not 0: no inf to discard (the kernel's interpreter would warn)."""
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    return torch.floor((x - zero) * inv + 0.5).clamp(0, qmax).to(torch.int32)


def _pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., D) int32 -> (..., D * bits / 8) uint8; int4: channel 2j low nibble, 2j + 1 high."""
    if bits == 8:
        return codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _unpack_ref(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of _pack_ref: (..., W) uint8 -> (..., D) int32."""
    packed = payload.to(torch.int32)
    if bits == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _dequantize_ref(q: QuantizedBlocks) -> torch.Tensor:
    """QuantizedBlocks -> (n, L, 2, bs, H, D) fp32."""
    spec = q.spec
    codes = _unpack_ref(q.payload, spec.bits).float()  # (n, L, 2, bs, H, D)
    k = codes[:, :, 0].unflatten(2, (spec.block_size // spec.k_group_size, spec.k_group_size))  # (n, L, T, Gk, H, D)
    k_scale, k_zero = (p.float().permute(0, 1, 3, 2, 4).unsqueeze(3) for p in (q.k_scales, q.k_zeros))
    v = codes[:, :, 1].unflatten(-1, (spec.head_dim // spec.group_size, spec.group_size))  # (n, L, bs, H, D/G, G)
    v_scale, v_zero = (p.float().permute(0, 1, 3, 2, 4).unsqueeze(-1) for p in (q.v_scales, q.v_zeros))
    k_values = (k * k_scale + k_zero).flatten(2, 3)  # (n, L, bs, H, D)
    v_values = (v * v_scale + v_zero).flatten(-2)  # (n, L, bs, H, D)
    return torch.stack([k_values, v_values], dim=2)


# ---------------------------------------------------------------------------------------------
# launchers and checks
# ---------------------------------------------------------------------------------------------

def _launch_quantize(rows: torch.Tensor, ids: torch.Tensor, out: QuantizedBlocks) -> None:
    spec = out.spec
    grid = (ids.numel() * spec.num_layers * spec.num_kv_heads, 2)  # (block, layer, head) x (K, V)
    kernels = _kernel_module()
    assert kernels is not None, "checked by _check_kernel_args"
    kernels._quantize_kernel[grid](
        rows, ids, *out.tensors(), spec.num_layers, spec.num_kv_heads, *rows.stride()[:5],
        **_constexprs(spec), num_warps=QUANT_NUM_WARPS, enable_fp_fusion=False)


def _launch_dequantize(q: QuantizedBlocks, ids: torch.Tensor, out: torch.Tensor) -> None:
    spec = q.spec
    grid = (ids.numel() * spec.num_layers * spec.num_kv_heads, 2)
    kernels = _kernel_module()
    assert kernels is not None, "checked by _check_kernel_args"
    kernels._dequantize_kernel[grid](
        *q.tensors(), ids, out, spec.num_layers, spec.num_kv_heads, *out.stride()[:5],
        **_constexprs(spec), num_warps=QUANT_NUM_WARPS, enable_fp_fusion=False)


def _constexprs(spec: QuantSpec) -> dict[str, int]:
    return dict(BLOCK_SIZE=spec.block_size, HEAD_DIM=spec.head_dim, BITS=spec.bits,
                GROUP=spec.group_size, K_GROUP=spec.k_group_size)


def _use_triton(backend: str | None, device: torch.device) -> bool:
    if backend is not None:
        return backend == "triton"
    return (device.type == "cuda" and _kernel_module() is not None) or _interpreted()


def _interpreted() -> bool:
    """Whether kernels run in Triton's interpreter; without TRITON_INTERPRET set, Triton is not
    imported to find out (tests may pin `_INTERPRETED` either way)."""
    if "_INTERPRETED" not in globals() and os.environ.get("TRITON_INTERPRET", "0").lower() in ("", "0", "false"):
        return False
    return lazy_kernels.interpreted(globals(), "_kv_quant_kernel")


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _ids_or_all(block_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if block_ids is not None:
        return block_ids
    return torch.arange(x.shape[0], dtype=torch.int64, device=x.device)


def _check_backend(backend: str | None) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _check_rows(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 6 or x.shape[2] != 2:
        raise ValueError(f"{name} must be a 6-D tensor (blocks, num_layers, 2, block_size, num_kv_heads, "
                         f"head_dim) with K and V as parts 0 and 1, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in CACHE_DTYPES:
        raise ValueError(f"{name} must be a KV cache dtype {CACHE_DTYPES}, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim (head_dim) must be contiguous, strides {x.stride()}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}; only CPU and CUDA tensors are supported")


def _check_quantized(q: QuantizedBlocks) -> None:
    if not isinstance(q, QuantizedBlocks):
        raise ValueError(f"expected QuantizedBlocks, got {type(q).__name__}")
    expected = q.spec.shapes(q.num_blocks)
    for name, t in zip(expected, q.tensors()):
        dtype = torch.uint8 if name == "payload" else PARAM_DTYPE
        if tuple(t.shape) != expected[name] or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"QuantizedBlocks.{name} must be a contiguous {dtype} tensor of shape "
                             f"{expected[name]}, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
        if t.device != q.payload.device:
            raise ValueError(f"QuantizedBlocks.{name} is on {t.device} but the payload on {q.payload.device}")


def _check_ids(ids: torch.Tensor, device: torch.device, num_blocks: int, distinct: bool,
               count: int | None = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in _ID_DTYPES:
        raise ValueError(f"block_ids must be a 1-D int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))} "
                         f"of shape {getattr(ids, 'shape', None)}")
    if ids.device != device:
        raise ValueError(f"block_ids is on {ids.device}, expected {device} (the blocks' device)")
    if count is not None and ids.numel() != count:
        raise ValueError(f"{ids.numel()} block_ids for {count} quantized blocks")
    if device.type == "cpu" and ids.numel():  # on the GPU a check would sync
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_ids must lie in [0, {num_blocks}), got min {lo} max {hi}")
        if distinct and torch.unique(ids).numel() != ids.numel():
            raise ValueError("block_ids must be distinct: they are destinations")


def _check_kernel_args(device: torch.device, spec: QuantSpec) -> None:
    if _kernel_module() is None:
        raise ValueError("backend 'triton' needs the triton package")
    if device.type != "cuda" and not _interpreted():
        raise ValueError("the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run it on the CPU)")
    for name, dim in (("block_size", spec.block_size), ("head_dim", spec.head_dim)):
        if dim & (dim - 1):
            raise ValueError(f"the Triton kernel tiles a block as block_size x head_dim and needs both "
                             f"powers of two; {name} is {dim} (backend 'torch' takes any)")
