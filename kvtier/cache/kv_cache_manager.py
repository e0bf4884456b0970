"""KV cache manager: which blocks each request holds in which tier, prefix lookup, slot allocation.

Owns the block lists of running requests. A request's block i holds its tokens
[i*block_size, (i+1)*block_size). Full blocks are registered in the pool under a chain hash so a
later request with the same prefix (and the same cache salt) reuses them.

With a CPU tier (`num_cpu_blocks > 0`) a cached block may live on the GPU, on the CPU, or both
(the tier map is the two pools' hash maps):
- demotion (the `DemotionPolicy`, kvtier/offload/policies.py): write-back copies a cached GPU block
  to the CPU when the GPU pool evicts it; write-through copies every block once it is full. Either
  way its hash moves with it.
- prefix lookup goes GPU, then CPU: the leading blocks found on the GPU are shared, the following
  ones found on the CPU are loaded into fresh GPU blocks.
- swap: when the `SwapPolicy` says it pays, a preempted request's computed blocks (the partial
  last one too) go to CPU blocks that the request holds while it waits; when it resumes they are
  loaded back.
- far-resident blocks (Pie, `--kv-expansion`): a running request's oldest full blocks may live
  on the CPU only (`req_far`); its block table then holds FAR_BLOCK_ID for them, and each step
  the worker brings them into a GPU staging ring layer by layer, where the attention reads them.
  A block goes far once a CPU copy of it has landed (write-through made one, or a store here).
The copies themselves are only recorded here, as typed `Move`s of a `TransferPlan`
(kvtier/cache/transfers.py); the runner's transfer engine issues them. Who holds a CPU block:
swapped requests (one reference each) and in-flight copies.
"""

from __future__ import annotations

import dataclasses
import itertools

from kvtier.cache.block_pool import Block, BlockPool
from kvtier.cache.hashing import hash_full_blocks
from kvtier.cache.storage import Tier
from kvtier.cache.transfers import MoveBuilder, PendingTransfers, Stage, TransferPlan
from kvtier.offload.policies import ALWAYS_SWAP, WRITE_BACK, DemotionPolicy, SwapPolicy
from kvtier.request import Request


@dataclasses.dataclass
class PrefixHit:
    """Computed blocks a request starts from: `gpu` blocks to share, then `cpu` blocks to load."""
    gpu: list[Block]
    cpu: list[Block]
    num_tokens: int  # tokens they hold (a swapped request's last block may be partial)
    swapped: bool = False


