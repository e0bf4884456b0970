"""Paged attention: metadata, the KV write through a slot mapping, and the pure-torch reference.

The KV cache of one layer is a pair of tensors (k_cache, v_cache), each
(num_blocks, block_size, num_kv_heads, head_dim). A token at position p of a sequence lives in
block `block_table[p // block_size]` at offset `p % block_size`; its flat slot is
`block_id * block_size + offset`.

One step's tokens are flattened across sequences:

    query_start_loc:  0        3   4            9
    tokens:          [a a a | b | c c c c c]      seq b decodes, a and c prefill (c over a prefix)
    seq_lens:         3        17  12             context length after this step's tokens

Query j of a sequence with q_len new tokens and seq_len context sits at position
seq_len - q_len + j and attends to keys 0..that position (causal):

    keys      0 1 2 3 4 5        seq_len 6, q_len 3 (a chunk over a cached prefix of 3)
    query 0   x x x x . .        position 3
    query 1   x x x x x .        position 4
    query 2   x x x x x x        position 5

Pie's far prefix (`FarPrefix`): a running sequence's oldest full blocks may live in CPU memory; the
worker copies one layer's of them into a staging ring before that layer attends, and the attention
reads them from the ring (`far_kv`) instead of the cache:

    positions  0 ......... far_blocks[b] * block_size ............ seq_len
               | ring slots ring_start[b] + j (j = p // bs) | block_tables[b, p // bs] |

Two implementations with one contract: `paged_attention_ref`, the plain reference (explicit fp32
scores, mask, softmax; kernels are tested against it), and `paged_attention_sdpa`, the torch
backend the engine runs (on the CPU above all), through fused scaled_dot_product_attention.

This module imports nothing from kvtier.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LayerHooks:
    """What a forward does around each decoder layer: the per-layer pipeline of the KV tiers.

    before(i) runs before layer i (wait for the KV layer i reads; issue what layer i+d will read),
    after(i) after it (release a staging slot, save what must be saved). Both run on the host, in
    layer order, once per layer of an eager forward. A CUDA graph replayed in segments (one per
    group of layers, kvtier/engine/cuda_graphs.py) calls before(i) for each layer of a segment
    before replaying it and after(i) for each after: a hook acts on whole segments there, so
    segments follow the pipeline.
    """

    before: Callable[[int], None] | None = None
    after: Callable[[int], None] | None = None

    def before_layer(self, layer: int) -> None:
        if self.before is not None:
            self.before(layer)

    def after_layer(self, layer: int) -> None:
        if self.after is not None:
            self.after(layer)


NO_HOOKS = LayerHooks()

# One layer's staging ring (k_ring, v_ring), each (ring_slots, block_size, Hkv, D), views allowed.
FarKV = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class FarPrefix:
    """Each sequence's first far_blocks[b] blocks are read from a staging ring, not the cache: its
    j-th block (j < far_blocks[b]) is ring slot ring_start[b] + j.

    The far blocks are a prefix of whole blocks that this step neither writes nor ends in (its new
    K/V go to cache blocks), so each source covers one contiguous range of positions. Their
    block-table entries are never dereferenced: they may hold anything (-1, a stale id).
    """

    far_blocks: torch.Tensor  # (B,) int32 (int64 accepted)
    ring_start: torch.Tensor  # (B,) int32 (int64 accepted)
    # Host copies for the torch paths (no sync); the Triton launchers never read them. Empty: the
    # torch paths read the device tensors when they need host ints.
    far_blocks_list: list[int] = dataclasses.field(default_factory=list)
    ring_start_list: list[int] = dataclasses.field(default_factory=list)

    @functools.cached_property
    def host(self) -> tuple[list[int], list[int]]:
        """(far_blocks, ring_start) as host lists (once: every layer reads them)."""
        if self.far_blocks_list or not self.far_blocks.shape[0]:
            return self.far_blocks_list, self.ring_start_list
        return self.far_blocks.tolist(), self.ring_start.tolist()

    @property
    def max_far_blocks(self) -> int | None:
        """The longest far prefix in blocks when known on the host without a sync, else None."""
        return max(self.far_blocks_list) if self.far_blocks_list else None

    def take(self, seqs: list[int]) -> FarPrefix:
        """The far prefixes of sequences `seqs` (host indices, repeats allowed), in that order."""
        index = torch.tensor(seqs, dtype=torch.long, device=self.far_blocks.device)
        far_blocks, ring_start = self.far_blocks_list, self.ring_start_list
        return FarPrefix(self.far_blocks[index], self.ring_start[index],
                         [far_blocks[b] for b in seqs] if far_blocks else [],
                         [ring_start[b] for b in seqs] if ring_start else [])


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64, -1 = padding token, not written
    block_tables: torch.Tensor  # (B, max_blocks) int32
    seq_lens: torch.Tensor  # (B,) int32, context length including this step's tokens
    query_start_loc: torch.Tensor  # (B+1,) int32
    max_query_len: int
    max_seq_len: int
    seq_lens_list: list[int] = dataclasses.field(default_factory=list)  # host copies, no sync
    query_lens_list: list[int] = dataclasses.field(default_factory=list)
    # The same step seen as one decode per query token (token i of a sequence = a sequence of
    # length position_i + 1 with the same block table). Set for short prefills over long
    # contexts, which a decode kernel splits along the context; a prefill kernel, parallel only
    # over queries and heads, would leave most of the GPU idle.
    per_token: AttentionMetadata | None = None
    # Run around each decoder layer (see LayerHooks); the CPU tier's loads make the compute stream
    # wait before a layer for its KV, so early layers run while later ones still load.
    hooks: LayerHooks = NO_HOOKS
    # Pie: sequences whose oldest blocks are read from the layer's staging ring (see FarPrefix);
    # per_token, when set, needs its own (per_token_far builds it).
    far: FarPrefix | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @functools.cached_property
    def query_spans(self) -> list[tuple[int, int, int, int]]:
        """(sequence, first query row, q_len, seq_len) of every sequence with queries in this step
        (once per step: every layer's attention reads them)."""
        starts = self.query_start_loc.tolist() if not self.query_lens_list else None
        seq_lens = self.seq_lens_list or self.seq_lens.tolist()
        spans, start = [], 0
        for b, seq_len in enumerate(seq_lens):
            q_len = self.query_lens_list[b] if starts is None else starts[b + 1] - starts[b]
            if q_len:
                spans.append((b, start, q_len, seq_len))
            start += q_len
        return spans

    @functools.cached_property
    def decode_rows(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """A mixed step's one-query sequences: (query rows, sequences, their longest context), or None."""
        decodes = [span for span in self.query_spans if span[2] == 1]
        if not decodes:
            return None
        device = self.seq_lens.device
        return (torch.tensor([start for _, start, _, _ in decodes], device=device),
                torch.tensor([b for b, _, _, _ in decodes], device=device),
                max(seq_len for _, _, _, seq_len in decodes))

    @functools.cached_property
    def decode_far(self) -> FarPrefix | None:
        """The far prefixes of decode_rows' sequences (once per step), or None without self.far."""
        if self.far is None:
            return None
        return self.far.take([b for b, _, q_len, _ in self.query_spans if q_len == 1])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def per_token_far(meta: AttentionMetadata) -> FarPrefix | None:
    """meta.per_token's FarPrefix, from meta.far: the per-token view's row i is query token i of
    the step, and it reads its sequence's far prefix from the same ring slots."""
    if meta.far is None:
        return None
    q_lens = meta.query_lens_list or torch.diff(meta.query_start_loc).tolist()
    return meta.far.take([b for b, q_len in enumerate(q_lens) for _ in range(q_len)])


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --kv-cache-dtype fp8 (vLLM's meaning, e4m3 unless fp8_e5m2): the cache stores x / scale with the
# scale 1.0 that vLLM uses when a checkpoint brings no KV scales, so the attention kernels only
# convert on load; the queries and outputs keep the model's dtype
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CACHE_DTYPES = (*COMPUTE_DTYPES, *FP8_CACHE_DTYPES)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to a cache dtype; an fp8 cache saturates at the format's largest finite value
    (e4m3fn has no infinity: torch's cast of an overflow may give NaN where vLLM's saturates)."""
    if dtype in FP8_CACHE_DTYPES:
        limit = torch.finfo(dtype).max
        return x.float().clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, v_name: str = "v_cache") -> None:
    """The paged layout every attention path reads: K (num_blocks, block_size, num_kv_heads,
    head_dim) in a float dtype, and V (named `v_name` in errors) of K's shape and dtype, block b
    of one holding the same tokens as block b of the other."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{v_name} {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {k_cache.dtype}")


def check_query(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Queries (T, Hq, D) for a paged cache (check_paged_cache): the cache's head_dim and dtype (any
    compute dtype over an fp8 cache), Hq a multiple of its KV heads."""
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, D), got shape {tuple(q.shape)}")
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype != k_cache.dtype and not (k_cache.dtype in FP8_CACHE_DTYPES and q.dtype in COMPUTE_DTYPES):
        raise ValueError(f"q dtype {q.dtype} must equal the cache dtype {k_cache.dtype} (or be one of "
                         f"{COMPUTE_DTYPES} over an fp8 cache)")


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hkv, D) -> cache slots; slots < 0 are skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(k[valid], k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(v[valid], v_cache.dtype)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                  ring: torch.Tensor | None = None, num_far: int = 0, ring_start: int = 0) -> torch.Tensor:
    """(num_blocks, bs, Hkv, D) + (max_blocks,) -> (seq_len, Hkv, D) in position order; the first
    num_far blocks come from ring (ring_slots, bs, Hkv, D) slots ring_start.. (a FarPrefix)."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[num_far:num_blocks].long()]  # (nb - num_far, bs, Hkv, D)
    if ring is not None and num_far:
        blocks = torch.cat([ring[ring_start:ring_start + num_far], blocks])
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def gather_padded_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
                     far: FarPrefix | None = None, ring: torch.Tensor | None = None) -> torch.Tensor:
    """(num_blocks, bs, Hkv, D) + (B, max_blocks) -> (B, Hkv, L, D), L = max_seq_len rounded up to
    whole blocks; the positions past a sequence's length hold whatever its table points at. With
    `far`, each sequence's far blocks come from `ring` (ring_slots, bs, Hkv, D)."""
    num_blocks = -(-max_seq_len // cache.shape[1])
    tables = block_tables[:, :num_blocks].long()
    blocks = cache[tables] if far is None or ring is None else _gather_far_blocks(cache, ring, tables, far)
    return blocks.flatten(1, 2).transpose(1, 2)


def _gather_far_blocks(cache: torch.Tensor, ring: torch.Tensor, tables: torch.Tensor,
                       far: FarPrefix) -> torch.Tensor:
    """cache[tables] (B, nb, bs, Hkv, D) with row b's first far_blocks[b] blocks read from ring
    slots ring_start[b] + j instead. No host sync: far blocks are selected on the device, their
    table entries replaced by block 0 before indexing (they may be garbage); only the first
    max_far_blocks columns (all, when unknown on the host) gather from the ring."""
    j = torch.arange(tables.shape[1], device=tables.device)
    is_far = j < far.far_blocks[:, None].long()  # (B, nb)
    blocks = cache[tables.masked_fill(is_far, 0)]
    max_far = far.max_far_blocks
    num_far = tables.shape[1] if max_far is None else min(max_far, tables.shape[1])
    if num_far:
        head = is_far[:, :num_far]
        slots = (far.ring_start[:, None].long() + j[:num_far]).masked_fill(~head, 0)
        blocks[:, :num_far] = torch.where(head[:, :, None, None, None], ring[slots], blocks[:, :num_far])
    return blocks


def _far_of(meta: AttentionMetadata, far_kv: FarKV | None) -> FarPrefix | None:
    """The far prefix the attention honours: both the metadata's and this layer's ring, or none."""
    return meta.far if far_kv is not None else None


def _span_far(far: FarPrefix | None, far_kv: FarKV | None,
              b: int) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """Sequence b's (k_ring, v_ring, far blocks, first ring slot), or None when it has none."""
    if far is None or far_kv is None or not far.host[0][b]:
        return None
    return (*far_kv, far.host[0][b], far.host[1][b])


def _gather_one(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                far: tuple[torch.Tensor, torch.Tensor, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K, V (seq_len, Hkv, D); `far` from _span_far."""
    if far is None:
        return gather_kv_ref(k_cache, block_table, seq_len), gather_kv_ref(v_cache, block_table, seq_len)
    k_ring, v_ring, num_far, ring_start = far
    return (gather_kv_ref(k_cache, block_table, seq_len, k_ring, num_far, ring_start),
            gather_kv_ref(v_cache, block_table, seq_len, v_ring, num_far, ring_start))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q (..., Hkv, G, Lq, D), k/v (..., Hkv, Lk, D), mask (..., 1, 1, Lq, Lk) bool -> like q."""
    scores = torch.matmul(q.float(), k.float().unsqueeze(-3).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float().unsqueeze(-3)).to(q.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                        *, far_kv: FarKV | None = None) -> torch.Tensor:
    """q (T, Hq, D) -> (T, Hq, D); K/V of this step must already be in the cache. With meta.far and
    far_kv (this layer's ring), far blocks are read from the ring."""
    far = _far_of(meta, far_kv)
    if meta.is_decode_only:
        return _decode_ref(q, k_cache, v_cache, meta, scale, sliding_window, far, far_kv)
    out = torch.empty_like(q)
    for b, start, q_len, seq_len in meta.query_spans:
        out[start:start + q_len] = _prefill_one(q[start:start + q_len], k_cache, v_cache,
                                                meta.block_tables[b], seq_len, scale, sliding_window,
                                                _span_far(far, far_kv, b))
    return out


def _group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(..., Lq, Hq, D) -> (..., Hkv, G, Lq, D)"""
    *lead, lq, hq, d = q.shape
    q = q.reshape(*lead, lq, num_kv_heads, hq // num_kv_heads, d)
    return q.movedim(-4, -2)


def _ungroup(o: torch.Tensor) -> torch.Tensor:
    """(..., Hkv, G, Lq, D) -> (..., Lq, Hq, D)"""
    o = o.movedim(-2, -4)
    return o.reshape(*o.shape[:-3], -1, o.shape[-1])


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        mask &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - sliding_window
    return mask


def _prefill_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_len: int, scale: float, sliding_window: int | None,
                 far: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    q_len, num_kv_heads = q.shape[0], k_cache.shape[2]
    k, v = (x.transpose(0, 1) for x in _gather_one(k_cache, v_cache, block_table, seq_len, far))  # (Hkv, L, D)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    mask = _causal_mask(q_pos, k_pos, sliding_window)  # (Lq, Lk)
    return _ungroup(_attend(_group(q, num_kv_heads), k, v, mask, scale))


def _decode_kv_mask(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, max_seq_len: int, sliding_window: int | None,
                    far: FarPrefix | None = None,
                    far_kv: FarKV | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query per sequence at position seq_len - 1: K, V (B, Hkv, L, D) padded to max_seq_len
    and the mask (B, 1, L) of the keys each query sees; far blocks from far_kv when far is set."""
    k_ring, v_ring = far_kv if far is not None and far_kv is not None else (None, None)
    k = gather_padded_kv(k_cache, block_tables, max_seq_len, far, k_ring)  # (B, Hkv, L, D)
    v = gather_padded_kv(v_cache, block_tables, max_seq_len, far, v_ring)
    k_pos = torch.arange(k.shape[2], device=k.device)
    q_pos = (seq_lens.long() - 1).unsqueeze(-1)  # (B, 1)
    return k, v, _causal_mask(q_pos, k_pos.expand(k.shape[0], -1), sliding_window)


def _decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None,
                far: FarPrefix | None, far_kv: FarKV | None) -> torch.Tensor:
    """All sequences have one query: gather every context padded to max_seq_len at once."""
    k, v, mask = _decode_kv_mask(k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                                 sliding_window, far, far_kv)
    qg = _group(q.unsqueeze(1), k_cache.shape[2])  # (B, Hkv, G, 1, D)
    return _ungroup(_attend(qg, k, v, mask[:, None, None], scale)).squeeze(1)


# -- the torch backend: fused SDPA ------------------------------------------------------------------
#
# On the CPU, scaled_dot_product_attention runs a flash kernel that works in tiles of queries and
# keys with an online softmax: no (Hq, Lq, Lk) fp32 score matrix is written and read back four times
# (scale, mask, softmax, matmul), and with is_causal the tiles above the diagonal are skipped. It
# takes that kernel only for 4-D inputs; enable_gqa (torch >= 2.5) sends the CPU to the unfused math
# path, so GQA is a stride-0 view instead: K/V (Hkv, L, D) -> (Hkv, G, L, D), no copy, queries
# grouped by their KV head as (Hkv, G, Lq, D).

def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                         *, far_kv: FarKV | None = None) -> torch.Tensor:
    """paged_attention_ref's contract: q (T, Hq, D) -> (T, Hq, D), this step's K/V already cached.

    Decodes (one query) attend in one batched call, a mixed step's too; longer queries one call each."""
    far = _far_of(meta, far_kv)
    if meta.is_decode_only:
        return _decode_sdpa(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                            scale, sliding_window, far, far_kv)
    out = torch.empty_like(q)
    decodes = meta.decode_rows
    if decodes is not None:
        rows, seqs, max_seq_len = decodes
        out[rows] = _decode_sdpa(q[rows], k_cache, v_cache, meta.block_tables[seqs], meta.seq_lens[seqs],
                                 max_seq_len, scale, sliding_window,
                                 None if far is None else meta.decode_far, far_kv)
    for b, start, q_len, seq_len in meta.query_spans:
        if q_len > 1:
            out[start:start + q_len] = _prefill_one_sdpa(q[start:start + q_len], k_cache, v_cache,
                                                         meta.block_tables[b], seq_len, scale, sliding_window,
                                                         _span_far(far, far_kv, b))
    return out


def _grouped_kv(kv: torch.Tensor, group: int) -> torch.Tensor:
    """(..., Hkv, L, D) -> (..., Hkv, G, L, D) as a view: each KV head read by its G query heads."""
    return kv.unsqueeze(-3).expand(*kv.shape[:-2], group, *kv.shape[-2:])


def _prefill_one_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_len: int, scale: float, sliding_window: int | None,
                      far: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """q (Lq, Hq, D) of one sequence -> (Lq, Hq, D); `far` from _span_far."""
    q_len, num_kv_heads = q.shape[0], k_cache.shape[2]
    qg = _group(q, num_kv_heads)  # (Hkv, G, Lq, D)
    k, v = (_grouped_kv(x.transpose(0, 1).to(q.dtype), qg.shape[1])  # (Hkv, G, L, D)
            for x in _gather_one(k_cache, v_cache, block_table, seq_len, far))
    mask = None
    # is_causal aligns the diagonal top-left (query j sees keys 0..j): right only when the queries
    # are the whole context. Otherwise (a chunk over a cached prefix, a window) an explicit mask.
    if sliding_window is not None or 1 < q_len < seq_len:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = _causal_mask(q_pos, torch.arange(seq_len, device=q.device), sliding_window)  # (Lq, L)
    is_causal = mask is None and q_len > 1
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return _ungroup(o)


def _decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                 sliding_window: int | None, far: FarPrefix | None = None,
                 far_kv: FarKV | None = None) -> torch.Tensor:
    """One query per sequence, q (B, Hq, D) -> (B, Hq, D). Contexts padded to max_seq_len; the G
    query heads of a KV head are its "query length", so K/V are read once per KV head."""
    num_seqs, num_kv_heads = q.shape[0], k_cache.shape[2]
    k, v, mask = _decode_kv_mask(k_cache, v_cache, block_tables, seq_lens, max_seq_len, sliding_window,
                                 far, far_kv)
    qg = q.reshape(num_seqs, num_kv_heads, -1, q.shape[-1])  # (B, Hkv, G, D)
    k, v = k.to(q.dtype), v.to(q.dtype)  # no copy unless the cache is fp8
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], scale=scale)  # (B, Hkv, G, D)
    return o.reshape(q.shape)
