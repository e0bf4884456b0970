"""Command bodies of `kvtier bench ...`: build the engine, run, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvtier.benchmarks.datasets import random_requests, sharegpt_requests
from kvtier.benchmarks.throughput import DeviceRates, device_info, hf_throughput, run_requests, summarize


def _requests(args: argparse.Namespace, llm) -> list:
    engine = llm.engine
    if args.dataset == "sharegpt":
        if engine.tokenizer is None:
            raise ValueError("the ShareGPT dataset needs a tokenizer; this model has none")
        return sharegpt_requests(engine.tokenizer, args.num_prompts, engine.max_model_len,
                                 args.output_len if args.ignore_eos else None, args.seed)
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds "
                         f"max_model_len {engine.max_model_len}")
    return random_requests(args.num_prompts, args.input_len, args.output_len,
                           engine.model_config.vocab_size, args.seed)


def print_table(results: dict[str, Any]) -> None:
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def run_bench_throughput(args: argparse.Namespace) -> int:
    from kvtier.cli import engine_kwargs
    from kvtier.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs(args))
    reqs = _requests(args, llm)
    rates = DeviceRates.measure(llm.engine.device, llm.engine.dtype)
    # Warm-up at the run's shapes on other prompts (no prefix-cache hits leak in): Triton compiles
    # a kernel variant the first time it meets a new specialization.
    vocab = llm.engine.model_config.vocab_size
    warm = [random_requests(1, len(r.prompt_token_ids), min(r.output_len, 4), vocab, args.seed + 1 + i)[0]
            for i, r in enumerate(reqs)]
    run_requests(llm, warm)
    seconds, outs, steps = run_requests(llm, reqs, args.ignore_eos)
    results = {**device_info(llm), **summarize(llm, reqs, seconds, outs, steps, rates)}
    if args.compare == "hf":
        results.update(hf_throughput(llm, reqs, args.hf_batch_size or args.max_num_seqs))
        results["speedup_vs_hf"] = results["output_tok_s"] / results["hf_output_tok_s"]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)
    return 0
