"""Pie's far prefix: attention that reads each sequence's oldest blocks from a staging ring.

Every case computes a step's attention twice over the same keys: once from the cache alone, then
with some sequences' oldest full blocks moved into a ring (at an offset, between garbage slots),
their cache blocks overwritten with NaN and their block-table entries set to garbage (a NaN block,
-1, an id past the cache). The second must equal the first bit for bit: the same values attended
in the same order give the same floats, so any key read from the wrong place shows (NaN, an index
error, or a different sum). Triton kernels run under the interpreter on the CPU (tests/conftest.py).
"""

import dataclasses
import inspect

import pytest
import torch

import kvtier.ops.triton_attention as ta
from kvtier.ops.attention import (
    AttentionMetadata,
    FarPrefix,
    paged_attention_ref,
    paged_attention_sdpa,
    per_token_far,
    write_kv_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RING_OFFSET = 2  # ring slots before the first used one, and garbage after the last
SCALE = 0.3


def _step(seq_lens, q_lens, *, num_kv_heads=2, group=2, head_dim=32, block_size=8,
          dtype=torch.float32, seed=0):
    """Random caches under shuffled block tables, this step's K/V written -> (q, k_cache, v_cache, meta).

    Table entries past a sequence's blocks point at a finite spare block: the torch decode path
    gathers (and masks) whole padded rows, and 0 x NaN would be NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    ids = torch.randperm(num_blocks - 1, generator=gen)
    tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), num_blocks - 1, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[sum(blocks_per_seq[:b]):sum(blocks_per_seq[:b + 1])]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size
             for b, (s, n) in enumerate(zip(seq_lens, q_lens)) for p in range(s - n, s)]
    index = dict(dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE), block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, **index),
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), **index),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        seq_lens_list=list(seq_lens), query_lens_list=list(q_lens))
    k, v = (torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(len(slots), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, meta


def _far_choice(meta, block_size):
    """Per sequence, cycling: none, every block it may have far, half of them. A far block lies
    wholly before this step's first query (never written now, never the last token's)."""
    most = [(s - n) // block_size for s, n in zip(meta.seq_lens_list, meta.query_lens_list)]
    return [(0, m, m // 2)[b % 3] for b, m in enumerate(most)]


def _move_far(k_cache, v_cache, meta, far_blocks, host_lists=True):
    """Move each sequence's first far_blocks[b] blocks into a ring -> (k_cache', v_cache', meta', far_kv).

    The ring is a strided view (offset and head axes swapped against the cache's, one entry of a
    (2, 2, ...) staging buffer); unused slots and the moved cache blocks hold NaN; the moved
    blocks' table entries become garbage: the NaN block itself, -1, or an id past the cache."""
    k_cache, v_cache, tables = k_cache.clone(), v_cache.clone(), meta.block_tables.clone()
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    ring_start = [RING_OFFSET + sum(far_blocks[:b]) for b in range(len(far_blocks))]
    num_slots = 2 * RING_OFFSET + sum(far_blocks)
    staging = torch.full((2, 2, num_slots, num_kv_heads, block_size, head_dim), float("nan"),
                         dtype=k_cache.dtype, device=DEVICE)
    k_ring, v_ring = staging[1, 0].transpose(1, 2), staging[1, 1].transpose(1, 2)  # (slots, bs, Hkv, D)
    for b, n in enumerate(far_blocks):
        for j in range(n):
            block = int(tables[b, j])
            k_ring[ring_start[b] + j], v_ring[ring_start[b] + j] = k_cache[block], v_cache[block]
            k_cache[block] = v_cache[block] = float("nan")
            tables[b, j] = (block, -1, num_blocks + 1000)[(b + j) % 3]
    index = dict(dtype=torch.int32, device=DEVICE)
    far = FarPrefix(torch.tensor(far_blocks, **index), torch.tensor(ring_start, **index),
                    list(far_blocks) if host_lists else [], ring_start if host_lists else [])
    return k_cache, v_cache, dataclasses.replace(meta, block_tables=tables, far=far), (k_ring, v_ring)


def _per_token_view(meta):
    """The step as one decode per query token, as the model runner builds it (Triton's short prefills)."""
    seq_of_token = torch.repeat_interleave(torch.arange(meta.num_seqs), torch.tensor(meta.query_lens_list))
    positions = torch.cat([torch.arange(s - n, s) for s, n in zip(meta.seq_lens_list, meta.query_lens_list)])
    index = dict(dtype=torch.int32, device=DEVICE)
    view = AttentionMetadata(meta.slot_mapping, meta.block_tables[seq_of_token.to(DEVICE)],
                             (positions + 1).to(**index), torch.arange(len(positions) + 1).to(**index),
                             1, meta.max_seq_len)
    return dataclasses.replace(meta, per_token=view)


