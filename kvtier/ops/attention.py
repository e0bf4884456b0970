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
seq_len - q_len + j and attends to keys 0..that position (causal).

This module imports nothing from kvtier.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


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
    per_token: "AttentionMetadata | None" = None
    # Called with a layer's index before the layer runs; the CPU tier's loads make the compute
    # stream wait there for that layer's KV, so early layers run while later ones still load.
    layer_ready: Callable[[int], None] | None = None

    def before_layer(self, layer: int) -> None:
        if self.layer_ready is not None:
            self.layer_ready(layer)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

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
    starts = meta.query_start_loc.tolist() if not meta.query_lens_list else None
    seq_lens = meta.seq_lens_list or meta.seq_lens.tolist()
    start = 0
    for b, seq_len in enumerate(seq_lens):
        q_len = meta.query_lens_list[b] if starts is None else starts[b + 1] - starts[b]
        if q_len == 0:
            continue
        out[start:start + q_len] = _prefill_one(q[start:start + q_len], k_cache, v_cache,
                                                meta.block_tables[b], seq_len, scale, sliding_window)
        start += q_len
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


def _decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
    """All sequences have one query: gather every context padded to max_seq_len at once."""
    num_seqs, block_size, num_kv_heads = q.shape[0], k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-meta.max_seq_len // block_size)
    table = meta.block_tables[:, :num_blocks].long()
    k = k_cache[table].flatten(1, 2).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache[table].flatten(1, 2).transpose(1, 2)
    k_pos = torch.arange(k.shape[2], device=q.device)
    q_pos = (meta.seq_lens.long() - 1).unsqueeze(-1)  # (B, 1)
    mask = _causal_mask(q_pos, k_pos.expand(num_seqs, -1), sliding_window)  # (B, 1, L)
    qg = _group(q.unsqueeze(1), num_kv_heads)  # (B, Hkv, G, 1, D)
    return _ungroup(_attend(qg, k, v, mask[:, None, None], scale)).squeeze(1)
