"""The scheduler's decisions, step by step, with hand-made runner outputs (no model).

Each test pins whole plans: which requests run, from which position, how many tokens (chunks and
the token budget), whether they sample, which request is preempted and which goes first when it
resumes, and the copies between tiers. Block size 4 keeps the arithmetic visible; a fresh pool
hands out block ids 0, 1, 2, ... in order.
"""

from __future__ import annotations

import weakref

from conftest import BlockTables, greedy
from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.cache.storage import Tier
from kvtier.cache.transfers import Stage
from kvtier.request import Request, RequestStatus
from kvtier.scheduler.output import RunnerOutput, SampledToken, SchedulerOutput
from kvtier.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4
STORES, LOADS = (Tier.GPU, Tier.CPU, Stage.BEFORE), (Tier.CPU, Tier.GPU)  # plan.transfers.pairs(...)


def make(num_blocks: int, budget: int = 32, max_num_seqs: int = 4, caching: bool = False,
         num_cpu_blocks: int = 0) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len=64),
                     KVCacheManager(num_blocks, BS, caching, num_cpu_blocks))


def add(sched: Scheduler, request_id: str, prompt: list[int], max_tokens: int = 16) -> Request:
    request = Request(request_id, prompt, greedy(max_tokens))
    sched.add_request(request)
    return request


