"""`kvtier bench serve`: load on any OpenAI-compatible server, measured like vLLM's `bench serve`.

Every request streams with `stream_options.include_usage`; its prompt and output token counts come
from the usage of the final chunk (the server's own count, no client-side tokenizer guess).
Per request: TTFT (first chunk with a token), ITL (gaps between later chunks), TPOT
((latency - TTFT) / (output tokens - 1)) and end-to-end latency.

Datasets are sessions of turns. Single-turn datasets (random, sharegpt, prefix-repetition) have one
turn each; multi-turn sessions send their turns in order, each prompt being the whole conversation so
far (the model's replies included), so every turn extends the previous prompt. Arrivals (Poisson at
--request-rate, or all at once) start sessions; --max-concurrency caps requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from typing import Any

import numpy as np

try:
    import httpx2 as httpx  # the name this environment's httpx is installed under (same API)
except ImportError:  # pragma: no cover - a standard environment
    import httpx

from kvtier.benchmarks.datasets import BenchRequest, random_requests, sharegpt_requests
from kvtier.benchmarks.plotting import new_figure, require_matplotlib
from kvtier.benchmarks.stats import latency_stats

DATASETS = ("random", "sharegpt", "multi-turn", "prefix-repetition")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_TIMEOUT_S = 6 * 3600  # vLLM's: a long run must not fail on the client's clock


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"  # completions | chat
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    tokenizer: str | None = None  # for random ids and lengths; None: the default model's (SmolLM2)
    dataset: str = "random"
    num_prompts: int = 100  # requests in all (multi-turn: turns in all)
    random_input_len: int = 128  # random: prompt tokens; prefix-repetition: suffix; multi-turn: per user turn
    random_output_len: int = 32  # tokens to generate (sharegpt: see sharegpt_output_len)
    sharegpt_output_len: int | None = None  # None: the dataset reply's length
    prefix_len: int = 256
    num_prefixes: int = 4
    num_turns: int = 3
    request_rate: float = math.inf
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    result_file: str | None = None
    plot_file: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; choose one of {sorted(ENDPOINTS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        for name in ("num_prompts", "random_input_len", "random_output_len", "prefix_len", "num_prefixes",
                     "num_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf sends everything at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.plot_file:
            require_matplotlib("--plot-file")


@dataclasses.dataclass
class Turn:
    user: str | list[int]  # text, or token ids (completions, single turn)
    output_len: int


@dataclasses.dataclass
class RequestResult:
    session: int
    turn: int
    start_s: float = 0.0  # since the benchmark's start
    success: bool = False
    error: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = dataclasses.field(default_factory=dict)
    generated_text: str = ""


# -- datasets -----------------------------------------------------------------------------------

def build_sessions(cfg: ServeBenchConfig, tokenizer, max_model_len: int) -> list[list[Turn]]:
    vocab = len(tokenizer)
    text = cfg.endpoint == "chat"
    if cfg.dataset == "random":
        reqs = random_requests(cfg.num_prompts, cfg.random_input_len, cfg.random_output_len, vocab, cfg.seed)
    elif cfg.dataset == "sharegpt":
        reqs = sharegpt_requests(tokenizer, cfg.num_prompts, max_model_len, cfg.sharegpt_output_len, cfg.seed)
    elif cfg.dataset == "prefix-repetition":
        prefixes = random_requests(cfg.num_prefixes, cfg.prefix_len, 1, vocab, cfg.seed)
        suffixes = random_requests(cfg.num_prompts, cfg.random_input_len, 1, vocab, cfg.seed + 1)
        reqs = [BenchRequest(prefixes[i % cfg.num_prefixes].prompt_token_ids + s.prompt_token_ids,
                             cfg.random_output_len) for i, s in enumerate(suffixes)]
    else:  # multi-turn: user messages as text, since each prompt is the conversation's text so far
        users = random_requests(cfg.num_prompts, cfg.random_input_len, cfg.random_output_len, vocab, cfg.seed)
        turns = [Turn(tokenizer.decode(u.prompt_token_ids), u.output_len) for u in users]
        return [turns[i:i + cfg.num_turns] for i in range(0, len(turns), cfg.num_turns)]
    # Completions take token ids exactly; chat messages are text (its token count then varies a little).
    return [[Turn(tokenizer.decode(r.prompt_token_ids) if text else r.prompt_token_ids, r.output_len)]
            for r in reqs]


def load_benchmark_tokenizer(name: str | None):
    """The tokenizer of a model directory or .gguf file; None: the default model's (SmolLM2)."""
    from kvtier.models.loader import load_tokenizer, resolve_model
    tokenizer = load_tokenizer(resolve_model(name))
    if tokenizer is None:
        raise ValueError(f"no tokenizer files for {name!r}; give --tokenizer a model directory or .gguf file")
    return tokenizer


