"""Triton paged-attention kernels against the pure-torch references, on the CPU (Triton interpreter).

Triton 3.9 reads TRITON_INTERPRET in every `@triton.jit` decorator, including triton.language's
own reductions, when triton is first imported; tests/conftest.py therefore sets it before anything
imports triton whenever no GPU is present. On a GPU machine the same cases run compiled on the GPU,
and the `*_full_size` tests add Llama-3-8B-shaped heads over long contexts (GPU only: the
interpreter would take hours).
"""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import kvtier.ops.triton_attention as ta
from kvtier.ops.attention import AttentionMetadata, paged_attention_ref, to_cache_dtype, write_kv_ref

INTERPRETING = not isinstance(tl.standard.sum, triton.runtime.JITFunction)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="full sizes need a GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels compiled")
def test_interpreter_is_active():
    """Without a GPU these tests must run interpreted; a silent skip would hide every kernel test."""
    assert INTERPRETING and ta._INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"


FP32_ATOL = 1e-4
LOW_PRECISION_REL = 1e-2


def _batch(seq_lens, q_lens, num_kv_heads, group, head_dim=32, block_size=16,
           dtype=torch.float32, seed=0, device=DEVICE, cache_dtype=None):
    """Random caches, shuffled block tables, this step's K/V written; -> (q, k_cache, v_cache, meta).

    Drawn on the CPU (the same numbers on every machine), then moved to `device`. q, k and v in
    dtype, the caches in cache_dtype (default: dtype; fp8 for --kv-cache-dtype fp8)."""
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold garbage that must never be read
    max_blocks = max(blocks_per_seq) + 1
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = to_cache_dtype(torch.randn(shape, generator=gen), cache_dtype).to(device)
    v_cache = to_cache_dtype(torch.randn(shape, generator=gen), cache_dtype).to(device)
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size
             for b, (s, n) in enumerate(zip(seq_lens, q_lens)) for p in range(s - n, s)]
    num_tokens = len(slots)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=tables.to(device, torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32,
                                     device=device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        seq_lens_list=list(seq_lens), query_lens_list=list(q_lens))
    write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, meta


def _assert_close(out, q, k_cache, v_cache, meta, scale, window=None, rows=slice(None)):
    """Against the fp32 reference: fp32 within FP32_ATOL, 16-bit within LOW_PRECISION_REL."""
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale, window)
    out, ref = out[rows].float(), ref[rows]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)
    else:
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= LOW_PRECISION_REL, rel


# ----------------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.float32, torch.bfloat16),
                                                   (torch.float16, torch.float16)])
