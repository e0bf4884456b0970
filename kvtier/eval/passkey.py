"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA's wording): a random
5-digit key hidden at a random depth in repetitive filler text, the model asked to repeat it.
Accuracy = the share of trials whose generated text's first number is the key.

The prompt is assembled from separately tokenized pieces, so its length is exact in tokens:

    [intro] [filler ... ] [needle: "The pass key is 12345. ..."] [filler ...] [question]
            |<-- depth * filler tokens -->|

The filler is one fixed paragraph repeated (no downloads, deterministic); the needle goes at the
start of a repetition, the last one that begins at or before depth * (filler tokens).

With `through_cpu_tier` the haystack (everything before the question) is computed by a request of
its own first, so write-through stores it in the CPU tier (quantized when the tier is); the GPU
prefix cache is then reset and the question's request loads the haystack's full blocks from the
CPU tier (checked per trial: `cpu_hit_tokens` in its record). The answer then reads the needle's
KV as the CPU tier's format kept it.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from tqdm.auto import tqdm

from kvtier.entrypoints.llm import LLM
from kvtier.eval.tier import check_tier_path, cpu_hit_tokens, store_in_cpu_tier
from kvtier.sampling_params import SamplingParams

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
# Every piece starts with a space and ends without one: BPE tokenizers attach the space to the next
# word, so pieces tokenized apart join as the whole text would tokenize.
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
# generated tokens per answer: the key's digits and some room (tokenizers that split digits one by one)
ANSWER_TOKENS = 12


@dataclasses.dataclass
class PasskeyPrompt:
    token_ids: list[int]
    key: int
    needle_start: int  # index of the needle's first token in token_ids
    depth: float  # the share of the filler before the needle, as placed


@dataclasses.dataclass
class PasskeyResult:
    accuracy: float
    num_correct: int
    trials: int
    prompt_len: int  # tokens of each prompt (context_len - ANSWER_TOKENS)
    records: list[dict[str, Any]]  # per trial: key, depth, answer text, correct (cpu_hit_tokens)
    cpu_hit_tokens: int = 0  # through_cpu_tier: prompt tokens loaded from the CPU tier, all trials


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def build_prompt(tokenizer: Any, num_tokens: int, key: int, depth: float) -> PasskeyPrompt:
    """A prompt of exactly `num_tokens` tokens with `key` at `depth` (0: right after the intro,
    1: right before the question) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must be in [0, 1]")
    intro, question = _encode(tokenizer, INTRO, special=True), _encode(tokenizer, QUESTION)
    needle, unit = _encode(tokenizer, NEEDLE.format(key=key)), _encode(tokenizer, FILLER)
    num_filler = num_tokens - len(intro) - len(needle) - len(question)
    if num_filler < 0:
        raise ValueError(f"{num_tokens} tokens do not hold the passkey prompt's {num_tokens - num_filler} fixed tokens")
    filler = unit * (num_filler // len(unit) + 1)
    before = int(depth * num_filler) // len(unit) * len(unit)  # a repetition's start
    token_ids = intro + filler[:before] + needle + filler[before:num_filler] + question
    return PasskeyPrompt(token_ids, key, len(intro) + before, before / max(num_filler, 1))


def score_answer(text: str, key: int) -> bool:
    """Exact match: the first run of digits in the answer is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == str(key)


def passkey(llm: LLM, context_len: int, trials: int, seed: int = 0, batch_size: int = 8,
            use_tqdm: bool = True, through_cpu_tier: bool = False) -> PasskeyResult:
    """`trials` prompts of context_len - ANSWER_TOKENS tokens (prompt and answer fit context_len), each
    with its own random key and depth from `seed`; greedy answers of up to ANSWER_TOKENS tokens.
    through_cpu_tier: the haystack's KV is stored in the CPU tier and loaded back from it first."""
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("passkey needs the model's tokenizer (not --skip-tokenizer-init)")
    if through_cpu_tier:
        check_tier_path(llm)
    rng = random.Random(seed)
    prompts = [build_prompt(tokenizer, context_len - ANSWER_TOKENS, rng.randint(10000, 99999), rng.random())
               for _ in range(trials)]
    # the answer ends with its sentence: the key is the first number in it
    params = SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS, stop=[".", "\n"])
    num_question = len(_encode(tokenizer, QUESTION))  # the haystack is the prompt before it
    records: list[dict[str, Any]] = []
    with tqdm(total=trials, desc="passkey", unit="trial", disable=not use_tqdm) as bar:
        for first in range(0, trials, batch_size):
            records += _run_batch(llm, prompts[first:first + batch_size], params, num_question, through_cpu_tier)
            bar.update(len(prompts[first:first + batch_size]))
    num_correct = sum(r["correct"] for r in records)
    return PasskeyResult(num_correct / max(trials, 1), num_correct, trials, context_len - ANSWER_TOKENS, records,
                         sum(r.get("cpu_hit_tokens", 0) for r in records))


def _run_batch(llm: LLM, batch: list[PasskeyPrompt], params: SamplingParams, num_question: int,
               through_cpu_tier: bool) -> list[dict[str, Any]]:
    """One batch of trials' records; through_cpu_tier: the haystacks (prompts less the question)
    are stored in the CPU tier and the GPU cache reset first, and each trial's hit is checked."""
    if through_cpu_tier:
        store_in_cpu_tier(llm, [p.token_ids[:-num_question] for p in batch])
    outs = llm.generate([{"prompt_token_ids": p.token_ids} for p in batch], params, use_tqdm=False)
    records = []
    for p, o in zip(batch, outs):
        record = {"key": p.key, "depth": round(p.depth, 4), "answer": o.outputs[0].text,
                  "correct": score_answer(o.outputs[0].text, p.key)}
        if through_cpu_tier:
            record.update(cpu_hit_tokens=cpu_hit_tokens(llm, [o], [len(p.token_ids) - num_question]),
                          cached_by_tier=dict(o.metrics.num_cached_tokens_by_tier))
        records.append(record)
    return records
