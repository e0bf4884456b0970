"""A request as the scheduler sees it: token ids, progress, status. No tensors."""

from __future__ import annotations

import enum
import time

from kvtier.outputs import RequestMetrics
from kvtier.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed inside an engine step; RequestOutput.error says why

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(status for status in RequestStatus if status.name.startswith("FINISHED_"))


class Request:
    """Progress is one number: `num_computed_tokens` catches up to `num_tokens`.

    A prefill chunk, a prefix-cache hit and a decode step all advance it; a preemption resets it.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), cache_salt: str | None = None,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # async scheduling: tokens sampled on the device that the host has not seen yet (their
        # positions count in num_computed_tokens once scheduled)
        self.num_pending_outputs = 0
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time(),
                                      num_prompt_tokens=len(prompt_token_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.metrics.num_output_tokens = len(self.output_token_ids)

    def finish(self, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        assert status.finished
        self.status, self.stop_reason = status, stop_reason
        self.metrics.finished_time = time.time()