def prompt(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def summary(plan: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, start position, number of tokens, samples) of each scheduled request, in order."""
    return [(s.request_id, s.start_pos, len(s.token_ids), s.sample) for s in plan.scheduled]


_TABLES: weakref.WeakKeyDictionary[Scheduler, BlockTables] = weakref.WeakKeyDictionary()
_PLAN_TABLES: dict[int, tuple[SchedulerOutput, dict[str, list[int]]]] = {}  # id(plan) -> (plan, tables)


def step(sched: Scheduler, expected: list[tuple[str, int, int, bool]],
         sampled: dict[str, int] | None = None) -> SchedulerOutput:
    """Plan a step, check it is `expected`, hand back `sampled` as the runner's output; the step's
    copies complete at once and both tiers' accounting must hold."""
    plan = sched.schedule()
    _PLAN_TABLES[id(plan)] = (plan, _TABLES.setdefault(sched, BlockTables()).apply(plan))
    assert summary(plan) == expected
    sampled = sampled or {}
    assert set(sampled) == {s.request_id for s in plan.scheduled if s.sample}, "the runner samples exactly these"
    sched.update_from_output(plan, RunnerOutput({r: SampledToken(t) for r, t in sampled.items()}))
    sched.kv_cache.complete_transfers(plan.transfers.step_id)
    sched.kv_cache.check_integrity()
    return plan


def item(plan: SchedulerOutput, request_id: str):
    return next(s for s in plan.scheduled if s.request_id == request_id)


def table(plan: SchedulerOutput, request_id: str) -> list[int]:
    """The request's whole block table as of `plan` (plans send diffs: rebuilt as the runner does)."""
    return _PLAN_TABLES[id(plan)][1][request_id]


def test_long_prompt_is_chunked_under_the_token_budget():
    sched = make(num_blocks=16, budget=8)
    a, b = add(sched, "A", prompt(10, 10)), add(sched, "B", prompt(50, 5))
    plan = step(sched, [("A", 0, 8, False)])  # the budget cuts A's prompt; B does not fit at all
    assert item(plan, "A").token_ids == a.prompt_token_ids[:8] and table(plan, "A") == [0, 1]
    assert plan.num_batched_tokens == 8 and a.num_computed_tokens == 8 and list(sched.waiting) == [b]
    plan = step(sched, [("A", 8, 2, True), ("B", 0, 5, True)], {"A": 100, "B": 200})  # 2 + 5 <= 8
    assert item(plan, "A").token_ids == a.prompt_token_ids[8:] and table(plan, "A") == [0, 1, 2]
    assert table(plan, "B") == [3, 4]
    plan = step(sched, [("A", 10, 1, True), ("B", 5, 1, True)], {"A": 101, "B": 201})
    assert item(plan, "A").token_ids == [100] and item(plan, "B").token_ids == [200]
    assert a.output_token_ids == [100, 101] and b.output_token_ids == [200, 201]


def test_running_requests_first_then_waiting_up_to_max_num_seqs():
    sched = make(num_blocks=16, budget=6, max_num_seqs=2)
    add(sched, "A", prompt(10, 3), max_tokens=2)
    add(sched, "B", prompt(20, 3))
    add(sched, "C", prompt(30, 2))
    step(sched, [("A", 0, 3, True), ("B", 0, 3, True)], {"A": 100, "B": 200})  # budget spent
    # 4 tokens of budget are left, but two requests already run: C waits.
    plan = step(sched, [("A", 3, 1, True), ("B", 3, 1, True)], {"A": 101, "B": 201})
    assert plan.finished_request_ids == []
    plan = step(sched, [("B", 4, 1, True), ("C", 0, 2, True)], {"B": 202, "C": 300})  # A hit max_tokens
    assert plan.finished_request_ids == ["A"] and "A" not in sched.requests


def test_preemption_takes_the_last_admitted_request_not_the_one_that_needs_a_block():
    sched = make(num_blocks=4)
    a, b = add(sched, "A", prompt(10, 8)), add(sched, "B", prompt(50, 5))
    step(sched, [("A", 0, 8, True), ("B", 0, 5, True)], {"A": 100, "B": 200})  # A [0, 1], B [2, 3]
    # A's next token needs a third block and none is free: B, admitted last, gives up its blocks.
    plan = step(sched, [("A", 8, 1, True)], {"A": 101})
    assert plan.preempted_request_ids == ["B"] and sched.num_preemptions == 1
    assert table(plan, "A")[:2] == [0, 1] and table(plan, "A")[2] in (2, 3)
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.metrics.num_preemptions == 1 and list(sched.waiting) == [b] and sched.running == [a]
    step(sched, [("A", 9, 1, True)], {"A": 102})  # B needs 2 blocks, 1 is free: it keeps waiting
    sched.finish_requests(["A"], RequestStatus.FINISHED_ABORTED)
    # B is recomputed from position 0: its prompt and the token it had sampled before.
    plan = step(sched, [("B", 0, 6, True)], {"B": 201})
    assert item(plan, "B").token_ids == b.prompt_token_ids + [200]
    assert b.output_token_ids == [200, 201] and sched.kv_cache.num_held_blocks() == 2


def test_preempted_request_resumes_before_requests_that_waited_longer():
    sched = make(num_blocks=5, budget=14, max_num_seqs=2)
    add(sched, "A", prompt(10, 7), max_tokens=3)
    b = add(sched, "B", prompt(30, 7))
    c = add(sched, "C", prompt(50, 8))  # waits: two requests run
    step(sched, [("A", 0, 7, True), ("B", 0, 7, True)], {"A": 100, "B": 200})  # A [0, 1], B [2, 3]
    step(sched, [("A", 7, 1, True), ("B", 7, 1, True)], {"A": 101, "B": 201})  # room in held blocks
    # A takes the last free block; B needs one too and preempts itself. A then reaches max_tokens.
    plan = step(sched, [("A", 8, 1, True)], {"A": 102})
    assert plan.preempted_request_ids == ["B"] and list(sched.waiting) == [b, c]
    # B goes first (9 tokens recomputed), C gets the rest of the budget: a 5-token chunk.
    plan = step(sched, [("B", 0, 9, True), ("C", 0, 5, False)], {"B": 202})
    assert plan.finished_request_ids == ["A"]
    assert item(plan, "B").token_ids == b.prompt_token_ids + [200, 201]
    assert len(table(plan, "B")) == 3 and len(table(plan, "C")) == 2
    step(sched, [("B", 9, 1, True), ("C", 5, 3, True)], {"B": 203, "C": 300})


def test_prefix_hit_starts_after_the_cached_blocks():
    sched = make(num_blocks=16, caching=True)
    shared = prompt(10, 8)  # two full blocks
    add(sched, "A", shared + [90, 91])
    first = step(sched, [("A", 0, 10, True)], {"A": 100})
    b = add(sched, "B", shared + [95, 96, 97])
    c = add(sched, "C", list(shared))  # the whole prompt is cached; its last token is recomputed
    plan = step(sched, [("A", 10, 1, True), ("B", 8, 3, True), ("C", 4, 4, True)],
                {"A": 101, "B": 200, "C": 300})
    assert table(plan, "B")[:2] == table(first, "A")[:2]
    assert table(plan, "C")[:1] == table(first, "A")[:1]
    assert table(plan, "C")[1] != table(first, "A")[1]
    assert b.metrics.num_cached_tokens == 8 and c.metrics.num_cached_tokens == 4


def test_swapped_request_resumes_from_the_cpu_tier_without_recomputing():
    sched = make(num_blocks=4, num_cpu_blocks=8)
    add(sched, "A", prompt(10, 8))
    b = add(sched, "B", prompt(50, 5))
    step(sched, [("A", 0, 8, True), ("B", 0, 5, True)], {"A": 100, "B": 200})  # A [0, 1], B [2, 3]
    plan = step(sched, [("A", 8, 1, True)], {"A": 101})
    assert plan.preempted_request_ids == ["B"]
    # B's 5 computed tokens (2 blocks) are copied out before A's forward reuses one of them.
    assert plan.transfers.pairs(*STORES) == [(2, 0), (3, 1)] and plan.transfers.pairs(*LOADS) == []
    assert sched.kv_cache.num_held_cpu_blocks() == 2 and sched.kv_cache.num_swaps_out == 1
    sched.finish_requests(["A"], RequestStatus.FINISHED_ABORTED)
    # B resumes at position 5 (only its sampled token is new), its blocks loaded back.
    plan = step(sched, [("B", 5, 1, True)], {"B": 201})
    gpu_ids = table(plan, "B")
    assert item(plan, "B").token_ids == [200] and len(gpu_ids) == 2
    assert plan.transfers.pairs(*LOADS) == [(0, gpu_ids[0]), (1, gpu_ids[1])] and plan.transfers.pairs(*STORES) == []
    assert sched.kv_cache.num_held_cpu_blocks() == 0 and sched.kv_cache.num_swaps_in == 1
    assert b.output_token_ids == [200, 201] and b.metrics.num_preemptions == 1
