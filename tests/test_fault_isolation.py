"""One request that fails inside an engine step fails alone: it ends with finish_reason "error" and
its error, the others finish with exactly the tokens of a run without it, and both tiers' block
accounting holds afterwards (the failed step's copies complete; its unwritten blocks are not left
in the prefix cache)."""

from __future__ import annotations

import pytest

from conftest import MIXED_LENGTHS, greedy, random_prompts
from kvtier import LLM

POISON = [7, 7, 7, 7, 7]  # a prompt starting with these fails wherever the fault is injected


def _poisoned(request) -> bool:
    return request.all_token_ids[:len(POISON)] == POISON


def _poisoned_item(engine, item) -> bool:
    """A plan's item holds no token list (plans are snapshots): read the request's."""
    return item.request_id in engine.scheduler.requests and _poisoned(engine.scheduler.requests[item.request_id])


def inject_in_forward(engine):
    """Fail the runner before the forward of any step that holds a poisoned request."""
    execute = engine.worker.execute_async

    def failing(plan):
        if any(_poisoned_item(engine, s) for s in plan.scheduled):
            raise RuntimeError("injected fault in the forward")
        return execute(plan)
    engine.worker.execute_async = failing
    return lambda: setattr(engine.worker, "execute_async", execute)


def inject_in_sampler(engine):
    """Fail the sampler (after the forward wrote the step's KV and the batch drew its tokens) when
    it samples a poisoned request's third output token."""
    sampler = engine.runner.sampler
    finish = sampler._with_logprobs

    def failing(raw, token_ids, items):
        if any(_poisoned_item(engine, i) and i.num_output_tokens == 2 for i in items):
            raise IndexError("injected fault in the sampler")
        return finish(raw, token_ids, items)
    sampler._with_logprobs = failing
    return lambda: setattr(sampler, "_with_logprobs", finish)


def inject_in_detokenizer(engine):
    """Fail the text of a poisoned request's second token (after the scheduler counted it)."""
    processor = engine.output_processor
    apply_one = processor._apply_one

    def failing(seq, token):
        if _poisoned(seq.request) and seq.request.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected fault in the detokenizer")
        return apply_one(seq, token)
    processor._apply_one = failing
    return lambda: setattr(processor, "_apply_one", apply_one)


_REFERENCE: dict[str, tuple] = {}


def reference(path, tier: str, prompts: list[list[int]], **args) -> tuple[list, list[int]]:
    """The outputs of a run without faults (one per tier setting), and the poisoned prompt's tokens."""
    if tier not in _REFERENCE:
        outs = LLM(str(path), **args).generate(prompts, greedy(12), use_tqdm=False)
        _REFERENCE[tier] = (outs, outs[-1].outputs[0].token_ids)
    return _REFERENCE[tier]


def run_to_end(engine) -> dict:
    """Step until idle, checking both tiers' accounting after every step; finished outputs by id."""
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
        engine.check_integrity()
    return done


@pytest.mark.parametrize("inject", [inject_in_forward, inject_in_sampler, inject_in_detokenizer])
@pytest.mark.parametrize("tier", ["gpu-only", "cpu-tier"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failing_request_fails_alone(tiny_model_dir, inject, tier, async_scheduling):
    """Async scheduling too: the failed step and the one issued after it are rolled back and
    their requests run one at a time; the others' tokens equal a synchronous run without faults."""
    path = tiny_model_dir("tiny-llama")[0]
    extra = {"kv_offloading_size": 0.002} if tier == "cpu-tier" else {}
    args = dict(skip_tokenizer_init=True, dtype="float32", block_size=4, max_model_len=96, **extra)
    prompts = random_prompts(MIXED_LENGTHS, seed=3)
    want, fresh = reference(path, tier, prompts + [POISON + prompts[3]], **args)

    engine = LLM(str(path), async_scheduling=async_scheduling, **args).engine
    undo = inject(engine)
    ids = [engine.add_request(p, greedy(12)) for p in prompts[:3]]
    bad = engine.add_request(POISON + prompts[3], greedy(12))
    ids += [engine.add_request(p, greedy(12)) for p in prompts[4:]]
    done = run_to_end(engine)
    failed = done.pop(bad)
    assert failed.outputs[0].finish_reason == "error" and "injected fault" in failed.error
    assert [done[i].outputs[0].token_ids for i in ids] == [w.outputs[0].token_ids for w in want[:3] + want[4:8]]
    assert all(done[i].error is None for i in ids)
    assert engine.num_held_blocks() == 0

    # Whatever the failed steps registered in the prefix cache must hold what it promises: the
    # poisoned prompt, run again without the fault, answers as on a fresh engine.
    undo()
    rerun = engine.add_request(POISON + prompts[3], greedy(12))
    assert run_to_end(engine)[rerun].outputs[0].token_ids == fresh


def test_a_failure_no_request_explains_fails_the_step(tiny_model_dir):
    engine = LLM(str(tiny_model_dir("tiny-llama")[0]), skip_tokenizer_init=True, dtype="float32").engine

    def broken(only=None):
        raise RuntimeError("scheduler bug")
    engine.add_request([1, 2, 3], greedy(4))
    engine.scheduler.schedule = broken
    with pytest.raises(RuntimeError, match="scheduler bug"):
        engine.step()
