"""Token-level perplexity of a text at a given context length, scored by the engine.

The text is cut into windows of `context_len` tokens, `stride` apart; each window's last `stride`
tokens are scored (so each scored token sees at least context_len - stride tokens before it, and no
token is scored twice), teacher-forced: the model's logprob of the true token given the true text
before it. Perplexity = exp(mean negative logprob) over every scored token.

    window      [ ---------- context ---------- | ---- scored (stride) ---- ]
    prefill     one prompt: the whole window (the last token forced as the sampled one)
    decode      prompt: the context up to its last token; then one decode step per scored token
    cpu-tier    as decode, but the prompt's KV makes a round trip through the CPU tier first

Two modes read the KV through different paths:

- prefill: the request's prompt is the window with `prompt_logprobs`; every scored token's logits
  come from a prefill forward (chunked by --max-num-batched-tokens: a later chunk reads the earlier
  chunks' KV from the paged cache). Measures the prefill-path attention.
- decode: the request's prompt is the context; the scored tokens are its forced outputs
  (SamplingParams.forced_token_ids), each the input of one decode step that attends over the KV the
  engine holds for the context and the tokens before it. Measures the decode path: what a quantized
  GPU or CPU tier stored for the context, KCache's top-N V rows, far blocks (--kv-expansion) read back
  from the CPU tier layer by layer.

- cpu-tier: decode mode over a context loaded from the CPU tier. A first request computes the
  context (write-through stores its full blocks in the CPU tier, quantized with
  --kv-offloading-dtype int8/int4), `LLM.reset_prefix_cache()` drops the GPU copies, and the scored
  request finds the context on the CPU only: its full blocks are loaded (dequantized) and the
  forced decode steps attend over them. Every window's hit is checked to be all CPU (kvtier/eval/
  tier.py); `cpu_hit_tokens` counts the context tokens that came back that way. Needs a CPU tier
  with --kv-offloading-policy write-through, large enough for --batch-size contexts.

All score the same tokens from the same contexts, so with exact attention they agree up to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from tqdm.auto import tqdm

from kvtier.entrypoints.llm import LLM
from kvtier.eval.tier import check_tier_path, cpu_hit_tokens, store_in_cpu_tier
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams

MODES = ("prefill", "decode", "cpu-tier")


@dataclasses.dataclass
class PerplexityResult:
    value: float  # exp(nll / num_tokens)
    nll: float  # negative logprob summed over the scored tokens
    num_tokens: int  # tokens scored
    num_windows: int
    cpu_hit_tokens: int = 0  # mode cpu-tier: context tokens whose KV was loaded from the CPU tier
    context_tokens: int = 0  # tokens of the windows' prompts (the context before the scored tokens)


def window_starts(num_tokens: int, context_len: int, stride: int) -> list[int]:
    """The first token of each window of `context_len` tokens, `stride` apart, that fits the text."""
    if not 0 < stride < context_len - 1:  # decode mode's prompt needs a token before the forced ones
        raise ValueError(f"stride {stride} must be in [1, context_len - 2] = [1, {context_len - 2}]")
    if num_tokens < context_len:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of {context_len}")
    return list(range(0, num_tokens - context_len + 1, stride))


def perplexity(llm: LLM, token_ids: Sequence[int], context_len: int, stride: int | None = None,
               mode: str = "prefill", batch_size: int = 4, use_tqdm: bool = True) -> PerplexityResult:
    """Perplexity of `token_ids` in windows of `context_len` tokens, the last `stride` of each scored
    (default: a quarter of the window); `batch_size` windows run at once.

    mode "prefill": each window is one prompt scored by prompt logprobs, so attention runs the prefill
    path (later prefill chunks read earlier chunks' KV from the cache). mode "decode": the context is
    prefilled and each scored token is one teacher-forced decode step, whose attention reads the KV the
    engine keeps for the context (quantized, split, far or not) the way generation does. mode
    "cpu-tier": decode, with the context's KV first stored in the CPU tier and loaded back from it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if context_len > llm.engine.max_model_len:
        raise ValueError(f"context_len {context_len} exceeds the engine's max_model_len {llm.engine.max_model_len}")
    stride = stride or context_len // 4
    if mode == "cpu-tier":
        check_tier_path(llm)
    windows = [list(token_ids[s:s + context_len]) for s in window_starts(len(token_ids), context_len, stride)]
    score = {"prefill": _score_prefill, "decode": _score_decode, "cpu-tier": _score_cpu_tier}[mode]
    logprobs: list[float] = []
    cpu_hits = 0
    with tqdm(total=len(windows), desc=f"perplexity ({mode})", unit="window", disable=not use_tqdm) as bar:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            scored, hits = score(llm, batch, stride)
            logprobs += scored
            cpu_hits += hits
            bar.update(len(batch))
    nll = -math.fsum(logprobs)
    context = (context_len - stride - (mode != "prefill")) * len(windows)  # decode's prompt ends a token earlier
    return PerplexityResult(math.exp(nll / len(logprobs)), nll, len(logprobs), len(windows), cpu_hits, context)


def _score_prefill(llm: LLM, windows: list[list[int]], stride: int) -> tuple[list[float], int]:
    """The scored tokens' logprobs from one prefill per window. The last token is the forced sampled
    one: a prompt of the whole window would need a position past it (max_model_len)."""
    params = [_forced(w[-1:], prompt_logprobs=0) for w in windows]
    outs = llm.generate([{"prompt_token_ids": w[:-1]} for w in windows], params, use_tqdm=False)
    scored = []
    for window, out in zip(windows, outs):
        _check(out, window[-1:])
        prompt = out.prompt_logprobs or []
        first = len(window) - stride
        scored += [prompt[p][window[p]].logprob for p in range(first, len(window) - 1)]
        scored.append(_output_logprobs(out, window[-1:])[0])
    return scored, 0


def _score_decode(llm: LLM, windows: list[list[int]], stride: int) -> tuple[list[float], int]:
    """The scored tokens' logprobs from decode steps: the prompt stops one token before them, and
    that token (forced, not scored: the prefill's last row predicts it) is the first step's input."""
    first = len(windows[0]) - stride - 1
    params = [_forced(w[first:]) for w in windows]
    outs = llm.generate([{"prompt_token_ids": w[:first]} for w in windows], params, use_tqdm=False)
    return [lp for w, out in zip(windows, outs) for lp in _output_logprobs(out, w[first:])[1:]], 0


def _score_cpu_tier(llm: LLM, windows: list[list[int]], stride: int) -> tuple[list[float], int]:
    """Decode scoring over contexts that made the CPU tier round trip: computed and stored first,
    the GPU prefix cache reset, then loaded back by the scoring request (checked: all from the CPU)."""
    first = len(windows[0]) - stride - 1
    store_in_cpu_tier(llm, [w[:first] for w in windows])
    params = [_forced(w[first:]) for w in windows]
    outs = llm.generate([{"prompt_token_ids": w[:first]} for w in windows], params, use_tqdm=False)
    scored = [lp for w, out in zip(windows, outs) for lp in _output_logprobs(out, w[first:])[1:]]
    return scored, cpu_hit_tokens(llm, outs, [first] * len(windows))  # after the check that they ran


def _forced(token_ids: list[int], prompt_logprobs: int | None = None) -> SamplingParams:
    """Teacher forcing: exactly these output tokens, each with its logprob; EOS in the text does not stop it."""
    return SamplingParams(temperature=0.0, max_tokens=len(token_ids), forced_token_ids=token_ids, logprobs=0,
                          ignore_eos=True, prompt_logprobs=prompt_logprobs)


def _output_logprobs(out: RequestOutput, forced: list[int]) -> list[float]:
    _check(out, forced)
    steps = out.outputs[0].logprobs or []
    return [step[t].logprob for step, t in zip(steps, forced)]


def _check(out: RequestOutput, forced: list[int]) -> None:
    """A request that failed or stopped early has no score to give: fail the evaluation, not skew it."""
    comp = out.outputs[0]
    if out.error is not None or comp.token_ids != forced:
        raise RuntimeError(f"request {out.request_id} ended {comp.finish_reason!r} after {len(comp.token_ids)} of "
                           f"{len(forced)} forced tokens{': ' + out.error if out.error else ''}")
