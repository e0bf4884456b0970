"""Asynchronous scheduling: step N+1 is planned while step N runs, its placeholder ids filled from
N's draw on the device, stops seen one step late. Everything a user sees equals the synchronous
engine's: greedy and seeded tokens, stops, aborts, preemption (recompute and swap), the CPU tier,
n > 1 and logprobs; both tiers' accounting holds after every step."""

from __future__ import annotations

import pytest

from conftest import MIXED_LENGTHS, assert_greedy_equal, greedy, hf_greedy, random_prompts
from kvtier import LLM, SamplingParams
from kvtier.offload.policies import ALWAYS_SWAP, NEVER_SWAP

NEW_TOKENS = 24
# a pool of 96 tokens in 2-token blocks for 8 requests of up to 64 + 24 tokens: preemption all the way
TIGHT = dict(block_size=2, num_gpu_blocks_override=48, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16)


def step_all(llm: LLM, prompts, params, abort_after: dict[str, int] | None = None) -> dict[str, object]:
    """Add the prompts and step by hand, checking both tiers after every step; abort_after:
    request id -> abort once it has streamed this many tokens. Returns request id -> last output."""
    engine, last = llm.engine, {}
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request({"prompt_token_ids": prompt}, p, request_id=str(i))
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
            if abort_after and len(out.outputs[0].token_ids) >= abort_after.get(out.request_id, 1 << 30):
                engine.abort_request(out.request_id)
        engine.check_integrity()
    assert engine.num_held_blocks() == 0
    return last


def tokens(outs: dict) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in outs.items()}


def engine(path, async_scheduling: bool, **kw) -> LLM:
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", async_scheduling=async_scheduling,
               **{"max_model_len": 256, **kw})


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def tiny(request, tiny_model_dir):
    return tiny_model_dir(request.param)


def test_greedy_async_equals_sync_and_hf(tiny):
    path, hf = tiny
    prompts = random_prompts(MIXED_LENGTHS)
    on = step_all(engine(path, True), prompts, greedy(NEW_TOKENS))
    off = step_all(engine(path, False), prompts, greedy(NEW_TOKENS))
    assert tokens(on) == tokens(off)
    for i, prompt in enumerate(prompts):
        ref, logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert_greedy_equal(on[str(i)].outputs[0].token_ids, ref, logits)


def test_async_keeps_one_step_in_flight(tiny):
    """The step issued last is still unread when step() returns (the overlap is real), and its
    placeholder came from the device: a decode plan carries no token id the host knew."""
    path, _ = tiny
    llm = engine(path, True)
    plans = []
    execute = llm.engine.worker.execute_async
    llm.engine.worker.execute_async = lambda plan: plans.append(plan) or execute(plan)
    llm.generate(random_prompts([8, 12]), greedy(6), use_tqdm=False)
    decodes = [s for plan in plans for s in plan.scheduled if s.start_pos >= s.num_prompt_tokens]
    assert decodes and all(s.token_ids == [-1] for s in decodes)
    assert llm.engine.async_scheduling and llm.engine.scheduler.config.async_scheduling


def test_seeded_sampling_async_equals_sync(tiny):
    path, _ = tiny
    prompts = random_prompts(MIXED_LENGTHS)
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=100 + i, max_tokens=NEW_TOKENS,
                             ignore_eos=True) for i in range(len(prompts))]
    on = step_all(engine(path, True), prompts, params)
    off = step_all(engine(path, False), prompts, params)
    assert tokens(on) == tokens(off)