# -- requests -----------------------------------------------------------------------------------

class Client:
    def __init__(self, cfg: ServeBenchConfig, model: str, http: httpx.AsyncClient):
        self.cfg, self.model, self.http = cfg, model, http
        self.url = cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint]
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    def payload(self, prompt: str | list[int] | list[dict[str, str]], output_len: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "temperature": self.cfg.temperature,
                                "stream_options": {"include_usage": True}}
        if self.cfg.endpoint == "chat":
            body.update(messages=prompt, max_completion_tokens=output_len)
        else:
            body.update(prompt=prompt, max_tokens=output_len)
        if self.cfg.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: exactly output_len tokens
        return body

    async def send(self, body: dict[str, Any], result: RequestResult, t0: float) -> None:
        start = time.perf_counter()
        result.start_s = start - t0
        try:
            async with self.http.stream("POST", self.url, json=body, headers=self.headers) as resp:
                if resp.status_code != 200:
                    result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                    return
                await self._read_events(resp, result, start)
        except httpx.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
            return
        result.latency_s = time.perf_counter() - start
        result.success = not result.error and result.ttft_s is not None

    async def _read_events(self, resp: httpx.Response, result: RequestResult, start: float) -> None:
        last = start
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            chunk, now = json.loads(data), time.perf_counter()
            if "error" in chunk:
                result.error = f"server error in stream: {chunk['error'].get('message')}"
                return
            if chunk.get("usage"):
                _take_usage(result, chunk["usage"])
            piece = _token_text(chunk)
            if piece is None:
                continue
            result.generated_text += piece
            if result.ttft_s is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now


def _token_text(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that carries generated tokens; None for role-only, empty and usage chunks."""
    for choice in chunk.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text or choice.get("token_ids"):
            return text or ""
    return None


def _take_usage(result: RequestResult, usage: dict[str, Any]) -> None:
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.output_tokens = usage.get("completion_tokens", 0)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    result.cached_tokens_by_tier = dict(usage.get("cached_tokens_by_tier") or {})


async def run_sessions(client: Client, sessions: list[list[Turn]], cfg: ServeBenchConfig) -> list[RequestResult]:
    """Start sessions at Poisson arrivals (or at once); a session's turns run one after another."""
    rng = random.Random(cfg.seed)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    results: list[RequestResult] = []
    t0, arrival = time.perf_counter(), 0.0
    tasks = []
    for i, session in enumerate(sessions):
        tasks.append(asyncio.create_task(_run_session(client, i, session, arrival, limit, results, t0)))
        if math.isfinite(cfg.request_rate):
            arrival += rng.expovariate(cfg.request_rate)
    await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.start_s)


async def _run_session(client: Client, index: int, session: list[Turn], arrival: float,
                       limit: asyncio.Semaphore | None, results: list[RequestResult], t0: float) -> None:
    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    messages: list[dict[str, str]] = []
    history = ""
    for t, turn in enumerate(session):
        if client.cfg.endpoint == "chat":
            messages = messages + [{"role": "user", "content": turn.user}]
            prompt: Any = messages
        else:
            prompt = turn.user if isinstance(turn.user, list) else history + turn.user
        result = RequestResult(index, t)
        if limit is not None:
            async with limit:
                await client.send(client.payload(prompt, turn.output_len), result, t0)
        else:
            await client.send(client.payload(prompt, turn.output_len), result, t0)
        results.append(result)
        if not result.success:  # later turns would build on a reply that never came
            results += [RequestResult(index, later, result.start_s, error="not sent: an earlier turn failed")
                        for later in range(t + 1, len(session))]
            return
        messages = messages + [{"role": "assistant", "content": result.generated_text}]
        history = f"{prompt}{result.generated_text}\n\n" if isinstance(prompt, str) else history


# -- results ------------------------------------------------------------------------------------

def summarize(results: list[RequestResult], duration_s: float, cfg: ServeBenchConfig) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft_s for r in ok]
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl_s]
    e2els = [r.latency_s for r in ok]
    num_in, num_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "backend": "openai-" + cfg.endpoint, "base_url": cfg.base_url, "dataset": cfg.dataset,
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "max_concurrency": cfg.max_concurrency, "num_prompts": cfg.num_prompts,
        "duration": duration_s, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration_s, "output_throughput": num_out / duration_s,
        "total_token_throughput": (num_in + num_out) / duration_s,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "cached_tokens_by_tier": _sum_tiers(ok)}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(_stats_ms(name, values))
    out.update(input_lens=[r.prompt_tokens for r in ok], output_lens=[r.output_tokens for r in ok],
               ttfts=ttfts, itls=[r.itl_s for r in ok], e2els=e2els, start_times=[r.start_s for r in ok],
               errors=[r.error for r in results if not r.success])
    return out


