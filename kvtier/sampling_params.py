"""SamplingParams: what to generate and how, with vLLM's field names and meanings."""

from __future__ import annotations

import dataclasses

_GREEDY_EPS = 1e-5
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # vLLM's seed range
# OpenAI's cap on n: each sample is a request of its own, so n is bounded before anything is allocated.
MAX_N = 128
# Upper bounds keep the fp32 sampling math finite: logits / T with T past fp32's range is -inf / inf = NaN.
# 100 is far past any useful temperature (OpenAI caps it at 2).
MAX_TEMPERATURE = 100.0
# The penalty divides positive logits and multiplies negative ones: near 0 it overflows fp32 (1e-300 made
# every seen token +inf and the output empty). [0.01, 100] keeps |logit| * 100 far inside fp32 and is
# wider than any useful setting (1.0 is off; values around 1.1-1.5 are usual).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# prompt_logprobs keeps k + 1 entries per prompt token, so its cost grows with the prompt: capped
# at vLLM's default max_logprobs (and OpenAI's top_logprobs cap).
MAX_PROMPT_LOGPROBS = 20


class SamplingParamError(ValueError):
    """A parameter outside its range; `name` is the field at fault (the API's `param`)."""

    def __init__(self, name: str, value: object, rule: str):
        super().__init__(f"invalid sampling parameter {name}={value!r}: {rule}")
        self.name, self.value, self.rule = name, value, rule


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
    # vLLM's meaning: for every prompt token after the first, its logprob and the top k alternatives
    # (RequestOutput.prompt_logprobs). Such a request recomputes its whole prompt: tokens whose KV came
    # from the prefix cache have no logits (LLM.generate gives it a cache salt of its own).
    prompt_logprobs: int | None = None
    # kvtier's extension, teacher forcing: the first len(ids) output tokens are these ids instead of
    # drawn ones; with `logprobs` each one's logprob is the model's for it (kvtier eval ppl scores text
    # through decode steps so). Later tokens are drawn as usual.
    forced_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.forced_token_ids is not None:
            self.forced_token_ids = list(self.forced_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        low_rp, high_rp = REPETITION_PENALTY_RANGE
        # `or ()` only narrows the declared types: __post_init__ has made both lists already
        bad_stop_ids = [t for t in self.stop_token_ids or () if not (isinstance(t, int) and t >= 0)]
        bad_forced_ids = [t for t in self.forced_token_ids or () if not _is_token_id(t)]
        k = self.prompt_logprobs
        checks = [  # written so that NaN fails every one of them
            (1 <= self.n <= MAX_N, "n", self.n, f"must be in [1, {MAX_N}]"),
            (0 <= self.temperature <= MAX_TEMPERATURE, "temperature", self.temperature,
             f"must be in [0, {MAX_TEMPERATURE:g}] (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", self.top_k, "must be >= 1, or 0 / -1 to disable"),
            (0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]"),
            (low_rp <= self.repetition_penalty <= high_rp, "repetition_penalty", self.repetition_penalty,
             f"must be in [{low_rp:g}, {high_rp:g}] (1 means no penalty)"),
            (self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed", self.seed,
             "must fit a signed 64-bit integer, [-2**63, 2**63 - 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
             "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             self.min_tokens, f"must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", self.logprobs, "must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop or ()), "stop", self.stop,
             "must be non-empty strings"),
            (not bad_stop_ids, "stop_token_ids", bad_stop_ids[:5], "must be token ids (integers >= 0)"),
            (k is None or (_is_int(k) and 0 <= k <= MAX_PROMPT_LOGPROBS), "prompt_logprobs", k,
             f"must be an integer in [0, {MAX_PROMPT_LOGPROBS}], or None for no prompt logprobs"),
            (not bad_forced_ids, "forced_token_ids", bad_forced_ids[:5], "must be token ids (integers >= 0)"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise SamplingParamError(name, value, rule)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def child(self, index: int) -> SamplingParams:
        """Params of the index-th of n samples: n=1, and a distinct seed when seeded.

        The seed wraps around within int64, so the children of every accepted seed are accepted too; torch
        reads seeds modulo 2**64, so the n children still draw from distinct generators. Only the first
        child computes prompt logprobs: the prompt, and so its logprobs, is the same for all n."""
        seed = None if self.seed is None else (self.seed + index - INT64_MIN) % 2**64 + INT64_MIN
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)


def _is_int(value: object) -> bool:
    """An int proper: True and 1.0 are refused as counts and ids."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
