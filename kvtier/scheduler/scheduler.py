"""Continuous batching over tokens.

There are no prefill and decode phases: each step gives every running request, then waiting
requests, up to `num_tokens - num_computed_tokens` new tokens under the step's token budget
(`max_num_batched_tokens`). Long prompts are thereby chunked, and prefill chunks and decodes of
different requests share a step. When blocks run out, the most recently admitted running
request is preempted and resumes first: swapped to the CPU tier when the cache manager's cost
model says reloading beats recomputing (and there is room), otherwise freed and recomputed.
Each plan carries the step's KV copies between tiers (`SchedulerOutput.transfers`).

Asynchronous scheduling (`SchedulerConfig.async_scheduling`): the plan of step N+1 is made while
step N runs, before its sampled tokens reach the host. Scheduling then advances each request's
`num_computed_tokens` at once and counts the token it will sample as pending
(`Request.num_pending_outputs`); the next plan computes that token's position with a placeholder
id that the runner fills from the device (PLACEHOLDER_TOKEN_ID). `update_from_output` later
appends the token and applies the stop conditions one step late; a token sampled after its
request stopped is dropped. A request whose pending tokens already reach max_tokens or
max_model_len is not scheduled again until they arrive.

    step:         N              N+1            N+2
    schedule      plan N         plan N+1       plan N+2        (host)
    device        ...            run N          run N+1          (reads N's sampled ids)
    host learns                  tokens of N-1  tokens of N
"""

from __future__ import annotations

import collections
import dataclasses
import time

