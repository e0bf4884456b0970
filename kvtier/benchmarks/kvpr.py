"""`kvtier bench kvpr`: KVPR against full transfer with all active KV in the CPU tier, and a CPU-tier
prefix hit by KVPR, by whole-K/V reload and by recompute.

Decode (FlexGen's regime): for each --modes value of --kvpr ("off" is full transfer), one engine with
--kv-expansion 1.0 (every full block of every running request lives only in the CPU tier and crosses
the link each step, layer by layer). BATCH random prompts of INPUT_LEN tokens are prefilled with
nothing far, then every full block goes far and OUTPUT_LEN decode steps are timed: decode tokens/s =
the batch over the median decode step (device time between consecutive steps' starts).
`split_fraction` is the share of the CPU-resident blocks the steps recomputed (the planner's mean l / s).

Prefix hit (--prefix-len > 0): per mode, an engine whose GPU pool holds ~2.5 such prompts; a prompt
is computed (TTFT = recompute), three others push it out to the CPU tier, then it comes back with a
new 16-token ending (TTFT = the hit: whole reload with --kvpr off, partly recomputed with KVPR).

    kvtier bench kvpr --model opt-13b --load-format dummy --skip-tokenizer-init --kv-offloading-size 48 \\
        --batch 64 --input-len 512 --output-len 32 --prefix-len 4096 --output-json kvpr.json
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvtier.benchmarks.expansion import _measure
from kvtier.benchmarks.multiturn import release_memory
from kvtier.benchmarks.prefix_hit import TAIL, prefix_hit_engine_args, prefix_hit_ttft
from kvtier.benchmarks.throughput import GREEDY, start_decoding
from kvtier.entrypoints.llm import LLM

SETTLE_STEPS = 48  # at most, decode steps for every full block to go far (copies land in prefill)


@dataclasses.dataclass
class KVPRBenchConfig:
    batch: int = 64
    input_len: int = 512
    output_len: int = 32
    modes: str = "off,auto"  # --kvpr values, each its own engine; "off" is full transfer
    prefix_len: int = 0  # the prefix-hit TTFT point (0: not run)
    prefix_reps: int = 3
    decode: bool = True  # the decode comparison (off: only the prefix hit)
    ring_load: str = "kernel"  # TransferEngine.ring_load: how far K/V (and kept inputs) reach the GPU
    flexgen_decode_tok_s: float | None = None  # FlexGen's, measured in the same run by its own script
    output_json: str | None = None

    def mode_list(self) -> list[str]:
        modes = [m.strip() for m in self.modes.split(",") if m.strip()]
        if "off" not in modes or len(modes) < 2:
            raise ValueError(f"--modes {self.modes!r}: 'off' (full transfer) and at least one KVPR mode, e.g. off,auto")
        return modes


def decode_point(engine_kwargs: dict[str, Any], cfg: KVPRBenchConfig, mode: str) -> dict[str, Any]:
    """One engine with --kvpr `mode`: the batch prefilled with nothing far, then every full block
    far (--kv-expansion 1.0) for the decode steps timed: decode rate, step, recomputed share."""
    llm = LLM(**{**engine_kwargs, "kv_expansion": "1.0", "kvpr": mode,
                 "max_num_seqs": max(cfg.batch, engine_kwargs.get("max_num_seqs") or 0)})
    engine = llm.engine
    engine.worker.transfers.ring_load = cfg.ring_load
    # prefill near: mixed prefill + far decode steps of OPT-13B at batch 64 met an illegal memory
    # access on the H200 (2026-12-01, not yet found; not with CUDA_LAUNCH_BLOCKING=1); decode is timed
    engine.kv_cache.far_fraction = 0.0
    start_decoding(llm, cfg.batch, cfg.input_len, cfg.output_len + SETTLE_STEPS + 4, GREEDY)
    settle_steps = _all_far(llm)
    before = engine.stats()
    step, far_blocks = _measure(llm, cfg.output_len)
    stats = engine.stats()
    recomputed = stats.get("kvpr_recomputed_blocks_total", 0) - before.get("kvpr_recomputed_blocks_total", 0)
    candidates = stats.get("kvpr_candidate_blocks_total", 0) - before.get("kvpr_candidate_blocks_total", 0)
    far_of = engine.kv_cache.req_far
    point = {"kvpr": mode, "decode_tok_s": cfg.batch / step, "decode_step_ms": step * 1e3,
             # which requests hold how many far blocks at the end (on the H200 the far share once
             # stalled at about half: 33 requests wholly far, the rest not at all, cause not found)
             "far_blocks_by_request": sorted(len(far_of.get(r.request_id, ())) for r in engine.scheduler.running),
             "decode_steps": cfg.output_len, "far_blocks_per_step": far_blocks, "settle_steps": settle_steps,
             "far_share": far_blocks / max(1, _full_blocks(engine)), "why_near": _why_near(engine),
             "split_fraction": recomputed / candidates if candidates else 0.0,
             "link_gb_s": stats.get("kvpr_link_gb_s"), "recompute_tflops": stats.get("kvpr_recompute_tflops")}
    engine.worker.free_kv_cache()
    del llm, engine
    release_memory()
    return point


def _full_blocks(engine) -> int:
    return sum(r.num_computed_tokens // engine.config.block_size for r in engine.scheduler.running)


def _why_near(engine) -> dict[str, int]:
    """Why full blocks of running requests are still on the GPU: no CPU copy, a copy in flight, or
    the limits (staging ring slots, free CPU blocks, stores dropped for want of one)."""
    kv = engine.kv_cache
    in_flight = kv.pending.refs(kv.cpu_pool)
    copies = [kv.cpu_pool.lookup(b.block_hash) if b.block_hash is not None else None
              for r in engine.scheduler.running
              for b in kv.req_blocks.get(r.request_id, [])[:r.num_computed_tokens // engine.config.block_size]]
    return {"no_copy": sum(c is None for c in copies),
            "copy_in_flight": sum(c is not None and c.block_id in in_flight for c in copies),
            "copy_landed": sum(c is not None and c.block_id not in in_flight for c in copies),
            "max_far_blocks": kv.max_far_blocks, "cpu_free_blocks": kv.cpu_pool.num_free_blocks,
            "dropped_stores": kv.num_dropped_demotions}


def _all_far(llm: LLM) -> int:
    """Steps until every full block is far (but the newest of each request: a block goes far a step
    or two after its CPU copy lands); at most SETTLE_STEPS. The far share is reported beside the rate."""
    engine = llm.engine
    engine.kv_cache.far_fraction = 1.0
    for steps in range(SETTLE_STEPS):
        if engine.kv_cache.num_far_blocks() >= _full_blocks(engine) - len(engine.scheduler.running):
            return steps
        engine.step()
    return SETTLE_STEPS


def prefix_point(engine_kwargs: dict[str, Any], cfg: KVPRBenchConfig, mode: str) -> dict[str, Any]:
    llm = LLM(**{**engine_kwargs, "kvpr": mode, "kv_expansion": "off",
                 **prefix_hit_engine_args(cfg.prefix_len, engine_kwargs.get("block_size") or 16)})
    result = prefix_hit_ttft(llm, cfg.prefix_len, TAIL, cfg.prefix_reps, evictors=3)
    result["split_fraction"] = llm.engine.stats().get("kvpr_split_fraction", 0.0)
    result.pop("runs")
    llm.engine.worker.free_kv_cache()
    del llm
    release_memory()
    return result


def run_kvpr(engine_kwargs: dict[str, Any], cfg: KVPRBenchConfig) -> dict[str, Any]:
    modes = cfg.mode_list()
    out = compare_decode(engine_kwargs, cfg, modes) if cfg.decode else {
        "feature": "kvpr", "device": _device_name(), "torch": torch.__version__, "model": engine_kwargs.get("model")}
    if cfg.prefix_len > 0:
        out["prefix_hit"] = {mode: prefix_point(engine_kwargs, cfg, mode) for mode in modes}
    return out


def compare_decode(engine_kwargs: dict[str, Any], cfg: KVPRBenchConfig, modes: list[str]) -> dict[str, Any]:
    decode = {mode: decode_point(engine_kwargs, cfg, mode) for mode in modes}
    best = max((m for m in modes if m != "off"), key=lambda m: decode[m]["decode_tok_s"])
    full, kvpr = decode["off"], decode[best]
    out: dict[str, Any] = {
        "feature": "kvpr", "device": _device_name(), "torch": torch.__version__, "model": engine_kwargs.get("model"),
        "batch": cfg.batch, "input_len": cfg.input_len, "output_len": cfg.output_len, "kvpr_mode": best,
        "split_fraction": kvpr["split_fraction"], "kvtier_decode_tok_s": kvpr["decode_tok_s"],
        "full_transfer_decode_tok_s": full["decode_tok_s"],
        "speedup_vs_full_transfer": kvpr["decode_tok_s"] / full["decode_tok_s"],
        "step_latency_reduction": 1 - kvpr["decode_step_ms"] / full["decode_step_ms"],
        "flexgen_decode_tok_s": cfg.flexgen_decode_tok_s,
        "vs_flexgen": kvpr["decode_tok_s"] / cfg.flexgen_decode_tok_s if cfg.flexgen_decode_tok_s else None,
        "decode": decode}
    return out


def print_result(result: dict[str, Any]) -> None:
    if "decode" in result:
        print_decode(result)
    for mode, p in result.get("prefix_hit", {}).items():
        print(f"prefix hit {p['prefix_len']} tokens, --kvpr {mode}: TTFT {p['cpu_hit_ttft_s'] * 1e3:.1f} ms "
              f"(recompute {p['recompute_ttft_s'] * 1e3:.1f} ms, split {p['split_fraction']:.2f})")


def print_decode(result: dict[str, Any]) -> None:
    print(f"{'--kvpr':>8}{'decode tok/s':>14}{'step ms':>10}{'split':>8}{'far blocks':>12}{'far share':>11}")
    for mode, p in result["decode"].items():
        print(f"{mode:>8}{p['decode_tok_s']:>14.1f}{p['decode_step_ms']:>10.1f}{p['split_fraction']:>8.2f}"
              f"{p['far_blocks_per_step']:>12.0f}{p['far_share']:>11.2f}")
    flex = result["flexgen_decode_tok_s"]
    print(f"KVPR ({result['kvpr_mode']}) vs full transfer: {result['speedup_vs_full_transfer']:.2f}x decode, "
          f"step {result['step_latency_reduction']:.1%} shorter" + (f"; {result['vs_flexgen']:.2f}x FlexGen's "
                                                                    f"{flex:.1f} tok/s" if flex else ""))


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
