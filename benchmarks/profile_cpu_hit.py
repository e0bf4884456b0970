"""Where the time to first token of a CPU-tier hit goes: torch profiler over the hit request.

    python3 benchmarks/profile_cpu_hit.py [--prefix 4096] [--policy write-back]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.benchmarks.datasets import random_requests  # noqa: E402


def timeline(path: str) -> None:
    """Per GPU stream: its copies and kernels on one time axis (ms from the first GPU event), so
    that waiting shows: a forward kernel that starts only after the last load, a small copy
    queued behind a large one."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return
    t0 = min(e["ts"] for e in events)
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[e.get("args", {}).get("stream")].append(e)
    for stream, evs in sorted(by_stream.items(), key=lambda kv: min(e["ts"] for e in kv[1])):
        evs.sort(key=lambda e: e["ts"])
        busy = sum(e["dur"] for e in evs) / 1e3
        print(f"stream {stream}: {len(evs)} events, {(evs[0]['ts'] - t0) / 1e3:.2f} -> "
              f"{(evs[-1]['ts'] + evs[-1]['dur'] - t0) / 1e3:.2f} ms, busy {busy:.2f} ms")
        for e in evs:
            if e["cat"] != "kernel" or e["dur"] > 500 or e is evs[0] or e is evs[-1]:
                print(f"    {(e['ts'] - t0) / 1e3:8.2f} +{e['dur'] / 1e3:6.2f} ms  {e['name'][:70]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--policy", default="write-back")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", help="folder for the Chrome trace (then a per-stream timeline is printed)")
    args = ap.parse_args()
    n = args.prefix + 16
    llm = LLM(args.model, load_format="dummy", device=args.device, num_gpu_blocks_override=int(2.5 * n / 16),
              kv_offloading_size=8.0 if args.device == "cuda" else 0.01, kv_offloading_policy=args.policy,
              max_model_len=n + 48, max_num_batched_tokens=n + 48, max_num_seqs=8, skip_tokenizer_init=True)
    vocab, one = llm.engine.model_config.vocab_size, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    seeds = iter(range(1000, 2000))

    def fresh(k):
        return random_requests(1, k, 1, vocab, next(seeds))[0].prompt_token_ids

    for rep in range(3):
        prompt = fresh(n)
        llm.generate([prompt], one, use_tqdm=False)
        for _ in range(3):
            llm.generate([fresh(n)], one, use_tqdm=False)
        again = prompt[:args.prefix] + fresh(16)
        if rep < 2:
            out = llm.generate([again], one, use_tqdm=False)[0]
            print("warm-up hit TTFT", out.metrics.ttft_s, out.metrics.num_cached_tokens_by_tier)
            continue
        if args.device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            out = llm.generate([again], one, use_tqdm=False)[0]
            wall = time.perf_counter() - t0
        print("profiled hit TTFT", out.metrics.ttft_s, "wall", wall, out.metrics.num_cached_tokens_by_tier)
        if args.out:
            prof.export_chrome_trace(os.path.join(args.out, "cpu_hit_trace.json"))
            timeline(os.path.join(args.out, "cpu_hit_trace.json"))
        print(prof.key_averages().table(sort_by="cuda_time_total" if args.device == "cuda" else "cpu_time_total",
                                        row_limit=22, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