def _both(run, seq_lens, q_lens, host_lists=True, **step):
    """run(q, k_cache, v_cache, meta, far_kv) without, then with far blocks -> (near, far) outputs."""
    q, k_cache, v_cache, meta = _step(seq_lens, q_lens, **step)
    near = run(q, k_cache, v_cache, meta, None)
    far_blocks = _far_choice(meta, k_cache.shape[1])
    assert any(far_blocks), "the case moves no block"
    k_far, v_far, meta_far, far_kv = _move_far(k_cache, v_cache, meta, far_blocks, host_lists)
    return near, run(q, k_far, v_far, meta_far, far_kv)


def _assert_same(near, far):
    assert torch.isfinite(near).all()
    assert torch.equal(near, far), (near - far).abs().max()


# ----------------------------------------------------------------------------------- torch paths

DECODE = ([1, 37, 100, 64, 16, 9, 41], [1] * 7)
# an uncached prefill (no far block possible), chunks over far prefixes, decodes, an idle sequence
MIXED = ([37, 100, 17, 64, 9, 50, 33], [37, 20, 1, 4, 0, 1, 9])


def _torch(attention, window=None):
    return lambda q, k_cache, v_cache, meta, far_kv: attention(q, k_cache, v_cache, meta, SCALE, window,
                                                               far_kv=far_kv)


