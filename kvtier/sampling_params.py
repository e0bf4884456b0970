"""SamplingParams: what to generate and how, with vLLM's field names and meanings."""

from __future__ import annotations

import dataclasses

_GREEDY_EPS = 1e-5


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n", self.n, "must be at least 1"),
            (self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", self.top_k, "must be >= 1, or 0 / -1 to disable"),
            (0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
             "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             self.min_tokens, f"must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", self.logprobs, "must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
             "must be non-empty strings"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={value!r}: {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: n=1, and a distinct seed when seeded."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)