def test_write_kv_matches_reference(src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_kv_heads, head_dim = 7, 3, 32
    k_cache = torch.randn(6, 8, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(6, 8, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    # k, v as views into a fused qkv projection output: strided tokens, contiguous head_dim
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, generator=gen).to(src_dtype)
    k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 3 * num_kv_heads:]
    slots = torch.randperm(6 * 8, generator=gen)[:num_tokens]
    slots[[1, 4]] = -1  # padding tokens are not written
    k_cache, v_cache, k, v, slots = (x.to(DEVICE) for x in (k_cache, v_cache, k, v, slots))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_ref, v_ref, slots)
    ta.write_kv(k, v, k_cache, v_cache, slots)
    # Same dtype: bit-exact. fp32 -> bf16: the interpreter truncates where torch and the GPU round
    # to nearest even, so allow one bf16 ulp (2**-7 relative).
    rtol = 0 if src_dtype == cache_dtype else 2 ** -7
    torch.testing.assert_close(k_cache, k_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(v_cache, v_ref, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------- prefill

# seq 0: plain prefill; 1: 80 cached + 20 new; 2: q_len 1 (a decode inside a mixed batch);
# 3: 60 cached + 4 new; 4: nothing scheduled this step
PREFILL_SEQ_LENS = [37, 100, 17, 64, 9]
PREFILL_Q_LENS = [37, 20, 1, 4, 0]


@pytest.mark.parametrize("dtype,group,head_dim,block_size,block_m", [
    (torch.float32, 1, 32, 16, None),
    (torch.float32, 3, 64, 8, 32),
    (torch.bfloat16, 3, 32, 16, 16),
    (torch.float16, 1, 32, 32, None),
    (torch.bfloat16, 1, 128, 16, 64),
])
def test_prefill_matches_reference(monkeypatch, dtype, group, head_dim, block_size, block_m):
    if block_m is not None:  # several query tiles per sequence, as at full size
        monkeypatch.setattr(ta, "PREFILL_BLOCK_M", block_m)
    q, k_cache, v_cache, meta = _batch(PREFILL_SEQ_LENS, PREFILL_Q_LENS, 2, group, head_dim,
                                       block_size, dtype)
    scale = head_dim ** -0.5
    out = ta.paged_prefill_attention(q, k_cache, v_cache, meta, scale)
    _assert_close(out, q, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize("dtype,window,block_n", [
    (torch.float32, 24, None),
    (torch.bfloat16, 5, None),
    (torch.float32, None, 16),
    (torch.float32, 16, 16),
    (torch.float32, 7, 16),
])
def test_prefill_tile_edges(monkeypatch, dtype, window, block_n):
    """Small tiles put query-tile starts, window edges and key-tile edges on every alignment."""
    monkeypatch.setattr(ta, "PREFILL_BLOCK_M", 16)
    if block_n is not None:
        monkeypatch.setattr(ta, "PREFILL_BLOCK_N", block_n)
    q, k_cache, v_cache, meta = _batch([70, 47, 95, 33], [8, 30, 50, 1], 1, 3, dtype=dtype, seed=2)
    out = ta.paged_prefill_attention(q, k_cache, v_cache, meta, 0.3, window)
    _assert_close(out, q, k_cache, v_cache, meta, 0.3, window)


# ----------------------------------------------------------------------------------- decode

DECODE_SEQ_LENS = [1, 37, 100, 64, 16]


@pytest.mark.parametrize("dtype,group,head_dim,num_splits", [
    (torch.float32, 1, 32, None),
    (torch.float32, 3, 64, 3),
    (torch.float32, 1, 32, 8),  # more splits than some sequences have tiles: empty splits
    (torch.bfloat16, 3, 128, 4),
    (torch.float16, 3, 32, None),
])
def test_decode_matches_reference(dtype, group, head_dim, num_splits):
    q, k_cache, v_cache, meta = _batch(DECODE_SEQ_LENS, [1] * 5, 2, group, head_dim, dtype=dtype,
                                       seed=3)
    out = ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=num_splits)
    _assert_close(out, q, k_cache, v_cache, meta, 0.2)


# --kv-cache-dtype fp8: the caches hold e4m3 (or e5m2) values, the queries the model's dtype; the
# kernels convert on load, exactly (every fp8 value is a bf16 and an fp32 value), so they must match
# the fp32 reference over the same fp8 values as closely as over a cache in the queries' dtype

@pytest.mark.parametrize("dtype,cache_dtype,group,num_splits", [
    (torch.float32, torch.float8_e4m3fn, 1, None),
    (torch.bfloat16, torch.float8_e4m3fn, 3, 4),
    (torch.float16, torch.float8_e5m2, 3, None),
])
def test_decode_over_fp8_cache(dtype, cache_dtype, group, num_splits):
    q, k_cache, v_cache, meta = _batch(DECODE_SEQ_LENS, [1] * 5, 2, group, 64, dtype=dtype, seed=5,
                                       cache_dtype=cache_dtype)
    assert k_cache.dtype == cache_dtype and q.dtype == dtype
    out = ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=num_splits)
    assert out.dtype == dtype
    _assert_close(out, q, k_cache, v_cache, meta, 0.2)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float8_e4m3fn),
                                               (torch.bfloat16, torch.float8_e4m3fn)])
def test_prefill_over_fp8_cache(monkeypatch, dtype, cache_dtype):
    monkeypatch.setattr(ta, "PREFILL_BLOCK_M", 16)
    q, k_cache, v_cache, meta = _batch(PREFILL_SEQ_LENS, PREFILL_Q_LENS, 2, 3, 32, dtype=dtype, seed=6,
                                       cache_dtype=cache_dtype)
    out = ta.paged_prefill_attention(q, k_cache, v_cache, meta, 0.3)
    _assert_close(out, q, k_cache, v_cache, meta, 0.3)


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float8_e4m3fn),
                                                   (torch.bfloat16, torch.float8_e4m3fn),
                                                   (torch.float16, torch.float8_e5m2)])
