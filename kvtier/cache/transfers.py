"""A step's copies between tiers as typed operations, and who is protected until they land.

The cache manager collects the copies while the scheduler plans a step (`MoveBuilder`) and hands
them over as a `TransferPlan`: a tuple of operations, run in order by the runner's transfer engine
(kvtier/engine/transfer_engine.py), which dispatches each `Move` to the handler registered for its
(src tier, dst tier). Today the cache manager emits, in this order:

    Move(GPU -> CPU, BEFORE)  demoted (write-back) and swapped-out blocks: read before the forward
                              overwrites them
    Move(CPU -> GPU, BEFORE)  prefix hits on CPU and swapped-in blocks: issued before the forward,
                              which waits for them layer group by layer group
    forward pass
    Move(GPU -> CPU, AFTER)   write-through copies of blocks that this forward filled

Every block a transfer reads or writes carries one extra reference until the step's copies have
completed (`PendingTransfers.complete`), so neither tier can evict and reuse it mid-copy.

Operations are frozen plain data (ids, enums, tuples): a plan pickles, can cross a process
boundary or wait a step.
"""

from __future__ import annotations

import dataclasses
import enum

from kvtier.cache.block_pool import Block, BlockPool
from kvtier.cache.storage import Kind, Tier


class Stage(enum.Enum):
    BEFORE = "before"  # issued before the step's forward
    PER_LAYER = "per-layer"  # issued layer by layer during the forward (no executor yet)
    AFTER = "after"  # issued after the forward; nothing in the step waits for it


@dataclasses.dataclass(frozen=True)
class Move:
    """Copy blocks of one kind from one tier to another: block_pairs are always
    (src_block_id, dst_block_id). layers: [first, end) of the layers moved, None for all;
    ephemeral: into a staging slot rather than a permanent block of the destination pool."""
    src: Tier
    dst: Tier
    kind: Kind
    block_pairs: tuple[tuple[int, int], ...]
    stage: Stage
    layers: tuple[int, int] | None = None
    ephemeral: bool = False


@dataclasses.dataclass(frozen=True)
class Recompute:
    """KVPR: the K/V of CPU-tier blocks recomputed on the GPU from the layer inputs kept beside them.
    block_pairs (cpu_block_id, dst): dst a GPU block id, or a staging-ring slot when ephemeral (the
    step's far blocks, as in an ephemeral Move); first_positions: each block's first token position
    (RoPE recomputes K there). Per layer the inputs cross first, then the K/V projection runs on
    the compute stream before the layer's attention while the rest of the step's K/V crosses."""
    block_pairs: tuple[tuple[int, int], ...]
    first_positions: tuple[int, ...]
    ephemeral: bool = False

    def __post_init__(self) -> None:
        if len(self.first_positions) != len(self.block_pairs):
            raise ValueError(f"{len(self.block_pairs)} blocks but {len(self.first_positions)} first positions")


Operation = Move | Recompute


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    step_id: int = -1
    operations: tuple[Operation, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.operations

    def pairs(self, src: Tier, dst: Tier, stage: Stage | None = None) -> list[tuple[int, int]]:
        """(src_block_id, dst_block_id) of every Move src -> dst (at `stage`, if given), in order."""
        return [pair for op in self.operations
                if isinstance(op, Move) and op.src is src and op.dst is dst and stage in (None, op.stage)
                for pair in op.block_pairs]

    def num_blocks(self, src: Tier, dst: Tier) -> int:
        return sum(len(op.block_pairs) for op in self.operations
                   if isinstance(op, Move) and op.src is src and op.dst is dst)


# The order in which a step's moves run: this step's stores before its loads, because a block
# being loaded into may be one just evicted and still being copied out.
MOVE_ORDER = ((Tier.GPU, Tier.CPU, Stage.BEFORE), (Tier.CPU, Tier.GPU, Stage.BEFORE),
              (Tier.GPU, Tier.CPU, Stage.AFTER))


class MoveBuilder:
    """The block pairs of the step being planned, per (src, dst, stage), until `take`."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[Tier, Tier, Stage], list[tuple[int, int]]] = {}

    def add(self, src: Tier, dst: Tier, stage: Stage, src_block_id: int, dst_block_id: int) -> None:
        self._pairs.setdefault((src, dst, stage), []).append((src_block_id, dst_block_id))

    def take(self, step_id: int) -> TransferPlan:
        """The collected moves as step `step_id`'s plan (in MOVE_ORDER); the builder starts empty."""
        pairs, self._pairs = self._pairs, {}
        unknown = set(pairs) - set(MOVE_ORDER)
        assert not unknown, f"moves with no place in MOVE_ORDER: {unknown}"
        moves = tuple(Move(src, dst, Kind.KV, tuple(pairs[src, dst, stage]), stage)
                      for src, dst, stage in MOVE_ORDER if (src, dst, stage) in pairs)
        return TransferPlan(step_id, moves)


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