NO_HIT = PrefixHit([], [], 0)
FAR_BLOCK_ID = 0  # a far block's entry in a block table: never read (the attention reads the ring)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_cpu_blocks: int = 0, demotion: DemotionPolicy = WRITE_BACK,
                 swap_policy: SwapPolicy = ALWAYS_SWAP):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.cpu_pool = BlockPool(num_cpu_blocks, enable_prefix_caching) if num_cpu_blocks else None
        self.demotion = demotion
        self.swap_policy = swap_policy
        if self.cpu_pool is not None and not demotion.store_when_full:
            self.pool.on_evict = self._demote
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same, as ids (the block table)
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already registered in the pool
        self.swapped: dict[str, tuple[list[Block], int]] = {}  # request id -> (CPU blocks, tokens)
        # Pie: each running request's far prefix (CPU blocks of its first blocks); at most
        # max_far_blocks in all (the staging ring's slots), far_fraction of each request's full blocks
        self.req_far: dict[str, list[Block]] = {}
        self._num_far = 0  # blocks in req_far (a count kept, not summed: every request's step asks)
        self.far_fraction = 0.0
        self.max_far_blocks = 0
        self.far_changed: set[str] = set()  # requests whose far prefix grew since their last plan
        self._far_offsets: dict[str, float] = {}  # far_targets' rounding offset per request
        self._far_counter = itertools.count()
        self.moves = MoveBuilder()  # the copies of the step being planned
        self.pending = PendingTransfers()
        self.prefix_queries = 0  # prompt tokens of admitted requests
        self.prefix_hits = 0  # of which found on the GPU
        self.prefix_hits_cpu = 0  # of which found on the CPU
        self.num_demotions = self.num_dropped_demotions = 0
        self.num_swaps_out = self.num_swaps_in = 0
        self.num_blocks_to_cpu = self.num_blocks_to_gpu = 0

    @property
    def _cpu(self) -> BlockPool:
        """The CPU pool, for paths that only a CPU tier reaches (a CPU hit, a swap, a demotion)."""
        assert self.cpu_pool is not None, "CPU tier is off"
        return self.cpu_pool

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

    # -- lookup and allocation ------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """Longest computed prefix: a swapped request's own blocks, else cached full blocks of
        either tier. At least one token is always left to compute."""
        if request.request_id in self.swapped:
            cpu_blocks, num_tokens = self.swapped[request.request_id]
            gpu = self._lookup(self.pool, self._hashes(request)[:num_tokens // self.block_size])
            return PrefixHit(gpu, cpu_blocks[len(gpu):], num_tokens, swapped=True)
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return NO_HIT  # prompt logprobs need every prompt token's logits: no cached KV (as vLLM)
        hashes = self._hashes(request)[:(request.num_tokens - 1) // self.block_size]
        gpu = self._lookup(self.pool, hashes)
        cpu = self._lookup(self.cpu_pool, hashes[len(gpu):]) if self.cpu_pool is not None else []
        return PrefixHit(gpu, cpu, (len(gpu) + len(cpu)) * self.block_size)

    @staticmethod
    def _lookup(pool: BlockPool, hashes: list[bytes]) -> list[Block]:
        hits = []
        for block_hash in hashes:
            block = pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after its computed prefix `hit`).

        CPU hits get fresh GPU blocks and a load each. Returns False, changing nothing, when the
        GPU pool cannot supply the blocks."""
        if hit is None and self._fits_held_blocks(request, num_new_tokens):
            return True  # the common decode step: room in the last block, no block newly full
        hit = hit or NO_HIT
        held = self.req_block_ids.get(request.request_id, [])  # far blocks included
        num_computed = request.num_computed_tokens + hit.num_tokens
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - len(held) - len(hit.gpu)
        reclaimed = sum(1 for b in hit.gpu if b.ref_cnt == 0)  # leave the free queue on touch
        if num_new_blocks > self.pool.num_free_blocks - reclaimed:
            return False
        self.pool.touch(hit.gpu)
        for block in hit.cpu:  # before the GPU allocation below demotes blocks into the CPU pool
            self.pending.protect(self._cpu, block)
        new = self.pool.allocate(max(num_new_blocks, 0))
        for cpu_block, gpu_block in zip(hit.cpu, new):
            self.moves.add(Tier.CPU, Tier.GPU, Stage.BEFORE, cpu_block.block_id, gpu_block.block_id)
        new = hit.gpu + new
        self.req_blocks.setdefault(request.request_id, []).extend(new)
        self.req_block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new)
        self._settle_hit(request, hit)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _settle_hit(self, request: Request, hit: PrefixHit) -> None:
        """A resumed swap releases the request's own CPU blocks; a first admission is counted."""
        if hit.swapped:
            cpu_blocks, _ = self.swapped.pop(request.request_id)
            self._cpu.free(reversed(cpu_blocks))  # loads hold their own references
            self.num_swaps_in += 1
        elif request.num_computed_tokens == 0:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(hit.gpu) * self.block_size
            self.prefix_hits_cpu += len(hit.cpu) * self.block_size

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
        num_far = self.num_far(request.request_id)
        assert done >= num_far, "a far block is always a cached one"
        for i in range(done, min(num_full, len(hashes))):
            if (self.pool.cache_block(blocks[i - num_far], hashes[i]) and self.cpu_pool is not None
                    and self.demotion.store_when_full and self.cpu_pool.lookup(hashes[i]) is None):
                self._store(blocks[i - num_far], self.demotion.store_stage)
        self.req_num_cached[request.request_id] = min(num_full, len(hashes))

    # -- the CPU tier ---------------------------------------------------------------------------

    def _demote(self, block: Block) -> None:
        """GPU eviction hook (write-back): keep the evicted block's KV on the CPU."""
        assert block.block_hash is not None  # the pool calls on_evict only for cached blocks
        if self._cpu.lookup(block.block_hash) is None and self._store(block, self.demotion.store_stage):
            self.num_demotions += 1

    def _store(self, block: Block, stage: Stage) -> Block | None:
        """Copy a GPU block into a new CPU block (under its hash, if any); None if the CPU pool is
        full of blocks in use. The new block's reference belongs to the copy."""
        cpu_pool = self._cpu
        if cpu_pool.num_free_blocks == 0:
            self.num_dropped_demotions += 1
            return None
        cpu_block = cpu_pool.allocate(1)[0]
        self.pending.current.append((cpu_pool, cpu_block))
        if block.block_hash is not None:
            cpu_pool.cache_block(cpu_block, block.block_hash)
        if stage is Stage.AFTER:  # the GPU block stays cached: keep it until the copy has read it
            self.pending.protect(self.pool, block)
        self.moves.add(Tier.GPU, Tier.CPU, stage, block.block_id, cpu_block.block_id)
        return cpu_block

    def swap_out(self, request: Request) -> bool:
        """Move a preempted request's computed blocks to CPU blocks it holds while waiting.

        Returns False (and changes nothing) when the tier is off, the swap policy prefers
        recomputation, or the CPU pool lacks room; the caller then frees the blocks."""
        num_tokens = request.num_computed_tokens
        if self.cpu_pool is None or num_tokens == 0 or not self.swap_policy.swap_pays(num_tokens):
            return False
        num_far = self.num_far(request.request_id)  # on the CPU already: they stay, held as swapped
        blocks = self.req_blocks.get(request.request_id, [])[:self.blocks_needed(num_tokens) - num_far]
        on_cpu = [self.cpu_pool.lookup(b.block_hash) if b.block_hash is not None else None for b in blocks]
        reclaimed = sum(1 for c in on_cpu if c is not None and c.ref_cnt == 0)
        if sum(1 for c in on_cpu if c is None) > self.cpu_pool.num_free_blocks - reclaimed:
            return False
        self.cpu_pool.touch([c for c in on_cpu if c is not None])  # before allocation can evict them
        cpu_blocks = []
        for block, cpu_block in zip(blocks, on_cpu):
            if cpu_block is None:
                cpu_block = self._store(block, Stage.BEFORE)  # before the blocks are reused
                assert cpu_block is not None  # room was checked above
                self.cpu_pool.touch([cpu_block])  # the request's own reference
            cpu_blocks.append(cpu_block)
        self._free_gpu(request)
        far = self.req_far.pop(request.request_id, [])
        self._num_far -= len(far)
        self.swapped[request.request_id] = (far + cpu_blocks, num_tokens)
        self.num_swaps_out += 1
        return True

    def take_transfers(self, step_id: int) -> TransferPlan:
        """Hand the planned copies to the runner; their protections now belong to `step_id`."""
        plan = self.moves.take(step_id)
        self.pending.seal(step_id)
        self.num_blocks_to_cpu += plan.num_blocks(Tier.GPU, Tier.CPU)
        self.num_blocks_to_gpu += plan.num_blocks(Tier.CPU, Tier.GPU)
        return plan

    def complete_transfers(self, step_id: int) -> None:
        self.pending.complete(step_id)

    # -- far-resident blocks (Pie) ----------------------------------------------------------------

    def num_far(self, request_id: str) -> int:
        return len(self.req_far.get(request_id, ()))

    def far_block_ids(self, request_id: str) -> tuple[int, ...]:
        """CPU block ids of the request's far prefix, in position order."""
        return tuple(b.block_id for b in self.req_far.get(request_id, ()))

    def num_far_blocks(self) -> int:
        return self._num_far

    def far_targets(self, requests: list[Request]) -> dict[str, int]:
        """Far blocks per running request: floor(f * its computed full blocks + its own offset in
        [0, 1)), the offsets spread evenly over requests (the golden ratio's multiples), so a
        fraction too small for one block a request still moves about f of all blocks. A request's
        target changes only when its own blocks or f do: no block goes back and forth."""
        if self.cpu_pool is None or (self.far_fraction <= 0 and not self.req_far):
            return {}
        return {r.request_id: int(self.far_fraction * (r.num_computed_tokens // self.block_size)
                                  + self._far_offset(r.request_id)) for r in requests}

    def _far_offset(self, request_id: str) -> float:
        offset = self._far_offsets.get(request_id)
        if offset is None:
            offset = self._far_offsets[request_id] = (next(self._far_counter) * 0.6180339887) % 1.0
        return offset

    def rebalance_far(self, request: Request, target: int) -> None:
        """Bring the request's far prefix to `target` blocks (within max_far_blocks in all): its
        oldest blocks go far, or, when the target fell, its newest far ones come back (a load
        before the step, into fresh GPU blocks while there are free ones)."""
        far = self.req_far.get(request.request_id, [])
        gpu_blocks = len(self.req_blocks.get(request.request_id, ()))
        target = min(target, request.num_computed_tokens // self.block_size, len(far) + gpu_blocks - 1,
                     len(far) + self.max_far_blocks - self.num_far_blocks())
        if target < len(far):
            self._bring_near(request.request_id, len(far) - target)
        else:
            self._send_far(request.request_id, target)

    def _send_far(self, request_id: str, target: int) -> None:
        """A block goes far once a CPU copy of it has landed: its GPU block is released and the CPU
        copy held instead, oldest first. Every block up to the target without a CPU copy gets a
        store beside this step (all in one step: one a step left a batch half near for dozens of
        steps), and goes far in a step after its store completes."""
        cpu_pool = self._cpu
        far = self.req_far.get(request_id, [])
        in_flight: dict[int, int] | None = None
        while len(far) < target:
            block = self.req_blocks[request_id][0]
            cpu_block = cpu_pool.lookup(block.block_hash) if block.block_hash is not None else None
            if cpu_block is None:
                break  # no copy yet: stored below
            in_flight = in_flight if in_flight is not None else self.pending.refs(cpu_pool)
            if cpu_block.block_id in in_flight:
                break  # its copy is still on the way
            cpu_pool.touch([cpu_block])
            far.append(cpu_block)
            self._num_far += 1
            self.req_far[request_id] = far
            self.req_blocks[request_id].pop(0)
            self.req_block_ids[request_id][len(far) - 1] = FAR_BLOCK_ID
            self.pool.free([block])
            self.far_changed.add(request_id)
        for block in self.req_blocks[request_id][:target - len(far)]:
            if block.block_hash is not None and cpu_pool.lookup(block.block_hash) is None:
                if self._store(block, Stage.AFTER) is None:
                    return  # the CPU pool is full of blocks in use

    def _bring_near(self, request_id: str, count: int) -> None:
        """The request's `count` newest far blocks back on the GPU: shared where the GPU still caches
        them, else loaded before the step into fresh blocks cached under their hashes (while there
        are free ones); the CPU copies stay cached there."""
        far = self.req_far[request_id]
        for _ in range(count):
            cpu_block = far[-1]
            gpu_block = self.pool.lookup(cpu_block.block_hash) if cpu_block.block_hash is not None else None
            if gpu_block is not None:
                self.pool.touch([gpu_block])
            elif self.pool.num_free_blocks > 0:
                gpu_block = self.pool.allocate(1)[0]
                self.pending.protect(self._cpu, cpu_block)  # the load's reference
                self.moves.add(Tier.CPU, Tier.GPU, Stage.BEFORE, cpu_block.block_id, gpu_block.block_id)
                if cpu_block.block_hash is not None:
                    self.pool.cache_block(gpu_block, cpu_block.block_hash)
            else:
                break
            far.pop()
            self._num_far -= 1
            self._cpu.free([cpu_block])  # the request's reference
            self.req_blocks[request_id].insert(0, gpu_block)
            self.req_block_ids[request_id][len(far)] = gpu_block.block_id
            self.far_changed.add(request_id)
        if not far:
            del self.req_far[request_id]

    # -- release and inspection -----------------------------------------------------------------

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read it, don't keep it)."""
        return self.req_block_ids.get(request_id, [])

    def free(self, request: Request) -> None:
        """Release the request's blocks in both tiers, tail first (see BlockPool.free)."""
        self._free_gpu(request)
        far = self.req_far.pop(request.request_id, None)
        if far:
            self._num_far -= len(far)
            self._cpu.free(reversed(far))
        swapped = self.swapped.pop(request.request_id, None)
        if swapped is not None:
            self._cpu.free(reversed(swapped[0]))

    def _free_gpu(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_num_cached.pop(request.request_id, None)
        self.req_block_ids.pop(request.request_id, None)
        self.far_changed.discard(request.request_id)
        self.pool.free(reversed(blocks))

    def forget_uncomputed(self, request: Request) -> None:
        """After a failed step: unregister the request's blocks past its computed tokens, in both
        tiers. They were registered when allocated, before the forward that should have written
        them (and a write-through copy of them may hold the same garbage); a retry registers
        them again once computed."""
        first = request.num_computed_tokens // self.block_size
        for block in self.req_blocks.get(request.request_id, [])[max(0, first - self.num_far(request.request_id)):]:
            if block.block_hash is not None and self.cpu_pool is not None:
                cpu_block = self.cpu_pool.lookup(block.block_hash)
                if cpu_block is not None:
                    self.cpu_pool.uncache(cpu_block)
            self.pool.uncache(block)
        if request.request_id in self.req_num_cached:
            self.req_num_cached[request.request_id] = min(self.req_num_cached[request.request_id], first)

    def reset_prefix_cache(self) -> int:
        """Drop the hash of every cached GPU block that nobody holds (vLLM's reset_prefix_cache);
        returns how many. Safe with requests running: blocks they hold (or an in-flight copy
        protects) keep their hashes, so their own later steps still register and find them. The
        CPU tier keeps its blocks, so a later request with the same prefix hits the CPU tier.
        Nothing is demoted: with write-back, a block not yet on the CPU is just dropped."""
        if not self.enable_prefix_caching:
            return 0
        idle = [b for b in self.pool.free_queue if b.block_hash is not None]
        for block in idle:
            self.pool.uncache(block)  # stays in the free queue, now a plain free block
        return len(idle)

    def forget(self, request: Request) -> None:
        self.req_hashes.pop(request.request_id, None)
        self._far_offsets.pop(request.request_id, None)

    def num_held_blocks(self) -> int:
        """GPU blocks held by requests."""
        return sum(len(b) for b in self.req_blocks.values())

    def num_held_cpu_blocks(self) -> int:
        """CPU blocks held by swapped requests and as running requests' far blocks."""
        return sum(len(b) for b, _ in self.swapped.values()) + self.num_far_blocks()

    def tier_stats(self) -> dict[str, int | float]:
        """Per-tier gauges and counters (the CPU tier's are zero while it is off)."""
        cpu = self.cpu_pool
        return {"kv_blocks_gpu": self.pool.num_blocks, "kv_blocks_cpu": cpu.num_blocks if cpu else 0,
                "kv_usage_gpu": self.pool.usage(), "kv_usage_cpu": cpu.usage() if cpu else 0.0,
                "num_held_blocks_gpu": self.num_held_blocks(), "num_held_blocks_cpu": self.num_held_cpu_blocks(),
                "prefix_hit_tokens_gpu_total": self.prefix_hits, "prefix_hit_tokens_cpu_total": self.prefix_hits_cpu,
                "blocks_to_cpu_total": self.num_blocks_to_cpu, "blocks_to_gpu_total": self.num_blocks_to_gpu,
                "num_far_blocks": self.num_far_blocks(),
                "num_swaps_out_total": self.num_swaps_out, "num_swaps_in_total": self.num_swaps_in,
                "num_demotions_total": self.num_demotions,
                "num_dropped_demotions_total": self.num_dropped_demotions,
                "num_evictions_gpu_total": self.pool.num_evictions,
                "num_evictions_cpu_total": cpu.num_evictions if cpu else 0}

    def check_integrity(self) -> None:
        """Both pools' own invariants, and every reference accounted for by a holder: a request
        (GPU), a swapped request (CPU) or an in-flight copy (either)."""
        refs: dict[int, int] = self.pending.refs(self.pool)
        for request_id, blocks in self.req_blocks.items():
            num_far = self.num_far(request_id)
            assert self.req_block_ids[request_id] == [FAR_BLOCK_ID] * num_far + [b.block_id for b in blocks], (
                "stale block table")
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        _check_refs(self.pool, refs, "GPU")
        if self.cpu_pool is not None:
            cpu_refs = self.pending.refs(self.cpu_pool)
            for blocks, num_tokens in self.swapped.values():
                assert len(blocks) == self.blocks_needed(num_tokens), "swapped blocks do not cover the tokens"
                for b in blocks:
                    cpu_refs[b.block_id] = cpu_refs.get(b.block_id, 0) + 1
            for request_id, far in self.req_far.items():
                assert request_id in self.req_blocks and far, "a far prefix of a request holding no GPU blocks"
                for b in far:
                    cpu_refs[b.block_id] = cpu_refs.get(b.block_id, 0) + 1
            assert self._num_far == sum(len(f) for f in self.req_far.values()), "far block count"
            assert self._num_far <= self.max_far_blocks, "more far blocks than the staging ring holds"
            _check_refs(self.cpu_pool, cpu_refs, "CPU")


def _check_refs(pool: BlockPool, refs: dict[int, int], tier: str) -> None:
    pool.check_integrity()
    for block in pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0), (
            f"{tier} block {block.block_id}: ref_cnt {block.ref_cnt} != {refs.get(block.block_id, 0)} holders")
