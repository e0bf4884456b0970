"""Sampling: seeds, top-k/top-p/min-p, penalties, stops, n, logprobs, and parameter validation."""

from __future__ import annotations

import pytest
import torch

from conftest import greedy, random_prompts
from kvtier import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("tiny-llama")[0]), skip_tokenizer_init=True, dtype="float32", max_model_len=256)


PROMPTS = random_prompts([6, 20, 11])


def tokens(llm, params, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_same_seed_same_tokens_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tokens(llm, p, PROMPTS[:1])[0]
    batched = tokens(llm, [p, SamplingParams(temperature=1.0, max_tokens=16)] * 1 + [p], [PROMPTS[0]] * 3)
    assert batched[0] == alone and batched[2] == alone
    other = tokens(llm, SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True), PROMPTS[:1])[0]
    assert other != alone


def test_top_k_one_equals_greedy(llm):
    assert tokens(llm, SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=12, ignore_eos=True)) == \
        tokens(llm, greedy(12))


def test_tiny_top_p_and_high_min_p_equal_greedy(llm):
    ref = tokens(llm, greedy(12))
    assert tokens(llm, SamplingParams(temperature=1.0, top_p=1e-6, seed=1, max_tokens=12, ignore_eos=True)) == ref
    assert tokens(llm, SamplingParams(temperature=1.0, min_p=1.0, seed=1, max_tokens=12, ignore_eos=True)) == ref


def test_sampling_follows_the_distribution():
    """The exponential-race draw samples from softmax(logits / T): check frequencies."""
    from kvtier.engine.sampler import Sampler
    from kvtier.scheduler.output import ScheduledRequest
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    item = ScheduledRequest("r", [0], 0, (0,), True, SamplingParams(temperature=1.0), (0,), 1)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sampler(logits, [item])[0].token_id] += 1
    assert torch.allclose(counts / 4000, torch.softmax(logits[0], -1), atol=0.03)


def test_repetition_penalty_changes_output_and_reduces_repeats(llm):
    plain = tokens(llm, greedy(40))
    penalized = tokens(llm, greedy(40, repetition_penalty=5.0))
    assert plain != penalized
    repeats = lambda seqs: sum(len(s) - len(set(s)) for s in seqs)  # noqa: E731
    assert repeats(penalized) < repeats(plain)


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    ref = tokens(llm, greedy(20))[1]
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = llm.generate([PROMPTS[1]], greedy(20, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens masks the stop token until enough tokens exist
    out = llm.generate([PROMPTS[1]], greedy(20, stop_token_ids=[stop_tok], min_tokens=first + 2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_tok not in out.token_ids[:first + 2]
    out = llm.generate([PROMPTS[1]], greedy(7), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:7]


def test_n_samples(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 10 for o in out.outputs)
    assert llm.engine.num_held_blocks() == 0


def test_logprobs_equal_log_softmax_of_hf_logits(llm, tiny_model_dir):
    from conftest import hf_greedy
    _, hf = tiny_model_dir("tiny-llama")
    out = llm.generate([PROMPTS[2]], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    ref_tokens, ref_logits = hf_greedy(hf, PROMPTS[2], 6)
    ref_lp = torch.log_softmax(ref_logits, -1)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok == ref_tokens[i]
        assert entry[tok].rank == 1
        assert abs(entry[tok].logprob - ref_lp[i, tok].item()) < 1e-4
        top3 = ref_lp[i].topk(3).indices.tolist()
        assert set(top3) <= set(entry)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params_name_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
