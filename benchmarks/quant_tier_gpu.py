"""TTFT of a CPU-tier prefix hit with the CPU tier in bf16 (the GPU's dtype), int8 and int4
(--kv-offloading-dtype), each against recomputing the same prompt, Llama-3-8B shape, one GPU.

    python3 benchmarks/quant_tier_gpu.py --out $OUT/quant_tier.json
    python3 benchmarks/quant_tier_gpu.py --out /tmp/quant_tier.json --dry-run   # tiny model, CPU

Per dtype, one engine whose GPU pool holds ~2.5 prompts of PREFIX + 16 tokens: a prompt is
computed (TTFT = recompute), three others push it out to the CPU tier, then it comes back with a
new 16-token ending (TTFT = the hit: its prefix crosses the link in the tier's dtype and, when
quantized, is dequantized on the GPU). Medians over --reps rounds after one warm-up round
(kvtier.benchmarks.prefix_hit). The bytes a hit moves are the tier's bytes per block times the
prefix's blocks; the link time they imply at the measured pinned rate is printed beside the TTFT.
Writes the JSON to --out (keys: feature "kv_quant", device, model, prefix_len, and per dtype
recompute_ttft_s, cpu_hit_ttft_s, speedup), prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtier.benchmarks.multiturn import release_memory  # noqa: E402
from kvtier.benchmarks.prefix_hit import TAIL, prefix_hit_engine_args, prefix_hit_ttft  # noqa: E402
from kvtier.cache.storage import Tier  # noqa: E402
from kvtier.entrypoints.llm import LLM  # noqa: E402
from kvtier.offload.hardware import host_link_bandwidth  # noqa: E402

DTYPES = ("auto", "int8", "int4")


def one_dtype(model: str, device: str, dtype: str, prefix: int, reps: int, cpu_gib: float) -> dict:
    llm = LLM(model, load_format="dummy", device=device, kv_offloading_size=cpu_gib, kv_offloading_dtype=dtype,
              max_num_seqs=8, skip_tokenizer_init=True, **prefix_hit_engine_args(prefix))
    engine = llm.engine
    result = prefix_hit_ttft(llm, prefix, TAIL, reps, evictors=3)
    # the hit's prefix tokens by the tier they came from, per round (all from "cpu": a real hit)
    result["cached_by_tier"] = [r["cached_by_tier"] for r in result.pop("runs")]
    cpu_spec = engine.worker.kv.specs[Tier.CPU]
    result["cpu_block_bytes"] = cpu_spec.bytes_per_block
    result["prefix_bytes"] = cpu_spec.bytes_per_block * (prefix // engine.config.block_size)
    engine.worker.free_kv_cache()
    del llm, engine
    release_memory()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix-len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, same code paths")
    args = ap.parse_args()
    model, device, cpu_gib = ("tiny-llama", "cpu", 0.05) if args.dry_run else ("llama3-8b", "cuda", 8.0)
    prefix = 48 if args.dry_run else args.prefix_len
    link = host_link_bandwidth(torch.device(device)) if device == "cuda" else None
    result = {"feature": "kv_quant", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": model, "prefix_len": prefix, "pinned_h2d_GBps": link / 1e9 if link else None,
              "command": "python3 benchmarks/quant_tier_gpu.py " + " ".join(sys.argv[1:]), "ttft": {}}
    for dtype in DTYPES:
        result["ttft"][dtype] = one_dtype(model, device, dtype, prefix, 2 if args.dry_run else args.reps, cpu_gib)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{'CPU tier dtype':<16}{'prefix MiB':>12}{'link ms':>10}{'recompute s':>13}{'hit s':>10}{'speedup':>9}")
    for dtype, t in result["ttft"].items():
        link_ms = t["prefix_bytes"] / link * 1e3 if link else float("nan")
        print(f"{dtype:<16}{t['prefix_bytes'] / 2**20:>12.1f}{link_ms:>10.2f}{t['recompute_ttft_s']:>13.4f}"
              f"{t['cpu_hit_ttft_s']:>10.4f}{t['speedup']:>9.2f}")


if __name__ == "__main__":
    main()