@pytest.mark.parametrize("attention", [paged_attention_ref, paged_attention_sdpa])
@pytest.mark.parametrize("case", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("dtype,window,host_lists", [
    (torch.float32, None, True),
    (torch.float32, 20, True),
    (torch.float32, None, False),  # far tensors only on the device: read back when needed
    (torch.bfloat16, None, True),
])
def test_torch_paths_read_far_blocks_from_the_ring(attention, case, dtype, window, host_lists):
    _assert_same(*_both(_torch(attention, window), *case, host_lists=host_lists, dtype=dtype, group=3))


def test_torch_paths_ignore_far_without_a_ring():
    """meta.far without far_kv (a layer that stages nothing) is today's attention over the cache."""
    q, k_cache, v_cache, meta = _step(*MIXED)
    far = FarPrefix(*(torch.zeros(meta.num_seqs, dtype=torch.int32, device=DEVICE) for _ in range(2)))
    for attention in (paged_attention_ref, paged_attention_sdpa):
        assert torch.equal(attention(q, k_cache, v_cache, meta, SCALE),
                           attention(q, k_cache, v_cache, dataclasses.replace(meta, far=far), SCALE))


def test_per_token_far_repeats_each_sequences_prefix():
    _, _, _, meta = _step([40, 9, 70], [3, 0, 2])
    meta.far = FarPrefix(torch.tensor([4, 0, 8], dtype=torch.int32), torch.tensor([1, 5, 5], dtype=torch.int32),
                         [4, 0, 8], [1, 5, 5])
    far = per_token_far(meta)
    assert far.far_blocks.tolist() == far.far_blocks_list == [4, 4, 4, 8, 8]
    assert far.ring_start.tolist() == far.ring_start_list == [1, 1, 1, 5, 5]
    assert per_token_far(dataclasses.replace(meta, far=None)) is None


# ----------------------------------------------------------------------------------- Triton kernels

def _decode(num_splits, window=None):
    return lambda q, k_cache, v_cache, meta, far_kv: ta.paged_decode_attention(
        q, k_cache, v_cache, meta, SCALE, window, num_splits=num_splits, far_kv=far_kv)


def _prefill(window=None):
    return lambda q, k_cache, v_cache, meta, far_kv: ta.paged_prefill_attention(
        q, k_cache, v_cache, meta, SCALE, window, far_kv=far_kv)


def _per_token(q, k_cache, v_cache, meta, far_kv):
    meta = _per_token_view(meta)
    meta.per_token.far = per_token_far(meta)
    return ta.paged_attention(q, k_cache, v_cache, meta, SCALE, far_kv=far_kv)


@pytest.mark.parametrize("num_splits,window,dtype", [
    (1, None, torch.float32),
    (3, None, torch.float32),  # splits that start inside, at the end of, and past the far prefix
    (3, 20, torch.float32),
    (1, None, torch.bfloat16),
])
def test_decode_kernel_reads_far_blocks_from_the_ring(num_splits, window, dtype):
    _assert_same(*_both(_decode(num_splits, window), *DECODE, dtype=dtype, group=3))


@pytest.mark.parametrize("window,dtype,block_n", [
    (None, torch.float32, None),
    (24, torch.float32, None),
    (None, torch.float32, 16),  # unmasked middle tiles inside the far prefix and across its end
    (None, torch.bfloat16, None),
])
def test_prefill_kernel_reads_far_blocks_from_the_ring(monkeypatch, window, dtype, block_n):
    monkeypatch.setattr(ta, "PREFILL_BLOCK_M", 16)  # several query tiles per chunk
    if block_n is not None:
        monkeypatch.setattr(ta, "PREFILL_BLOCK_N", block_n)
    _assert_same(*_both(_prefill(window), *MIXED, dtype=dtype))


def test_chunked_prefill_over_a_far_prefix():
    """One chunk whose whole cached context (12 blocks of 8) is far; key tiles straddle its end."""
    q, k_cache, v_cache, meta = _step([130], [34], seed=5)
    k_far, v_far, meta_far, far_kv = _move_far(k_cache, v_cache, meta, [12])
    for run in (_torch(paged_attention_ref), _torch(paged_attention_sdpa), _prefill()):
        _assert_same(run(q, k_cache, v_cache, meta, None), run(q, k_far, v_far, meta_far, far_kv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_decodes_read_far_blocks_from_the_ring(dtype):
    _assert_same(*_both(_per_token, [40, 70, 33, 90], [3, 1, 5, 2], dtype=dtype, group=3))


def test_mixed_dispatch_with_far_blocks():
    """paged_attention on a mixed step without a per-token view: the prefill kernel."""
    def run(q, k_cache, v_cache, meta, far_kv):
        return ta.paged_attention(q, k_cache, v_cache, meta, SCALE, far_kv=far_kv)

    _assert_same(*_both(run, *MIXED, block_size=16))


# ----------------------------------------------------------------------------------- variants

class _Recorder:
    """Wraps a kernel: records each launch's HAS_FAR and far arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(inspect.signature(self.kernel.fn).parameters)
            self.launches.append((kwargs["HAS_FAR"], args[names.index("far_blocks_ptr")]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def recorders(monkeypatch):
    found = {name: _Recorder(getattr(ta, name)) for name in ("_decode_split_kernel", "_prefill_kernel")}
    for name, recorder in found.items():
        monkeypatch.setattr(ta, name, recorder)
    return found


def test_no_far_launches_the_no_far_variant(recorders):
    """Without meta.far or without far_kv: HAS_FAR=False and every far argument None (a
    constexpr to Triton), so the compiled kernel is the one without far code."""
    q, k_cache, v_cache, meta = _step(*MIXED)
    _, _, meta_far, far_kv = _move_far(k_cache, v_cache, meta, _far_choice(meta, 8))
    ta.paged_prefill_attention(q, k_cache, v_cache, meta, SCALE)
    ta.paged_prefill_attention(q, k_cache, v_cache, meta, SCALE, far_kv=far_kv)
    ta.paged_prefill_attention(q, k_cache, v_cache, dataclasses.replace(meta_far, block_tables=meta.block_tables),
                               SCALE)
    assert recorders["_prefill_kernel"].launches == [(False, None)] * 3
    q, k_cache, v_cache, meta = _step(*DECODE)
    ta.paged_decode_attention(q, k_cache, v_cache, meta, SCALE, num_splits=2)
    assert recorders["_decode_split_kernel"].launches == [(False, None)]


def test_precompile_launches_far_variants(recorders):
    """precompile's launches with a ring: every prefill and decode variant again with HAS_FAR
    (run here interpreted, on tiny problems that read no far block)."""
    _, k_cache, v_cache, _ = _step([16], [1], num_kv_heads=1, head_dim=16)
    ring = torch.zeros(3, *k_cache.shape[1:], dtype=k_cache.dtype, device=DEVICE)
    ta._launch_each_variant(k_cache, v_cache, 1, torch.int32, (ring, ring))
    for name, count in (("_prefill_kernel", 4), ("_decode_split_kernel", 2)):
        launches = recorders[name].launches
        assert len(launches) == count and all(has_far and ptr is not None for has_far, ptr in launches)


# ----------------------------------------------------------------------------------- errors

def test_far_argument_errors():
    q, k_cache, v_cache, meta = _step(*DECODE)
    _, _, meta_far, (k_ring, v_ring) = _move_far(k_cache, v_cache, meta, _far_choice(meta, 8))
    cases = [
        ((k_ring[:, :4], v_ring[:, :4]), meta_far, "like the cache's blocks"),
        ((k_ring.half(), v_ring.half()), meta_far, "dtype"),
        ((k_ring, v_ring), dataclasses.replace(meta_far, far=FarPrefix(meta_far.far.far_blocks[:2],
                                                                         meta_far.far.ring_start)), "far_blocks"),
        ((k_ring.to("meta"), v_ring), meta_far, "is on meta"),
    ]
    for far_kv, bad_meta, match in cases:
        with pytest.raises(ValueError, match=match):
            ta.paged_decode_attention(q, k_cache, v_cache, bad_meta, SCALE, far_kv=far_kv)


def test_per_token_view_without_its_far_prefix_is_refused():
    q, k_cache, v_cache, meta = _step([40, 70], [3, 2])
    _, _, meta_far, far_kv = _move_far(k_cache, v_cache, meta, [2, 4])
    with pytest.raises(ValueError, match="per_token"):
        ta.paged_attention(q, k_cache, v_cache, _per_token_view(meta_far), SCALE, far_kv=far_kv)
