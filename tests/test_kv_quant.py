"""Quantized KV (kvtier.ops.kv_quant): fp8 e4m3 round trips, and int8 / int4 blocks (KIVI) against
their error bound, the Triton kernels against the torch reference, bytes per block, edge cases.

The Triton kernels run on CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) and compiled on a GPU machine. They do the reference's
fp32 arithmetic op for op, so codes, scales, zeros and dequantized values are compared bit for
bit, in both places (on a GPU the launches disable FMA fusion to keep it so).
"""

from __future__ import annotations

import pytest
import torch

import kvtier.ops.kv_quant as kq
from kvtier.ops.attention import to_cache_dtype
from kvtier.ops.kv_quant import (
    FP8_MAX,
    FP8_MIN_SCALE,
    QuantizedBlocks,
    QuantSpec,
    dequantize_blocks,
    dequantize_blocks_ref,
    dequantize_fp8,
    fp8_scales,
    quantize_blocks,
    quantize_blocks_ref,
    quantize_fp8,
    quantized_block_bytes,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
L, BS, H, D = 2, 8, 2, 16  # a block: 2 layers x (K, V) x 8 tokens x 2 KV heads x 16 channels
NUM_BLOCKS = 5
# (bits, group_size: V channels a group, k_group_size: K tokens a group)
FORMATS = [(8, 4, 2), (8, 16, 8), (4, 8, 4), (4, 16, 8), (4, 2, 1)]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def kv_rows(num_blocks: int = NUM_BLOCKS, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """(n, L, 2, BS, H, D) on DEVICE, drawn on the CPU. K like a real model's: per-channel offsets
    and two outlier channels 8x the rest (what per-channel K quantization is for); V plain."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_blocks, L, 2, BS, H, D), generator=gen)
    x[:, :, 0] += torch.randn((1, L, 1, H, D), generator=gen) * 2  # per-channel offsets of K
    x[:, :, 0, ..., :2] *= 8  # outlier channels
    return x.to(dtype).to(DEVICE)


def assert_same(a: QuantizedBlocks, b: QuantizedBlocks) -> None:
    assert a.spec == b.spec
    for name, x, y in zip(("payload", "k_scales", "k_zeros", "v_scales", "v_zeros"), a.tensors(), b.tensors()):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{name} differs"


def group_bounds(x: torch.Tensor, bits: int, group_size: int, k_group_size: int) -> torch.Tensor:
    """The error bound of every element of x (n, L, 2, bs, H, D), from the format's definition (not
    from the module's code): half a quantization step of its group, step = (max - min) / qmax, as
    stored in fp16 (2^-11 relative); where that scale is an fp16 subnormal (< 2^-14) its rounding
    (2^-25) can push the top codes past qmax, clamped: up to qmax of it more; the fp16 rounding
    of the zero (none for bf16 / fp16 data in fp16's normal range); fp32 arithmetic (ulps of x)."""
    x = x.float()
    k = x[:, :, 0].unflatten(2, (BS // k_group_size, k_group_size))  # (n, L, T, Gk, H, D)
    v = x[:, :, 1].unflatten(-1, (D // group_size, group_size))  # (n, L, bs, H, D/G, G)
    k_lo, k_hi = k.amin(3, keepdim=True).expand_as(k), k.amax(3, keepdim=True).expand_as(k)
    v_lo, v_hi = v.amin(-1, keepdim=True).expand_as(v), v.amax(-1, keepdim=True).expand_as(v)
    lo = torch.stack([k_lo.flatten(2, 3), v_lo.flatten(-2)], dim=2)
    hi = torch.stack([k_hi.flatten(2, 3), v_hi.flatten(-2)], dim=2)
    qmax = 2 ** bits - 1
    step = (hi - lo) / qmax
    clamped = torch.where(step < 2.0 ** -14, qmax * 2.0 ** -25, 0.0)
    return step / 2 * (1 + 2.0 ** -11) + clamped + fp16_rounding(lo) + x.abs() * 2.0 ** -22


def fp16_rounding(x: torch.Tensor) -> torch.Tensor:
    """The most rounding x to fp16 can cost: 2^-11 relative, 2^-25 among fp16's subnormals (< 2^-14)."""
    return torch.maximum(x.abs() * 2.0 ** -11, torch.full_like(x, 2.0 ** -25))


# ------------------------------------------------------------------------------- fp8 e4m3

@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_round_trip_relative_error(per_head, dtype):
    """e4m3 keeps 3 mantissa bits: |x^ - x| <= 2^-4 |x| for every value whose x / scale is normal."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((64, 4, D), generator=gen) * torch.tensor([1.0, 30.0, 0.01, 1e3])[:, None]  # heads apart
    x = x.to(dtype).to(DEVICE)
    scale = fp8_scales(x, per_head=per_head)
    assert scale.shape == ((4,) if per_head else ())
    q = quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert q.float().abs().max().item() == FP8_MAX  # amax maps to 448 exactly (per head: in each head)
    y = dequantize_fp8(q, scale, torch.float32)
    scaled = x.float() / (scale[:, None] if per_head else scale)
    normal = scaled.abs() >= 2.0 ** -6
    rel = ((y - x.float()).abs() / x.float().abs())[normal]
    assert rel.max().item() <= 2.0 ** -4 * (1 + 1e-6)
    assert normal.float().mean() > (0.99 if per_head else 0.5)  # per-tensor squeezes the small heads


def test_fp8_saturates_and_zero_tensors_stay_finite():
    x = torch.tensor([[[1.0, -2.0, 1000.0, -1e4]]], device=DEVICE)  # (1, 1, 4)
    q = quantize_fp8(x, torch.tensor(1.0, device=DEVICE))
    assert q.float().tolist() == [[[1.0, -2.0, FP8_MAX, -FP8_MAX]]]  # not NaN, as torch's cast alone gives
    zeros = torch.zeros((3, 2, D), dtype=torch.bfloat16, device=DEVICE)
    scale = fp8_scales(zeros, per_head=True)
    assert torch.equal(scale, torch.full((2,), FP8_MIN_SCALE, device=DEVICE))
    assert torch.equal(dequantize_fp8(quantize_fp8(zeros, scale), scale), zeros)


@pytest.mark.parametrize("call, message", [
    (lambda x, s: quantize_fp8(x, s[:1].double()), r"fp32 tensor of shape \(\) .* or \(2,\)"),
    (lambda x, s: quantize_fp8(x, torch.ones(3, device=DEVICE)), r"or \(2,\)"),
    (lambda x, s: quantize_fp8(x.int(), s), "bf16/fp16/fp32"),
    (lambda x, s: fp8_scales(x[0, 0]), "num_kv_heads, head_dim"),
    (lambda x, s: dequantize_fp8(x, s), "float8_e4m3fn"),
    (lambda x, s: dequantize_fp8(quantize_fp8(x, s), s, torch.int8), "dtype must be one of"),
])
def test_fp8_rejects(call, message):
    x = torch.ones((3, 2, D), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        call(x, fp8_scales(x, per_head=True))


# ------------------------------------------------------------------------------- int8 / int4: accuracy

@pytest.mark.parametrize("bits, group_size, k_group_size", FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_within_the_error_bound(bits, group_size, k_group_size, dtype):
    rows = kv_rows(dtype=dtype, seed=bits + group_size)
    q = quantize_blocks_ref(rows, bits, group_size, k_group_size)
    err = (dequantize_blocks_ref(q, torch.float32) - rows.float()).abs()
    bound = group_bounds(rows, bits, group_size, k_group_size)
    assert (err <= bound).all(), f"worst error / bound {(err / bound).max().item():.3f}"
    if min(group_size, k_group_size) >= 4:  # groups with values inside the range: the bound is tight
        assert (err / bound).max() > 0.9


def test_per_channel_k_keeps_outlier_channels_from_widening_the_others():
    """Why K is quantized per channel: the 8x outlier channels cost the other channels nothing."""
    rows = kv_rows(seed=3)
    q = quantize_blocks_ref(rows, 4, group_size=D, k_group_size=BS)
    k_err = (dequantize_blocks_ref(q, torch.float32) - rows.float())[:, :, 0].abs()  # (n, L, bs, H, D)
    per_channel_spread = rows[:, :, 0].float().amax(2) - rows[:, :, 0].float().amin(2)  # (n, L, H, D)
    assert (k_err[..., 2:].amax(2) <= per_channel_spread[..., 2:] / 15 / 2 * (1 + 2.0 ** -8)).all()
    assert k_err[..., 2:].max() < k_err[..., :2].max() / 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_and_zero_blocks_are_exact(backend, bits):
    rows = kv_rows(num_blocks=3, seed=4)
    rows[0] = 0.0  # a zero block
    rows[1, :, 0, :2] = rows[1, :, 0, :1]  # K: tokens 0 and 1 equal in every channel (a constant group)
    rows[1, :, 1, ..., :4] = 1.5  # V: channels 0-3 of every token constant (a constant group)
    q = quantize_blocks(rows, bits, group_size=4, k_group_size=2, backend=backend)
    out = torch.full_like(rows, float("nan"))
    dequantize_blocks(q, out, backend=backend)
    assert torch.equal(out[0], rows[0]) and torch.equal(q.payload[0], torch.zeros_like(q.payload[0]))
    assert torch.equal(out[1, :, 0, :2], rows[1, :, 0, :2])
    assert torch.equal(out[1, :, 1, ..., :4], rows[1, :, 1, ..., :4])
    assert (q.k_scales[1, :, :, 0] == 0).all() and (q.v_scales[1, ..., 0] == 0).all()
    assert not out.isnan().any()


def test_int4_packs_two_channels_a_byte_low_nibble_first():
    rows = torch.zeros((1, 1, 2, BS, 1, D), device=DEVICE)
    rows[0, 0, 1, 0, 0] = torch.arange(D, dtype=torch.float32)  # V of token 0: codes 0..15 (scale 1, zero 0)
    q = quantize_blocks(rows, 4, group_size=D)
    assert q.payload[0, 0, 1, 0, 0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert q.v_scales[0, 0, 0, 0].tolist() == [1.0] and q.v_zeros[0, 0, 0, 0].tolist() == [0.0]


# ------------------------------------------------------------------------------- the kernels

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels compiled")
def test_interpreter_is_active():
    """Without a GPU the kernel tests must run interpreted; a silent skip would hide them."""
    assert kq._INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"


@pytest.mark.parametrize("bits, group_size, k_group_size", FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kernels_match_the_reference_bit_for_bit(bits, group_size, k_group_size, dtype):
    rows = kv_rows(dtype=dtype, seed=5)
    q = quantize_blocks(rows, bits, group_size, k_group_size=k_group_size, backend="triton")
    assert_same(q, quantize_blocks_ref(rows, bits, group_size, k_group_size))
    out = torch.full_like(rows, float("nan"))
    dequantize_blocks(q, out, backend="triton")
    assert torch.equal(out, dequantize_blocks_ref(q, dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_kernels_over_an_fp8_gpu_cache(bits, cache_dtype):
    """--kv-cache-dtype fp8 with an int8 / int4 CPU tier: the kernels read fp8 rows and write fp8
    rows (saturating, to nearest even), bit for bit as the reference; the round trip stays within
    the int format's bound plus one fp8 step."""
    rows = to_cache_dtype(kv_rows(dtype=torch.float32, seed=8) * 40, cache_dtype)  # some past e4m3's 448
    q = quantize_blocks(rows, bits, 8, backend="triton")
    assert_same(q, quantize_blocks_ref(rows, bits, 8))
    out = torch.zeros_like(rows)
    dequantize_blocks(q, out, backend="triton")
    ref = torch.zeros_like(rows)
    dequantize_blocks(q, ref, backend="torch")
    assert out.float().isfinite().all() and torch.equal(out.float(), ref.float())
    assert torch.equal(out.float(), to_cache_dtype(dequantize_blocks_ref(q, torch.float32), cache_dtype).float())


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_gather_from_and_scatter_into_a_layer_major_cache(bits):
    """The intended use: quantize scattered blocks of the GPU cache (L, 2, Ng, bs, H, D), viewed as
    block rows (strided), and dequantize them back into other blocks of it; the rest is untouched."""
    cache = kv_rows(num_blocks=7, seed=6).permute(1, 2, 0, 3, 4, 5).contiguous()  # (L, 2, Ng, bs, H, D)
    rows = cache.permute(2, 0, 1, 3, 4, 5)  # (Ng, L, 2, bs, H, D), a view
    src, dst = torch.tensor([4, 0, 2], device=DEVICE), torch.tensor([1, 6, 3], device=DEVICE, dtype=torch.int32)
    q = quantize_blocks(rows, bits, 8, block_ids=src, backend="triton")
    assert_same(q, quantize_blocks_ref(rows[src], bits, 8))
    before = rows.clone()
    dequantize_blocks(q, rows, block_ids=dst, backend="triton")
    expected = before.clone()
    expected[dst.long()] = dequantize_blocks_ref(q, rows.dtype)
    assert torch.equal(rows, expected)


def test_no_blocks_is_a_no_op():
    rows = kv_rows(num_blocks=2)
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    q = quantize_blocks(rows, 4, 8, block_ids=none, backend="triton")
    assert q.num_blocks == 0 and q.nbytes == 0
    before = rows.clone()
    dequantize_blocks(q, rows, block_ids=none, backend="triton")
    assert torch.equal(rows, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="dispatch on CPU tensors")
@pytest.mark.parametrize("interpreted", [False, True])
def test_default_backend_on_the_cpu_follows_the_interpreter(monkeypatch, interpreted):
    monkeypatch.setattr(kq, "_INTERPRETED", interpreted, raising=False)
    launched = []
    monkeypatch.setattr(kq, "_launch_quantize", lambda *args: launched.append(True))
    quantize_blocks(kv_rows(num_blocks=1), 8, 8)
    assert launched == ([True] if interpreted else [])


def test_triton_backend_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(kq, "_INTERPRETED", False, raising=False)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        quantize_blocks(kv_rows(num_blocks=1).cpu(), 8, 8, backend="triton")


# ------------------------------------------------------------------------------- bytes per block

@pytest.mark.parametrize("bits, group_size, k_group_size", FORMATS)
def test_bytes_per_block_are_the_tensors_bytes(bits, group_size, k_group_size):
    q = quantize_blocks_ref(kv_rows(), bits, group_size, k_group_size)
    assert q.nbytes == NUM_BLOCKS * quantized_block_bytes((L, 2, BS, H, D), bits, group_size, k_group_size)
    assert {n: tuple(t.shape) for n, t in zip(q.spec.shapes(NUM_BLOCKS), q.tensors())} == q.spec.shapes(NUM_BLOCKS)


@pytest.mark.parametrize("bits, expected", [(8, 1245184), (4, 720896)])
def test_llama3_8b_block_bytes(bits, expected):
    """Llama-3-8B (32 layers, 8 KV heads, head_dim 128, 16 tokens), G = 32, K groups of 16 tokens:
    payload 1 MiB (int8) or 512 KiB (int4), params 192 KiB, against 2 MiB in bf16."""
    block = (32, 2, 16, 8, 128)
    assert quantized_block_bytes(block, bits) == expected
    spec = QuantSpec.for_block(block, bits)
    assert QuantizedBlocks.empty(spec, 3, device="meta").nbytes == 3 * expected


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "bits must be 8 or 4, got 3"),
    (dict(bits=16), "bits must be 8 or 4"),
    (dict(group_size=3), r"group_size \(V channels per scale\) must be a power of two dividing head_dim 16: "
                         r"one of \[1, 2, 4, 8, 16\], got 3"),
    (dict(group_size=32), r"one of \[1, 2, 4, 8, 16\], got 32"),
    (dict(group_size=0), "got 0"),
    (dict(k_group_size=16), r"k_group_size \(K tokens per scale\) must be a power of two dividing block_size 8: "
                            r"one of \[1, 2, 4, 8\], got 16"),
    (dict(k_group_size=6), "got 6"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_bits_and_group_sizes_are_refused(kwargs, message, backend):
    args = dict(bits=8, group_size=8, k_group_size=None) | kwargs
    with pytest.raises(ValueError, match=message):
        quantize_blocks(kv_rows(num_blocks=1), args["bits"], args["group_size"],
                        k_group_size=args["k_group_size"], backend=backend)
    with pytest.raises(ValueError, match=message):
        quantized_block_bytes((L, 2, BS, H, D), args["bits"], args["group_size"], args["k_group_size"])


def test_int4_needs_an_even_head_dim_and_the_kernel_powers_of_two():
    odd = torch.zeros((1, 1, 2, 4, 1, 3), device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be even"):
        quantize_blocks(odd, 4, 1, backend="torch")
    rows = torch.zeros((1, 1, 2, 4, 1, 12), device=DEVICE)  # fine for the reference, not for the kernel
    assert quantize_blocks(rows, 8, 4, backend="torch").num_blocks == 1
    with pytest.raises(ValueError, match="head_dim is 12"):
        quantize_blocks(rows, 8, 4, backend="triton")


def _bad_quantize_calls():
    rows = kv_rows(num_blocks=3)
    return [
        ("5-D rows", dict(rows=rows[0]), "6-D tensor"),
        ("three parts", dict(rows=torch.cat([rows, rows[:, :, :1]], dim=2)), "parts 0 and 1"),
        ("int rows", dict(rows=rows.int()), "a KV cache dtype"),
        ("strided channels", dict(rows=rows[..., ::2]), "contiguous"),
        ("float ids", dict(block_ids=torch.tensor([0.0], device=DEVICE)), "int32/int64"),
        ("id too large", dict(block_ids=torch.tensor([0, 3], device=DEVICE)), r"\[0, 3\)"),
        ("backend", dict(backend="cuda"), "backend must be one of"),
    ], dict(rows=rows, bits=8, group_size=8)


@pytest.mark.parametrize("case", range(len(_bad_quantize_calls()[0])), ids=[c[0] for c in _bad_quantize_calls()[0]])
def test_quantize_rejects(case):
    cases, valid = _bad_quantize_calls()
    _, override, message = cases[case]
    if "id too large" in cases[case][0] and DEVICE.type == "cuda":
        pytest.skip("ids on the GPU are not range-checked (that would sync)")
    with pytest.raises(ValueError, match=message):
        quantize_blocks(**{**valid, **override})


def _bad_dequantize_calls():
    q = quantize_blocks_ref(kv_rows(num_blocks=2), 8, 8)
    out = torch.zeros((4, L, 2, BS, H, D), device=DEVICE)
    ids = dict(block_ids=torch.tensor([3, 0], device=DEVICE))
    return [
        ("out of another shape", dict(out=out[..., :8], **ids), "does not hold blocks"),
        ("too many out blocks without ids", dict(), "pass block_ids"),
        ("repeated ids", dict(block_ids=torch.tensor([1, 1], device=DEVICE)), "distinct"),
        ("ids and blocks differ", dict(block_ids=torch.tensor([1], device=DEVICE)), "1 block_ids for 2"),
        ("params of another dtype", dict(q=_replace(q, k_scales=q.k_scales.float()), **ids), "k_scales must be"),
        ("payload cut", dict(q=_replace(q, payload=q.payload[..., :4]), **ids), "payload must be"),
    ], dict(q=q, out=out)


def _replace(q: QuantizedBlocks, **tensors: torch.Tensor) -> QuantizedBlocks:
    import dataclasses
    return dataclasses.replace(q, **tensors)


@pytest.mark.parametrize("case", range(len(_bad_dequantize_calls()[0])), ids=[c[0] for c in _bad_dequantize_calls()[0]])
def test_dequantize_rejects(case):
    cases, valid = _bad_dequantize_calls()
    name, override, message = cases[case]
    if name == "repeated ids" and DEVICE.type == "cuda":
        pytest.skip("ids on the GPU are not checked (that would sync)")
    before = valid["out"].clone()
    with pytest.raises(ValueError, match=message):
        dequantize_blocks(**{**valid, **override})
    assert torch.equal(valid["out"], before), "a refused call must not write"