def test_stops_max_tokens_min_tokens_and_penalties(tiny):
    """Stop tokens and max_tokens end a request one step late without showing the token past
    them; min_tokens, repetition penalties (which read the pending token) and logprobs agree."""
    path, _ = tiny
    prompts = random_prompts(MIXED_LENGTHS)
    probe = step_all(engine(path, False), prompts, greedy(NEW_TOKENS))
    # stop at the 5th token of each answer: the engine must end there, async or not
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS - i, ignore_eos=True,
                             stop_token_ids=[probe[str(i)].outputs[0].token_ids[4]], min_tokens=i % 3,
                             repetition_penalty=1.3 if i % 2 else 1.0, logprobs=2)
              for i in range(len(prompts))]
    on = step_all(engine(path, True), prompts, params)
    off = step_all(engine(path, False), prompts, params)
    assert tokens(on) == tokens(off)
    for rid, out in on.items():
        ref = off[rid].outputs[0]
        got = out.outputs[0]
        assert got.finish_reason == ref.finish_reason and got.stop_reason == ref.stop_reason
        assert len(got.logprobs) == len(got.token_ids)
        for a, b in zip(got.logprobs, ref.logprobs):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    assert any(o.outputs[0].finish_reason == "stop" for o in on.values())
    assert any(o.outputs[0].finish_reason == "length" for o in on.values())


def test_abort_mid_stream(tiny):
    path, _ = tiny
    prompts = random_prompts(MIXED_LENGTHS)
    aborts = {"1": 3, "4": 7}
    on = step_all(engine(path, True), prompts, greedy(NEW_TOKENS), aborts)
    off = step_all(engine(path, False), prompts, greedy(NEW_TOKENS), aborts)
    for rid in aborts:
        assert on[rid].outputs[0].token_ids == off[rid].outputs[0].token_ids[:len(on[rid].outputs[0].token_ids)]
    assert {r: t for r, t in tokens(on).items() if r not in aborts} == \
        {r: t for r, t in tokens(off).items() if r not in aborts}


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
def test_forced_preemption(tiny, swap):
    path, _ = tiny
    prompts = random_prompts(MIXED_LENGTHS)
    runs = []
    for async_on in (True, False):
        llm = engine(path, async_on, **TIGHT, kv_offloading_size=0.004 if swap else 0)
        llm.engine.kv_cache.swap_policy = ALWAYS_SWAP if swap else NEVER_SWAP
        runs.append(step_all(llm, prompts, greedy(NEW_TOKENS)))
        stats = llm.engine.stats()
        assert stats["num_preemptions_total"] > 0
        assert (stats["num_swaps_out_total"] > 0) == swap
    assert tokens(runs[0]) == tokens(runs[1])


def test_cpu_tier_loads_under_async(tiny):
    """Prompts come back after the small GPU pool evicted them: their prefixes load from the CPU."""
    path, _ = tiny
    first = random_prompts(MIXED_LENGTHS, seed=3)
    again = [p + [7, 7, 7] for p in first]
    results = []
    for async_on in (True, False):
        llm = engine(path, async_on, **TIGHT, kv_offloading_size=0.004)
        results.append([step_all(llm, first, greedy(8)), step_all(llm, again, greedy(8))])
        assert llm.engine.stats()["prefix_hit_tokens_cpu_total"] > 0
    assert [tokens(r) for r in results[0]] == [tokens(r) for r in results[1]]


def test_n_greater_than_one(tiny):
    path, _ = tiny
    prompts = random_prompts([9, 30])
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=1)
    on = step_all(engine(path, True), prompts, params)
    off = step_all(engine(path, False), prompts, params)
    assert tokens(on) == tokens(off) and all(len(o.outputs) == 3 for o in on.values())


def test_stop_strings_and_eos_smollm2(smollm2):
    """Text stops and EOS on the real model and tokenizer, async on and off."""
    outs = []
    for async_on in (True, False):
        llm = LLM(str(smollm2), async_scheduling=async_on, max_model_len=512)
        params = [SamplingParams(temperature=0.0, max_tokens=40, stop=[" the"]),
                  SamplingParams(temperature=0.0, max_tokens=200)]
        outs.append(llm.generate(["The capital of France is", "Say hi."], params, use_tqdm=False))
        llm.engine.check_integrity()
    for a, b in zip(*outs):
        assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert outs[0][0].outputs[0].finish_reason == "stop" and " the" not in outs[0][0].outputs[0].text
    assert outs[0][1].outputs[0].finish_reason == "stop"  # EOS within 200 tokens
