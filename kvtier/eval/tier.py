"""Putting the CPU tier in an evaluation's KV path: a prompt's prefix is computed once (write-through
stores its full blocks in the CPU tier, quantized when the tier is), the GPU prefix cache is reset,
and the scored request then finds the prefix on the CPU only: its KV is loaded (dequantized) from
there, and attention reads that round trip. Both `perplexity(mode="cpu-tier")` and
`passkey(through_cpu_tier=True)` use it; the hits are checked, not assumed."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.entrypoints.llm import LLM
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams


def check_tier_path(llm: LLM) -> None:
    """The round trip needs a CPU tier that stores blocks as they fill (write-through): with
    write-back nothing reaches the CPU before the reset drops the GPU copies."""
    kv = llm.engine.kv_cache
    if kv.cpu_pool is None:
        raise ValueError("the CPU-tier path needs a CPU tier: set --kv-offloading-size (GiB)")
    if not kv.demotion.store_when_full:
        raise ValueError("the CPU-tier path needs --kv-offloading-policy write-through (blocks stored as they fill)")
    if not kv.enable_prefix_caching:
        raise ValueError("the CPU-tier path finds the stored prefix by its hash: keep --enable-prefix-caching")


def store_in_cpu_tier(llm: LLM, prefixes: Sequence[Sequence[int]]) -> None:
    """Compute each prefix (one generated token, discarded), so write-through stores its full
    blocks; then drop them from the GPU prefix cache so the next request loads them from the CPU."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for out in llm.generate([{"prompt_token_ids": list(p)} for p in prefixes], params, use_tqdm=False):
        if out.error is not None:
            raise RuntimeError(f"prefix request {out.request_id} failed: {out.error}")
    llm.reset_prefix_cache()


def expected_cpu_hit(stored_len: int, prompt_len: int, block_size: int) -> int:
    """Tokens a prompt can load after a prefix of `stored_len` tokens was stored: the stored full
    blocks, but not the prompt's last token (one is always left to compute)."""
    return min(stored_len // block_size, (prompt_len - 1) // block_size) * block_size


def cpu_hit_tokens(llm: LLM, outs: Sequence[RequestOutput], stored_lens: Sequence[int]) -> int:
    """Prompt tokens the requests took from the round trip (their stored prefix, `stored_lens`, all
    of it); raises if any came short (a CPU tier too small evicted part of a prefix). Hits on the
    GPU count too: after the reset the GPU caches only blocks that a request of the same batch
    loaded from the CPU (passkey prompts share their intro) or computed past its stored prefix,
    which no other prompt shares. A figure from a partial round trip would be mislabelled."""
    block_size = llm.engine.config.block_size
    total = 0
    for out, stored_len in zip(outs, stored_lens):
        hits = out.metrics.num_cached_tokens_by_tier
        want = expected_cpu_hit(stored_len, len(out.prompt_token_ids), block_size)
        if hits.get("cpu", 0) + hits.get("gpu", 0) != want or (want and not hits.get("cpu", 0)):
            raise RuntimeError(f"request {out.request_id}: cached tokens by tier {dict(hits)}, expected {want} "
                               "loaded from the CPU tier: raise --kv-offloading-size, or lower --batch-size")
        total += want
    return total
