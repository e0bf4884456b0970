"""Block pool of one tier: block metadata, ref counts, an O(1) LRU free queue, the prefix-hash map.

No tensors here: a block is an id into the tier's KV storage.

Invariants (checked by `check_integrity`):
- a block with ref_cnt == 0 is in the free queue; a block with ref_cnt > 0 is not;
- a block with a hash is in `cached` under that hash (and only it, for that hash);
- free + used + cached == total, where "cached" counts free-queue blocks that still carry a hash
  (evictable, reusable by a prefix hit) and "free" those without.
Eviction takes the head of the free queue (least recently freed); a freed block goes to the tail.
`on_evict`, when set, sees a cached block just before its hash is dropped (the CPU tier demotes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator


@dataclasses.dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev: Block | None = None  # free-queue links; both None when not queued (except ends)
    next: Block | None = None
    queued: bool = False


class FreeBlockQueue:
    """Doubly linked list of blocks with O(1) append, popleft and removal from the middle."""

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)  # sentinels
        self._tail = Block(-2)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None and not block.queued
        last.next, block.prev, block.next, self._tail.prev = block, last, self._tail, block
        block.queued = True
        self.num_blocks += 1

    def remove(self, block: Block) -> None:
        assert block.queued and block.prev is not None and block.next is not None
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        block.queued = False
        self.num_blocks -= 1

    def popleft(self) -> Block:
        first = self._head.next
        if first is self._tail or first is None:
            raise IndexError("no free blocks")
        self.remove(first)
        return first

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.num_evictions = 0
        self.on_evict: Callable[[Block], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take: truly free plus evictable cached ones."""
        return self.free_queue.num_blocks

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num: int) -> list[Block]:
        if num > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(num):
            block = self.free_queue.popleft()
            self._evict_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict_hash(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block)
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def uncache(self, block: Block) -> None:
        """Forget a block's hash because its content may not be what the hash promises (a step
        that failed before writing it); unlike an eviction, nothing is demoted."""
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-hit blocks, pulling them out of the free queue if needed."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: Block, block_hash: bytes) -> bool:
        """Register a now-full block under its chain hash (first writer wins); True if registered."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash = block_hash
        self.cached[block_hash] = block
        return True

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching zero go to the tail of the free queue.

        Callers pass a request's blocks tail-first so that a prefix's last blocks are evicted
        before its first ones (a later request sharing a shorter prefix still hits)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def counts(self) -> dict[str, int]:
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        cached = sum(1 for b in self.free_queue if b.block_hash is not None)
        return {"total": self.num_blocks, "used": used, "cached": cached,
                "free": self.free_queue.num_blocks - cached}

    def check_integrity(self) -> None:
        queued = list(self.free_queue)
        assert len(queued) == self.free_queue.num_blocks, "free queue length mismatch"
        assert len({b.block_id for b in queued}) == len(queued), "block queued twice"
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"negative ref count on block {block.block_id}"
            assert (block.ref_cnt == 0) == block.queued, (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but queued={block.queued}")
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) is block, f"block {block.block_id} hash unmapped"
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"stale hash entry for block {block.block_id}"
        c = self.counts()
        assert c["free"] + c["used"] + c["cached"] == c["total"], f"block counts do not add up: {c}"
