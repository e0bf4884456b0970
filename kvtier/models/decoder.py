"""The decoder loop every model family runs: each layer between its pipeline hooks.

A family differs in what it carries from one layer to the next (`hidden`): Llama carries
(output, residual) so that each RMSNorm fuses the preceding add; OPT carries the hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from kvtier.models.attention_backends import KVCache
from kvtier.ops.attention import AttentionMetadata

Hidden = TypeVar("Hidden")


def run_layers(layers: nn.ModuleList, positions: torch.Tensor, hidden: Hidden,
               kv_caches: Sequence[KVCache], meta: AttentionMetadata) -> Hidden:
    """hidden = layer_i(positions, hidden, kv_caches[i], meta) for each layer i, with
    meta.hooks.before_layer(i) before it and meta.hooks.after_layer(i) after it (see LayerHooks)."""
    hooks = meta.hooks
    for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches)):
        hooks.before_layer(i)
        hidden = layer(positions, hidden, kv_cache, meta)
        hooks.after_layer(i)
    return hidden
