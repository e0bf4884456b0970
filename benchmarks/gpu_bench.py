"""GPU benchmark scenarios on one engine (Llama-3-8B shape, random bf16 weights), one JSON each.

    decode             batch 64, 2048-token prompts, 64 new tokens: decode step vs the memory roofline
    decode_sampled     the same with temperature 1.0, top_p 0.9
    decode256          batch 256, 512-token prompts, 64 new tokens, greedy
    decode256_sampled  the same with temperature 1.0, top_p 0.9
    prefill            8 x 2048-token prompts, 1 new token: prefill MFU vs the measured matmul rate
    vs_hf              batch 16, 2048-token prompts, 256 new tokens: output tok/s and the engine's own
                       bound (e2e_roofline_fraction) vs HF transformers (last: it frees kvtier's KV
                       cache to give HF the memory)

Run by benchmarks/gpu_suite.sh; `--smoke` runs tiny shapes on any device. `--kv-cache-dtypes auto,fp8`
runs the chosen scenarios once per GPU cache dtype, one engine each, in this run, and writes
kv_cache_dtype.json: each scenario's step time with each dtype and its ratio to "auto"'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvtier import LLM  # noqa: E402
from kvtier.benchmarks.datasets import random_requests  # noqa: E402
from kvtier.benchmarks.multiturn import release_memory  # noqa: E402
from kvtier.benchmarks.throughput import GREEDY, DeviceRates, benchmark, compare_hf  # noqa: E402
from kvtier.sampling_params import SamplingParams  # noqa: E402

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)
FULL = {"model": "llama3-8b", "decode": (64, 2048, 64), "decode256": (256, 512, 64), "prefill": (8, 2048, 1),
        "vs_hf": (16, 2048, 256), "engine": dict(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384)}
SMOKE = {"model": "tiny-llama", "decode": (8, 64, 8), "decode256": (16, 32, 8), "prefill": (4, 64, 1),
         "vs_hf": (4, 64, 16), "engine": dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512)}
SCENARIOS = (("decode", "decode", GREEDY), ("decode_sampled", "decode", SAMPLED),
             ("decode256", "decode256", GREEDY), ("decode256_sampled", "decode256", SAMPLED),
             ("prefill", "prefill", GREEDY), ("vs_hf", "vs_hf", GREEDY))


def scenario(llm: LLM, rates: DeviceRates, name: str, shape: tuple[int, int, int], seed: int,
             sampling: SamplingParams) -> dict:
    num, input_len, output_len = shape
    reqs = random_requests(num, input_len, output_len, llm.engine.model_config.vocab_size, seed)
    res = {"scenario": name, **benchmark(llm, reqs, rates, seed=seed, sampling=sampling)}
    res["engine_args"] = {k: v for k, v in vars(llm.engine.config).items() if v is not None}
    if name == "vs_hf":
        compare_hf(llm, reqs, num, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="default: the engine's (on with a GPU)")
    ap.add_argument("--only", default=None, help="comma-separated scenarios to run (default: all)")
    ap.add_argument("--kv-cache-dtypes", default="auto",
                    help="comma-separated --kv-cache-dtype values, one engine each (e.g. auto,fp8)")
    args = ap.parse_args()
    spec = SMOKE if args.smoke else FULL
    os.makedirs(args.out, exist_ok=True)
    dtypes = args.kv_cache_dtypes.split(",")
    by_dtype = {dtype: run_engine(args, spec, dtype, "" if len(dtypes) == 1 else f"_{dtype}") for dtype in dtypes}
    if len(dtypes) > 1:
        write_dtype_comparison(args, by_dtype)


def run_engine(args: argparse.Namespace, spec: dict, kv_cache_dtype: str, suffix: str) -> list[dict]:
    t0 = time.time()
    llm = LLM(spec["model"], load_format="dummy", enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling, kv_cache_dtype=kv_cache_dtype, **spec["engine"])
    print(f"engine ready in {time.time() - t0:.1f}s (backend {llm.engine.runner.attention_backend}, "
          f"graphs {llm.engine.runner.graphs is not None}, KV cache {llm.engine.kv_spec.dtype})", flush=True)
    rates = DeviceRates.measure(llm.engine.device, llm.engine.dtype)
    rows = []
    for i, (name, shape, sampling) in enumerate(SCENARIOS):
        if args.only and name not in args.only.split(","):
            continue
        res = scenario(llm, rates, name, spec[shape], seed=i, sampling=sampling)
        res["kv_cache_dtype"] = kv_cache_dtype
        with open(os.path.join(args.out, f"bench_{name}{suffix}.json"), "w") as f:
            json.dump(res, f, indent=2, default=str)
        rows.append(res)
        keys = ("scenario", "decode_step_ms", "roofline_fraction", "prefill_mfu", "output_tok_s",
                "e2e_roofline_fraction", "host_ms_per_step", "device_ms_per_step", "speedup_vs_hf")
        print(json.dumps({k: res.get(k) for k in keys}), flush=True)
    print(f"\nasync scheduling: {llm.engine.async_scheduling}; KV cache dtype {kv_cache_dtype}")
    print_rows(rows)
    llm.engine.worker.free_kv_cache()
    del llm
    release_memory()
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'scenario':<18} batch    in   out  temp  top_p  step_ms  roofline_ms  roofline_frac  host_ms  "
          "prefill_mfu  out_tok/s  e2e_frac  vs_hf")
    nan = float("nan")
    for r in rows:
        print(f"{r['scenario']:<18} {r['num_prompts']:>5}  {r['input_len']:>4.0f}  {r['output_len']:>4.0f}  "
              f"{r['temperature']:>4.1f}  {r['top_p']:>5.2f}  {r.get('decode_step_ms', nan):>7.2f}  "
              f"{r.get('roofline_step_ms', nan):>11.2f}  {r.get('roofline_fraction', nan):>13.3f}  "
              f"{r.get('host_ms_per_step', nan):>7.3f}  {r.get('prefill_mfu', nan):>11.3f}  "
              f"{r['output_tok_s']:>9.1f}  {r.get('e2e_roofline_fraction', nan):>8.3f}  "
              f"{r.get('speedup_vs_hf', nan):>5.2f}")


def write_dtype_comparison(args: argparse.Namespace, by_dtype: dict[str, list[dict]]) -> None:
    """Each scenario's decode step with each cache dtype, and its ratio to the first dtype's."""
    base_name, base_rows = next(iter(by_dtype.items()))
    out = {"feature": "kv_quant", "device": base_rows[0].get("device") if base_rows else None,
           "command": "python3 benchmarks/gpu_bench.py " + " ".join(sys.argv[1:]), "baseline": base_name,
           "scenarios": {}}
    for i, base in enumerate(base_rows):
        entry = out["scenarios"][base["scenario"]] = {}
        for dtype, rows in by_dtype.items():
            step = rows[i].get("decode_step_ms")
            entry[dtype] = {"decode_step_ms": step, "roofline_fraction": rows[i].get("roofline_fraction"),
                            "output_tok_s": rows[i]["output_tok_s"],
                            "step_ratio_vs_" + base_name: step / base["decode_step_ms"] if step else None}
    with open(os.path.join(args.out, "kv_cache_dtype.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{'scenario':<18}" + "".join(f"{d + ' ms':>14}" for d in by_dtype) + f"{'ratio':>8}")
    for name, entry in out["scenarios"].items():
        last = entry[list(by_dtype)[-1]]["step_ratio_vs_" + base_name]
        print(f"{name:<18}" + "".join(f"{e['decode_step_ms'] or float('nan'):>14.2f}" for e in entry.values())
              + f"{last or float('nan'):>8.3f}")


if __name__ == "__main__":
    main()