from kvtier.cache.kv_cache_manager import KVCacheManager, PrefixHit
from kvtier.request import Request, RequestStatus
from kvtier.scheduler.output import PLACEHOLDER_TOKEN_ID, RunnerOutput, ScheduledRequest, SchedulerOutput


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    async_scheduling: bool = False


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        # block ids already sent in plans, per request: later plans send only the table's tail
        self._num_sent_blocks: dict[str, int] = {}
        self.num_preemptions = 0
        self.num_steps = 0

    # -- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def finish_requests(self, request_ids: list[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> None:
        """Finish (stop string, abort, ...) requests wherever they are; frees their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish(status, stop_reason)
            self._release(request)

    def _release(self, request: Request) -> None:
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        self._num_sent_blocks.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning -----------------------------------------------------------------------------

    def schedule(self, only: frozenset[str] | None = None) -> SchedulerOutput:
        """The next step's plan. `only`: schedule just these requests (the engine isolating the
        request that made a step fail); the others keep their blocks and wait."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, scheduled, preempted, only)
        if not preempted:
            self._schedule_waiting(budget, scheduled, only)
        out = SchedulerOutput([self._plan(r, n) for r, n in scheduled],
                              [r.request_id for r in preempted], self._finished_ids,
                              self.kv_cache.take_transfers(self.num_steps))
        self._finished_ids = []
        if self.config.async_scheduling:
            for request, item in zip((r for r, _ in scheduled), out.scheduled):
                request.num_computed_tokens += len(item.token_ids)
                request.num_pending_outputs += item.sample
        self.num_steps += 1
        return out

    def _schedule_running(self, budget: int, scheduled: list[tuple[Request, int]], preempted: list[Request],
                          only: frozenset[str] | None) -> int:
        far_targets = self.kv_cache.far_targets(self.running)  # Pie: {} when nothing goes far
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if only is not None and request.request_id not in only:
                i += 1
                continue
            num_new = min(self._num_uncomputed(request), budget)
            if num_new <= 0:  # its pending tokens reach a limit: wait for them
                i += 1
                continue
            if request.request_id in far_targets:  # Pie: its oldest blocks may go far, freeing GPU blocks
                self.kv_cache.rebalance_far(request, far_targets[request.request_id])
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return budget
            scheduled.append((request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _num_uncomputed(self, request: Request) -> int:
        """Tokens to compute, pending ones included; 0 when the pending tokens already reach
        max_tokens or max_model_len (the next one would be dropped)."""
        pending = request.num_pending_outputs
        if pending and (request.num_output_tokens + pending >= (request.params.max_tokens or float("inf"))
                        or request.num_tokens + pending >= self.config.max_model_len):
            return 0
        return request.num_tokens + pending - request.num_computed_tokens

    def _preempt(self, request: Request) -> None:
        if not self.kv_cache.swap_out(request):
            self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        self._num_sent_blocks.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, budget: int, scheduled: list[tuple[Request, int]],
                          only: frozenset[str] | None) -> None:
        if only is not None:  # admit only those; the queue keeps its order
            queued = list(self.waiting)
            self.waiting = collections.deque(r for r in queued if r.request_id in only)
            try:
                self._schedule_waiting(budget, scheduled, None)
            finally:
                self.waiting = collections.deque(r for r in queued if r.status != RequestStatus.RUNNING)
            return
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - hit.num_tokens, budget)
            if not self.kv_cache.allocate_slots(request, num_new, hit):
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:  # first admission, not a resume
                self._record_hit(request, hit)
            request.num_computed_tokens = hit.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new

    def _record_hit(self, request: Request, hit: PrefixHit) -> None:
        bs = self.kv_cache.block_size
        request.metrics.num_cached_tokens = hit.num_tokens
        request.metrics.num_cached_tokens_by_tier = {"gpu": len(hit.gpu) * bs, "cpu": len(hit.cpu) * bs}
        request.metrics.first_scheduled_time = time.time()

    def resend_block_tables(self, request_ids: list[str]) -> None:
        """The next plans send these requests' whole block tables (the runner may have missed
        diffs: a step that failed before the runner applied them)."""
        for request_id in request_ids:
            self._num_sent_blocks.pop(request_id, None)

    def _plan(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        table = self.kv_cache.block_ids(request.request_id)
        sent = self._num_sent_blocks.get(request.request_id)
        if request.request_id in self.kv_cache.far_changed:  # its table's head changed: send it whole
            self.kv_cache.far_changed.discard(request.request_id)
            sent = None
        self._num_sent_blocks[request.request_id] = len(table)
        params = request.params
        token_ids = request.all_token_ids[start:start + num_new]
        token_ids += [PLACEHOLDER_TOKEN_ID] * (num_new - len(token_ids))  # sampled, not seen yet
        return ScheduledRequest(
            request_id=request.request_id, token_ids=token_ids,
            start_pos=start, new_block_ids=tuple(table[sent or 0:]),
            sample=start + num_new == request.num_tokens + request.num_pending_outputs, params=params,
            all_token_ids=tuple(request.all_token_ids) if params.repetition_penalty != 1.0 else (),
            num_prompt_tokens=request.num_prompt_tokens, eos_token_ids=request.eos_token_ids,
            reset_block_table=sent is None, far_block_ids=self.kv_cache.far_block_ids(request.request_id),
            num_output_tokens=request.num_output_tokens + request.num_pending_outputs)

    # -- results ------------------------------------------------------------------------------

    def update_from_output(self, plan: SchedulerOutput, output: RunnerOutput) -> list[Request]:
        """Advance computed tokens (unless scheduling did: async), append sampled tokens, finish
        requests that hit a stop.

        Returns the requests that received a token this step."""
        updated = []
        for item in plan.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.status.finished:
                continue  # finished meanwhile: a token sampled past its stop is dropped
            if not self.config.async_scheduling:
                if request.status != RequestStatus.RUNNING:
                    continue  # preempted meanwhile
                request.num_computed_tokens += len(item.token_ids)
            elif item.sample:
                request.num_pending_outputs -= 1  # also when preempted since: its token stands
            sampled = output.sampled.get(item.request_id)
            if sampled is None:
                continue
            request.append_output_token(sampled.token_id)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = time.time()
            updated.append(request)
            self._check_stop(request)
        return updated

    def rollback(self, plan: SchedulerOutput) -> None:
        """Async scheduling: undo what scheduling a plan advanced, for a step whose results will
        never come (it failed, or one before it did); the tokens are computed again."""
        if not self.config.async_scheduling:
            return  # nothing advanced before the results
        for item in plan.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.status.finished:
                continue
            request.num_pending_outputs -= item.sample
            if request.status == RequestStatus.RUNNING:
                request.num_computed_tokens = min(request.num_computed_tokens, item.start_pos)

    def _check_stop(self, request: Request) -> None:
        params, token = request.params, request.output_token_ids[-1]
        status, reason = None, None
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif token in (params.stop_token_ids or ()):  # a list once SamplingParams is built
                status, reason = RequestStatus.FINISHED_STOPPED, token
        if status is None and (request.num_output_tokens >= (params.max_tokens or float("inf"))
                               or request.num_tokens >= self.config.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.finish_requests([request.request_id], status, reason)
