"""`kvtier bench multiturn`: interleaved multi-turn conversations with think time, run with the CPU
KV tier off and on in one invocation.

Turn t of a conversation sends

    prompt(t) = prompt(t-1) + the tokens the engine generated for turn t-1 + user message t

so turn t-1's KV is a prefix hit if it is still cached: on the GPU, on the CPU tier, or nowhere
(evicted, recomputed). Users think between turns (exponential, seeded) and many conversations are
open at once while the GPU KV pool holds only a fraction of them, so cached prefixes are evicted
between turns; keeping them is the CPU tier's job.

Everything runs by the wall clock: a turn is submitted when its user has finished thinking, and its
time to first token is first_token_time - submit time (both `time.time()`, as in RequestMetrics).

The settings run in the order --cpu-tier gives (default: off, then on), each on a fresh engine with
the same options but kv_offloading_size, each after a rehearsal on a throwaway engine (see
_warm_up), over the same conversations and the same seeded think times.

A step that stalls delays every request in flight, so each run also reports its slowest steps with
what they held (sequences, prefill and decode tokens, blocks moved, Triton compiles), the Triton
compiles of the timed run, and the time spent in steps over STALL_S (`stall_stats`).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import heapq
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtier.benchmarks.datasets import random_requests, read_sharegpt
from kvtier.benchmarks.plotting import new_figure, require_matplotlib, save_results
from kvtier.benchmarks.stats import latency_stats
from kvtier.benchmarks.throughput import device_info
from kvtier.cache.storage import StorageSpec, Tier
from kvtier.config import EngineConfig, GiB
from kvtier.engine.llm_engine import LLMEngine, StepRecord, resolve_device_dtype
from kvtier.entrypoints.llm import LLM
from kvtier.models.loader import load_tokenizer, model_config, resolve_model
from kvtier.ops.kernel_variants import num_compiled_variants
from kvtier.outputs import RequestMetrics, RequestOutput
from kvtier.sampling_params import SamplingParams

TIERS = ("gpu", "cpu")
NUM_SLOW_STEPS = 10  # slowest steps reported per run
STALL_S = 0.5  # a step longer than this is a stall (a decode step takes milliseconds)
_SETTINGS = {"on": True, "off": False}


@dataclasses.dataclass(frozen=True)
class MultiturnConfig:
    """The benchmark's own options (the engine's come as EngineConfig keyword arguments)."""
    dataset: str = "sharegpt"  # "sharegpt" or "random"
    num_conversations: int = 4
    num_turns: int = 3  # random: exactly; sharegpt: the first num_turns user turns
    min_turns: int | None = None  # sharegpt: fewest user turns a conversation must have (default num_turns)
    user_len: int = 64  # random: tokens per user message
    output_len: int = 16  # random: tokens generated per turn
    max_output_len: int = 16  # sharegpt: cap on the dataset's reply length
    max_active: int | None = None  # conversations open at once (default: all)
    think_time: float = 0.5  # mean seconds between a turn's end and the next turn's submission
    gpu_kv_fraction: float = 0.25  # GPU KV pool = this share of the open conversations' peak KV
    cpu_tier: str = "off,on"  # settings to run, in order
    warmup_conversations: int | None = None  # conversations rehearsed before each setting (default: all)
    output_json: str | None = None
    plot: str | None = None
    conversations_file: str | None = None  # read tokenized conversations (from --save-conversations)
    save_conversations: str | None = None  # write the tokenized conversations here and stop

    def __post_init__(self) -> None:
        if self.dataset not in ("sharegpt", "random"):
            raise ValueError(f"unknown dataset {self.dataset!r}; choose sharegpt or random")
        for name in ("num_conversations", "num_turns", "user_len", "output_len", "max_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_active is not None and self.max_active < 1:
            raise ValueError("--max-active must be at least 1")
        if self.warmup_conversations is not None and self.warmup_conversations < 0:
            raise ValueError("--warmup-conversations must be >= 0")
        if self.think_time < 0 or self.gpu_kv_fraction < 0:
            raise ValueError("--think-time and --gpu-kv-fraction must be >= 0")
        _ = self.cpu_tier_settings  # validates
        if self.plot:
            require_matplotlib("--plot")

    @property
    def cpu_tier_settings(self) -> tuple[bool, ...]:
        names = [s.strip() for s in self.cpu_tier.split(",") if s.strip()]
        if not names or any(n not in _SETTINGS for n in names):
            raise ValueError(f"--cpu-tier {self.cpu_tier!r}: give on, off, or both comma-separated (off,on)")
        return tuple(_SETTINGS[n] for n in names)

    @property
    def num_active(self) -> int:
        return min(self.max_active or self.num_conversations, self.num_conversations)


@dataclasses.dataclass
class Conversation:
    user_turns: list[list[int]]  # token ids of each user message (turn 0 with the chat preamble)
    output_lens: list[int]  # tokens generated per turn (ignore_eos makes them exact)

    @property
    def num_tokens(self) -> int:
        """Length of the last turn's prompt plus its output: the conversation's peak context."""
        return sum(map(len, self.user_turns)) + sum(self.output_lens)


@dataclasses.dataclass
class TurnResult:
    conversation: int
    turn: int
    submit_s: float  # since the run's start
    ttft_s: float
    e2e_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    cached_tokens_by_tier: dict[str, int]


# -- conversations ------------------------------------------------------------------------------

def random_conversations(num: int, num_turns: int, user_len: int, output_len: int, vocab_size: int,
                         seed: int = 0) -> list[Conversation]:
    """Fresh random user messages (no two conversations share a prefix)."""
    msgs = random_requests(num * num_turns, user_len, output_len, vocab_size, seed)
    return [Conversation([m.prompt_token_ids for m in msgs[i * num_turns:(i + 1) * num_turns]],
                         [output_len] * num_turns) for i in range(num)]


def sharegpt_conversations(tokenizer, num: int, min_turns: int, max_turns: int, max_output_len: int,
                           max_len: int) -> list[Conversation]:
    """The first `num` ShareGPT conversations (file order) with >= min_turns (human, gpt) pairs that
    fit max_len, cut to their first max_turns; output length = the reply's, capped."""
    encode, out = user_turn_encoder(tokenizer), []
    for conv in read_sharegpt():
        pairs = _human_gpt_pairs(conv.get("conversations") or [])
        if len(pairs) < min_turns:
            continue
        pairs = pairs[:max_turns]
        users = [encode(human, first=i == 0) for i, (human, _) in enumerate(pairs)]
        outs = [max(1, min(max_output_len, len(tokenizer.encode(gpt, add_special_tokens=False))))
                for _, gpt in pairs]
        c = Conversation(users, outs)
        if c.num_tokens <= max_len:
            out.append(c)
        if len(out) == num:
            break
    return out


