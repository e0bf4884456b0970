"""Command line: kvtier generate | chat.

Engine flags are generated from EngineConfig's fields with vLLM's names
(--gpu-memory-utilization, --max-model-len, --enable-prefix-caching/--no-enable-prefix-caching, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Sequence

from kvtier.config import DTYPES, LOAD_FORMATS, OFFLOAD_POLICIES, EngineConfig

_ENGINE_HELP = {
    "model": "model: a local HF directory, a .gguf file, or with --load-format dummy a config name "
             "(llama3-8b, llama3-1b, opt-13b, opt-30b, tiny-llama, ...); default: SmolLM2-135M-Instruct",
    "tokenizer": "tokenizer directory (default: the model's)",
    "load_format": "auto (directory or .gguf), safetensors, gguf, or dummy (random weights)",
    "dtype": "weights and KV dtype; auto = bfloat16 on GPU, float32 on CPU",
    "device": "auto, cpu, cuda or cuda:N",
    "seed": "random seed (dummy weights, sampling)",
    "block_size": "tokens per KV cache block",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use (weights + activations + KV)",
    "kv_cache_memory": "KV cache size in bytes or with a unit (e.g. 4GiB); overrides the utilization; "
                       "default on CPU: 2GiB",
    "num_gpu_blocks_override": "exact number of KV blocks (testing)",
    "max_model_len": "longest sequence (prompt + output) in tokens; default: the model's",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step (prefill chunks + decodes)",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "skip_tokenizer_init": "load no tokenizer; prompts must be token ids",
    "enforce_eager": "never capture CUDA graphs",
    "attention_backend": "torch (reference) or triton; default: triton on GPU, torch on CPU",
    "kv_offloading_size": "GiB of pinned CPU memory for the CPU KV tier (evicted prefix blocks and "
                          "swapped requests go there); 0 = off",
    "kv_offloading_policy": "write-back (copy a block to CPU when the GPU evicts it) or write-through "
                            "(copy every full block once computed)",
}
_CHOICES = {"load_format": LOAD_FORMATS, "dtype": DTYPES, "attention_backend": ("torch", "triton"),
            "kv_offloading_policy": OFFLOAD_POLICIES}


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True) -> None:
    group = parser.add_argument_group("engine")
    if positional_model:
        group.add_argument("model_pos", nargs="?", metavar="MODEL", help=_ENGINE_HELP["model"])
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": _ENGINE_HELP.get(f.name)}
        if f.type in ("bool", bool):
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
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if getattr(args, "model_pos", None) is not None:
        if args.model and args.model != args.model_pos:
            raise SystemExit(f"error: model given twice ({args.model_pos!r} and --model {args.model!r})")
        kwargs["model"] = args.model_pos
    return kwargs


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None)
    g.add_argument("--include-stop-str-in-output", action="store_true")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="top logprobs per generated token")


def sampling_params(args: argparse.Namespace):
    from kvtier.sampling_params import SamplingParams
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        stop_token_ids=args.stop_token_ids, include_stop_str_in_output=args.include_stop_str_in_output,
        ignore_eos=args.ignore_eos, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        logprobs=args.logprobs)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    if not prompts:
        raise SystemExit("error: no prompt given; use --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM
    prompts = _read_prompts(args)
    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    if args.chat_template is None:
        args.chat_template = bool(getattr(llm.get_tokenizer(), "chat_template", None))
    if args.chat_template:
        inputs = [{"prompt": p, "prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": p}])}
                  for p in prompts]
    else:
        inputs = prompts
    outputs = llm.generate(inputs, params, use_tqdm=not args.json)
    for out in outputs:
        for comp in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "text": comp.text, "token_ids": comp.token_ids,
                                  "finish_reason": comp.finish_reason, "metrics": out.metrics.to_dict()}))
            else:
                print(f"--- prompt: {out.prompt!r}\n{comp.text}\n[{comp.finish_reason}, "
                      f"{len(comp.token_ids)} tokens, {out.metrics.num_cached_tokens} cached prompt tokens]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvtier chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        t0 = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0]
        reply = out.outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        m = out.metrics
        print(f"assistant> {reply}")
        print(f"  [{m.num_output_tokens} tokens in {time.perf_counter() - t0:.2f}s, "
              f"prompt {m.num_prompt_tokens} tokens of which {m.num_cached_tokens} cached]", file=sys.stderr)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.cli import run_bench_throughput
    return run_bench_throughput(args)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks of kvtier.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    tp = bsub.add_parser("throughput", help="offline throughput, decode roofline, prefill MFU",
                         description="Offline throughput like vLLM's `bench throughput`, with the decode "
                                     "step time against the memory roofline and prefill MFU.")
    tp.add_argument("--num-prompts", type=int, default=16)
    tp.add_argument("--input-len", type=int, default=1024, help="prompt tokens (random dataset)")
    tp.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    tp.add_argument("--dataset", choices=("random", "sharegpt"), default="random")
    tp.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    tp.add_argument("--compare", choices=("hf",), default=None,
                    help="also run HF transformers generate on the same prompts and weights")
    tp.add_argument("--hf-batch-size", type=int, default=None, help="HF batch (default: --max-num-seqs)")
    tp.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(tp, positional_model=False)
    tp.set_defaults(func=cmd_bench_throughput)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="LLM inference with a KV cache "
                                     "spanning GPU and CPU memory")
    parser.add_argument("--log-level", default="WARNING", help="logging level (INFO, DEBUG, ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate completions for prompts",
                         description="Generate completions for prompts given as flags or in a file.")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", help="file with one prompt per line (or JSON lines with 'prompt')")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt as a user message with the model's chat template "
                          "(default: on when the tokenizer has one; --no-chat-template for raw completion)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive multi-turn chat",
                          description="Chat with the model; later turns reuse the cached prefix.")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
