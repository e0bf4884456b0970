"""KV cache manager: which blocks each request holds, prefix lookup, slot allocation.

Owns the block lists of running requests. A request's block i holds its tokens
[i*block_size, (i+1)*block_size). Full blocks are registered in the pool under a chain hash so a
later request with the same prefix (and the same cache salt) reuses them.
"""

from __future__ import annotations

from kvtier.cache.block_pool import Block, BlockPool
from kvtier.cache.hashing import hash_full_blocks
from kvtier.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same, as ids (the block table)
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already registered in the pool
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request) -> list[bytes]:
        """Chain hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        if len(hashes) < request.num_tokens // self.block_size:
            salt = (request.cache_salt or "").encode()
            hashes += hash_full_blocks(request.all_token_ids, self.block_size, len(hashes),
                                       hashes[-1] if hashes else None, salt)
        return hashes

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """Longest cached prefix of full blocks; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._hashes(request)[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[Block] | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after its computed prefix hits).

        Returns False, changing nothing, when the pool cannot supply them."""
        if not computed_blocks and self._fits_held_blocks(request, num_new_tokens):
            return True  # the common decode step: room in the last block, no block newly full
        computed_blocks = computed_blocks or []
        held = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - len(held) - len(computed_blocks)
        reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # leave the free queue on touch
        if num_new_blocks > self.pool.num_free_blocks - reclaimed:
            return False
        self.pool.touch(computed_blocks)
        blocks = self.req_blocks.setdefault(request.request_id, [])
        new = computed_blocks + self.pool.allocate(max(num_new_blocks, 0))
        blocks += new
        self.req_block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _fits_held_blocks(self, request: Request, num_new_tokens: int) -> bool:
        held = self.req_block_ids.get(request.request_id)
        if held is None:
            return False
        total = request.num_computed_tokens + num_new_tokens
        newly_full = (self.enable_prefix_caching
                      and total // self.block_size > self.req_num_cached.get(request.request_id, 0))
        return total <= len(held) * self.block_size and not newly_full

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        done = self.req_num_cached.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = self._hashes(request)
        blocks = self.req_blocks[request.request_id]
        for i in range(done, min(num_full, len(hashes))):
            self.pool.cache_block(blocks[i], hashes[i])
        self.req_num_cached[request.request_id] = min(num_full, len(hashes))

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read it, don't keep it)."""
        return self.req_block_ids.get(request_id, [])

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (see BlockPool.free)."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_num_cached.pop(request.request_id, None)
        self.req_block_ids.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def forget(self, request: Request) -> None:
        self.req_hashes.pop(request.request_id, None)

    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self.req_blocks.values())

    def tier_stats(self) -> dict[str, int | float]:
        """Per-tier gauges and counters (the CPU tier's are zero while it is off)."""
        pool = self.pool
        return {"kv_blocks_gpu": pool.num_blocks, "kv_blocks_cpu": 0,
                "kv_usage_gpu": pool.usage(), "kv_usage_cpu": 0.0,
                "num_held_blocks_gpu": self.num_held_blocks(),
                "prefix_hit_tokens_gpu_total": self.prefix_hits, "prefix_hit_tokens_cpu_total": 0,
                "bytes_to_cpu_total": 0, "bytes_to_gpu_total": 0,
                "transfer_seconds_to_cpu_total": 0.0, "transfer_seconds_to_gpu_total": 0.0,
                "num_swaps_out_total": 0, "num_swaps_in_total": 0, "num_demotions_total": 0,
                "num_evictions_gpu_total": pool.num_evictions, "num_evictions_cpu_total": 0}

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for request_id, blocks in self.req_blocks.items():
            assert self.req_block_ids[request_id] == [b.block_id for b in blocks], "stale block table"
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} != {refs.get(block.block_id, 0)} holders")
