"""KCache decode attention (kvtier/ops/kcache.py): the reference against exact paged attention and
against its own definition, the fast path (Triton scores and V gather) against the reference, the
attended set's guarantees, and the argument checks.

Without a GPU tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors; on a GPU
the same cases run compiled, K on the GPU and V in a pinned CPU store read through UVA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvtier.ops.kcache as kc
from kvtier.ops.attention import AttentionMetadata, paged_attention_ref
from kvtier.ops.kcache import (
    KCacheSettings,
    attended_mask,
    gather_v_rows,
    gather_v_rows_ref,
    kcache_decode,
    kcache_decode_ref,
    kcache_link_bytes,
    kcache_scores,
    kcache_scores_ref,
    kcache_select,
    kcache_select_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # of q, K, block tables
BS, D = 4, 16
# sink 2 + window 4 + top_n 8 = a budget of 14: 1 and 5 are shorter than sink + window, 13 and 14
# fit the budget, 15 is one past it, 40 and 77 choose 8 of 34 and 71 candidates.
SEQ_LENS = (1, 5, 13, 14, 15, 40, 77)
SETTINGS = {"top_n": 8, "sink": 2, "window": 4}  # page mode: 2 pages of 4
HEADS = [(4, 4), (4, 2), (6, 1)]  # (Hq, Hkv): MHA, GQA, MQA
MODES = ["row", "page"]


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # (B, Hq, D)
    k_cache: torch.Tensor  # (num_blocks, BS, Hkv, D) on DEVICE
    v_store: torch.Tensor  # the same on the CPU, pinned on a GPU machine
    block_tables: torch.Tensor  # (B, max_blocks) int32, scattered distinct blocks
    seq_lens: torch.Tensor  # (B,) int32
    scale: float = 0.5

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_store, self.block_tables, self.seq_lens, self.scale

    def select_args(self) -> tuple:
        return self.q, self.k_cache, self.block_tables, self.seq_lens, self.scale


def make_inputs(num_heads: int, num_kv_heads: int, seq_lens: tuple[int, ...] = SEQ_LENS,
                dtype: torch.dtype = torch.float32, seed: int = 0, extra_blocks: int = 0) -> Inputs:
    """Random inputs drawn on the CPU (the same numbers on every machine), never zeros."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(seq_lens) // BS) + extra_blocks
    num_blocks = len(seq_lens) * max_blocks + 3
    k = torch.randn(num_blocks, BS, num_kv_heads, D, generator=gen)
    v = torch.randn(num_blocks, BS, num_kv_heads, D, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * max_blocks].view(len(seq_lens), -1)
    q = torch.randn(len(seq_lens), num_heads, D, generator=gen)
    return Inputs(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.pin_memory() if DEVICE.type == "cuda" else v,
                  tables.to(DEVICE, torch.int32), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))


def exact_attention(x: Inputs) -> torch.Tensor:
    """kvtier's paged attention reference over the whole context, V on the device."""
    meta = AttentionMetadata(
        slot_mapping=torch.full((x.q.shape[0],), -1, dtype=torch.int64, device=DEVICE),
        block_tables=x.block_tables, seq_lens=x.seq_lens,
        query_start_loc=torch.arange(x.q.shape[0] + 1, dtype=torch.int32, device=DEVICE),
        max_query_len=1, max_seq_len=int(x.seq_lens.max()))
    return paged_attention_ref(x.q, x.k_cache, x.v_store.to(DEVICE), meta, x.scale)


