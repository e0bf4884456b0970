"""OutputProcessor: what a request looks like to its caller — text, logprobs, RequestOutputs — kept
apart from the step loop.

The engine hands it each step's sampled tokens (`apply`); it detokenizes, finds stop strings,
keeps logprobs and builds RequestOutputs (`outputs`). It never touches the scheduler: the stop
strings it finds and the requests whose own text failed come back to the engine, which finishes
them. It reads the scheduler's Request objects (tokens, status, metrics) and writes none of them,
so it can later run beside the engine thread (the server's).

One request id names a group of n samples (`SamplingParams.n`); each sample is a scheduler
request of its own (`<id>#<i>` when n > 1).
"""

from __future__ import annotations

import dataclasses
import logging

from kvtier.engine.detokenizer import IncrementalDetokenizer
from kvtier.engine.sampler import HostLogprobs, PromptLogprobsToken
from kvtier.outputs import CompletionOutput, Logprob, RequestOutput
from kvtier.request import Request
from kvtier.scheduler.output import SampledToken

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Sequence:
    """One of a request's n samples, with its text state."""
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0


@dataclasses.dataclass
class _RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Sequence]
    error: str | None = None  # set when an engine step failed because of this request
    # SamplingParams.prompt_logprobs, once the first sample's first token brought them
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.seqs)

    @property
    def sample_ids(self) -> list[str]:
        return [s.request.request_id for s in self.seqs]


@dataclasses.dataclass
class Applied:
    """What one step's tokens did: groups with news, samples to finish on a stop string, groups
    whose own text or logprobs failed (the engine ends them with finish_reason "error")."""
    touched: list[str]
    stops: list[tuple[str, str]]  # (sample id, stop string)
    failures: list[tuple[str, Exception]]  # (request id, error)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, _RequestGroup] = {}
        self._group_of: dict[str, tuple[str, _Sequence]] = {}  # sample id -> (request id, its sequence)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], samples: list[Request]) -> None:
        seqs = [_Sequence(r, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, r.params),
                          [] if r.params.logprobs is not None else None) for r in samples]
        self.groups[request_id] = _RequestGroup(request_id, prompt, prompt_token_ids, seqs)
        for seq in seqs:
            self._group_of[seq.request.request_id] = (request_id, seq)

    def request_id_of(self, sample_id: str) -> str:
        return self._group_of[sample_id][0]

    def remove(self, request_id: str) -> list[str]:
        """Forget a request (aborted); returns its sample ids, [] if unknown."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return []
        self._forget(group)
        return group.sample_ids

    def fail(self, request_id: str, error: Exception) -> list[str]:
        """Record why a request failed; returns its sample ids for the engine to end."""
        group = self.groups[request_id]
        group.error = f"{type(error).__name__}: {error}"
        return group.sample_ids

    # -- one step's tokens ----------------------------------------------------------------------

    def apply(self, updated: list[Request], sampled: dict[str, SampledToken]) -> Applied:
        applied = Applied([], [], [])
        touched: dict[str, None] = {}
        for req in updated:
            request_id, seq = self._group_of[req.request_id]
            try:
                self._take_prompt_logprobs(self.groups[request_id], sampled[req.request_id])
                stop = self._apply_one(seq, sampled[req.request_id])
            except Exception as e:  # noqa: BLE001 - its own text or logprobs: it fails alone
                logger.error("kvtier: request %s failed while its token was applied", req.request_id,
                             exc_info=True)
                applied.failures.append((request_id, e))
            else:
                if stop is not None and not req.status.finished:
                    applied.stops.append((req.request_id, stop))
            touched[request_id] = None
        applied.touched = list(touched)
        return applied

    def _apply_one(self, seq: _Sequence, token: SampledToken) -> str | None:
        """Add the token to the sample's text and logprobs; returns a stop string it completed."""
        req = seq.request
        stop = seq.detok.add_token(token.token_id, req.num_output_tokens >= req.params.min_tokens)
        if seq.logprobs is not None:
            seq.logprobs.append(_entry(token.token_id, token.logprob, token.rank, token.top_logprobs or []))
            seq.cumulative_logprob += token.logprob
        return stop

    @staticmethod
    def _take_prompt_logprobs(group: _RequestGroup, token: SampledToken) -> None:
        """The prompt's logprobs, from the first token that carries them (vLLM's shape: None for the
        first prompt token, which nothing predicts)."""
        if not isinstance(token, PromptLogprobsToken) or token.prompt_logprobs is None:
            return
        if group.prompt_logprobs is None:
            group.prompt_logprobs = [None, *_entries(token.prompt_logprobs, group.prompt_token_ids)]

    # -- outputs --------------------------------------------------------------------------------

    def outputs(self, request_ids: list[str], final_only: bool) -> list[RequestOutput]:
        """RequestOutputs of these requests (final_only: only the finished ones); a finished request
        is forgotten once reported."""
        outputs = []
        for request_id in request_ids:
            group = self.groups[request_id]
            if group.finished:
                del self.groups[request_id]
                self._forget(group)
            elif final_only:
                continue
            outputs.append(self._output(group))
        return outputs

    def _output(self, group: _RequestGroup) -> RequestOutput:
        outs = []
        for i, seq in enumerate(group.seqs):
            req = seq.request
            status = req.status.value if req.status.finished else None
            outs.append(CompletionOutput(i, seq.detok.text, list(req.output_token_ids), status,
                                         req.stop_reason, seq.logprobs,
                                         seq.cumulative_logprob if seq.logprobs is not None else None))
        first = group.seqs[0].request
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs,
                             group.finished, first.metrics, group.error, group.prompt_logprobs)

    def _forget(self, group: _RequestGroup) -> None:
        for seq in group.seqs:
            self._group_of.pop(seq.request.request_id, None)


def _entry(token_id: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> dict[int, Logprob]:
    """One position's logprobs: the top ones by rank, and the token itself with its own rank."""
    entry = {tid: Logprob(lp, i + 1) for i, (tid, lp) in enumerate(top)}
    entry[token_id] = Logprob(logprob, rank)
    return entry


def _entries(raw: HostLogprobs, prompt_token_ids: list[int]) -> list[dict[int, Logprob] | None]:
    """Per scored prompt token (raw.rows: their positions) its logprob entry."""
    chosen, rank = raw.chosen.tolist(), raw.rank.tolist()
    top_ids, top_values = raw.top_ids.tolist(), raw.top_values.tolist()
    return [_entry(prompt_token_ids[pos], chosen[j], rank[j], list(zip(top_ids[j], top_values[j])))
            for j, pos in enumerate(raw.rows)]
