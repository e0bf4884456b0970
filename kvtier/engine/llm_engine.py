"""LLMEngine: requests in, one step at a time: schedule -> forward + sample -> update -> outputs."""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import json
import logging
import math
import time
from typing import Any

import torch

from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.cache.storage import StorageSpec, Tier
from kvtier.config import (
    ADAPTIVE_MAX_FRACTION,
    DEFAULT_CPU_KV_CACHE_BYTES,
    KV_CACHE_DTYPES,
    ConfigError,
    EngineConfig,
    GiB,
    default_cpu_threads,
)
from kvtier.engine.host_kv_pool import HostKVPool, quant_spec
from kvtier.engine.kv_storage import KVStorage
from kvtier.engine.model_runner import PER_TOKEN_MAX_QUERY
from kvtier.engine.output_processor import OutputProcessor
from kvtier.engine.transfer_engine import STAGING_BYTES
from kvtier.engine.worker import StepFuture, Worker
from kvtier.models.loader import load_model, load_tokenizer, model_config, resolve_model, weight_bytes
from kvtier.offload.cost_model import HardwareRates, SwapCostModel
from kvtier.offload.expansion import AdaptiveExpansion, ExpansionController
from kvtier.offload.hardware import host_link_bandwidth, matmul_flops, skinny_matmul_flops
from kvtier.offload.kvpr import KVPRRates
from kvtier.offload.policies import ALWAYS_SWAP, DEMOTION_POLICIES, CostModelSwap
from kvtier.ops.kernel_variants import num_compiled_variants
from kvtier.ops.kv_quant import DEFAULT_GROUP_SIZE
from kvtier.outputs import RequestOutput
from kvtier.request import Request, RequestStatus
from kvtier.sampling_params import SamplingParamError, SamplingParams
from kvtier.scheduler.output import SampledToken, SchedulerOutput
from kvtier.scheduler.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]
LOG_STATS_INTERVAL_S = 10.0


@dataclasses.dataclass
class StepRecord:
    """One whole engine step (schedule, forward, sample, bookkeeping), recorded for benchmarks."""
    num_tokens: int
    num_seqs: int
    decode_only: bool
    sum_seq_lens: int  # context tokens whose K/V the step's attention reads
    seconds: float
    end_time: float  # time.time() at the step's end: the clock of RequestMetrics
    num_prefill_tokens: int  # tokens of requests still in their prompt (or recomputing)
    num_decode_tokens: int  # one per request generating its next token
    num_blocks_loaded: int  # CPU -> GPU
    num_blocks_stored: int  # GPU -> CPU, before and after the forward
    compiled_variants: int | None  # Triton kernel variants compiled in the process so far (None: interpreted)
    num_far_blocks: int = 0  # Pie: far blocks the step's attention read from the staging ring
    device_start: torch.cuda.Event | None = None  # the step's device work (GPU; read after a sync)
    device_end: torch.cuda.Event | None = None


