"""Where a decode step's device time goes, kernel by kernel (torch.profiler over CUDA-graph replays).

Builds the engine (Llama-3-8B shape, random bf16 weights), prefills BATCH prompts of INPUT_LEN tokens,
then profiles STEPS decode steps and prints, per kernel (grouped by name), its time per step, its
share, and the device time not covered by any kernel (launch gaps inside the graph). Writes the
table as JSON with --out.

    python3 benchmarks/profile_forward.py [--batch 64] [--input-len 2048] [--steps 10] [--out prof.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.benchmarks.throughput import start_decoding  # noqa: E402

MAX_BATCHED_TOKENS = 16384


def kernel_table(prof, steps: int, wall_ms: float) -> dict:
    per_name: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            per_name[event.name] += us / 1e3 / steps  # us -> ms, per step
            calls[event.name] += 1
    busy = sum(per_name.values())
    rows = sorted(per_name.items(), key=lambda kv: -kv[1])
    return {"step_wall_ms": wall_ms, "kernel_ms": busy, "not_in_kernels_ms": wall_ms - busy,
            "kernel_launches_per_step": sum(calls.values()) / steps,
            "kernels": [{"name": n[:90], "ms_per_step": ms, "share": ms / busy,
                         "calls_per_step": calls[n] / steps} for n, ms in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # Long enough that no request finishes while profiled: the prompts are prefilled over several
    # steps, during which the first ones already decode (a shrinking batch would mix batch sizes).
    new_tokens = args.steps + 16 + -(-args.batch * args.input_len // MAX_BATCHED_TOKENS)
    llm = LLM("llama3-8b", load_format="dummy", max_model_len=args.input_len + new_tokens + 16,
              max_num_seqs=args.batch, max_num_batched_tokens=MAX_BATCHED_TOKENS)
    sampling = SamplingParams(temperature=args.temperature, top_p=0.9 if args.temperature else 1.0)
    start_decoding(llm, args.batch, args.input_len, new_tokens, sampling)
    for _ in range(3):  # into steady decoding
        llm.engine.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.steps):
            llm.engine.step()
        end.record()
        torch.cuda.synchronize()
    table = {"batch": args.batch, "input_len": args.input_len, "temperature": args.temperature,
             "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             **kernel_table(prof, args.steps, start.elapsed_time(end) / args.steps)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2)
    print(f"step {table['step_wall_ms']:.3f} ms, kernels {table['kernel_ms']:.3f} ms, "
          f"not in kernels {table['not_in_kernels_ms']:.3f} ms")
    print(f"kernel launches per step {table['kernel_launches_per_step']:.0f}")
    print(f"{'kernel':<92}{'ms/step':>9}{'share':>7}{'calls':>7}")
    for row in table["kernels"][:25]:
        print(f"{row['name']:<92}{row['ms_per_step']:>9.3f}{row['share']:>7.1%}{row['calls_per_step']:>7.0f}")


if __name__ == "__main__":
    main()
