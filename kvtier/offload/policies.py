"""Offload policies: objects the cache manager consults while it plans a step's copies.

- A swap policy answers, for a preempted request's computed tokens, whether moving them to the CPU
  tier and back beats dropping and recomputing them (`swap_pays`). The engine builds one from the
  measured cost model (`CostModelSwap`); tests pin the choice (`ALWAYS_SWAP`, `NEVER_SWAP`).
- A demotion policy says when a cached GPU block gets a CPU copy, and at which stage of the step
  that copy runs (the stage of the `Move` the cache manager emits for it):
      write-back     when the GPU pool evicts the block, before the forward (which may overwrite it)
      write-through  once the block is full, after the forward that filled it

Both are plain frozen data: a plan built under them pickles, and a policy never holds the cache
manager (the manager holds the policy).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from kvtier.cache.transfers import Stage
from kvtier.offload.cost_model import SwapCostModel


class SwapPolicy(Protocol):
    def swap_pays(self, num_tokens: int) -> bool:
        """Whether `num_tokens` computed tokens of a preempted request go to the CPU tier."""
        ...


@dataclasses.dataclass(frozen=True)
class FixedSwap:
    """Always (or never) swap: for tests and for runs that pin the choice."""
    swap: bool

    def swap_pays(self, num_tokens: int) -> bool:
        return self.swap


ALWAYS_SWAP = FixedSwap(True)
NEVER_SWAP = FixedSwap(False)


@dataclasses.dataclass(frozen=True)
class CostModelSwap:
    """Swap when moving the KV there and back costs less than recomputing it, at measured rates."""
    cost: SwapCostModel

    def swap_pays(self, num_tokens: int) -> bool:
        return self.cost.swap_pays(num_tokens)


@dataclasses.dataclass(frozen=True)
class DemotionPolicy:
    name: str
    store_when_full: bool  # copy each block to the CPU once full (else only when evicted)

    @property
    def store_stage(self) -> Stage:
        """When the copy of a demoted block runs: after the forward that filled it (write-through),
        or before the forward that may reuse the evicted block (write-back)."""
        return Stage.AFTER if self.store_when_full else Stage.BEFORE


WRITE_BACK = DemotionPolicy("write-back", store_when_full=False)
WRITE_THROUGH = DemotionPolicy("write-through", store_when_full=True)
DEMOTION_POLICIES = {p.name: p for p in (WRITE_BACK, WRITE_THROUGH)}
