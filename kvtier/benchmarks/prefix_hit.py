"""TTFT of a prompt whose prefix the CPU tier holds, against the same prompt computed fresh
(`benchmarks/tier_gpu.py`, `kvtier bench kvpr`). Build the engine with a GPU pool of a few such
prompts, so `evictors` later ones push the first out to the CPU tier."""

from __future__ import annotations

import gc
import statistics
import time

from kvtier.benchmarks.datasets import random_requests
from kvtier.entrypoints.llm import LLM
from kvtier.sampling_params import SamplingParams

TAIL = 16  # new tokens after the held prefix


def prefix_hit_engine_args(prefix_len: int, block_size: int = 16) -> dict[str, int]:
    """Engine options for prefix_hit_ttft: a GPU pool of ~2.5 prompts of prefix_len + TAIL tokens
    (three later prompts push the first out to the CPU tier), and room for one such prompt a step."""
    return {"num_gpu_blocks_override": int(2.5 * (prefix_len + TAIL) / block_size),
            "max_model_len": prefix_len + 64, "max_num_batched_tokens": prefix_len + 64}


def prefix_hit_ttft(llm: LLM, prefix_len: int, tail: int, reps: int, evictors: int) -> dict:
    """TTFT of a prompt whose prefix is in the CPU tier vs a fresh prompt of the same length."""
    vocab = llm.engine.model_config.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    seed = 100
    runs = []

    def fresh(n):
        nonlocal seed
        seed += 1
        return random_requests(1, n, 1, vocab, seed)[0].prompt_token_ids

    for rep in range(reps + 1):  # the first round warms up (kernel variants for prefix + new tokens)
        prompt = fresh(prefix_len + tail)
        recompute = llm.generate([prompt], one, use_tqdm=False)[0].metrics
        for _ in range(evictors):  # push the prompt's blocks out of the GPU pool (demoted to CPU)
            llm.generate([fresh(prefix_len + tail)], one, use_tqdm=False)
        again = prompt[:prefix_len] + fresh(tail)
        llm.engine.step_log, gc_pauses = [], []  # where a slow hit's time went: steps, collections
        hit = _with_gc_pauses(gc_pauses, lambda: llm.generate([again], one, use_tqdm=False)[0].metrics)  # noqa: B023
        steps, llm.engine.step_log = llm.engine.step_log, None
        if rep:
            runs.append({"recompute_ttft_s": recompute.ttft_s, "cpu_hit_ttft_s": hit.ttft_s,
                         "cached_by_tier": hit.num_cached_tokens_by_tier,
                         "queued_s": hit.first_scheduled_time - hit.arrival_time,
                         "steps": [{"tokens": r.num_tokens, "ms": r.seconds * 1e3} for r in steps],
                         "gc_ms": [t * 1e3 for t in gc_pauses]})
    rec = statistics.median(r["recompute_ttft_s"] for r in runs)
    hit = statistics.median(r["cpu_hit_ttft_s"] for r in runs)
    return {"prefix_len": prefix_len, "tail": tail, "runs": runs, "recompute_ttft_s": rec,
            "cpu_hit_ttft_s": hit, "speedup": rec / hit}


def _with_gc_pauses(pauses: list[float], fn):
    """fn(), appending the seconds of each garbage collection that ran inside it to pauses."""
    started = []

    def callback(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append(time.perf_counter() - started.pop())
    gc.callbacks.append(callback)
    try:
        return fn()
    finally:
        gc.callbacks.remove(callback)
