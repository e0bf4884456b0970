"""Command bodies of `kvtier bench ...`: build the engine, run, print a table, write JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from kvtier.benchmarks.datasets import random_requests, sharegpt_requests
from kvtier.benchmarks.plotting import require_matplotlib, save_results
from kvtier.benchmarks.throughput import DeviceRates, benchmark, compare_hf
from kvtier.engine_args import engine_kwargs
from kvtier.sampling_params import SamplingParams


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
    from kvtier.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs(args))
    reqs = _requests(args, llm)
    rates = DeviceRates.measure(llm.engine.device, llm.engine.dtype)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    results = benchmark(llm, reqs, rates, args.seed, args.ignore_eos, sampling)
    if args.compare == "hf":
        compare_hf(llm, reqs, args.hf_batch_size or args.max_num_seqs, results)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)
    return 0


def run_bench_multiturn(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.multiturn import MultiturnConfig, run_multiturn
    cfg = MultiturnConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MultiturnConfig)})
    run_multiturn(cfg, engine_kwargs(args))
    return 0


def run_bench_expansion(args: argparse.Namespace) -> int:
    from kvtier.benchmarks import expansion
    from kvtier.entrypoints.llm import LLM
    cfg = expansion.ExpansionBenchConfig(**{f.name: getattr(args, f.name)
                                            for f in dataclasses.fields(expansion.ExpansionBenchConfig)})
    capacity = expansion.CapacityConfig(**{f.name: getattr(args, "capacity_" + f.name)
                                           for f in dataclasses.fields(expansion.CapacityConfig)})
    cfg.fraction_list()  # clear errors before the engine is built
    if cfg.plot and cfg.sweep:
        require_matplotlib("--plot")
    result: dict[str, Any] = {"command": " ".join(["kvtier", *sys.argv[1:]])}
    if cfg.sweep:
        result.update(expansion.run_sweep(LLM(**engine_kwargs(args)), cfg))
        expansion.print_points(result)
    if capacity.prompts > 0:
        result["capacity"] = expansion.run_capacity(engine_kwargs(args), capacity)
        result["output_tok_s"] = result["capacity"]["output_tok_s"]
        print_table({f"capacity {k} output tok/s": v for k, v in result["output_tok_s"].items()})
    save_results(result, cfg.output_json, cfg.plot if cfg.sweep else None, expansion.plot_points)
    return 0


def run_bench_kvpr(args: argparse.Namespace) -> int:
    from kvtier.benchmarks import kvpr
    cfg = kvpr.KVPRBenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kvpr.KVPRBenchConfig)})
    cfg.mode_list()  # clear errors before an engine is built
    result: dict[str, Any] = {"command": " ".join(["kvtier", *sys.argv[1:]])}
    result.update(kvpr.run_kvpr(engine_kwargs(args), cfg))
    kvpr.print_result(result)
    save_results(result, cfg.output_json, None, None)
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.serve import ServeBenchConfig, run_serve_benchmark
    cfg = ServeBenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeBenchConfig)})
    res = run_serve_benchmark(cfg)
    return 0 if res["completed"] else 1
