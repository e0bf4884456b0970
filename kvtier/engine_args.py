"""The engine's command-line flags, generated from EngineConfig's fields with vLLM's names
(--gpu-memory-utilization, --max-model-len, --enable-prefix-caching/--no-enable-prefix-caching, ...).

Beside EngineConfig, not in cli.py, so that every command that builds an engine (kvtier.cli and
kvtier.benchmarks.cli) imports it from below: cli -> benchmarks.cli -> engine_args -> config.
Kept out of config.py so that the validated dataclass the engine reads carries no argparse or
help text (as vLLM's EngineArgs sits in engine/arg_utils.py, apart from its configs).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from kvtier.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    OFFLOAD_POLICIES,
    OFFLOADING_DTYPES,
    EngineConfig,
)

_ENGINE_HELP = {
    "model": "model: a local HF directory, a .gguf file, or with --load-format dummy a config name "
             "(llama3-8b, llama3-1b, opt-13b, opt-30b, tiny-llama, ...); default: SmolLM2-135M-Instruct",
    "tokenizer": "tokenizer directory (default: the model's)",
    "load_format": "auto (directory or .gguf), safetensors, gguf, or dummy (random weights)",
    "dtype": "weights and KV dtype; auto = bfloat16 on GPU, float32 on CPU",
    "device": "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N",
    "seed": "random seed (dummy weights, sampling)",
    "block_size": "tokens per KV cache block",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use (weights + activations + KV)",
    "kv_cache_memory": "KV cache size in bytes or with a unit (e.g. 4GiB); overrides "
                       "--gpu-memory-utilization (default: 2GiB on CPU, what the utilization leaves on GPU); "
                       "a cache smaller than one longest sequence lowers max_model_len, with a warning",
    "num_gpu_blocks_override": "exact number of KV blocks instead of sizing the cache from memory (testing)",
    "max_model_len": "longest sequence (prompt + output) in tokens (default: the model's, lowered with a "
                     "warning to what the KV cache holds; a value set here that does not fit is an error)",
    "max_num_seqs": "most sequences running at once (one step serves them all)",
    "max_num_batched_tokens": "token budget of one step (prefill chunks + decodes)",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "skip_tokenizer_init": "load no tokenizer; prompts must be token ids",
    "enforce_eager": "never capture CUDA graphs",
    "attention_backend": "torch (PyTorch's fused scaled_dot_product_attention over the paged cache) or "
                         "triton (kvtier's kernels); default: triton on GPU, torch on CPU",
    "kv_cache_dtype": "the GPU KV cache's format: auto (the model's dtype) or fp8 (= fp8_e4m3; fp8_e5m2): "
                      "K/V stored in 8 bits with scale 1.0, saturating, converted back on load by the "
                      "attention kernels: twice the blocks in the same memory and half the KV bytes each "
                      "decode step reads; lossy (greedy tokens may change). Not yet with --kvpr",
    "kv_offloading_size": "GiB of pinned CPU memory for the CPU KV tier (evicted prefix blocks and "
                          "swapped requests go there); 0 = off",
    "kv_offloading_policy": "write-through: copy every block to CPU once full, beside later steps; "
                            "write-back: copy a block when the GPU evicts it, on the critical path of the "
                            "request that needs the space",
    "kv_offloading_dtype": "the CPU tier's format: auto (the GPU cache's dtype), or int8 / int4 (KIVI: K per "
                           "channel, V per token in groups, an fp16 scale and zero per group): blocks are "
                           "quantized on the GPU before they cross to the CPU and dequantized after they come "
                           "back, so --kv-offloading-size holds ~1.7x (int8) / ~2.9x (int4) the blocks and the "
                           "link moves that much less; lossy (greedy tokens may change). Not yet with "
                           "--kv-expansion or --kvpr",
    "kv_offloading_group_size": "V channels that share a scale and zero in an int8 / int4 CPU tier, a power "
                                "of two dividing head_dim (smaller: more accurate, more bytes); default: 32 "
                                "(KIVI's), or the widest power of two dividing a narrower head_dim",
    "cpu_threads": "torch threads for the model on the CPU; default: OMP_NUM_THREADS if set, else the "
                   "cores this process may use. Beside other busy processes a lower value (even 1) "
                   "can be many times faster. On a GPU applied only when given",
    "async_scheduling": "schedule the next step while this one runs on the device (sampled token ids "
                        "stay there and feed the next step; stops are seen one step late and tokens past "
                        "them dropped); default: on with a GPU, off on the CPU",
    "kv_expansion": "Pie: off; adaptive (a controller grows the far share while decode steps stay within 3%% "
                    "of their time with nothing far, and cuts it when they do not); or FRACTION in [0, 1] "
                    "(1: all full blocks): that share of each running request's full KV blocks lives only "
                    "in the CPU tier and is brought back layer by layer during each step (prefetched one "
                    "layer ahead into a GPU staging ring); needs --kv-offloading-size",
    "kvpr": "KVPR partial recomputation: off; auto (each step, for the CPU-resident KV it loads -- far "
            "blocks of --kv-expansion, prefix hits, swap-ins -- send the layer inputs of the first tokens "
            "and recompute their K/V on the GPU while the rest of the K/V crosses; the split comes from "
            "measured link and GEMM rates and is 0 where it does not pay, e.g. grouped-query attention); "
            "or FRACTION in [0, 1] of those tokens, fixed. The CPU tier then keeps each block's layer inputs "
            "beside its K/V (its size counts both); needs --kv-offloading-size",
}
_CHOICES = {"load_format": LOAD_FORMATS, "dtype": DTYPES, "attention_backend": ATTENTION_BACKENDS,
            "kv_offloading_policy": OFFLOAD_POLICIES, "kv_offloading_dtype": OFFLOADING_DTYPES,
            "kv_cache_dtype": tuple(KV_CACHE_DTYPES)}


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True) -> None:
    """One flag per EngineConfig field in an `engine` group; the model also as a positional MODEL."""
    group = parser.add_argument_group("engine")
    if positional_model:
        group.add_argument("model_pos", nargs="?", metavar="MODEL", help=_ENGINE_HELP["model"])
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": _ENGINE_HELP.get(f.name)}
        if f.type in ("bool", bool, "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "kv_cache_memory":
            kwargs["type"] = str
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
        elif f.type == "float":
            kwargs["type"] = float
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        group.add_argument(flag, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig's fields from parsed flags, for LLM(**...); MODEL and --model must not disagree."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if getattr(args, "model_pos", None) is not None:
        if args.model and args.model != args.model_pos:
            raise SystemExit(f"error: model given twice ({args.model_pos!r} and --model {args.model!r})")
        kwargs["model"] = args.model_pos
    return kwargs
