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

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hkv, D) -> cache slots; slots < 0 are skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[valid].to(v_cache.dtype)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(num_blocks, bs, Hkv, D) + (max_blocks,) -> (seq_len, Hkv, D) in position order."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # (nb, bs, Hkv, D)
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def gather_padded_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """(num_blocks, bs, Hkv, D) + (B, max_blocks) -> (B, Hkv, L, D), L = max_seq_len rounded up to
    whole blocks; the positions past a sequence's length hold whatever its table points at."""
    num_blocks = -(-max_seq_len // cache.shape[1])
    return cache[block_tables[:, :num_blocks].long()].flatten(1, 2).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q (..., Hkv, G, Lq, D), k/v (..., Hkv, Lk, D), mask (..., 1, 1, Lq, Lk) bool -> like q."""
    scores = torch.matmul(q.float(), k.float().unsqueeze(-3).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float().unsqueeze(-3)).to(q.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
    """q (T, Hq, D) -> (T, Hq, D); K/V of this step must already be in the cache."""
    if meta.is_decode_only:
        return _decode_ref(q, k_cache, v_cache, meta, scale, sliding_window)
    out = torch.empty_like(q)
    for b, start, q_len, seq_len in meta.query_spans:
        out[start:start + q_len] = _prefill_one(q[start:start + q_len], k_cache, v_cache,
                                                meta.block_tables[b], seq_len, scale, sliding_window)
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
                 block_table: torch.Tensor, seq_len: int, scale: float,
                 sliding_window: int | None) -> torch.Tensor:
    q_len, num_kv_heads = q.shape[0], k_cache.shape[2]
    k = gather_kv_ref(k_cache, block_table, seq_len).transpose(0, 1)  # (Hkv, L, D)
    v = gather_kv_ref(v_cache, block_table, seq_len).transpose(0, 1)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    mask = _causal_mask(q_pos, k_pos, sliding_window)  # (Lq, Lk)
    return _ungroup(_attend(_group(q, num_kv_heads), k, v, mask, scale))


def _decode_kv_mask(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, max_seq_len: int,
                    sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query per sequence at position seq_len - 1: K, V (B, Hkv, L, D) padded to max_seq_len
    and the mask (B, 1, L) of the keys each query sees."""
    k = gather_padded_kv(k_cache, block_tables, max_seq_len)  # (B, Hkv, L, D)
    v = gather_padded_kv(v_cache, block_tables, max_seq_len)
    k_pos = torch.arange(k.shape[2], device=k.device)
    q_pos = (seq_lens.long() - 1).unsqueeze(-1)  # (B, 1)
    return k, v, _causal_mask(q_pos, k_pos.expand(k.shape[0], -1), sliding_window)


def _decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
    """All sequences have one query: gather every context padded to max_seq_len at once."""
    k, v, mask = _decode_kv_mask(k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                                 sliding_window)
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
                         meta: AttentionMetadata, scale: float,
                         sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention_ref's contract: q (T, Hq, D) -> (T, Hq, D), this step's K/V already cached.

    Decodes (one query) attend in one batched call, a mixed step's too; longer queries one call each."""
    if meta.is_decode_only:
        return _decode_sdpa(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                            scale, sliding_window)
    out = torch.empty_like(q)
    decodes = meta.decode_rows
    if decodes is not None:
        rows, seqs, max_seq_len = decodes
        out[rows] = _decode_sdpa(q[rows], k_cache, v_cache, meta.block_tables[seqs], meta.seq_lens[seqs],
                                 max_seq_len, scale, sliding_window)
    for b, start, q_len, seq_len in meta.query_spans:
        if q_len > 1:
            out[start:start + q_len] = _prefill_one_sdpa(q[start:start + q_len], k_cache, v_cache,
                                                         meta.block_tables[b], seq_len, scale, sliding_window)
    return out


def _grouped_kv(kv: torch.Tensor, group: int) -> torch.Tensor:
    """(..., Hkv, L, D) -> (..., Hkv, G, L, D) as a view: each KV head read by its G query heads."""
    return kv.unsqueeze(-3).expand(*kv.shape[:-2], group, *kv.shape[-2:])


def _prefill_one_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_len: int, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """q (Lq, Hq, D) of one sequence -> (Lq, Hq, D)."""
    q_len, num_kv_heads = q.shape[0], k_cache.shape[2]
    qg = _group(q, num_kv_heads)  # (Hkv, G, Lq, D)
    k = _grouped_kv(gather_kv_ref(k_cache, block_table, seq_len).transpose(0, 1), qg.shape[1])  # (Hkv, G, L, D)
    v = _grouped_kv(gather_kv_ref(v_cache, block_table, seq_len).transpose(0, 1), qg.shape[1])
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
                 sliding_window: int | None) -> torch.Tensor:
    """One query per sequence, q (B, Hq, D) -> (B, Hq, D). Contexts padded to max_seq_len; the G
    query heads of a KV head are its "query length", so K/V are read once per KV head."""
    num_seqs, num_kv_heads = q.shape[0], k_cache.shape[2]
    k, v, mask = _decode_kv_mask(k_cache, v_cache, block_tables, seq_lens, max_seq_len, sliding_window)
    qg = q.reshape(num_seqs, num_kv_heads, -1, q.shape[-1])  # (B, Hkv, G, D)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], scale=scale)  # (B, Hkv, G, D)
    return o.reshape(q.shape)