# ------------------------------------------------------------------------------- exactness

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels compiled")
def test_interpreter_is_active():
    """Without a GPU the kernel tests must run interpreted; a silent fallback would hide them."""
    assert kc._INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_covering_budget_is_exact_attention(mode, heads, backend):
    """When top_n covers every context, KCache is exact paged attention."""
    x = make_inputs(*heads)
    settings = KCacheSettings(top_n=80, sink=2, window=4, mode=mode)
    out = kcache_decode(*x.args(), settings, backend=backend)
    torch.testing.assert_close(out, exact_attention(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_fast_path_matches_reference(mode, heads, aggregate):
    """top_n below the context: the Triton scores and gather give the reference's set and output."""
    x = make_inputs(*heads, seed=1)
    settings = KCacheSettings(**SETTINGS, mode=mode, aggregate=aggregate)
    positions = kcache_select(*x.select_args(), settings, backend="triton")
    ref_set = kcache_select_ref(*x.select_args(), settings)
    assert torch.equal(attended_mask(positions, max(SEQ_LENS)), ref_set)
    out = kcache_decode(*x.args(), settings, backend="triton")
    torch.testing.assert_close(out, kcache_decode_ref(*x.args(), settings), atol=1e-5, rtol=1e-5)


def test_fast_path_bf16():
    x = make_inputs(4, 2, dtype=torch.bfloat16, seed=2)
    settings = KCacheSettings(**SETTINGS)
    out = kcache_decode(*x.args(), settings, backend="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, kcache_decode_ref(*x.args(), settings), atol=2e-2, rtol=2e-2)


def test_grid_sized_past_the_longest_context():
    """A max_seq_len above every seq_len (a CUDA graph's cap) changes nothing."""
    x = make_inputs(4, 2, seed=3, extra_blocks=3)
    settings = KCacheSettings(**SETTINGS, mode="page")
    out = kcache_decode(*x.args(), settings, max_seq_len=max(SEQ_LENS) + 3 * BS, backend="triton")
    torch.testing.assert_close(out, kcache_decode_ref(*x.args(), settings), atol=1e-5, rtol=1e-5)


def test_empty_context_gives_zeros():
    x = make_inputs(4, 2, seq_lens=(0, 9, 30), seed=4)
    settings = KCacheSettings(**SETTINGS)
    for backend in ("triton", "torch"):
        out = kcache_decode(*x.args(), settings, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(out[1:], kcache_decode_ref(*x.args(), settings)[1:], atol=1e-5, rtol=1e-5)


def test_reference_is_softmax_over_its_set():
    """The reference's output is exact attention with every position outside its set masked off."""
    x = make_inputs(4, 2, seed=5)
    settings = KCacheSettings(**SETTINGS)
    attended = kcache_select_ref(*x.select_args(), settings)  # (B, Hkv, L)
    out = kcache_decode_ref(*x.args(), settings)
    for b, seq_len in enumerate(SEQ_LENS):
        k, v = (dense(cache.to(DEVICE), x.block_tables[b], seq_len) for cache in (x.k_cache, x.v_store))
        scores = torch.einsum("hgd,hld->hgl", group(x.q[b], k.shape[0]), k) * x.scale  # (Hkv, G, L)
        scores = scores.masked_fill(~attended[b, :, None, :seq_len], float("-inf"))
        expected = torch.einsum("hgl,hld->hgd", scores.softmax(-1), v).reshape(x.q[b].shape)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- the attended set

@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_rows_chosen_are_the_best_candidates(aggregate):
    """Row mode, against the definition: the group's summed (or max) softmax probability, no logs."""
    x = make_inputs(4, 2, seed=6)
    settings = KCacheSettings(**SETTINGS, aggregate=aggregate)
    attended = kcache_select_ref(*x.select_args(), settings)
    for b, seq_len in enumerate(SEQ_LENS):
        if seq_len <= settings.budget:
            continue
        mass, candidate = group_mass(x, b, seq_len, settings)  # (Hkv, L), (L,)
        chosen = attended[b, :, :seq_len] & candidate
        assert (chosen.sum(-1) == settings.top_n).all()
        for h in range(mass.shape[0]):
            assert mass[h][chosen[h]].min() >= mass[h][candidate & ~chosen[h]].max()


def test_pages_chosen_are_the_best_pages():
    x = make_inputs(4, 2, seed=7)
    settings = KCacheSettings(**SETTINGS, mode="page")
    attended = kcache_select_ref(*x.select_args(), settings)
    for b, seq_len in enumerate(SEQ_LENS):
        if seq_len <= settings.budget:
            continue
        mass, candidate = group_mass(x, b, seq_len, settings)
        num_pages = -(-seq_len // BS)
        page_of = torch.arange(seq_len, device=DEVICE) // BS
        for h in range(mass.shape[0]):
            best = torch.full((num_pages,), -1.0, device=DEVICE).scatter_reduce(
                0, page_of[candidate], mass[h][candidate], "amax")  # -1: no candidate in the page
            chosen = torch.zeros(num_pages, dtype=torch.bool, device=DEVICE)
            chosen[page_of[attended[b, h, :seq_len] & candidate]] = True
            assert chosen.sum() == settings.top_n // BS
            assert best[chosen].min() >= best[~chosen].max()
            assert torch.equal(attended[b, h, :seq_len] & candidate, chosen[page_of] & candidate)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attended_set_holds_sink_and_window(mode, backend):
    """Sink and window always; no position twice; everything when the context fits the budget;
    in row mode exactly min(seq_len, budget) positions."""
    x = make_inputs(4, 2, seq_lens=(*SEQ_LENS, 3, 6, 7, 26), seed=8)
    settings = KCacheSettings(**SETTINGS, mode=mode)
    positions = kcache_select(*x.select_args(), settings, backend=backend)  # (B, Hkv, n)
    attended = attended_mask(positions, int(x.seq_lens.max()))
    assert torch.equal(attended, kcache_select_ref(*x.select_args(), settings))
    pos = torch.arange(attended.shape[-1], device=DEVICE)
    for b, seq_len in enumerate(x.seq_lens.tolist()):
        fixed = (pos < min(settings.sink, seq_len)) | ((pos >= seq_len - settings.window) & (pos < seq_len))
        assert attended[b][:, fixed].all()
        assert not attended[b][:, seq_len:].any()
        num_listed = (positions[b] >= 0).sum(-1)  # (Hkv,)
        assert (attended[b].sum(-1) == num_listed).all(), "a position listed twice"
        if seq_len <= settings.budget:
            assert attended[b][:, :seq_len].all()
        if mode == "row":
            assert (num_listed == min(seq_len, settings.budget)).all()


def test_link_bytes_count_the_rows_fetched():
    x = make_inputs(4, 2, seed=9)
    settings = KCacheSettings(**SETTINGS)
    positions = kcache_select(*x.select_args(), settings)
    rows = sum(min(n, settings.budget) for n in SEQ_LENS) * x.k_cache.shape[2]
    assert kcache_link_bytes(positions, x.v_store) == rows * D * 4


# ------------------------------------------------------------------------------- the kernels

def test_scores_kernel_matches_reference():
    x = make_inputs(6, 2, seed=10, extra_blocks=2)
    max_seq_len = max(SEQ_LENS) + 5  # positions past every context: -inf
    scores = kcache_scores(*x.select_args(), max_seq_len=max_seq_len, backend="triton")
    ref = kcache_scores_ref(*x.select_args(), max_seq_len)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.isinf(), ref.isinf())


def test_gather_kernel_matches_reference():
    """Scattered positions, unused slots (-1) anywhere: the kernel's rows are the reference's, bit for bit."""
    x = make_inputs(4, 2, seed=11)
    gen = torch.Generator().manual_seed(12)
    positions = torch.stack([torch.randint(0, n, (2, 37), generator=gen) for n in SEQ_LENS])  # (B, Hkv, 37)
    positions[torch.rand(positions.shape, generator=gen) < 0.3] = -1
    positions = positions.to(DEVICE)
    rows = gather_v_rows(x.v_store, x.block_tables, positions, backend="triton")
    assert torch.equal(rows, gather_v_rows_ref(x.v_store, x.block_tables, positions))
    b, h, r = 6, 1, int((positions[6, 1] >= 0).nonzero()[0])
    pos = int(positions[b, h, r])
    block = int(x.block_tables[b, pos // BS])
    assert torch.equal(rows[b, h, r].cpu(), x.v_store[block, pos % BS, h])
    assert not rows[positions < 0].any()


def test_default_backend_without_interpreter_is_the_reference(monkeypatch):
    """CPU tensors with Triton not interpreted: the reference runs, no kernel is launched."""
    if DEVICE.type == "cuda":
        pytest.skip("CUDA tensors always take the kernels")
    x = make_inputs(4, 2, seed=13)
    monkeypatch.setattr(kc, "_INTERPRETED", False, raising=False)
    monkeypatch.setattr(kc, "_launch_scores", lambda *a: pytest.fail("launched a kernel"))
    out = kcache_decode(*x.args(), KCacheSettings(**SETTINGS))
    torch.testing.assert_close(out, kcache_decode_ref(*x.args(), KCacheSettings(**SETTINGS)))


# ------------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs, message", [
    ({"top_n": -1}, "top_n must be an int >= 0"),
    ({"top_n": 2.5}, "top_n must be an int"),
    ({"top_n": 8, "sink": -2}, "sink must be an int >= 0"),
    ({"top_n": 8, "window": 0}, "window must be an int >= 1"),
    ({"top_n": 8, "mode": "block"}, "mode must be one of"),
    ({"top_n": 8, "aggregate": "mean"}, "aggregate must be one of"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KCacheSettings(**kwargs)


def test_bad_arguments_raise():
    x = make_inputs(4, 2, seq_lens=(9, 30))
    settings = KCacheSettings(**SETTINGS)
    cases = [
        (dict(settings=KCacheSettings(top_n=6, mode="page")), "multiple of the block size"),
        (dict(v_store=x.v_store[:, :, :1]), "must match k_cache"),
        (dict(q=x.q[:, :3]), "multiple of num_kv_heads"),
        (dict(q=x.q.double()), "q dtype"),
        (dict(seq_lens=x.seq_lens[:1]), "seq_lens must be"),
        (dict(block_tables=x.block_tables.float()), "block_tables must be"),
        (dict(scale=float("nan")), "scale must be a finite"),
        (dict(settings={"top_n": 8}), "settings must be a KCacheSettings"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(max_seq_len=10 ** 4), "fewer than max_seq_len"),
    ]
    for change, message in cases:
        args = dict(q=x.q, k_cache=x.k_cache, v_store=x.v_store, block_tables=x.block_tables,
                    seq_lens=x.seq_lens, scale=x.scale, settings=settings) | change
        with pytest.raises(ValueError, match=message):
            kcache_decode(**args)
    with pytest.raises(ValueError, match="positions must be"):
        gather_v_rows(x.v_store, x.block_tables, torch.zeros(2, 3, 4, dtype=torch.int64, device=DEVICE))


# ------------------------------------------------------------------------------- helpers

def dense(cache: torch.Tensor, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(num_blocks, BS, Hkv, D) -> one sequence's (Hkv, L, D), fp32, by plain position arithmetic."""
    pos = torch.arange(seq_len, device=cache.device)
    return cache[table.long()[pos // BS], pos % BS].float().transpose(0, 1)


def group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(Hq, D) -> (Hkv, G, D) fp32: query head h * G + g reads KV head h."""
    return q.float().view(num_kv_heads, -1, q.shape[-1])


def group_mass(x: Inputs, b: int, seq_len: int, settings: KCacheSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's aggregated probability (Hkv, L) by the definition (softmax over the whole
    context, summed or maxed over the group) and its candidates (L,) (neither sink nor window)."""
    k = dense(x.k_cache, x.block_tables[b], seq_len)
    probs = (torch.einsum("hgd,hld->hgl", group(x.q[b], k.shape[0]), k) * x.scale).softmax(-1)
    mass = probs.sum(1) if settings.aggregate == "sum" else probs.amax(1)
    pos = torch.arange(seq_len, device=DEVICE)
    return mass, (pos >= settings.sink) & (pos < seq_len - settings.window)
