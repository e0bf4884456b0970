"""The plan the scheduler hands the model runner, and what the runner hands back."""

from __future__ import annotations

import dataclasses

from kvtier.cache.transfers import TransferPlan
from kvtier.sampling_params import SamplingParams

# A token id the host does not know yet (async scheduling): the runner reads it from the previous
# step's sampled ids on the device.
PLACEHOLDER_TOKEN_ID = -1


@dataclasses.dataclass
class ScheduledRequest:
    """One request's part of the plan: values and diffs only, never the scheduler's live lists, so
    a plan can be pickled, sent to another process or kept past the step."""

    request_id: str
    token_ids: list[int]  # the tokens computed this step (a copy; the last may be PLACEHOLDER_TOKEN_ID)
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    new_block_ids: tuple[int, ...]  # block ids appended to the request's table since the last plan
    sample: bool  # this chunk reaches the request's last token: sample the next one
    params: SamplingParams
    # prompt + outputs so far, only where the sampler reads them (a repetition penalty); ()
    # otherwise, so a step does not copy every request's whole token list
    all_token_ids: tuple[int, ...]
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    # new_block_ids is the whole table (first plan, or a resume after preemption): drop the old one
    reset_block_table: bool = True
    num_output_tokens: int = 0  # tokens sampled so far, pending ones included (min_tokens, seeded draws)
    # Pie: CPU block ids of the request's far prefix (its first blocks, whose table entries are
    # FAR_BLOCK_ID): the worker brings them into the staging ring layer by layer
    far_block_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted_request_ids: list[str]
    finished_request_ids: list[str]  # finished since the last plan: the runner drops their state
    transfers: TransferPlan = TransferPlan()  # the step's copies between tiers, as typed operations

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token_id, logprob), best first


@dataclasses.dataclass
class RunnerOutput:
    sampled: dict[str, SampledToken]  # request id -> the token sampled for it this step
