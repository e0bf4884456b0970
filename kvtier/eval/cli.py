"""`kvtier eval ppl` and `kvtier eval passkey`: build the engine from the flags, run the evaluation,
print a table and write the JSON (its keys: metric, value, context_len, num_tokens, model, the
evaluation's own settings, and the engine options that change the KV attention reads).
`ppl --mode cpu-tier` and `passkey --through-cpu-tier` put the CPU tier's round trip (its format) in
the KV path (kvtier/eval/tier.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from kvtier.engine_args import engine_kwargs
from kvtier.entrypoints.llm import LLM
from kvtier.eval.passkey import passkey
from kvtier.eval.perplexity import perplexity
from kvtier.eval.text import read_token_ids, sharegpt_token_ids

# EngineConfig fields that change the KV attention reads or how it is computed, beside every field
# named kv* or kcache* (the tiers, their formats and policies: new ones are picked up by name)
KV_FIELDS = ("dtype", "block_size", "attention_backend", "enable_prefix_caching", "max_num_batched_tokens",
             "max_model_len", "enforce_eager")


def kv_options(llm: LLM) -> dict[str, Any]:
    """The engine's KV-related settings as given, with the device and dtype it resolved."""
    config = llm.engine.config
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name.startswith(("kv", "kcache")) or f.name in KV_FIELDS}
    options.update(device=str(llm.engine.device), dtype=str(llm.engine.dtype).removeprefix("torch."),
                   max_model_len=llm.engine.max_model_len, async_scheduling=llm.engine.async_scheduling)
    return options


def run_eval_ppl(args: argparse.Namespace) -> int:
    llm = LLM(**engine_kwargs(args))
    stride = args.stride or args.context_len // 4
    num_tokens = args.context_len + (args.num_windows - 1) * stride
    if args.tokens_file:
        token_ids = read_token_ids(args.tokens_file)[:num_tokens]
    else:
        if llm.get_tokenizer() is None:
            raise ValueError("the ShareGPT text needs the model's tokenizer; or give --tokens-file")
        token_ids = sharegpt_token_ids(llm.get_tokenizer(), num_tokens)
    if args.save_tokens:
        with open(args.save_tokens, "w") as f:
            json.dump({"token_ids": token_ids}, f)
    t0 = time.perf_counter()
    result = perplexity(llm, token_ids, args.context_len, stride, args.mode, args.batch_size)
    record = {"metric": "perplexity", "value": result.value, "context_len": args.context_len,
              "num_tokens": result.num_tokens, "model": llm.engine.model_name, "mode": args.mode,
              "stride": stride, "num_windows": result.num_windows, "nll": result.nll,
              "text": args.tokens_file or "sharegpt", "seconds": time.perf_counter() - t0,
              "context_tokens": result.context_tokens, "cpu_hit_tokens": result.cpu_hit_tokens, **kv_options(llm)}
    _report(record, args.output_json)
    return 0


def run_eval_passkey(args: argparse.Namespace) -> int:
    llm = LLM(**engine_kwargs(args))
    t0 = time.perf_counter()
    through = args.through_cpu_tier
    result = passkey(llm, args.context_len, args.trials, args.seed, args.batch_size, through_cpu_tier=through)
    record = {"metric": "passkey_accuracy", "value": result.accuracy, "context_len": args.context_len,
              "num_tokens": result.prompt_len, "model": llm.engine.model_name, "trials": result.trials,
              "num_correct": result.num_correct, "seed": args.seed, "seconds": time.perf_counter() - t0,
              "through_cpu_tier": through, "cpu_hit_tokens": result.cpu_hit_tokens,
              **kv_options(llm), "records": result.records}
    _report(record, args.output_json)
    return 0


def _report(record: dict[str, Any], path: str | None) -> None:
    """A two-column table of the scalar entries on stdout; the whole record to `path` as JSON."""
    width = max(len(k) for k in record)
    for key, value in record.items():
        if not isinstance(value, (list, dict)):
            print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
