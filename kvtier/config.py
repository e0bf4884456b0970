"""EngineConfig: every engine option, with vLLM's names, validated once.

The same fields become CLI flags (`--gpu-memory-utilization` ...) and `LLM(...)` keyword
arguments; an unknown option is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_BYTES = 2 * GiB
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OFFLOAD_POLICIES = ("write-back", "write-through")
OFFLOADING_DTYPES = ("auto", "int8", "int4")  # the CPU tier's: auto = the GPU cache's dtype
# the GPU cache's (vLLM's --kv-cache-dtype): auto = the model's; fp8 = fp8_e4m3
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# --kv-expansion adaptive: the far share the controller may reach (sizes the staging ring: at Llama-3-8B's
# 32 layers, a ring of 2 layers' worth of far blocks costs ~2% of the GPU KV memory)
ADAPTIVE_MAX_FRACTION = 0.25
ATTENTION_BACKENDS = ("torch", "triton")


class ConfigError(ValueError):
    pass


def parse_bytes(value: int | float | str | None) -> int | None:
    """'4GiB', '512MiB', '2G', '1.5e9' or a number of bytes -> bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", value)
    if not m:
        raise ConfigError(f"cannot parse memory size {value!r}; use bytes or e.g. '4GiB', '512MiB'")
    scale = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)]
    base = 1024 if (m.group(3) or m.group(2)) else 1
    return int(float(m.group(1)) * base ** (scale if m.group(2) else 0))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or a config name with load_format=dummy
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | str | None = None  # bytes for the KV cache; overrides the utilization
    num_gpu_blocks_override: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    attention_backend: str | None = None  # "torch" or "triton"; default: triton on GPU
    # the GPU KV cache's format: "auto" (the model's dtype) or fp8 ("fp8" = "fp8_e4m3", "fp8_e5m2"),
    # vLLM's flag: K/V stored with scale 1.0 (saturating), converted to the model's dtype on load
    # by the attention kernels; half the bytes of bf16, so twice the blocks and half the KV reads
    kv_cache_dtype: str = "auto"
    kv_offloading_size: float = 0.0  # GiB of pinned CPU memory for the CPU KV tier; 0 = off
    # when GPU blocks are copied to the CPU tier; write-through measured faster on an H100 (a CPU
    # hit's TTFT 23.5 vs 34.6 ms for a 4096-token prefix: write-back stores evicted blocks on the
    # critical path of the request that evicts them), benchmarks/results/h100-2026-11-22-tier
    kv_offloading_policy: str = "write-through"
    # the CPU tier's format: "auto" (the GPU cache's dtype), or "int8" / "int4" blocks in KIVI's
    # format (kvtier/ops/kv_quant.py), quantized on the GPU before the DMA, dequantized after it:
    # the same GiB hold ~1.7x / ~2.9x the blocks, and the link carries that much less
    kv_offloading_dtype: str = "auto"
    # a quantized tier's V channels sharing a scale and zero (a power of two dividing head_dim);
    # None = kv_quant's DEFAULT_GROUP_SIZE (32, KIVI's), or the widest power of two dividing a narrower head_dim
    kv_offloading_group_size: int | None = None
    # torch's intra-op threads when the engine runs on the CPU; None = the cores this process may
    # use (default_cpu_threads). Fewer can be far faster beside other busy processes: threads that
    # wait for a core at every op's barrier stall the whole op.
    cpu_threads: int | None = None
    # schedule step N+1 while step N runs (sampled ids stay on the device); None = on with a GPU
    async_scheduling: bool | None = None
    # Pie: "off", "adaptive" (a controller sizes the far share online from measured decode steps),
    # or a fixed fraction in [0, 1] of each running request's full blocks kept only in the CPU tier (1.0:
    # all of them, FlexGen's regime; the block being written stays on the GPU)
    # and brought to the GPU layer by layer each step (experiments); needs the CPU tier and prefix caching
    kv_expansion: str = "off"
    # KVPR: "off"; "auto" (per step, the planner sends the layer inputs of the first l tokens of each
    # CPU-resident context it loads and recomputes their K/V on the GPU while the rest of the K/V
    # crosses, l from measured link and GEMM rates; 0 where it does not pay, as for GQA models); or a
    # fixed FRACTION in [0, 1] of those tokens (experiments). Needs the CPU tier.
    kvpr: str = "off"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_cache_memory", parse_bytes(self.kv_cache_memory))
        self._validate()

    def _validate(self) -> None:
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("dtype", self.dtype, DTYPES)
        if self.attention_backend is not None:
            _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"invalid device {self.device!r}; choose one of {DEVICES} or 'cuda:N'")
        _positive("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two (e.g. 16)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            _positive(name, getattr(self, name))
        if not isinstance(self.kv_offloading_size, (int, float)) or self.kv_offloading_size < 0:
            raise ConfigError(f"kv_offloading_size={self.kv_offloading_size!r} must be a number of GiB >= 0 "
                              "(0 turns the CPU tier off)")
        _choice("kv_offloading_policy", self.kv_offloading_policy, OFFLOAD_POLICIES)
        self._validate_expansion()
        self._validate_kvpr()
        self._validate_offloading_dtype()
        self._validate_cache_dtype()
        for name in ("kv_cache_memory", "num_gpu_blocks_override", "max_model_len", "cpu_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))

    @property
    def kv_expansion_fraction(self) -> float:
        """The largest far share of --kv-expansion (0.0 when off; adaptive: the controller's cap)."""
        if self.kv_expansion == "adaptive":
            return ADAPTIVE_MAX_FRACTION
        return 0.0 if self.kv_expansion == "off" else float(self.kv_expansion)

    def _validate_expansion(self) -> None:
        if self.kv_expansion == "off":
            return
        if self.kv_expansion == "adaptive":
            self._expansion_needs_tier()
            return
        if not 0 <= _fraction(self.kv_expansion) <= 1:
            raise ConfigError(f"invalid kv_expansion {self.kv_expansion!r}; give 'off', 'adaptive' or a far "
                              "fraction in [0, 1], e.g. 0.08")
        self._expansion_needs_tier()

    @property
    def kvpr_fraction(self) -> float | None:
        """--kvpr's fixed recomputed share; None when the planner chooses ("auto") or KVPR is off."""
        return None if self.kvpr in ("off", "auto") else float(self.kvpr)

    def _validate_kvpr(self) -> None:
        if self.kvpr == "off":
            return
        if self.kvpr != "auto" and not 0 <= _fraction(self.kvpr) <= 1:
            raise ConfigError(f"invalid kvpr {self.kvpr!r}; give 'off', 'auto' or a recomputed fraction "
                              "in [0, 1], e.g. 0.5")
        if self.kv_offloading_size <= 0:
            raise ConfigError("kvpr keeps layer inputs beside the KV blocks of the CPU tier: set "
                              "--kv-offloading-size (GiB)")

    def _validate_cache_dtype(self) -> None:
        _choice("kv_cache_dtype", self.kv_cache_dtype, tuple(KV_CACHE_DTYPES))
        if self.kv_cache_dtype != "auto" and self.kvpr != "off":
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype} does not work with kvpr {self.kvpr!r} yet "
                              "(KVPR keeps the layer inputs it recomputes from in the cache's dtype): use "
                              "--kv-cache-dtype auto, or --kvpr off")

    def _validate_offloading_dtype(self) -> None:
        _choice("kv_offloading_dtype", self.kv_offloading_dtype, OFFLOADING_DTYPES)
        group, quantized = self.kv_offloading_group_size, self.kv_offloading_dtype != "auto"
        if group is not None and (not isinstance(group, int) or group < 1 or group & (group - 1)):
            raise ConfigError(f"kv_offloading_group_size={group!r} must be a power of two (e.g. 32) that "
                              "divides the model's head_dim")
        if group is not None and not quantized:
            raise ConfigError("kv_offloading_group_size sets a quantized CPU tier's groups: also set "
                              "--kv-offloading-dtype int8 or int4, or drop it")
        if not quantized:
            return
        if self.kv_offloading_size <= 0:
            raise ConfigError(f"kv_offloading_dtype {self.kv_offloading_dtype} quantizes the CPU tier: set "
                              "--kv-offloading-size (GiB)")
        # not yet: both read the CPU tier's blocks in the GPU's dtype, as raw rows
        for name, value, why in (("kv_expansion", self.kv_expansion, "Pie's staging ring loads raw K/V"),
                                 ("kvpr", self.kvpr, "KVPR keeps layer inputs beside raw K/V")):
            if value != "off":
                raise ConfigError(f"kv_offloading_dtype {self.kv_offloading_dtype} does not work with "
                                  f"{name} {value!r} yet ({why} blocks): use --kv-offloading-dtype auto, or "
                                  f"--{name.replace('_', '-')} off")

    def _expansion_needs_tier(self) -> None:
        if self.kv_offloading_size <= 0 or not self.enable_prefix_caching:
            raise ConfigError("kv_expansion keeps far blocks in the CPU tier and finds their copies by "
                              "prefix hash: set --kv-offloading-size (GiB) and keep --enable-prefix-caching")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**kwargs)


def default_cpu_threads() -> int:
    """OMP_NUM_THREADS when set to a number (as torch itself honours it), else the cores this
    process may run on: its affinity mask (taskset, a container's cpuset), not the machine's
    count, since more threads than cores only queue for them."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {name} {value!r}; choose one of {choices}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _fraction(value: str) -> float:
    """A fraction flag's number; -1.0 (out of every range) when it is none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return -1.0
