"""Attention backends: how one layer writes this step's K/V into its paged cache and attends over it.

Each layer's `PagedAttention` holds its own backend object, so one layer can differ from another
(KCache gives some layers a backend that fetches V rows from CPU memory). The engine's choice,
`--attention-backend torch|triton`, gives every layer a fresh backend of that kind:

    "torch"   torch's fused scaled_dot_product_attention over the paged cache (the CPU's path); not
              the plain reference `kvtier.ops.attention.paged_attention_ref` kernels are tested against
    "triton"  the kernels of kvtier/ops/triton_attention.py, imported only when chosen
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.ops.attention import AttentionMetadata, paged_attention_sdpa, write_kv_ref

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each (num_blocks, block_size, Hkv, D)


class AttentionBackend:
    """One layer's attention over its paged KV cache."""

    # Pie: this layer's entry of the staging ring, (k, v) each (slots, block_size, Hkv, D), where
    # a step's far blocks are (AttentionMetadata.far); set by ModelRunner.attach_ring
    far_kv: KVCache | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) of this step -> (T, Hq, D): writes k/v into the cache at
        meta.slot_mapping, then attends causally over each sequence's cached context."""
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_sdpa(q, k_cache, v_cache, meta, scale, sliding_window, far_kv=self.far_kv)


class TritonAttention(AttentionBackend):
    def __init__(self) -> None:
        from kvtier.ops import triton_attention  # here: importing kvtier must not import Triton
        self._write_kv, self._attend = triton_attention.write_kv, triton_attention.paged_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self._write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale, sliding_window, far_kv=self.far_kv)


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchAttention,
                                                                  "triton": TritonAttention}


def make_attention_backend(name: str) -> AttentionBackend:
    """A new backend object of the named kind."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {tuple(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()