def test_write_kv_to_fp8_cache(src_dtype, cache_dtype):
    """Values cast to fp8 as to_cache_dtype does (to nearest even), saturating at the format's
    largest value (some inputs are far past it: no NaN, no inf); equal values (the interpreter's
    path rounds by hand and may give +0 where torch gives -0)."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_kv_heads, head_dim = 9, 2, 32
    limit = torch.finfo(cache_dtype).max
    k_cache = torch.zeros(4, 8, num_kv_heads, head_dim, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 4).to(src_dtype)
    v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 4).to(src_dtype)
    k[0, 0, :4] = torch.tensor([limit * 2, -limit * 2, limit * 1.01, 1e-3])
    slots = torch.randperm(4 * 8, generator=gen)[:num_tokens]
    slots[2] = -1
    k_cache, v_cache, k, v, slots = (x.to(DEVICE) for x in (k_cache, v_cache, k, v, slots))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_ref, v_ref, slots)
    ta.write_kv(k, v, k_cache, v_cache, slots)
    assert k_ref.float().isfinite().all() and k_ref.float().abs().max() == limit  # saturated, not NaN
    assert (k_cache.float() == k_ref.float()).all() and (v_cache.float() == v_ref.float()).all()
    assert (k_cache.float() != 0).sum() > num_tokens  # written at all


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window(num_splits):
    q, k_cache, v_cache, meta = _batch(DECODE_SEQ_LENS, [1] * 5, 1, 3, block_size=8, seed=4)
    out = ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, 30, num_splits=num_splits)
    _assert_close(out, q, k_cache, v_cache, meta, 0.2, 30)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_padding_sequence_gives_zeros(num_splits):
    """A CUDA-graph padding row (seq_len 0) must not produce NaN or disturb the others."""
    q, k_cache, v_cache, meta = _batch([20, 50], [1, 1], 1, 1, seed=5)
    q = torch.cat([q, torch.randn(1, *q.shape[1:], device=DEVICE)])
    meta.block_tables = torch.cat([meta.block_tables, meta.block_tables[:1]])
    meta.seq_lens = torch.tensor([20, 50, 0], dtype=torch.int32, device=DEVICE)
    meta.seq_lens_list = [20, 50, 0]
    out = ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=num_splits)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    _assert_close(out, q, k_cache, v_cache, meta, 0.2, rows=slice(0, 2))


def test_dispatch_and_prefill_kernel_on_decode_batch():
    q, k_cache, v_cache, meta = _batch(DECODE_SEQ_LENS, [1] * 5, 2, 3, seed=6)
    decode = ta.paged_attention(q, k_cache, v_cache, meta, 0.2)
    prefill = ta.paged_prefill_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(decode, prefill, atol=FP32_ATOL, rtol=0)
    q, k_cache, v_cache, meta = _batch([30, 9], [3, 1], 2, 3, seed=7)
    _assert_close(ta.paged_attention(q, k_cache, v_cache, meta, 0.2), q, k_cache, v_cache, meta, 0.2)


def test_launchers_never_sync(monkeypatch):
    """No .item()/.tolist() in the launchers: they must be capturable in a CUDA graph."""
    q, k_cache, v_cache, meta = _batch([30, 9], [1, 1], 1, 1, seed=8)
    k = torch.randn(2, *k_cache.shape[2:], device=DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in a launcher")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    ta.write_kv(k, k, k_cache, v_cache, meta.slot_mapping)
    ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=2)
    ta.paged_prefill_attention(q, k_cache, v_cache, meta, 0.2)


def test_num_decode_splits_heuristic():
    assert ta.num_decode_splits(64, 8, 2048, 132) == 1  # 512 programs: the reduce kernel would cost more
    assert ta.num_decode_splits(16, 8, 2048, 132) == 3
    assert ta.num_decode_splits(8, 8, 512, 132) == 4
    assert ta.num_decode_splits(1, 8, 32768, 132) == 33
    assert ta.num_decode_splits(1, 1, 1 << 20, 132) == ta.DECODE_MAX_SPLITS  # one KV head: 264 wanted
    assert ta.num_decode_splits(256, 8, 4096, 132) == 1
    assert ta.num_decode_splits(4, 8, 100, 132) == 1  # short contexts are not split


# ----------------------------------------------------------------------------------- full sizes (GPU)

# Llama-3-8B attention: 32 query heads over 8 KV heads, head_dim 128, 16-token blocks, bf16.
LLAMA3_8B = dict(num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16)


@on_gpu
@pytest.mark.parametrize("seq_lens,q_lens,window", [
    ([2048] * 8, [2048] * 8, None),  # the benchmark's prefill, 8 x 2048
    ([8192, 4100, 3001, 517, 70], [512, 4100, 1, 17, 0], None),  # chunks after long cached prefixes
    ([6000, 4096], [700, 4096], 4096),  # a Mistral-sized sliding window
])
def test_prefill_full_size(seq_lens, q_lens, window):
    q, k_cache, v_cache, meta = _batch(seq_lens, q_lens, **LLAMA3_8B, seed=10)
    out = ta.paged_prefill_attention(q, k_cache, v_cache, meta, 128 ** -0.5, window)
    _assert_close(out, q, k_cache, v_cache, meta, 128 ** -0.5, window)


@on_gpu
@pytest.mark.parametrize("seq_lens,window,num_splits", [
    ([2048] * 64, None, None),  # the benchmark's decode, 64 x 2048
    ([32768, 16384, 9000, 4097, 100, 1], None, None),  # long contexts split by the heuristic
    ([32768, 16384, 9000, 4097, 100, 1], None, 16),
    ([20000, 5000, 300], 4096, None),
])
def test_decode_full_size(seq_lens, window, num_splits):
    q, k_cache, v_cache, meta = _batch(seq_lens, [1] * len(seq_lens), **LLAMA3_8B, seed=11)
    out = ta.paged_decode_attention(q, k_cache, v_cache, meta, 128 ** -0.5, window, num_splits=num_splits)
    _assert_close(out, q, k_cache, v_cache, meta, 128 ** -0.5, window)


@on_gpu
def test_write_kv_full_size():
    """One 8 x 2048 prefill's K/V scattered into a 1k-block bf16 cache, bit for bit."""
    _, k_cache, v_cache, meta = _batch([2048] * 8, [2048] * 8, **LLAMA3_8B, seed=12)
    gen = torch.Generator(DEVICE).manual_seed(12)
    k, v = (torch.randn(8 * 2048, 8, 128, generator=gen, device=DEVICE, dtype=torch.bfloat16)
            for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_ref, v_ref, meta.slot_mapping)
    assert not torch.equal(k_cache, k_ref)  # the new K differs from what the slots held
    ta.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ----------------------------------------------------------------------------------- errors

