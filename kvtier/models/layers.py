"""Building blocks shared by the model families: RMSNorm, rotary embedding, paged attention layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from kvtier.models.attention_backends import AttentionBackend, TorchAttention
from kvtier.ops import fused
from kvtier.ops.attention import AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual (norm(x + residual), x + residual) in one fused kernel.

        Same order of operations as HF Llama: normalize in fp32, cast, then scale."""
        out, new_residual = fused.rmsnorm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, smooth in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        # No buffers: the table is built on first use, so a model built on the meta device and
        # materialized with to_empty() needs no re-initialization here.
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self._cos_sin: torch.Tensor | None = None

    def inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        return llama3_inv_freq(inv_freq, self.scaling) if self.scaling else inv_freq

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        """(max_positions, head_dim) table: first half cos, second half sin, fp32."""
        if self._cos_sin is None or self._cos_sin.device != device:
            t = torch.arange(self.max_positions, device=device, dtype=torch.int64).float()
            freqs = torch.outer(t, self.inv_freq().to(device))  # (P, D/2)
            self._cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        return self._cos_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions (T,), q (T, Hq, D), k (T, Hkv, D) -> rotated q, k (in place on a GPU)."""
        return fused.rotary(q, k, positions, self.cos_sin(q.device))


def save_inputs(x: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """KVPR: a layer's inputs x (T, h) into its activation rows (slots + 1, h) at each token's KV
    slot; padding tokens (slot -1) go to the last, spare row. No host sync, fixed shapes (graph-safe)."""
    spare = rows.shape[0] - 1
    rows.index_copy_(0, torch.where(slot_mapping < 0, spare, slot_mapping), x.to(rows.dtype))


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over the cached context,
    through this layer's own backend object (kvtier/models/attention_backends.py)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend: AttentionBackend = TorchAttention()  # the model runner sets the engine's choice

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq*D)"""
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], -1)
