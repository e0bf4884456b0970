"""The planner's arithmetic: move KV over the host link, or recompute it? From measured rates.

Swap preemption: a victim's n computed tokens either go to the CPU tier and come back
(2 · n · kv_bytes_per_token over the link) or are dropped and recomputed by a prefill
(n · 2 · params FLOPs at the measured matmul rate). On an H100 with Llama-3-8B (131 KiB of KV
and 16 GFLOP per token) moving is ~4x cheaper; a model with little KV per FLOP may differ.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HardwareRates:
    link_bytes_per_s: float  # pinned host <-> device copy
    flops_per_s: float  # dense matmul in the model's dtype


@dataclasses.dataclass(frozen=True)
class SwapCostModel:
    rates: HardwareRates
    kv_bytes_per_token: int
    flops_per_token: float  # a forward pass, ~2 x parameters

    def swap_seconds(self, num_tokens: int) -> float:
        return 2 * num_tokens * self.kv_bytes_per_token / self.rates.link_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.flops_per_token / self.rates.flops_per_s

    def swap_pays(self, num_tokens: int) -> bool:
        return self.swap_seconds(num_tokens) < self.recompute_seconds(num_tokens)
