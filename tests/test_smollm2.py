"""The default model (SmolLM2-135M-Instruct from its GGUF) against HF transformers, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import assert_greedy_equal, greedy, hf_greedy

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain photosynthesis in one sentence.",
             "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
             "What is 12 times 7?", "Give me a name for a pet turtle."]


def test_smollm2_greedy_matches_hf(smol_llm, hf_model):
    llm = smol_llm
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS[:6]]
    prompts += [llm.get_tokenizer().encode("The history of the Roman Empire"), [1, 2, 3, 4, 5]]
    assert len({len(p) for p in prompts}) >= 5  # mixed lengths
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(32), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref, logits = hf_greedy(hf_model, prompt, 32)
        assert_greedy_equal(out.outputs[0].token_ids, ref, logits)


def test_chat_reuses_prefix_across_turns(smol_llm):
    from kvtier import SamplingParams
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = smol_llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in first.outputs[0].text
    messages += [{"role": "assistant", "content": first.outputs[0].text},
                 {"role": "user", "content": "And of Italy?"}]
    second = smol_llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert second.metrics.num_cached_tokens >= 32
    assert second.metrics.num_cached_tokens <= second.metrics.num_prompt_tokens - 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_answers_paris():
    res = _cli("generate", "--prompt", "What is the capital of France?")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_cli_generate_json_fields():
    res = _cli("generate", "--prompt", "What is the capital of France?", "--prompt", "Hi", "--json",
               "--max-tokens", "8")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert {"text", "token_ids", "finish_reason", "metrics"} <= set(row)
        assert {"ttft_s", "num_prompt_tokens", "num_cached_tokens", "num_output_tokens"} <= set(row["metrics"])
        assert row["metrics"]["num_output_tokens"] == len(row["token_ids"]) <= 8
        assert row["finish_reason"] in ("stop", "length")
