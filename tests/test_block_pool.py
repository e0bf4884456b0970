"""Block pool and KV cache manager: accounting, LRU eviction, prefix hits. No model, no tensors."""

from __future__ import annotations

import pytest

from kvtier.cache.block_pool import Block, BlockPool, FreeBlockQueue
from kvtier.cache.hashing import hash_full_blocks
from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.request import Request
from kvtier.sampling_params import SamplingParams


def test_free_queue_order_and_removal():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(blocks[0])
    assert [b.block_id for b in q] == [1, 3, 4, 0] and q.num_blocks == 4


def test_allocate_free_counts_and_lru_eviction():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    assert pool.counts() == {"total": 4, "used": 2, "cached": 0, "free": 2}
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.counts() == {"total": 4, "used": 0, "cached": 2, "free": 2}
    pool.check_integrity()
    pool.allocate(3)  # takes the 2 free blocks, then evicts b (least recently freed)
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") is a
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_touch_revives_cached_block():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    pool.free([a])
    pool.touch([pool.lookup(b"h")])
    assert a.ref_cnt == 1 and not a.queued
    pool.check_integrity()


def test_integrity_check_detects_corruption():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    a.ref_cnt = 0  # a block with no references that is not in the free queue
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_double_free_is_caught():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(AssertionError):
        pool.free([a])


def test_chain_hash_depends_on_prefix_and_salt():
    tokens = list(range(48))
    h = hash_full_blocks(tokens, 16)
    assert len(h) == 3
    other = hash_full_blocks([99] + tokens[1:], 16)
    assert other[1] != h[1]  # same block tokens, different parent
    assert hash_full_blocks(tokens, 16, extra=b"tenant")[0] != h[0]
    assert hash_full_blocks(tokens, 16, start_block=1, parent=h[0]) == h[1:]


def _req(rid, tokens, salt=None):
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_prefix_hit_leaves_one_token_and_respects_salt():
    mgr = KVCacheManager(num_blocks=16, block_size=4)
    r1 = _req("a", list(range(12)))
    assert mgr.allocate_slots(r1, 12)
    mgr.free(r1)
    r2 = _req("b", list(range(12)))
    hit = mgr.get_computed_blocks(r2)
    assert len(hit.gpu) == 2 and hit.num_tokens == 8  # 3 full blocks cached; the last token is computed
    assert mgr.get_computed_blocks(_req("c", list(range(12)), salt="other")).num_tokens == 0
    assert mgr.allocate_slots(r2, 4, hit)
    assert mgr.block_ids("b")[:2] == [b.block_id for b in hit.gpu]
    mgr.check_integrity()


def test_allocation_failure_changes_nothing():
    mgr = KVCacheManager(num_blocks=3, block_size=4)
    r = _req("a", list(range(20)))
    assert not mgr.allocate_slots(r, 20)
    assert mgr.num_held_blocks() == 0 and mgr.pool.num_free_blocks == 3
    mgr.check_integrity()