def _errors_case():
    return _batch([20, 9], [1, 1], 2, 2, seed=9)


def _with(meta, **changes):
    return dataclasses.replace(meta, **changes)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, kc, vc, m: (q.to(torch.float16), kc, vc, m), "q dtype"),
    (lambda q, kc, vc, m: (q[..., :16], kc, vc, m), "head_dim"),
    (lambda q, kc, vc, m: (q[:, :3], kc, vc, m), "multiple of num_kv_heads"),
    (lambda q, kc, vc, m: (q[0], kc, vc, m), r"q must be \(T, Hq, D\)"),
    (lambda q, kc, vc, m: (q, kc, vc[:-1], m), "must match"),
    (lambda q, kc, vc, m: (q, kc.int(), vc.int(), m), "cache dtype"),
    (lambda q, kc, vc, m: (q, kc[..., :24], vc[..., :24], m), "power of two"),
    (lambda q, kc, vc, m: (q.transpose(0, 2).contiguous().transpose(0, 2), kc, vc, m),
     "contiguous"),
    (lambda q, kc, vc, m: (q, kc, vc, _with(m, seq_lens=m.seq_lens.float())), "seq_lens"),
    (lambda q, kc, vc, m: (q, kc, vc, _with(m, block_tables=m.block_tables[:1])), "block_tables"),
    (lambda q, kc, vc, m: (q, kc, vc, _with(m, max_seq_len=10_000)), "fewer than"),
    (lambda q, kc, vc, m: (q, kc, vc, _with(m, seq_lens=m.seq_lens.to("meta"))), "is on meta"),
    (lambda q, kc, vc, m: (q[:1], kc, vc, m), "one query per sequence"),
])
def test_attention_launcher_errors(mutate, match):
    q, k_cache, v_cache, meta = mutate(*_errors_case())
    with pytest.raises(ValueError, match=match):
        ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2)


def test_attention_argument_errors():
    q, k_cache, v_cache, meta = _errors_case()
    with pytest.raises(ValueError, match="sliding_window"):
        ta.paged_attention(q, k_cache, v_cache, meta, 0.2, sliding_window=0)
    with pytest.raises(ValueError, match="scale"):
        ta.paged_attention(q, k_cache, v_cache, meta, float("nan"))
    with pytest.raises(ValueError, match="num_splits"):
        ta.paged_decode_attention(q, k_cache, v_cache, meta, 0.2, num_splits=0)
    with pytest.raises(ValueError, match="max_query_len"):
        ta.paged_decode_attention(q, k_cache, v_cache, _with(meta, max_query_len=2), 0.2)
    with pytest.raises(ValueError, match="query_start_loc"):
        ta.paged_prefill_attention(q, k_cache, v_cache,
                                   _with(meta, query_start_loc=meta.query_start_loc[:2]), 0.2)


def test_write_kv_errors(monkeypatch):
    q, k_cache, v_cache, meta = _errors_case()
    k = torch.randn(2, 2, 32, device=DEVICE)
    slots = meta.slot_mapping
    with pytest.raises(ValueError, match="k and v must both"):
        ta.write_kv(k, k[:1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="does not match"):
        ta.write_kv(k[:, :1], k[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        ta.write_kv(k, k, k_cache, v_cache, slots[:1])
    with pytest.raises(ValueError, match="slot_mapping"):
        ta.write_kv(k, k, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="is on meta"):
        ta.write_kv(k, k, k_cache, v_cache, slots.to("meta"))
    monkeypatch.setattr(ta, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ta.write_kv(k.cpu(), k.cpu(), k_cache.cpu(), v_cache.cpu(), slots.cpu())
