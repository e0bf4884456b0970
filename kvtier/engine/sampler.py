"""Sampling from a batch of logits, each row with its own SamplingParams.

Order, as in vLLM: repetition penalty -> min_tokens masking -> (greedy argmax) or
temperature -> top-k -> top-p -> min-p -> draw. Logprobs are those of the raw model
distribution (log_softmax of the unprocessed logits).

A seeded request draws from its own torch.Generator, so its tokens do not depend on what else
is in the batch. Draws use the exponential-race trick (argmax p / E, E ~ Exp(1)), which equals
sampling from p without a host sync.
"""

from __future__ import annotations

import torch

from kvtier.scheduler.output import SampledToken, ScheduledRequest


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    def _generator(self, item: ScheduledRequest) -> torch.Generator:
        if item.params.seed is None:
            return self.default_generator
        gen = self.generators.get(item.request_id)
        if gen is None:
            gen = self.generators[item.request_id] = torch.Generator(device=self.device)
            gen.manual_seed(item.params.seed)
        return gen

    def __call__(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> list[SampledToken]:
        """logits (N, V) fp32, one row per item -> one SampledToken per item."""
        raw = logits
        if any(_needs_penalty(item) for item in items):
            logits = self._penalize(logits.clone(), items)
        if all(item.params.greedy for item in items):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.stack([self._draw(logits[i], item) for i, item in enumerate(items)])
        token_ids = tokens.tolist()  # the one host sync of the step
        return self._with_logprobs(raw, token_ids, items)

    def _penalize(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> torch.Tensor:
        for i, item in enumerate(items):
            p = item.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(item.all_token_ids)), device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                              vals * p.repetition_penalty)
            if _below_min_tokens(item):
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(item.eos_token_ids))
                if banned:
                    logits[i, torch.tensor(banned, device=logits.device)] = float("-inf")
        return logits

    def _draw(self, row: torch.Tensor, item: ScheduledRequest) -> torch.Tensor:
        p = item.params
        if p.greedy:
            return row.argmax()
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(item))
        return (probs / noise).argmax()

    def _with_logprobs(self, raw: torch.Tensor, token_ids: list[int],
                       items: list[ScheduledRequest]) -> list[SampledToken]:
        out = [SampledToken(t) for t in token_ids]
        rows = [i for i, item in enumerate(items) if item.params.logprobs is not None]
        if not rows:
            return out
        logprobs = torch.log_softmax(raw[rows], dim=-1)
        for j, i in enumerate(rows):
            lp, tok = logprobs[j], token_ids[i]
            k = items[i].params.logprobs
            chosen = lp[tok]
            top = torch.topk(lp, k) if k else None
            out[i].logprob = chosen.item()
            out[i].rank = int((lp > chosen).sum().item()) + 1
            out[i].top_logprobs = (list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
        return out


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _below_min_tokens(item: ScheduledRequest) -> bool:
    return item.num_output_tokens < item.params.min_tokens


def _needs_penalty(item: ScheduledRequest) -> bool:
    return item.params.repetition_penalty != 1.0 or _below_min_tokens(item)