@dataclasses.dataclass
class _IssuedStep:
    plan: SchedulerOutput
    issued: float  # perf_counter() when it was planned
    future: StepFuture | None = None  # None until issued


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device, self.dtype = resolve_device_dtype(config)
        if self.device.type == "cpu" or config.cpu_threads is not None:
            # torch's intra-op threads (process-wide). On a GPU they run only host-side torch work,
            # so there torch's own default stays unless --cpu-threads is given.
            torch.set_num_threads(config.cpu_threads or default_cpu_threads())
        torch.manual_seed(config.seed)
        source = resolve_model(config.model, config.load_format)
        self.model_config = model_config(source)
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        model = load_model(source, self.model_config, self.device, self.dtype, config.seed)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(source, config.tokenizer)
        self.eos_token_ids = self._eos_ids(source.path)
        # what one GPU block holds; the CPU tier's spec is the same blocks in its own layout (and format)
        self.kv_spec = StorageSpec.for_model(self.model_config, Tier.GPU, config.block_size,
                                             KV_CACHE_DTYPES[config.kv_cache_dtype] or self.dtype)
        self.cpu_kv_spec = self._cpu_kv_spec()
        num_blocks = self._num_blocks()
        self.max_model_len = self._max_model_len(num_blocks)
        kv = KVStorage.allocate(self.kv_spec, num_blocks, self.device, self._num_cpu_blocks(),
                                activation_width=self._activation_width, cpu_spec=self.cpu_kv_spec)
        self.worker = Worker(model, self.model_config, kv, self.device, config.seed, config.attention_backend)
        self.runner = self.worker.runner
        if kv.host is not None:
            logger.info("kvtier: CPU KV tier of %d blocks (%.2f GiB%s%s)", kv.host.num_blocks,
                        kv.host.num_blocks * kv.host.block_bytes / GiB, ", pinned" if kv.host.pinned else "",
                        self._cpu_format_note())
        num_far_slots = self._enable_far(num_blocks)  # before the graphs: they read the ring
        if config.kvpr != "off":  # after the ring (its inputs' ring matches it), before the graphs
            self._enable_kvpr()
        if self.device.type == "cuda" and not config.enforce_eager and self.runner.attention_backend == "triton":
            # small steps replay these graphs as one decode per token (ModelRunner._per_token_view)
            self.worker.capture_decode_graphs(max(config.max_num_seqs, PER_TOKEN_MAX_QUERY), self.max_model_len)
        self.swap_cost = self._swap_cost_model(model) if self.host_pool is not None else None
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                       self.worker.num_blocks(Tier.CPU),
                                       DEMOTION_POLICIES[config.kv_offloading_policy],
                                       CostModelSwap(self.swap_cost) if self.swap_cost else ALWAYS_SWAP)
        self.kv_cache.far_fraction, self.kv_cache.max_far_blocks = config.kv_expansion_fraction, num_far_slots
        self.expansion: AdaptiveExpansion | None = None
        if config.kv_expansion == "adaptive":
            self.start_adaptive_expansion(ADAPTIVE_MAX_FRACTION)
        # decode steps whose period the controller has not seen: (start, next step's start, far blocks, KV bytes)
        self._timed_steps: collections.deque[tuple[Any, Any, int, int]] = collections.deque()
        self._last_decode: tuple[Any, int, int, int] | None = None
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, self.async_scheduling), self.kv_cache)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.step_log: list[StepRecord] | None = None  # benchmarks set a list (syncs every step)
        self._ids = itertools.count()
        self._inflight: collections.deque[_IssuedStep] = collections.deque()  # issued, tokens not taken
        self._last_finished = 0.0  # perf_counter() when the step log last recorded a step
        self._last_log = time.monotonic()
        logger.info("kvtier: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                    self.model_name, self.device, self.dtype, num_blocks, config.block_size, self.max_model_len)

    # -- set-up ---------------------------------------------------------------------------------

    def _eos_ids(self, path) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        gen_cfg = path / "generation_config.json" if path is not None else None
        if gen_cfg is not None and gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def _num_blocks(self) -> int:
        cfg, block_bytes = self.config, self._block_bytes
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        # Without an explicit size, never more than 4x what max_num_seqs full-length sequences
        # need (the rest only holds cached prefixes); a tiny model would otherwise get millions.
        # This lowers no limit, so it is logged at INFO; the limits it could lower warn in _max_model_len.
        full = cfg.max_model_len or self.model_config.max_position_embeddings
        cap = 4 * -(-full // cfg.block_size) * cfg.max_num_seqs * block_bytes
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
        else:  # on the CPU a fixed default
            available = self._cuda_kv_budget() if self.device.type == "cuda" else DEFAULT_CPU_KV_CACHE_BYTES
            budget = min(available, cap)
            if budget < available:
                logger.info("kvtier: KV cache capped at %d MiB of %d MiB available: 4x what %d sequences of %d "
                            "tokens (--max-num-seqs, max_model_len) need; --kv-cache-memory sets it",
                            budget >> 20, available >> 20, cfg.max_num_seqs, full)
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ConfigError(f"the KV cache budget of {budget} bytes holds no block of {block_bytes} bytes; "
                              f"give --kv-cache-memory at least {self._kv_memory_for(cfg.block_size)}, or raise "
                              "--gpu-memory-utilization")
        return num_blocks

    def start_adaptive_expansion(self, max_fraction: float) -> None:
        """--kv-expansion adaptive: from none far, the far share follows measured decode steps
        (`_observe_expansion`), up to `max_fraction` (at most the ring's)."""
        weights = weight_bytes(self.runner.model)
        self.expansion = AdaptiveExpansion(ExpansionController(max_fraction=max_fraction), weights)
        self.kv_cache.far_fraction = 0.0

    def _enable_far(self, num_blocks: int) -> int:
        """Pie (--kv-expansion FRACTION): the staging ring, sized for the most far blocks a step can
        read: FRACTION of the running requests' blocks, of which the GPU holds the rest."""
        fraction = self.config.kv_expansion_fraction
        if fraction <= 0:
            return 0
        per_seq = -(-self.max_model_len // self.config.block_size)
        most = int(fraction * per_seq) * self.config.max_num_seqs  # every sequence at max_model_len
        slots = max(1, most if fraction >= 1 else min(int(fraction / (1 - fraction) * num_blocks) + 1, most))
        ring_bytes = self.worker.enable_far(slots)
        logger.info("kvtier: KV expansion %.3f, staging ring of %d far blocks (%.1f MiB)", fraction, slots,
                    ring_bytes / 2**20)
        return slots

    @property
    def _activation_width(self) -> int:
        """KVPR: each tier keeps every block's layer inputs this wide beside its K/V (0: off)."""
        return self.model_config.hidden_size if self.config.kvpr != "off" else 0

    @property
    def _block_bytes(self) -> int:
        """What one block costs a tier: its K/V and, with KVPR, its kept layer inputs."""
        return self.kv_spec.bytes_per_block + KVStorage.activation_bytes_per_block(self.kv_spec, self._activation_width)

    def _enable_kvpr(self) -> None:
        """KVPR: rates measured now (the link toward the GPU; the GPU's GEMM at the recompute's
        shape), refreshed later from the transfers' own timings; the planner's verdict logged."""
        cfg, kv_width = self.model_config, self.model_config.num_kv_heads * self.model_config.head_dim
        rows = 8192 if self.device.type == "cuda" else 256
        rates = KVPRRates(host_link_bandwidth(self.device),
                          skinny_matmul_flops(self.device, self.dtype, rows, cfg.hidden_size, 2 * kv_width, iters=5))
        self.worker.enable_kvpr(cfg, rates, self.config.kvpr_fraction)
        pays = cfg.hidden_size < 2 * kv_width
        logger.info("kvtier: KVPR %s; link %.1f GB/s, recompute GEMM %.1f TFLOP/s measured; layer inputs %d wide "
                    "against K+V %d: recomputation %s", self.config.kvpr, rates.link_bytes_per_s / 1e9,
                    rates.recompute_flops_per_s / 1e12, cfg.hidden_size, 2 * kv_width,
                    "can pay" if pays else "never pays (the planner will choose l = 0)")

    def _cpu_kv_spec(self) -> StorageSpec:
        """The CPU tier's blocks: the GPU's in the CPU layout, quantized with --kv-offloading-dtype."""
        spec, cfg = self.kv_spec.on(Tier.CPU), self.config
        if cfg.kv_offloading_dtype == "auto":
            return spec
        # unset: KIVI's 32 channels, or the widest power of two that divides a narrower head_dim
        group = cfg.kv_offloading_group_size or math.gcd(DEFAULT_GROUP_SIZE, spec.head_dim)
        try:
            quantized = spec.quantized(cfg.kv_offloading_dtype, group)
            quant_spec(quantized)  # kv_quant's own checks of the format, here as a ConfigError
        except ValueError as e:
            raise ConfigError(f"--kv-offloading-dtype {cfg.kv_offloading_dtype} with --kv-offloading-group-size "
                              f"{group} does not fit this model's KV (head_dim {spec.head_dim}): {e}") from e
        return quantized

    def _cpu_format_note(self) -> str:
        """The log's word on a quantized CPU tier: its format and what it gains over the GPU's dtype."""
        spec = self.cpu_kv_spec
        if spec.scale is None:
            return ""
        return (f", {spec.dtype} in groups of {spec.scale.group_size}: {spec.bytes_per_block} bytes a block, "
                f"{self.kv_spec.bytes_per_block / spec.bytes_per_block:.2f}x fewer than {self.kv_spec.dtype}")

    def _num_cpu_blocks(self) -> int:
        """The CPU tier's blocks (--kv-offloading-size GiB of its own spec's blocks); 0 when off."""
        if self.config.kv_offloading_size <= 0:
            return 0
        # its own blocks' bytes (quantized ones: fewer) and, with KVPR, the kept layer inputs
        block_bytes = self.cpu_kv_spec.bytes_per_block + KVStorage.activation_bytes_per_block(
            self.kv_spec, self._activation_width)
        num_cpu_blocks = int(self.config.kv_offloading_size * GiB // block_bytes)
        if num_cpu_blocks < 1:
            raise ConfigError(f"--kv-offloading-size {self.config.kv_offloading_size} GiB holds no KV block "
                              f"of {block_bytes} bytes; give at least {block_bytes / GiB:.6f} GiB")
        return num_cpu_blocks

    @property
    def host_pool(self) -> HostKVPool | None:
        """The CPU tier's pinned storage, None when the tier is off."""
        return self.worker.kv.host

    def _swap_cost_model(self, model: torch.nn.Module) -> SwapCostModel:
        # small and quick: the decision needs the order of magnitude, not the last percent
        size = 2048 if self.device.type == "cuda" else 256
        rates = HardwareRates(host_link_bandwidth(self.device), matmul_flops(self.device, self.dtype, size, iters=5))
        kv_per_token = self.cpu_kv_spec.bytes_per_token  # what crosses the link (quantized tiers: fewer)
        flops_per_token = 2.0 * sum(p.numel() for p in model.parameters())
        cost = SwapCostModel(rates, kv_per_token, flops_per_token)
        logger.info("kvtier: swap preemption %s (per 1k tokens: swap %.2f ms, recompute %.2f ms; link %.1f GB/s, "
                    "%.1f TFLOP/s measured)", "on" if cost.swap_pays(1024) else "off (recompute is cheaper)",
                    cost.swap_seconds(1024) * 1e3, cost.recompute_seconds(1024) * 1e3,
                    rates.link_bytes_per_s / 1e9, rates.flops_per_s / 1e12)
        return cost

    def _cuda_kv_budget(self) -> int:
        """vLLM's meaning: the engine may use this fraction of the GPU's total memory in all."""
        gc.collect()  # an engine dropped earlier in this process must not count as in use
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        activations = self._activation_reserve()
        staging = 2 * STAGING_BYTES if self.config.kv_offloading_size > 0 else 0  # the CPU tier's buffers
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - activations - staging
        if budget <= 0:
            raise ConfigError(f"gpu_memory_utilization={self.config.gpu_memory_utilization} leaves no "
                              f"memory for the KV cache ({(total - free) / 2**30:.1f} GiB already used)")
        return budget

    def _activation_reserve(self) -> int:
        """Peak extra memory of a forward over max_num_batched_tokens, estimated from shapes."""
        cfg, t = self.model_config, self.config.max_num_batched_tokens
        width = max(cfg.hidden_size * 4, cfg.intermediate_size * 3, cfg.vocab_size // 8)
        return int(t * width * self.dtype.itemsize * 2 + cfg.vocab_size * 4 * min(t, 1024))

    def _max_model_len(self, num_blocks: int) -> int:
        """The user's max_model_len if the model and the KV cache allow it (else an error); unset,
        the model's positions, lowered with a warning to what the cache holds."""
        model_max = self.model_config.max_position_embeddings
        capacity = num_blocks * self.config.block_size
        wanted = self.config.max_model_len
        if wanted is not None and wanted > model_max:
            raise ConfigError(f"max_model_len={wanted} exceeds the model's {model_max} positions; "
                              f"lower --max-model-len to at most {model_max}")
        if wanted is not None and wanted > capacity:
            raise ConfigError(f"max_model_len={wanted} does not fit the KV cache ({capacity} tokens in "
                              f"{num_blocks} blocks of {self.config.block_size}); lower --max-model-len to at "
                              f"most {capacity}, or give the cache at least {self._kv_memory_for(wanted)} "
                              "(--kv-cache-memory)")
        if wanted is None and capacity < model_max:
            logger.warning("kvtier: max_model_len lowered from the model's %d to %d tokens, all that the KV "
                           "cache holds (%d blocks of %d tokens); for the model's full length give the cache at "
                           "least %s (--kv-cache-memory), or set --max-model-len %d to accept the shorter limit",
                           model_max, capacity, num_blocks, self.config.block_size,
                           self._kv_memory_for(model_max), capacity)
        return wanted or min(model_max, capacity)

    def _kv_memory_for(self, num_tokens: int) -> str:
        """KV cache memory that holds one sequence of num_tokens, as a --kv-cache-memory value."""
        num_blocks = -(-num_tokens // self.config.block_size)
        num_bytes = num_blocks * self.kv_spec.bytes_per_block
        return f"{-(-num_bytes // 2**20)}MiB"

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (skip_tokenizer_init or a model "
                                 "without tokenizer files); pass prompt token ids instead")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises ValueError (and changes nothing) on bad input."""
        params = params or SamplingParams()
        self.check_sampling_params(params)
        text, token_ids = self.process_prompt(prompt)
        return self.add_processed_request(text, token_ids, params, request_id, cache_salt, arrival_time)

    def add_processed_request(self, text: str | None, token_ids: list[int], params: SamplingParams,
                              request_id: str | None = None, cache_salt: str | None = None,
                              arrival_time: float | None = None) -> str:
        """Queue a request whose prompt and parameters were validated already (`process_prompt`,
        `check_sampling_params`: the server does it off the engine thread)."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        samples = [Request(request_id if params.n == 1 else f"{request_id}#{i}", token_ids,
                           params.child(i) if params.n > 1 else params, self.eos_token_ids, cache_salt, arrival_time)
                   for i in range(params.n)]
        self.output_processor.add(request_id, text, token_ids, samples)
        for sample in samples:
            self.scheduler.add_request(sample)
        return request_id

    def check_sampling_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: ids and counts against this model's vocabulary (an id
        past it would fail the sampler's step, and every request in it)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise SamplingParamError("stop_token_ids", bad[:5], f"must be in [0, {vocab}), the vocabulary")
        if params.logprobs is not None and params.logprobs > vocab:
            raise SamplingParamError("logprobs", params.logprobs, f"must be at most {vocab}, the vocabulary size")
        bad = [t for t in params.forced_token_ids or () if t >= vocab]
        if bad:
            raise SamplingParamError("forced_token_ids", bad[:5], f"must be in [0, {vocab}), the vocabulary")

    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Tokenize and validate; raises ValueError naming the problem."""
        text, token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        return text, token_ids

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(token_ids) + 1 > self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but max_model_len is "
                             f"{self.max_model_len}, which must leave room for at least one new token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for request_id in ids:
            self.scheduler.finish_requests(self.output_processor.remove(request_id), RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    # -- the step -------------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One scheduling step; returns outputs of the requests that advanced (finished ones last seen).

        final_only: only requests that finished (offline generation needs nothing else).

        One request must not fail the others: a step that raises is run again request by request
        (`_isolate_failure`); a request that fails alone finishes with finish_reason "error" and
        `RequestOutput.error`. Raises only for a failure no request can be blamed for."""
        try:
            return self._step(final_only)
        except Exception as error:  # noqa: BLE001 - attributed below, or re-raised
            return self._isolate_failure(error, final_only)

    def _step(self, final_only: bool, only: frozenset[str] | None = None) -> list[RequestOutput]:
        """Schedule and issue a step; then finish the steps before it (async scheduling keeps the
        newest one running while the next is planned) or this one."""
        step = _IssuedStep(self.scheduler.schedule(only), time.perf_counter())
        self._inflight.append(step)  # before it is issued: a failure rolls it back
        self.worker.time_steps = self.step_log is not None or self.expansion is not None
        step.future = self.worker.execute_async(step.plan)
        keep = 1 if self.async_scheduling and only is None and not step.plan.is_empty else 0
        outputs = []
        while len(self._inflight) > keep:
            outputs += self._finish_step(final_only)
        if time.monotonic() - self._last_log >= LOG_STATS_INTERVAL_S and logger.isEnabledFor(logging.INFO):
            self._log_stats()
        return outputs

    def _finish_step(self, final_only: bool) -> list[RequestOutput]:
        """The oldest issued step's tokens to the scheduler and the outputs."""
        step = self._inflight[0]
        result = step.future.result() if step.future is not None else None  # may raise: it stays listed
        self._inflight.popleft()
        if result is None:
            raise RuntimeError("a step was listed but never issued")
        self._settle_transfers()
        if self.expansion is not None:
            self._observe_expansion(step)
        updated = self.scheduler.update_from_output(step.plan, result)
        outputs = self.output_processor.outputs(self._apply_tokens(updated, result.sampled), final_only)
        if self.step_log is not None and not step.plan.is_empty:
            self._record_step(step)
        return outputs

    def _observe_expansion(self, step: _IssuedStep) -> None:
        """Adaptive expansion: each decode step's period, from its start on the device to the next
        decode step's (CUDA events, read once complete: no sync; the host's clock on the CPU), goes
        to the controller, whose fraction the cache manager then follows. The period, not the
        step's own span: host work that far blocks add (and the device waits for) counts too."""
        assert self.expansion is not None
        plan, future = step.plan, step.future
        if plan.is_empty or plan.num_batched_tokens != len(plan.scheduled) or future is None:
            self._last_decode = None  # decode steps only: a prefill's time says nothing about the far share
            return
        far = sum(len(s.far_block_ids) for s in plan.scheduled)
        kv_bytes = sum(s.start_pos + 1 for s in plan.scheduled) * self.kv_spec.bytes_per_token
        if future.device_start is None:  # the CPU: the step's own time on the host
            self.kv_cache.far_fraction = self.expansion.observe(time.perf_counter() - step.issued, far, kv_bytes)
            return
        last, self._last_decode = self._last_decode, (future.device_start, far, kv_bytes, plan.transfers.step_id)
        if last is not None and last[3] + 1 == plan.transfers.step_id:
            self._timed_steps.append((last[0], future.device_start, last[1], last[2]))
        while self._timed_steps and self._timed_steps[0][1].query():
            start, next_start, far, kv_bytes = self._timed_steps.popleft()
            self.kv_cache.far_fraction = self.expansion.observe(start.elapsed_time(next_start) / 1e3, far, kv_bytes)

    def _abandon_inflight(self) -> list[str]:
        """After a failure: the issued steps whose tokens were not taken are undone (async
        scheduling advanced their requests when planning them) and will run again; returns
        their requests that are still unfinished."""
        suspects: list[str] = []
        for step in reversed(self._inflight):
            self.scheduler.rollback(step.plan)
            suspects += [item.request_id for item in step.plan.scheduled]
        self._inflight.clear()
        self.worker.forget_sampled()
        return [rid for rid in dict.fromkeys(reversed(suspects)) if rid in self.scheduler.requests]

    def _isolate_failure(self, error: Exception, final_only: bool) -> list[RequestOutput]:
        """Run the failed step's requests one at a time: the ones that fail alone are failed, the
        others advance as in any step. The failed step changed no request's progress (tokens are
        counted after the forward; async scheduling's advance is rolled back), so nobody's output
        differs from a run without the failure."""
        suspects = self._abandon_inflight()
        if not suspects:
            raise error  # not in a request's part of the step: the caller fails the batch
        logger.warning("kvtier: a step of %d requests failed (%s: %s); running them one at a time to find "
                       "the one that fails", len(suspects), type(error).__name__, error)
        for rid in suspects:
            self.kv_cache.forget_uncomputed(self.scheduler.requests[rid])
        self.scheduler.resend_block_tables(suspects)  # the runner may not have seen the step's diffs
        outputs = []
        for rid in suspects:
            if rid not in self.scheduler.requests:
                continue  # finished meanwhile (a sibling of the same request failed)
            try:
                outputs += self._step(final_only, only=frozenset({rid}))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                logger.error("kvtier: request %s failed inside an engine step and was ended", rid,
                             exc_info=True)
                self._abandon_inflight()
                self.kv_cache.forget_uncomputed(self.scheduler.requests[rid])
                request_id = self.output_processor.request_id_of(rid)
                self._fail(request_id, e)
                outputs += self.output_processor.outputs([request_id], final_only=False)
        return outputs

    def _fail(self, request_id: str, error: Exception) -> None:
        """End all of a request's samples with finish_reason "error"; their blocks are freed."""
        self.scheduler.finish_requests(self.output_processor.fail(request_id, error), RequestStatus.FINISHED_ERROR)

    def _settle_transfers(self, wait: bool = False) -> None:
        """Release what the completed steps' copies protected (wait: for all of them first)."""
        for step_id in self.worker.poll(wait):
            self.kv_cache.complete_transfers(step_id)

    def _log_stats(self) -> None:
        """vLLM-style periodic line: queue, KV usage and prefix hits per tier, bytes moved."""
        s, self._last_log = self.stats(), time.monotonic()
        queried = max(1, s["prefix_query_tokens_total"])
        line = (f"running {s['num_running']}, waiting {s['num_waiting']}, GPU KV {s['kv_usage_gpu']:.1%}, "
                f"prefix hits GPU {s['prefix_hit_tokens_gpu_total'] / queried:.1%}")
        if self.host_pool is not None:
            line += (f", CPU KV {s['kv_usage_cpu']:.1%}, "
                     f"prefix hits CPU {s['prefix_hit_tokens_cpu_total'] / queried:.1%}, "
                     f"to CPU {s['bytes_to_cpu_total'] / 2**30:.2f} GiB, "
                     f"to GPU {s['bytes_to_gpu_total'] / 2**30:.2f} GiB, "
                     f"demotions {s['num_demotions_total']}, swaps {s['num_swaps_out_total']}")
        logger.info("kvtier: %s", line)

    def _record_step(self, step: _IssuedStep) -> None:
        """Synchronous steps: the step's own work, waited for (a device-wide sync would also wait
        for the write-through copies that run beside later steps). Async: the time since the last
        step finished (host and device overlap, so that is the step's cost), with no sync."""
        if not self.async_scheduling and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        seconds = now - (max(step.issued, self._last_finished) if self.async_scheduling else step.issued)
        self._last_finished = now
        plan = step.plan
        seq_lens = [s.start_pos + len(s.token_ids) for s in plan.scheduled]
        num_decode = sum(len(s.token_ids) == 1 and s.start_pos >= s.num_prompt_tokens for s in plan.scheduled)
        moves = plan.transfers
        self.step_log.append(StepRecord(
            plan.num_batched_tokens, len(seq_lens), plan.num_batched_tokens == len(seq_lens), sum(seq_lens),
            seconds, time.time(), num_prefill_tokens=plan.num_batched_tokens - num_decode,
            num_decode_tokens=num_decode, num_blocks_loaded=moves.num_blocks(Tier.CPU, Tier.GPU),
            num_blocks_stored=moves.num_blocks(Tier.GPU, Tier.CPU), compiled_variants=num_compiled_variants(),
            num_far_blocks=sum(len(s.far_block_ids) for s in plan.scheduled),
            device_start=step.future.device_start if step.future else None,
            device_end=step.future.device_end if step.future else None))

    def _apply_tokens(self, updated: list[Request], sampled: dict[str, SampledToken]) -> list[str]:
        """Text and logprobs of the step's tokens; finishes what a stop string or a failure ended.
        Returns the request ids with news."""
        applied = self.output_processor.apply(updated, sampled)
        for sample_id, stop in applied.stops:
            self.scheduler.finish_requests([sample_id], RequestStatus.FINISHED_STOPPED, stop)
        for request_id, error in applied.failures:
            self._fail(request_id, error)
        return applied.touched

    # -- inspection -----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Block accounting of both tiers (waits for in-flight copies so that it is settled)."""
        self._settle_transfers(wait=True)
        self.kv_cache.check_integrity()

    def reset_prefix_cache(self) -> int:
        """Forget the GPU prefix cache's unreferenced blocks (vLLM's LLMEngine.reset_prefix_cache);
        returns how many. Waits for in-flight copies first: a write-through store protects its
        GPU block until the copy has read it, and a block still protected would stay cached.
        Safe while requests run (their blocks stay); the CPU tier keeps every block."""
        self._settle_transfers(wait=True)
        return self.kv_cache.reset_prefix_cache()

    def num_held_blocks(self) -> int:
        return self.kv_cache.num_held_blocks()

    def stats(self) -> dict[str, int | float]:
        """A snapshot for logs, /metrics and benchmarks. Keys ending in `_total` only grow."""
        kv, sched = self.kv_cache, self.scheduler
        out = {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
               "num_preemptions_total": sched.num_preemptions,
               "prefix_query_tokens_total": kv.prefix_queries}
        out.update(kv.tier_stats())
        out["kv_expansion_fraction"] = kv.far_fraction
        out.update(self.worker.stats())
        return out
