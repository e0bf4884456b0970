"""Where a decode step's time goes: host input preparation, the forward (graph replay), sampling,
and the engine's own bookkeeping (scheduling, the scheduler's update, the outputs: text and
RequestOutputs). Synchronous scheduling, and a device sync around each part, so each part is
its own cost; totals exceed a normal step.

    python3 benchmarks/profile_decode.py [--model llama3-8b] [--batch 64] [--input-len 2048] \
        [--temperature 1.0 --top-p 0.9]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.benchmarks.throughput import start_decoding  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name, fn, device):
    def wrapper(*a, **kw):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        TIMES[name].append((time.perf_counter() - t0) * 1e3)
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=args.input_len + args.output_len + 64,
              max_num_seqs=args.batch, max_num_batched_tokens=16384, async_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    dev = engine.device
    start_decoding(llm, args.batch, args.input_len, args.output_len,
                   SamplingParams(temperature=args.temperature, top_p=args.top_p))
    runner.prepare_inputs = timed("prepare_inputs", runner.prepare_inputs, dev)
    runner._logits = timed("forward", runner._logits, dev)
    runner.sampler.sample = timed("sample", runner.sampler.sample, dev)
    engine.output_processor.outputs = timed("outputs", engine.output_processor.outputs, dev)
    engine._apply_tokens = timed("apply_tokens", engine._apply_tokens, dev)
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule, dev)
    engine.scheduler.update_from_output = timed("update", engine.scheduler.update_from_output, dev)
    step = timed("step", engine.step, dev)
    graphs = runner.graphs
    if graphs is not None:
        size = graphs.sizes[-1]
        whole = graphs.graphs[size][0]  # no CPU tier here: one segment per size
        whole.replay = timed("graph.replay", whole.replay, dev)
    prof = cProfile.Profile()
    prof.enable()
    while engine.has_unfinished_requests():
        step()
    prof.disable()
    if graphs is not None:  # the same graph replayed alone, inputs left from the last step
        for _ in range(10):
            whole.replay()
    print(f"{'part':<16} {'median ms':>10}  n")
    for name, vals in TIMES.items():
        vals = sorted(vals[2:]) or vals
        print(f"{name:<16} {vals[len(vals) // 2]:>10.3f}  {len(vals)}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
