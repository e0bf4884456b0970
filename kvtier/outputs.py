"""What the engine returns per request (vLLM's RequestOutput shape)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (all tiers)
    num_cached_tokens_by_tier: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"gpu": 0, "cpu": 0})
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    def to_dict(self) -> dict[str, object]:
        return {"ttft_s": self.ttft_s, "e2e_s": self.e2e_s,
                "num_prompt_tokens": self.num_prompt_tokens,
                "num_cached_tokens": self.num_cached_tokens,
                "num_cached_tokens_by_tier": dict(self.num_cached_tokens_by_tier),
                "num_output_tokens": self.num_output_tokens,
                "num_preemptions": self.num_preemptions}


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that matched
    logprobs: list[dict[int, Logprob]] | None = None  # per token: {token_id: Logprob}
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # why the request failed inside an engine step (finish_reason "error")
    # SamplingParams.prompt_logprobs: None for the first prompt token (nothing predicts it), then per
    # prompt token {token_id: Logprob} with the token itself and the top k; None when not asked
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
