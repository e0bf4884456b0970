"""The same greedy tokens however requests are batched, chunked, cached or preempted."""

from __future__ import annotations

import pytest

from conftest import MIXED_LENGTHS, greedy, random_prompts
from kvtier import LLM

NEW_TOKENS = 32


def run(path, prompts, one_by_one=False, **engine_args):
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **{"max_model_len": 256, **engine_args})
    if one_by_one:
        outs = [llm.generate([p], greedy(NEW_TOKENS), use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.engine.num_held_blocks() == 0
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def model_path(request, tiny_model_dir):
    return tiny_model_dir(request.param)[0]


def test_batched_equals_alone(model_path):
    prompts = random_prompts(MIXED_LENGTHS)
    assert run(model_path, prompts)[0] == run(model_path, prompts, one_by_one=True)[0]


def test_prefix_caching_on_off_and_small_chunks(model_path):
    shared = random_prompts([48], seed=7)[0]
    prompts = [shared + p for p in random_prompts(MIXED_LENGTHS)]  # common 48-token prefix
    ref, _ = run(model_path, prompts, enable_prefix_caching=False)
    cached, llm = run(model_path, prompts, enable_prefix_caching=True)
    assert cached == ref
    assert llm.engine.kv_cache.prefix_hits > 0
    chunked, llm = run(model_path, prompts, max_num_batched_tokens=7)
    assert chunked == ref


def test_forced_preemption(model_path, monkeypatch):
    prompts = random_prompts(MIXED_LENGTHS)
    ref, _ = run(model_path, prompts)
    steps = record_schedules(monkeypatch)
    # 8 requests need up to 6 blocks each; 12 blocks hold only a few at once.
    tight, llm = run(model_path, prompts, num_gpu_blocks_override=12, max_model_len=160)
    assert tight == ref
    steps = [s for s in steps if s[0] is llm.engine.scheduler]
    num_preempted = 0
    for i, (_, running, waiting, plan) in enumerate(steps):
        victims = plan.preempted_request_ids  # the most recently admitted running requests, latest first
        assert victims == running[::-1][:len(victims)]
        admitted = [s.request_id for s in plan.scheduled if s.request_id not in running]
        assert admitted == waiting[:len(admitted)]  # admissions strictly in queue order
        if victims:  # they wait at the front of the queue, the earliest admitted first: they resume first
            assert steps[i + 1][2][:len(victims)] == victims[::-1]
        num_preempted += len(victims)
    assert num_preempted == llm.engine.scheduler.num_preemptions > 0


def record_schedules(monkeypatch) -> list:
    """(scheduler, running ids, waiting ids before the step, plan) of every step planned from now."""
    from kvtier.scheduler.scheduler import Scheduler
    steps, schedule = [], Scheduler.schedule

    def recording(self, *args, **kwargs):
        running, waiting = [r.request_id for r in self.running], [r.request_id for r in self.waiting]
        plan = schedule(self, *args, **kwargs)
        steps.append((self, running, waiting, plan))
        return plan
    monkeypatch.setattr(Scheduler, "schedule", recording)
    return steps


def test_repeated_prompt_reports_and_skips_cached_prefix(model_path):
    prompt = random_prompts([70], seed=3)[0]
    llm = LLM(str(model_path), skip_tokenizer_init=True, dtype="float32", max_model_len=256)
    first = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
    computed_before = _computed_tokens(llm)
    second = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == 64  # 4 full blocks of 16; the last token is recomputed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # The second run computed only the 6 uncached prompt tokens + 7 decode steps.
    assert _computed_tokens(llm) - computed_before == 70 - 64 + 7


def _computed_tokens(llm) -> int:
    return llm.engine.runner.num_computed_tokens


def test_triton_backend_equals_torch_backend(tiny_model_dir):
    """The whole engine with the Triton kernels (interpreted on the CPU) gives the reference's tokens."""
    path, _ = tiny_model_dir("tiny-llama")
    prompts = random_prompts([5, 20, 37])
    ref, _ = run(path, prompts, attention_backend="torch")
    tri, llm = run(path, prompts, attention_backend="triton")
    assert llm.engine.runner.attention_backend == "triton"
    assert tri == ref


def test_short_prefill_chunks_as_per_token_decodes(tiny_model_dir, monkeypatch):
    """Chunks of <= 7 tokens over a prefix take the per-token decode view: same tokens."""
    from kvtier.engine import model_runner
    path, _ = tiny_model_dir("tiny-llama")
    monkeypatch.setattr(model_runner, "PER_TOKEN_MIN_CONTEXT", 0)
    taken = []
    original = model_runner.ModelRunner._per_token_view
    monkeypatch.setattr(model_runner.ModelRunner, "_per_token_view",
                        lambda self, q, s: taken.append(original(self, q, s)) or taken[-1])
    prompts = random_prompts([5, 20, 37])
    ref, _ = run(path, prompts, attention_backend="torch")
    got, _ = run(path, prompts, attention_backend="triton", max_num_batched_tokens=7)
    assert got == ref
    assert any(taken)
