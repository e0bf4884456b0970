"""Randomized schedules (hypothesis): add / step / abort over small pools, with fake model outputs.

After every step the block accounting of both tiers holds, with the step's copies completing one
or a few steps late; once every request has finished or been aborted no block is held in either
tier. A second property runs the real engine on a tiny model, with and without the CPU tier.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import BlockTables
from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.cache.storage import Tier
from kvtier.cache.transfers import Stage
from kvtier.offload.policies import WRITE_BACK, WRITE_THROUGH
from kvtier.request import Request, RequestStatus
from kvtier.sampling_params import SamplingParams
from kvtier.scheduler.output import RunnerOutput, SampledToken
from kvtier.scheduler.scheduler import Scheduler, SchedulerConfig

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=1, max_size=40)


def fake_outputs(plan, rng) -> RunnerOutput:
    return RunnerOutput({s.request_id: SampledToken(rng.randrange(4, 50)) for s in plan.scheduled if s.sample})


def check_plan(plan, scheduler, cfg, tables: dict[str, list[int]]):
    assert plan.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(plan.scheduled) <= cfg.max_num_seqs
    for s in plan.scheduled:
        need = -(-(s.start_pos + len(s.token_ids)) // scheduler.kv_cache.block_size)
        block_ids = tables[s.request_id]
        assert block_ids == scheduler.kv_cache.block_ids(s.request_id), "the plans' diffs rebuild the table"
        assert len(block_ids) >= need, "tokens scheduled without blocks for them"
        assert len(set(block_ids)) == len(block_ids)


def check_transfers(plan, in_flight: dict[int, set[int]]):
    """Each block is written by at most one copy of a step, and a CPU block still being written by
    an earlier step's copy is never chosen again (it is protected until its copy completes).
    (A load may read a CPU block whose store is still in flight: loads are issued after, and wait
    for, every store issued before them.)"""
    t = plan.transfers
    stored = [c for _, c in t.pairs(Tier.GPU, Tier.CPU, Stage.BEFORE) + t.pairs(Tier.GPU, Tier.CPU, Stage.AFTER)]
    assert len(set(stored)) == len(stored), "two stores into one CPU block"
    loads = t.pairs(Tier.CPU, Tier.GPU)
    assert len({g for _, g in loads}) == len(loads), "two loads into one GPU block"
    busy = set().union(*in_flight.values()) if in_flight else set()
    assert not busy & set(stored), "a CPU block in flight was reused"
    in_flight[t.step_id] = set(stored)


def complete_some(sched, in_flight: dict[int, set[int]], rng):
    """Copies land one or a few steps late, in order, as on a GPU."""
    for step_id in sorted(in_flight):
        if rng.random() < 0.6:
            sched.kv_cache.complete_transfers(step_id)
            del in_flight[step_id]
        else:
            break


def complete_all(sched, in_flight):
    for step_id in sorted(in_flight):
        sched.kv_cache.complete_transfers(step_id)
    in_flight.clear()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 24), budget=st.integers(3, 64), caching=st.booleans(),
       cpu_blocks=st.sampled_from([0, 0, 2, 5, 12, 32]), write_through=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_schedules_keep_accounting(ops, num_blocks, budget, caching, cpu_blocks, write_through, seed):
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=num_blocks * 4)
    demotion = WRITE_THROUGH if write_through else WRITE_BACK
    sched = Scheduler(cfg, KVCacheManager(num_blocks, 4, caching, cpu_blocks, demotion))
    tables = BlockTables()
    in_flight: dict[int, set[int]] = {}
    prefixes = [[rng.randrange(4, 50) for _ in range(12)] for _ in range(4)]
    ids = []
    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, prefix = op
            tokens = (prefixes[prefix] + [rng.randrange(4, 50) for _ in range(length)])[:cfg.max_model_len - 1]
            rid = f"r{len(ids)}"
            ids.append(rid)
            sched.add_request(Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        elif op[0] == "step":
            for _ in range(op[1]):
                plan = sched.schedule()
                check_plan(plan, sched, cfg, tables.apply(plan))
                check_transfers(plan, in_flight)
                sched.update_from_output(plan, fake_outputs(plan, rng))
                complete_some(sched, in_flight, rng)
                sched.kv_cache.check_integrity()
        elif ids:
            sched.finish_requests([ids[op[1] % len(ids)]], RequestStatus.FINISHED_ABORTED)
            sched.kv_cache.check_integrity()
    for _ in range(2000):  # drain
        if not sched.has_unfinished_requests():
            break
        plan = sched.schedule()
        tables.apply(plan)
        check_transfers(plan, in_flight)
        sched.update_from_output(plan, fake_outputs(plan, rng))
        complete_some(sched, in_flight, rng)
        sched.kv_cache.check_integrity()
    assert not sched.has_unfinished_requests(), "requests starved"
    complete_all(sched, in_flight)
    sched.kv_cache.check_integrity()
    assert sched.kv_cache.num_held_blocks() == 0 and sched.kv_cache.num_held_cpu_blocks() == 0
    assert sched.kv_cache.pool.counts()["used"] == 0
    if sched.kv_cache.cpu_pool is not None:
        assert sched.kv_cache.cpu_pool.counts()["used"] == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=ops, num_blocks=st.integers(8, 20), tier=st.sampled_from([0, 0.0005]), seed=st.integers(0, 2**16))
def test_random_schedules_on_real_engine(tiny_model_dir, ops, num_blocks, tier, seed):
    from kvtier import LLM
    rng = random.Random(seed)
    path, _ = tiny_model_dir("tiny-llama")
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", num_gpu_blocks_override=num_blocks,
              max_model_len=num_blocks * 16, max_num_batched_tokens=24, max_num_seqs=4,
              kv_offloading_size=tier)
    engine, ids = llm.engine, []
    for op in ops:
        if op[0] == "add":
            tokens = [rng.randrange(3, 500) for _ in range(op[1])]
            ids.append(engine.add_request(tokens, SamplingParams(temperature=0, max_tokens=op[2])))
        elif op[0] == "step":
            for _ in range(op[1]):
                engine.step()
                engine.check_integrity()
        elif ids:
            engine.abort_request(ids[op[1] % len(ids)])
            engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
    assert engine.num_held_blocks() == 0 and engine.kv_cache.num_held_cpu_blocks() == 0
