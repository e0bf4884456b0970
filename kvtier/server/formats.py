"""RequestOutputs -> OpenAI JSON: whole responses, streamed chunks, usage and logprobs.

The engine's outputs are cumulative (all text and tokens so far); a stream sends each choice the
part it has not seen. While stop strings are set, the last `max stop length - 1` characters are
held back until the next output, since a stop string that completes later truncates the text there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from kvtier.outputs import CompletionOutput, Logprob, RequestOutput
from kvtier.sampling_params import SamplingParams

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way

TokenStr = Callable[[int], str]


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    """OpenAI usage, plus kvtier's `cached_tokens_by_tier` (which tier served the cached prompt tokens)."""
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    by_tier: dict[str, int] = {"gpu": 0, "cpu": 0}
    for o in outputs:
        for tier, n in o.metrics.num_cached_tokens_by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.metrics.num_cached_tokens for o in outputs)},
            "cached_tokens_by_tier": by_tier}


def hold_back(params: SamplingParams) -> int:
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


@dataclasses.dataclass
class _Sent:
    """How much of one choice the client already has."""
    num_chars: int = 0
    num_tokens: int = 0
    num_logprob_chars: int = 0  # completions' text_offset runs over the tokens' strings
    done: bool = False

    def advance(self, comp: CompletionOutput, hold: int) -> tuple[str, list[int], list[dict[int, Logprob]]]:
        end = len(comp.text) if comp.finish_reason else max(self.num_chars, len(comp.text) - hold)
        text, ids = comp.text[self.num_chars:end], comp.token_ids[self.num_tokens:]
        entries = (comp.logprobs or [])[self.num_tokens:]
        self.num_chars, self.num_tokens = max(self.num_chars, end), len(comp.token_ids)
        self.done = comp.finish_reason is not None
        return text, ids, entries


class ResponseFormat:
    """What /v1/completions and /v1/chat/completions share: ids, envelopes, per-choice stream deltas."""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, params: SamplingParams, token_str: TokenStr,
                 return_token_ids: bool):
        self.response_id, self.model, self.params = response_id, model, params
        self.token_str, self.return_token_ids = token_str, return_token_ids
        self.created = int(time.time())
        self.hold = hold_back(params)
        self._sent: dict[int, _Sent] = {}

    def envelope(self, obj: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
        body = {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = [self.choice(out, comp) for out in outputs for comp in out.outputs]
        return self.envelope(self.object_name, sorted(choices, key=lambda c: c["index"]), usage(outputs))

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        """One chunk per choice that has new tokens or just finished."""
        result = []
        for comp in out.outputs:
            index = self.choice_index(out, comp)
            sent = self._sent.setdefault(index, _Sent())
            if sent.done:
                continue
            first = sent.num_tokens == 0
            text, ids, entries = sent.advance(comp, self.hold)
            if not ids and not sent.done:
                continue
            choice = self.delta_choice(index, out, text, ids, entries, sent, first)
            choice["finish_reason"], choice["stop_reason"] = comp.finish_reason, comp.stop_reason
            if self.return_token_ids:
                choice["token_ids"] = ids
                if first:
                    choice["prompt_token_ids"] = out.prompt_token_ids
            result.append(self.envelope(self.chunk_object_name, [choice]))
        return result

    def usage_chunk(self, usage_: dict[str, Any]) -> dict[str, Any]:
        return self.envelope(self.chunk_object_name, [], usage_)

    def with_token_ids(self, choice: dict, out: RequestOutput, comp: CompletionOutput) -> dict:
        if self.return_token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = out.prompt_token_ids, comp.token_ids
        return choice

    # -- per endpoint ---------------------------------------------------------------------------

    def choice_index(self, out: RequestOutput, comp: CompletionOutput) -> int:
        return comp.index

    def choice(self, out: RequestOutput, comp: CompletionOutput) -> dict[str, Any]:
        raise NotImplementedError

    def delta_choice(self, index: int, out: RequestOutput, text: str, token_ids: list[int],
                     entries: list[dict[int, Logprob]], sent: _Sent, first: bool) -> dict[str, Any]:
        """The new part of one choice; `entries` are the logprobs of `token_ids`."""
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args: Any, prompt_index: dict[str, int], echo_texts: list[str] | None, **kw: Any):
        super().__init__(*args, **kw)
        self.prompt_index = prompt_index  # engine request id -> position in the prompt list
        self.echo_texts = echo_texts

    def choice_index(self, out: RequestOutput, comp: CompletionOutput) -> int:
        return self.prompt_index[out.request_id] * self.params.n + comp.index

    def choice(self, out: RequestOutput, comp: CompletionOutput) -> dict[str, Any]:
        choice = {"index": self.choice_index(out, comp), "text": self._echo(out, True) + comp.text,
                  "logprobs": self._logprobs(comp.token_ids, comp.logprobs or [], 0),
                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        return self.with_token_ids(choice, out, comp)

    def delta_choice(self, index, out, text, token_ids, entries, sent, first):
        logprobs = self._logprobs(token_ids, entries, sent.num_logprob_chars)
        if logprobs is not None:
            sent.num_logprob_chars += sum(len(t) for t in logprobs["tokens"])
        return {"index": index, "text": self._echo(out, first) + text, "logprobs": logprobs}

    def _echo(self, out: RequestOutput, first: bool) -> str:
        return self.echo_texts[self.prompt_index[out.request_id]] if self.echo_texts and first else ""

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], offset: int) -> dict | None:
        if self.params.logprobs is None:
            return None
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": [_clamp(e[t].logprob) for t, e in zip(token_ids, entries)],
                "top_logprobs": [{self.token_str(tid): _clamp(lp.logprob) for tid, lp in _by_rank(e)}
                                 for e in entries],
                "text_offset": offsets}


class ChatFormat(ResponseFormat):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def choice(self, out: RequestOutput, comp: CompletionOutput) -> dict[str, Any]:
        choice = {"index": comp.index, "message": {"role": "assistant", "content": comp.text},
                  "logprobs": self._logprobs(comp.token_ids, comp.logprobs or []),
                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        return self.with_token_ids(choice, out, comp)

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Like OpenAI and vLLM: each choice opens with a chunk that carries only the role."""
        return [self.envelope(self.chunk_object_name,
                              [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for i in range(self.params.n)]

    def delta_choice(self, index, out, text, token_ids, entries, sent, first):
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(token_ids, entries)}

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]]) -> dict | None:
        if self.params.logprobs is None:
            return None
        k = self.params.logprobs
        return {"content": [{**self._entry(t, e[t]),
                             "top_logprobs": [self._entry(tid, lp) for tid, lp in _by_rank(e) if lp.rank <= k]}
                            for t, e in zip(token_ids, entries)]}

    def _entry(self, token_id: int, lp: Logprob) -> dict[str, Any]:
        s = self.token_str(token_id)
        return {"token": s, "logprob": _clamp(lp.logprob), "bytes": list(s.encode())}


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda item: item[1].rank)


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)
