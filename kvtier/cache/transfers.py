"""A step's KV transfer plan between the GPU and CPU tiers, and who is protected until it lands.

The cache manager fills one `KVTransfers` while the scheduler plans a step; the runner's transfer
engine issues it in this order, on copy streams, around the step's forward pass:

    stores (GPU -> CPU)   demoted and swapped-out blocks: read before the forward overwrites them
    loads  (CPU -> GPU)   prefix hits on CPU and swapped-in blocks: the forward waits for them
    forward pass
    stores_after          write-through copies of blocks that this forward filled

Every block a transfer reads or writes carries one extra reference until the step's copies have
completed (`PendingTransfers.complete`), so neither tier can evict and reuse it mid-copy.
"""

from __future__ import annotations

import dataclasses

from kvtier.cache.block_pool import Block, BlockPool


@dataclasses.dataclass
class KVTransfers:
    stores: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (gpu_block_id, cpu_block_id)
    loads: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (cpu_block_id, gpu_block_id)
    stores_after: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (gpu, cpu), post-forward
    step_id: int = -1

    @property
    def is_empty(self) -> bool:
        return not (self.stores or self.loads or self.stores_after)

    @property
    def num_blocks_to_cpu(self) -> int:
        return len(self.stores) + len(self.stores_after)


class PendingTransfers:
    """References held for in-flight copies, released per step when its copies have completed."""

    def __init__(self) -> None:
        self.current: list[tuple[BlockPool, Block]] = []  # taken while the next plan is being built
        self.by_step: dict[int, list[tuple[BlockPool, Block]]] = {}

    def protect(self, pool: BlockPool, block: Block) -> None:
        pool.touch([block])
        self.current.append((pool, block))

    def seal(self, step_id: int) -> None:
        """The plan being built becomes step `step_id`'s."""
        if self.current:
            self.by_step[step_id] = self.current
            self.current = []

    def complete(self, step_id: int) -> None:
        for pool, block in self.by_step.pop(step_id, []):
            pool.free([block])

    def refs(self, pool: BlockPool) -> dict[int, int]:
        """block id -> references held for copies, in `pool`."""
        out: dict[int, int] = {}
        for held in [self.current, *self.by_step.values()]:
            for p, block in held:
                if p is pool:
                    out[block.block_id] = out.get(block.block_id, 0) + 1
        return out
