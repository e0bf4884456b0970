"""Incremental detokenization and stop-string matching for one sequence.

Decoding the whole output every step is quadratic; instead decode a short window that starts a
few tokens back (`prefix_offset`) and emit what it adds beyond the already-read part
(`read_offset`). A window that ends inside a multi-byte character decodes to U+FFFD and waits.
"""

from __future__ import annotations

from kvtier.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string when one now occurs in the text."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return None
        new_text = self._decode_delta()
        self.text += new_text
        return self._check_stop(len(new_text)) if new_text and check_stop and self.params.stop else None

    def _decode_delta(self) -> str:
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=skip)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix):]

    def _check_stop(self, num_new_chars: int) -> str | None:
        """Search only where a match could newly start; truncate the text at the match."""
        start = max(0, len(self.text) - num_new_chars - self._max_stop_len + 1)
        for stop in self.params.stop:
            idx = self.text.find(stop, start)
            if idx >= 0:
                end = idx + len(stop) if self.params.include_stop_str_in_output else idx
                self.text = self.text[:end]
                return stop
        return None
