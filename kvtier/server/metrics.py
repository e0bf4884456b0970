"""Prometheus metrics of one server, in a registry of its own (several servers can share a process).

Two sources: request-level counters and histograms that the async engine records as outputs reach
the event loop, and the engine's gauges and counters read from `LLMEngine.stats()` at scrape time.
Names follow vLLM's (`vllm:prompt_tokens_total` -> `kvtier_prompt_tokens_total`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.outputs import RequestOutput

PREFIX = "kvtier_"

# LLMEngine.stats() key -> (metric name without prefix, labels). Keys ending in `_total` become
# counters, the rest gauges; a key not listed here is exported as kvtier_<key>.
_ENGINE_METRICS: dict[str, tuple[str, dict[str, str]]] = {
    "num_running": ("num_requests_running", {}),
    "num_waiting": ("num_requests_waiting", {}),
    "kv_usage_gpu": ("kv_cache_usage_perc", {"tier": "gpu"}),
    "kv_usage_cpu": ("kv_cache_usage_perc", {"tier": "cpu"}),
    "kv_blocks_gpu": ("kv_cache_blocks", {"tier": "gpu"}),
    "kv_blocks_cpu": ("kv_cache_blocks", {"tier": "cpu"}),
    "num_preemptions_total": ("num_preemptions_total", {}),
    "prefix_query_tokens_total": ("prefix_cache_queries_total", {}),
    "prefix_hit_tokens_gpu_total": ("prefix_cache_hits_total", {"tier": "gpu"}),
    "prefix_hit_tokens_cpu_total": ("prefix_cache_hits_total", {"tier": "cpu"}),
    "bytes_to_cpu_total": ("kv_transfer_bytes_total", {"direction": "to_cpu"}),
    "bytes_to_gpu_total": ("kv_transfer_bytes_total", {"direction": "to_gpu"}),
    "transfer_seconds_to_cpu_total": ("kv_transfer_seconds_total", {"direction": "to_cpu"}),
    "transfer_seconds_to_gpu_total": ("kv_transfer_seconds_total", {"direction": "to_gpu"}),
    "num_swaps_out_total": ("swaps_total", {"direction": "to_cpu"}),
    "num_swaps_in_total": ("swaps_total", {"direction": "to_gpu"}),
    "num_demotions_total": ("demotions_total", {}),
    "num_evictions_gpu_total": ("evictions_total", {"tier": "gpu"}),
    "num_evictions_cpu_total": ("evictions_total", {"tier": "cpu"}),
}
_HELP = {
    "num_requests_running": "Requests in the engine's running batch",
    "num_requests_waiting": "Requests waiting to be scheduled (new or preempted)",
    "kv_cache_usage_perc": "Fraction of the tier's KV blocks in use (0 to 1)",
    "kv_cache_blocks": "KV blocks in the tier",
    "num_held_blocks_gpu": "GPU KV blocks held by requests (0 when idle, else a block leaked)",
    "num_preemptions_total": "Requests preempted to free KV blocks",
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits_total": "Prompt tokens served from the prefix cache, by tier",
    "kv_transfer_bytes_total": "KV bytes copied between tiers",
    "kv_transfer_seconds_total": "Seconds spent copying KV between tiers",
    "swaps_total": "Requests whose KV was swapped between tiers",
    "demotions_total": "GPU KV blocks demoted to the CPU tier",
    "evictions_total": "KV blocks evicted from the tier's prefix cache",
}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class EngineStatsCollector(Collector):
    """Exports the last `LLMEngine.stats()` snapshot; the /metrics handler refreshes it per scrape."""

    def __init__(self) -> None:
        self.snapshot: dict[str, int | float] = {}

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for key, value in self.snapshot.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, labels = _ENGINE_METRICS.get(key, (key, {}))
            if name not in families:
                families[name] = _family(name, key, list(labels))
            families[name].add_metric(list(labels.values()), value)
        return iter(families.values())


def _family(name: str, key: str, label_names: list[str]) -> Metric:
    doc = _HELP.get(name, f"LLMEngine.stats()[{key!r}]")
    if name.endswith("_total"):  # the exposition format adds `_total` back to counters
        return CounterMetricFamily(PREFIX + name.removesuffix("_total"), doc, labels=label_names)
    return GaugeMetricFamily(PREFIX + name, doc, labels=label_names)


@dataclasses.dataclass
class RequestTimer:
    """What one request's metrics need between outputs (times from time.monotonic())."""
    arrival: float
    last_token: float | None = None
    num_output_tokens: int = 0  # over all n samples


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine_stats = EngineStatsCollector()
        self.registry.register(self.engine_stats)
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests that were prefilled",
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason "
                                       "(stop, length, abort = client went away, error = engine failure)",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between a request's outputs",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, timer: RequestTimer, out: RequestOutput, now: float) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > timer.num_output_tokens:
            if timer.last_token is None:
                self.ttft.observe(now - timer.arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                self.itl.observe(now - timer.last_token)
            self.generation_tokens.inc(num_tokens - timer.num_output_tokens)
            timer.last_token, timer.num_output_tokens = now, num_tokens
        if out.finished:
            self.e2e.observe(now - timer.arrival)
            self.request_success.labels(out.outputs[0].finish_reason or "stop").inc()

    def observe_end(self, reason: str) -> None:
        """A request that ended without a finished output: 'abort' or 'error'."""
        self.request_success.labels(reason).inc()

    def render(self, stats: dict[str, int | float]) -> bytes:
        self.engine_stats.snapshot = stats
        return generate_latest(self.registry)