def _human_gpt_pairs(turns: list[dict]) -> list[tuple[str, str]]:
    """(human, gpt) message pairs from the start, up to the first break in that pattern."""
    pairs = []
    for human, gpt in zip(turns[::2], turns[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt" or not human.get("value", "").strip():
            break
        pairs.append((human["value"], gpt.get("value", "")))
    return pairs


_SENTINEL = "\x00KVTIER-REPLY\x00"


def user_turn_encoder(tokenizer) -> Callable[..., list[int]]:
    """encode(message, first) -> the token ids turn `first`/later appends for a user message.

    With a chat template: turn 0 is the whole templated conversation so far (system preamble, user
    message, generation prompt); a later turn is what the template puts after an assistant reply
    (its end-of-turn marker, the user message, the generation prompt). Without one: plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return lambda msg, first: tokenizer.encode(msg, add_special_tokens=first)

    def encode(msg: str, first: bool) -> list[int]:
        user = {"role": "user", "content": msg}
        if first:
            return tokenizer.encode(_render(tokenizer, [user]), add_special_tokens=False)
        text = _render(tokenizer, [{"role": "user", "content": "."},
                                   {"role": "assistant", "content": _SENTINEL}, user])
        return tokenizer.encode(text.split(_SENTINEL, 1)[-1], add_special_tokens=False)
    return encode


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_conversations(cfg: MultiturnConfig, engine_kwargs: dict[str, Any], vocab_size: int,
                        max_len: int) -> list[Conversation]:
    if cfg.conversations_file:
        return load_conversations(cfg.conversations_file, cfg.num_conversations, max_len, vocab_size)
    if cfg.dataset == "random":
        if cfg.num_turns * (cfg.user_len + cfg.output_len) > max_len:
            raise ValueError(f"{cfg.num_turns} turns of {cfg.user_len} + {cfg.output_len} tokens exceed "
                             f"the longest sequence, {max_len} tokens")
        return random_conversations(cfg.num_conversations, cfg.num_turns, cfg.user_len, cfg.output_len,
                                    vocab_size, engine_kwargs["seed"])
    tokenizer = benchmark_tokenizer(engine_kwargs)
    convs = sharegpt_conversations(tokenizer, cfg.num_conversations, cfg.min_turns or cfg.num_turns,
                                   cfg.num_turns, cfg.max_output_len, max_len)
    if not convs:
        raise ValueError("no ShareGPT conversation fits; lower --min-turns or raise --max-model-len")
    if len(convs) < cfg.num_conversations:
        print(f"only {len(convs)} ShareGPT conversations have {cfg.min_turns or cfg.num_turns}+ turns and fit "
              f"{max_len} tokens")
    return _check_vocab(convs, vocab_size, "the tokenizer's ids", "use --dataset random or a matching --tokenizer")


def save_conversations(conversations: list[Conversation], path: str) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(c) for c in conversations], f)


def load_conversations(path: str, num: int, max_len: int, vocab_size: int) -> list[Conversation]:
    """Tokenized conversations saved by --save-conversations (for a machine without the dataset)."""
    with open(path) as f:
        convs = [Conversation(**c) for c in json.load(f)]
    fits = [c for c in convs if c.num_tokens <= max_len][:num]
    if not fits:
        raise ValueError(f"no conversation in {path} fits {max_len} tokens")
    return _check_vocab(fits, vocab_size, f"{path}'s token ids", "save them with this model's tokenizer")


def _check_vocab(convs: list[Conversation], vocab_size: int, what: str, fix: str) -> list[Conversation]:
    top = max(max(t) for c in convs for t in c.user_turns)
    if top >= vocab_size:
        raise ValueError(f"{what} (up to {top}) exceed the model's vocabulary of {vocab_size}; {fix}")
    return convs


def benchmark_tokenizer(engine_kwargs: dict[str, Any]):
    """The model's tokenizer (or --tokenizer); for a model without one (dummy weights), the default
    model's (SmolLM2), so that ShareGPT runs on e.g. a dummy llama3-8b."""
    source = resolve_model(engine_kwargs["model"], engine_kwargs["load_format"])
    tokenizer = load_tokenizer(source, engine_kwargs["tokenizer"])
    if tokenizer is None:
        print("the model has no tokenizer: tokenizing ShareGPT with the default model's (SmolLM2)")
        tokenizer = load_tokenizer(resolve_model(None))
    return tokenizer


# -- KV budgets ---------------------------------------------------------------------------------

def conversation_blocks(conversations: list[Conversation], block_size: int) -> list[int]:
    """KV blocks each conversation holds at its end, largest first."""
    return sorted((-(-c.num_tokens // block_size) for c in conversations), reverse=True)


def gpu_blocks_for(conversations: list[Conversation], num_active: int, fraction: float,
                   block_size: int) -> int:
    """Blocks for `fraction` of the KV that the num_active longest conversations hold at their end;
    never fewer than the longest conversation needs plus one block (its last turn must fit alone)."""
    blocks = conversation_blocks(conversations, block_size)
    return max(math.ceil(fraction * sum(blocks[:num_active])), blocks[0] + 1)


def cpu_tier_gib(conversations: list[Conversation], kv_bytes_per_token: int) -> float:
    """Enough CPU tier for every conversation's whole KV (so the CPU tier itself never evicts)."""
    return sum(c.num_tokens for c in conversations) * kv_bytes_per_token / GiB


# -- the driver ---------------------------------------------------------------------------------

def think_times(conversations: list[Conversation], mean_s: float, seed: int) -> list[list[float]]:
    """Seconds each user thinks after each turn, drawn up front: the same for every setting."""
    rng = random.Random(seed)
    return [[rng.expovariate(1 / mean_s) if mean_s > 0 else 0.0 for _ in c.user_turns] for c in conversations]


class ConversationDriver:
    """Runs conversations against one engine by the wall clock.

    At most `num_active` conversations are open; the first ones open at the start, the next one
    when a conversation has finished its last turn. A conversation's next turn is submitted
    think_s[c][t] seconds after its turn t finished.
    """

    def __init__(self, engine: LLMEngine, conversations: list[Conversation], num_active: int,
                 think_s: list[list[float]], id_prefix: str = "conv"):
        self.engine, self.conversations, self.think_s = engine, conversations, think_s
        self.num_active, self.id_prefix = num_active, id_prefix
        self.due: list[tuple[float, int]] = []  # heap of (submit time, conversation)
        self.unopened = collections.deque(range(len(conversations)))
        self.history: list[list[int]] = [[] for _ in conversations]  # last prompt + its output
        self.next_turn = [0] * len(conversations)
        self.in_flight: dict[str, tuple[int, int]] = {}  # request id -> (conversation, turn)
        self.results: list[TurnResult] = []
        self.peak_usage = dict.fromkeys(TIERS, 0.0)
        self.t0 = 0.0

    def run(self, desc: str = "turns", progress: bool = True) -> float:
        """Run every turn of every conversation; returns the seconds from start to the last token."""
        total = sum(len(c.user_turns) for c in self.conversations)
        self.t0 = time.time()
        for _ in range(min(self.num_active, len(self.conversations))):
            self._open(self.t0)
        with tqdm(total=total, desc=desc, unit="turn", disable=not progress, leave=False) as bar:
            while len(self.results) < total:
                self._submit_due()
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step(final_only=True):
                        self._finish(out)
                        bar.update()
                elif self.due:
                    time.sleep(max(0.0, self.due[0][0] - time.time()))
        return max(r.submit_s + r.e2e_s for r in self.results)

    def _open(self, now: float) -> None:
        heapq.heappush(self.due, (now, self.unopened.popleft()))

    def _submit_due(self) -> None:
        now = time.time()
        while self.due and self.due[0][0] <= now:
            c = heapq.heappop(self.due)[1]
            t, conv = self.next_turn[c], self.conversations[c]
            params = SamplingParams(temperature=0.0, max_tokens=conv.output_lens[t], ignore_eos=True)
            request_id = f"{self.id_prefix}{c}-turn{t}"
            self.engine.add_request({"prompt_token_ids": self.history[c] + conv.user_turns[t]}, params,
                                    request_id=request_id, arrival_time=now)
            self.in_flight[request_id] = (c, t)

    def _finish(self, out: RequestOutput) -> None:
        c, t = self.in_flight.pop(out.request_id)
        now, m = time.time(), out.metrics
        self.history[c] = out.prompt_token_ids + out.outputs[0].token_ids
        self.results.append(TurnResult(c, t, m.arrival_time - self.t0, m.ttft_s, now - m.arrival_time,
                                       m.num_prompt_tokens, len(out.outputs[0].token_ids),
                                       m.num_cached_tokens, hits_by_tier(m)))
        stats = self.engine.stats()
        for tier in TIERS:
            self.peak_usage[tier] = max(self.peak_usage[tier], stats.get(f"kv_usage_{tier}", 0.0))
        self.next_turn[c] += 1
        if self.next_turn[c] < len(self.conversations[c].user_turns):
            heapq.heappush(self.due, (now + self.think_s[c][t], c))
        elif self.unopened:
            self._open(now)


def hits_by_tier(m: RequestMetrics) -> dict[str, int]:
    """Prompt tokens served from each tier's prefix cache. Hits that the engine does not split by
    tier count as GPU hits: that is where they are while the engine has no CPU tier to report."""
    hits = {tier: m.num_cached_tokens_by_tier.get(tier, 0) for tier in TIERS}
    hits["gpu"] += max(0, m.num_cached_tokens - sum(hits.values()))
    return hits


# -- one setting, statistics --------------------------------------------------------------------

def ttft_stats(values: list[float]) -> dict[str, float]:
    """Mean, median (p50) and 99th percentile in the input unit."""
    stats = latency_stats(values)
    return {"mean": stats["mean"], "p50": stats["median"], "p99": stats["p99"]}


def run_setting(engine_kwargs: dict[str, Any], conversations: list[Conversation], cfg: MultiturnConfig,
                cpu_tier: bool, cpu_gib: float, progress: bool = True) -> dict[str, Any]:
    """A fresh engine with the CPU tier on or off through every conversation, after a warm-up."""
    kwargs = {**engine_kwargs, "kv_offloading_size": cpu_gib if cpu_tier else 0.0}
    _warm_up(kwargs, conversations, cfg)
    llm = LLM(**kwargs)
    engine = llm.engine
    driver = ConversationDriver(engine, conversations, cfg.num_active,
                                think_times(conversations, cfg.think_time, kwargs["seed"]))
    before, compiled_before = engine.stats(), num_compiled_variants()
    # The step log syncs the compute stream once a step (sampling already waited for it): on an H100
    # with llama3-1b and the CPU tier, TTFT and duration stayed within run-to-run noise.
    engine.step_log = []
    duration = driver.run(f"cpu tier {'on' if cpu_tier else 'off'}", progress)
    steps, engine.step_log = engine.step_log, None
    run = summarize(cpu_tier, driver, duration, before, engine.stats())
    run.update(stall_stats(steps, compiled_before, num_compiled_variants(), driver.t0))
    run.update(device_info(llm), engine_config=kwargs)
    del llm, driver
    release_memory()
    return run


def _warm_up(engine_kwargs: dict[str, Any], conversations: list[Conversation], cfg: MultiturnConfig) -> None:
    """A rehearsal on a throwaway engine with the same options: random conversations shaped like the
    first --warmup-conversations (same message and output lengths) with no think time, after one of
    them alone. Triton specializes kernels on integer arguments (== 1, multiples of 16) and block
    sizes, and compiles each new variant for about a second; that must happen here (it keeps them
    for the process), not in the timed run. The timed engine starts with an empty prefix cache.
    (On an H100 with llama3-1b, 24 conversations: 12 compiles here, none left for the timed run;
    a warm-up of one short batch left 5, which made the first setting's mean TTFT 10x worse.)
    Once the engine precompiles its kernels at start-up (kvtier.ops.triton_attention.precompile,
    fused.precompile), none is left to rehearse but the CPU tier's copy kernel; each run's
    `num_compiles` says whether a timed run compiled anything."""
    num = len(conversations) if cfg.warmup_conversations is None else cfg.warmup_conversations
    if num == 0:
        return
    llm = LLM(**engine_kwargs)
    vocab, seed = llm.engine.model_config.vocab_size, (engine_kwargs["seed"] + 7) * 1_000_003
    alone = _random_like(conversations[:1], vocab, seed)
    rehearsal = _random_like(conversations[:num], vocab, seed + 1)
    for active, warm in ((1, alone), (cfg.num_active, rehearsal)):  # no thinking: more varied batches
        ConversationDriver(llm.engine, warm, active, think_times(warm, 0.0, 0), "warmup").run(progress=False)
    del llm
    release_memory()


def _random_like(conversations: list[Conversation], vocab_size: int, seed: int) -> list[Conversation]:
    """Random messages of the same lengths (no prefix shared with anything), the same output lengths."""
    def message(i: int, t: int, n: int) -> list[int]:
        return random_requests(1, n, 1, vocab_size, seed + 1009 * (1000 * i + t))[0].prompt_token_ids
    return [Conversation([message(i, t, len(u)) for t, u in enumerate(c.user_turns)], list(c.output_lens))
            for i, c in enumerate(conversations)]


def release_memory() -> None:
    """Free a dropped engine's memory before the next one sizes itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stall_stats(steps: list[StepRecord], compiled_before: int | None, compiled_after: int | None,
                t0: float) -> dict[str, Any]:
    """The run's NUM_SLOW_STEPS slowest steps, slowest first, with their composition; the Triton
    compiles of the run (None when unknown, e.g. interpreted); seconds spent in steps over STALL_S."""
    compiles = _compiles_per_step(steps, compiled_before)
    slowest = sorted(range(len(steps)), key=lambda i: steps[i].seconds, reverse=True)[:NUM_SLOW_STEPS]
    stalls = [s.seconds for s in steps if s.seconds > STALL_S]
    return {"slow_steps": [_slow_step(steps[i], compiles[i], t0) for i in slowest],
            "num_compiles": None if None in (compiled_before, compiled_after) else compiled_after - compiled_before,
            "stall_seconds": sum(stalls), "num_stall_steps": len(stalls)}


def _compiles_per_step(steps: list[StepRecord], compiled_before: int | None) -> list[int | None]:
    out, prev = [], compiled_before
    for s in steps:
        out.append(None if prev is None or s.compiled_variants is None else s.compiled_variants - prev)
        prev = s.compiled_variants
    return out


def _slow_step(step: StepRecord, num_compiles: int | None, t0: float) -> dict[str, Any]:
    return {"start_s": step.end_time - step.seconds - t0, "seconds": step.seconds, "num_seqs": step.num_seqs,
            "num_prefill_tokens": step.num_prefill_tokens, "num_decode_tokens": step.num_decode_tokens,
            "sum_seq_lens": step.sum_seq_lens, "num_blocks_loaded": step.num_blocks_loaded,
            "num_blocks_stored": step.num_blocks_stored, "num_compiles": num_compiles}


def stall_line(run: dict[str, Any]) -> str:
    """One line per setting: compiles, stall time, and the slowest step's composition."""
    n = run["num_compiles"]
    line = (f"cpu tier {'on' if run['cpu_tier'] else 'off'}: "
            f"{'unknown' if n is None else n} Triton compiles in the timed run, "
            f"{run['stall_seconds']:.2f} s in {run['num_stall_steps']} steps over {STALL_S} s")
    if run["slow_steps"]:
        s = run["slow_steps"][0]
        line += (f"; slowest step {s['seconds']:.3f} s at {s['start_s']:.1f} s: {s['num_seqs']} seqs, "
                 f"{s['num_prefill_tokens']} prefill + {s['num_decode_tokens']} decode tokens, "
                 f"{s['num_blocks_loaded']}/{s['num_blocks_stored']} blocks loaded/stored, "
                 f"{'?' if s['num_compiles'] is None else s['num_compiles']} compiles")
    return line


def summarize(cpu_tier: bool, driver: ConversationDriver, duration: float, before: dict[str, Any],
              after: dict[str, Any]) -> dict[str, Any]:
    res = driver.results
    ttft = ttft_stats([r.ttft_s for r in res])
    counters = {k: v - before.get(k, 0) for k, v in after.items() if k.endswith("_total")}
    num_prompt, num_cached = sum(r.num_prompt_tokens for r in res), sum(r.num_cached_tokens for r in res)
    num_out = sum(r.num_output_tokens for r in res)
    return {"cpu_tier": cpu_tier, "num_turns": len(res), "duration_s": duration,
            "ttft_mean_s": ttft["mean"], "ttft_p50_s": ttft["p50"], "ttft_p99_s": ttft["p99"],
            "output_tok_s": num_out / duration, "num_output_tokens": num_out,
            "num_prompt_tokens": num_prompt, "num_cached_tokens": num_cached,
            "hit_tokens": {t: sum(r.cached_tokens_by_tier[t] for r in res) for t in TIERS},
            "prefix_hit_rate": num_cached / num_prompt,
            "kv_usage_peak": dict(driver.peak_usage),
            "kv_blocks": {t: after.get(f"kv_blocks_{t}", 0) for t in TIERS},
            "bytes_to_cpu": counters.get("bytes_to_cpu_total", 0),
            "bytes_to_gpu": counters.get("bytes_to_gpu_total", 0),
            "num_swaps_out": counters.get("num_swaps_out_total", 0),
            "num_swaps_in": counters.get("num_swaps_in_total", 0),
            "num_demotions": counters.get("num_demotions_total", 0),
            "num_preemptions": counters.get("num_preemptions_total", 0),
            "engine_counters": counters, "turns": [dataclasses.asdict(r) for r in res]}


# -- the whole benchmark ------------------------------------------------------------------------

def run_multiturn(cfg: MultiturnConfig, engine_kwargs: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Build the conversations once, size the KV tiers, run each CPU-tier setting; write JSON/plot."""
    engine_kwargs = dataclasses.asdict(EngineConfig.from_kwargs(**engine_kwargs))  # validated, complete
    mcfg = model_config(resolve_model(engine_kwargs["model"], engine_kwargs["load_format"]))
    max_len = engine_kwargs["max_model_len"] or mcfg.max_position_embeddings
    if engine_kwargs["num_gpu_blocks_override"]:
        max_len = min(max_len, engine_kwargs["num_gpu_blocks_override"] * engine_kwargs["block_size"])
    conversations = build_conversations(cfg, engine_kwargs, mcfg.vocab_size, max_len)
    if cfg.save_conversations:
        save_conversations(conversations, cfg.save_conversations)
        print(f"wrote {len(conversations)} tokenized conversations to {cfg.save_conversations}")
        return {"conversations": len(conversations)}
    _size_gpu_pool(cfg, engine_kwargs, conversations)
    _, dtype = resolve_device_dtype(EngineConfig.from_kwargs(**engine_kwargs))
    cpu_spec = StorageSpec.for_model(mcfg, Tier.CPU, engine_kwargs["block_size"], dtype)
    cpu_gib = engine_kwargs["kv_offloading_size"] or cpu_tier_gib(conversations, cpu_spec.bytes_per_token)
    if True in cfg.cpu_tier_settings:
        print(f"CPU tier (when on): {cpu_gib:.4g} GiB")
    runs = [run_setting(engine_kwargs, conversations, cfg, on, cpu_gib, progress)
            for on in cfg.cpu_tier_settings]
    result = {"benchmark": "multiturn", "config": dataclasses.asdict(cfg), "num_conversations": len(conversations),
              "conversation_tokens": [c.num_tokens for c in conversations], "runs": runs}
    save_results(result, cfg.output_json, cfg.plot, lambda _, path: plot_runs(runs, path))
    print_table(runs)
    for run in runs:
        print(stall_line(run))
    return result


def _size_gpu_pool(cfg: MultiturnConfig, engine_kwargs: dict[str, Any], conversations: list[Conversation]) -> None:
    """Set num_gpu_blocks_override from --gpu-kv-fraction unless given (0 = the engine's own sizing)."""
    if engine_kwargs["num_gpu_blocks_override"] or cfg.gpu_kv_fraction == 0:
        return
    bs = engine_kwargs["block_size"]
    blocks = gpu_blocks_for(conversations, cfg.num_active, cfg.gpu_kv_fraction, bs)
    peak = sum(conversation_blocks(conversations, bs)[:cfg.num_active])
    engine_kwargs["num_gpu_blocks_override"] = blocks
    if engine_kwargs.get("max_model_len") is None:  # the pool, not the model, is the limit: say so
        engine_kwargs["max_model_len"] = max(conversation_blocks(conversations, bs)) * bs
    print(f"GPU KV pool: {blocks} blocks of {bs} tokens for {len(conversations)} conversations "
          f"({cfg.num_active} open at once, peak KV {peak} blocks; --gpu-kv-fraction {cfg.gpu_kv_fraction})")


# -- report -------------------------------------------------------------------------------------

_COLUMNS = (("cpu tier", lambda r: "on" if r["cpu_tier"] else "off"),
            ("turns", lambda r: r["num_turns"]),
            ("TTFT mean s", lambda r: f"{r['ttft_mean_s']:.3f}"),
            ("p50 s", lambda r: f"{r['ttft_p50_s']:.3f}"),
            ("p99 s", lambda r: f"{r['ttft_p99_s']:.3f}"),
            ("out tok/s", lambda r: f"{r['output_tok_s']:.1f}"),
            ("hit gpu", lambda r: r["hit_tokens"]["gpu"]),
            ("hit cpu", lambda r: r["hit_tokens"]["cpu"]),
            ("MB to cpu", lambda r: f"{r['bytes_to_cpu'] / 1e6:.1f}"),
            ("MB to gpu", lambda r: f"{r['bytes_to_gpu'] / 1e6:.1f}"),
            ("swaps out/in", lambda r: f"{r['num_swaps_out']}/{r['num_swaps_in']}"),
            ("preempt", lambda r: r["num_preemptions"]))


def print_table(runs: list[dict[str, Any]]) -> None:
    rows = [[h for h, _ in _COLUMNS]] + [[str(f(r)) for _, f in _COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def plot_runs(runs: list[dict[str, Any]], path: str) -> None:
    """TTFT CDF per setting, mean TTFT by turn index, and prefix-hit tokens by tier (PNG, Agg)."""
    fig = new_figure(figsize=(15, 4.2), layout="constrained")
    from matplotlib.ticker import MaxNLocator  # the bench extra, present once new_figure returned
    cdf, by_turn, hits = fig.subplots(1, 3)
    labels = [f"CPU tier {'on' if r['cpu_tier'] else 'off'}" for r in runs]
    for run, label in zip(runs, labels):
        ttft = np.sort([t["ttft_s"] for t in run["turns"]])
        cdf.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=label)
        per_turn = collections.defaultdict(list)
        for t in run["turns"]:
            per_turn[t["turn"] + 1].append(t["ttft_s"])
        turns = sorted(per_turn)
        by_turn.plot(turns, [np.mean(per_turn[k]) for k in turns], marker="o", label=label)
    cdf.set(xlabel="time to first token (s)", ylabel="fraction of turns", title="TTFT CDF")
    by_turn.set(xlabel="turn", ylabel="mean TTFT (s)", title="TTFT by turn")
    by_turn.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom = np.zeros(len(runs))
    for tier in TIERS:
        values = np.array([r["hit_tokens"][tier] for r in runs], dtype=float)
        hits.bar(labels, values, bottom=bottom, label=f"{tier} hits")
        bottom += values
    hits.set(ylabel="prompt tokens", title="prefix-cache hit tokens by tier")
    for ax in (cdf, by_turn, hits):
        ax.legend()
    fig.savefig(path, dpi=110)