def _sum_tiers(results: list[RequestResult]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in results:
        for tier, n in r.cached_tokens_by_tier.items():
            total[tier] = total.get(tier, 0) + n
    return total


def _stats_ms(name: str, values: list[float]) -> dict[str, float]:
    """vLLM's keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms (zeros when nothing finished)."""
    return {f"{stat}_{name}_ms": v for stat, v in latency_stats(values or [0.0], scale=1000).items()}


_SECTIONS = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


def format_table(res: dict[str, Any]) -> str:
    """vLLM's result table, plus the prefix-cache hits the server reported."""
    lines = [f"{' Serving Benchmark Result ':=^50}"]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", res["completed"])
    row("Failed requests:", res["failed"])
    row("Benchmark duration (s):", res["duration"])
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", res["request_throughput"])
    row("Output token throughput (tok/s):", res["output_throughput"])
    row("Total Token throughput (tok/s):", res["total_token_throughput"])
    row("Cached prompt tokens:", res["total_cached_tokens"])
    for tier, n in res["cached_tokens_by_tier"].items():
        row(f"  of them from {tier.upper()}:", n)
    for key, title, short in _SECTIONS:
        lines.append(f"{title:-^50}")
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            row(f"{name} {short} (ms):", res[f"{stat}_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def plot_results(res: dict[str, Any], path: str) -> None:
    """TTFT CDF, ITL histogram, E2E latency by start time, output tokens over time (PNG, Agg)."""
    fig = new_figure(figsize=(12, 8), tight_layout=True)
    (cdf, itl), (e2e, tokens) = fig.subplots(2, 2)
    ttft_ms = np.sort(np.asarray(res["ttfts"]) * 1000)
    cdf.plot(ttft_ms, np.arange(1, len(ttft_ms) + 1) / max(len(ttft_ms), 1))
    cdf.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="Time to first token (CDF)")
    itl.hist([x * 1000 for gaps in res["itls"] for x in gaps] or [0.0], bins=50)
    itl.set(xlabel="ITL (ms)", ylabel="count", title="Inter-token latency")
    e2e.scatter(res["start_times"], np.asarray(res["e2els"]) * 1000, s=8)
    e2e.set(xlabel="request start (s)", ylabel="E2E latency (ms)", title="End-to-end latency")
    ends = np.asarray(res["start_times"]) + np.asarray(res["e2els"])
    order = np.argsort(ends)
    tokens.step(ends[order], np.cumsum(np.asarray(res["output_lens"])[order]), where="post")
    tokens.set(xlabel="time (s)", ylabel="output tokens done", title=f"{res['output_throughput']:.1f} tok/s")
    fig.savefig(path, dpi=100)


async def _server_model(http: httpx.AsyncClient, cfg: ServeBenchConfig) -> tuple[str, int]:
    """The model to ask for (--model, else the server's first) and its max_model_len (vLLM and kvtier
    list it; other servers: a generous guess, used only to skip over-long ShareGPT prompts)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    resp = await http.get(cfg.base_url.rstrip("/") + "/v1/models", headers=headers)
    resp.raise_for_status()
    models = resp.json()["data"]
    chosen = next((m for m in models if m["id"] == cfg.model), None) if cfg.model else models[0]
    return cfg.model or chosen["id"], (chosen or {}).get("max_model_len") or 4096


async def benchmark(cfg: ServeBenchConfig, tokenizer) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, limits=limits) as http:
        model, max_model_len = await _server_model(http, cfg)
        sessions = build_sessions(cfg, tokenizer, max_model_len)
        client = Client(cfg, model, http)
        t0 = time.perf_counter()
        results = await run_sessions(client, sessions, cfg)
        return summarize(results, time.perf_counter() - t0, cfg)


def run_serve_benchmark(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Build the dataset, run it against the server, print the table, write JSON and PNG if asked."""
    tokenizer = load_benchmark_tokenizer(cfg.tokenizer)
    try:
        res = asyncio.run(benchmark(cfg, tokenizer))
    except httpx.HTTPError as e:  # before any request: the server is not there or refuses us
        raise ValueError(f"cannot list the models of {cfg.base_url}: {type(e).__name__}: {e}") from e
    print(format_table(res))
    if cfg.result_file:
        with open(cfg.result_file, "w") as f:
            json.dump(res, f, indent=2)
    if cfg.plot_file:
        plot_results(res, cfg.plot_file)
    return res
