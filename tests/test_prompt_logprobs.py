"""Prompt logprobs (SamplingParams.prompt_logprobs) and teacher forcing (forced_token_ids) equal HF
transformers' log_softmax of its logits on the same weights (fp32, CPU), through chunked prefill,
asynchronous scheduling, preemption and the prefix cache."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from kvtier import LLM, SamplingParams
from kvtier.offload.policies import ALWAYS_SWAP, NEVER_SWAP
from kvtier.sampling_params import MAX_PROMPT_LOGPROBS, SamplingParamError

LENGTHS = (1, 2, 5, 17, 40, 64)
K = 3
ATOL = 1e-4
# a pool of 96 tokens in 2-token blocks for requests of up to 64 + 4 tokens, 16 tokens a step:
# prompts are chunked and preempted mid-prompt
TIGHT = dict(block_size=2, num_gpu_blocks_override=48, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("tiny-llama")


def engine(path, **kw) -> LLM:
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", **{"max_model_len": 256, **kw})


def hf_logprobs(hf, token_ids: list[int]) -> torch.Tensor:
    """(len, vocab): row i is HF's log_softmax predicting token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([token_ids])).logits[0].float(), dim=-1)


def assert_prompt_logprobs(hf, prompt: list[int], got, k: int = K) -> None:
    ref = hf_logprobs(hf, prompt)
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        entry, row, token = got[i], ref[i - 1], prompt[i]
        assert abs(entry[token].logprob - row[token].item()) < ATOL, f"position {i}"
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            if tid != token:
                assert entry[tid].rank == rank and abs(entry[tid].logprob - value) < ATOL


def run(llm: LLM, prompts, params) -> list:
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.engine.num_held_blocks() == 0
    return outs


CHUNKING = [{}, {"max_num_batched_tokens": 16}, {"max_num_batched_tokens": 7, "async_scheduling": True}]


@pytest.mark.parametrize("kw", CHUNKING, ids=["whole", "chunked", "chunked-async"])
def test_prompt_logprobs_equal_hf(tiny, kw):
    path, hf = tiny
    prompts = random_prompts(LENGTHS)
    outs = run(engine(path, **kw), prompts, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=K))
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(hf, prompt, out.prompt_logprobs)


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
@pytest.mark.parametrize("async_on", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_survive_preemption(tiny, swap, async_on):
    """Requests preempted mid-prompt resume (their own cached blocks, or a swap) or start over; the
    prompt's logprobs are complete and right either way."""
    path, hf = tiny
    prompts = random_prompts((64, 60, 50, 40, 33, 20), seed=5)
    llm = engine(path, **TIGHT, async_scheduling=async_on, kv_offloading_size=0.004 if swap else 0)
    llm.engine.kv_cache.swap_policy = ALWAYS_SWAP if swap else NEVER_SWAP
    outs = run(llm, prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1))
    assert llm.engine.stats()["num_preemptions_total"] > 0
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, k=1)


def test_prefix_cache_hits_are_recomputed(tiny):
    """A prompt cached by an earlier request still gets every token's logprob (its KV is recomputed),
    and a later request without prompt_logprobs still hits the cache."""
    path, hf = tiny
    prompt = random_prompts([48], seed=9)[0]
    llm = engine(path)
    run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2))
    out = run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))[0]
    assert out.metrics.num_cached_tokens == 0
    assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, k=0)
    assert run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2))[0].metrics.num_cached_tokens > 0


def test_a_cached_prompt_is_computed_again_for_its_logprobs(tiny):
    """Through LLMEngine.add_request too: the prefix cache has no logits, so a request with
    prompt_logprobs finds no hit (the cache manager skips it) and gets every prompt token's."""
    path, hf = tiny
    prompt = random_prompts([40], seed=11)[0]
    llm = engine(path)
    run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2))
    eng = llm.engine
    eng.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=0), request_id="again")
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    assert outs["again"].metrics.num_cached_tokens == 0
    assert_prompt_logprobs(hf, prompt, outs["again"].prompt_logprobs, k=0)


def test_n_samples_share_one_prompt_logprobs(tiny):
    path, hf = tiny
    prompt = random_prompts([30], seed=2)[0]
    out = run(engine(path), [prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=2))[0]
    assert len(out.outputs) == 3
    assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, k=2)


def test_not_asked_nothing_computed(tiny, monkeypatch):
    """Without prompt_logprobs no prompt is scored, and outputs carry None."""
    from kvtier.engine.sampler import PromptLogprobs
    path, _ = tiny
    monkeypatch.setattr(PromptLogprobs, "score", lambda *a: pytest.fail("a prompt was scored"))
    outs = run(engine(path, max_num_batched_tokens=16), random_prompts(LENGTHS), SamplingParams(max_tokens=3))
    assert all(o.prompt_logprobs is None for o in outs)


def test_forced_tokens_and_their_logprobs_equal_hf(tiny):
    """Teacher forcing: the output is the forced ids, each logprob HF's for it given the text before."""
    path, hf = tiny
    prompt, forced = random_prompts([20, 12], seed=4)
    for kw in ({}, {"async_scheduling": True}):
        out = run(engine(path, **kw), [prompt], SamplingParams(temperature=0.8, seed=3, max_tokens=15, logprobs=0,
                                                              forced_token_ids=forced, ignore_eos=True))[0]
        comp = out.outputs[0]
        assert comp.token_ids[:12] == forced and len(comp.token_ids) == 15
        ref = hf_logprobs(hf, prompt + forced)
        for j, token in enumerate(forced):
            assert abs(comp.logprobs[j][token].logprob - ref[len(prompt) - 1 + j, token].item()) < ATOL


@pytest.mark.parametrize("value", [-1, MAX_PROMPT_LOGPROBS + 1, 10**9, 1.5, True])
def test_bad_prompt_logprobs_are_refused(value):
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(prompt_logprobs=value)
    assert e.value.name == "prompt_logprobs"


def test_bad_forced_ids_are_refused(tiny):
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(forced_token_ids=[3, -1])
    assert e.value.name == "forced_token_ids"
    llm = engine(tiny[0])
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(SamplingParamError, match="vocabulary"):
        llm.generate([[1, 2, 3]], SamplingParams(forced_token_ids=[vocab]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
