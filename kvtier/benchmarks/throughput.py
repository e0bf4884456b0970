"""`kvtier bench throughput`: offline throughput, decode step time against the memory roofline,
prefill MFU against the measured matmul rate, and optionally HF transformers on the same prompts.

Decode roofline per step = (weight bytes + K/V bytes the step's attention reads) / measured
device copy bandwidth; `roofline_fraction` = roofline / measured (1.0 is the limit).

The engine's own bound on the whole run: each step at the slower of its roofline (memory) and its
FLOPs at the measured matmul rate, summed; `e2e_roofline_fraction` = that sum / the elapsed time
(= output tokens/s over the bound's). `host_ms_per_step`: the median gap on the device between one
decode step's end and the next one's start (CUDA events, no sync): host time the GPU waited for;
`device_ms_per_step`: the median span of a decode step's forward and draw on the device.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
import time
from typing import Any

import torch

from kvtier.benchmarks.datasets import BenchRequest, random_requests
from kvtier.engine.llm_engine import StepRecord
from kvtier.entrypoints.llm import LLM
from kvtier.models.loader import hf_state_dict, weight_bytes
from kvtier.offload.hardware import matmul_flops, memory_bandwidth, synchronize
from kvtier.sampling_params import SamplingParams


@dataclasses.dataclass
class DeviceRates:
    mem_bw: float  # bytes/s, device copy (read + write)
    flops: float  # FLOP/s, dense matmul in the model dtype

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype) -> DeviceRates:
        return cls(memory_bandwidth(device), matmul_flops(device, dtype))


GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """What a step moves and computes on this model, from its record: the one place for the
    roofline and FLOP formulas of the benchmarks."""
    weight_bytes: int
    kv_bytes_per_token: int
    num_params: int
    attn_flops_per_query_key: int  # QK^T and PV over all layers and heads, 2 FLOPs per MAC

    @classmethod
    def of(cls, llm: LLM) -> StepCosts:
        model, cfg = llm.engine.runner.model, llm.engine.model_config
        return cls(weight_bytes(model), llm.engine.kv_spec.bytes_per_token, sum(p.numel() for p in model.parameters()),
                   4 * cfg.num_layers * cfg.num_heads * cfg.head_dim)

    def roofline_s(self, sum_seq_lens: float, rates: DeviceRates) -> float:
        """Weights plus the K/V the step's attention reads, at the device's copy bandwidth."""
        return (self.weight_bytes + sum_seq_lens * self.kv_bytes_per_token) / rates.mem_bw

    def flops(self, step: StepRecord) -> float:
        """Matmuls (2 per parameter per token) and causal attention (each token over about half
        its sequence)."""
        keys_per_query = step.sum_seq_lens / max(step.num_seqs, 1) / 2
        return (2 * self.num_params + self.attn_flops_per_query_key * keys_per_query) * step.num_tokens


def device_info(llm: LLM) -> dict[str, Any]:
    dev = llm.engine.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    cfg = llm.engine.model_config
    return {"device": name, "torch_version": torch.__version__, "model": llm.engine.model_name,
            "architecture": cfg.architecture, "dtype": str(llm.engine.dtype).replace("torch.", ""),
            "num_params": StepCosts.of(llm).num_params,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_requests(llm: LLM, reqs: list[BenchRequest], ignore_eos: bool = True,
                 sampling: SamplingParams = GREEDY) -> tuple[float, list, list[StepRecord]]:
    """Generate as `sampling` says (greedy by default) with each request's output length; returns
    (seconds, outputs, per-step records)."""
    engine = llm.engine
    engine.step_log = []
    params = [dataclasses.replace(sampling, max_tokens=r.output_len, ignore_eos=ignore_eos) for r in reqs]
    synchronize(llm.engine.device)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
    synchronize(llm.engine.device)
    seconds = time.perf_counter() - t0
    steps, engine.step_log = engine.step_log, None
    return seconds, outs, steps


def start_decoding(llm: LLM, batch: int, input_len: int, new_tokens: int, sampling: SamplingParams = GREEDY,
                   seed: int = 0) -> None:
    """Add `batch` random prompts of `input_len` tokens that generate `new_tokens` each, and step
    the engine until every prompt is computed (the profilers then time decode steps)."""
    engine = llm.engine
    params = dataclasses.replace(sampling, max_tokens=new_tokens, ignore_eos=True)
    for r in random_requests(batch, input_len, new_tokens, engine.model_config.vocab_size, seed):
        engine.add_request({"prompt_token_ids": r.prompt_token_ids}, params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()


def decode_stats(costs: StepCosts, steps: list[StepRecord], rates: DeviceRates) -> dict[str, Any]:
    """Median decode step at the largest batch seen, and its roofline."""
    decode = [s for s in steps if s.decode_only]
    if not decode:
        return {}
    full = max(s.num_seqs for s in decode)
    at_full = [s for s in decode if s.num_seqs == full][1:] or [s for s in decode if s.num_seqs == full]
    measured = statistics.median(s.seconds for s in at_full)
    mean_ctx = statistics.mean(s.sum_seq_lens for s in at_full)
    roofline = costs.roofline_s(mean_ctx, rates)
    return {"batch_size": full, "decode_step_ms": measured * 1e3, "roofline_step_ms": roofline * 1e3,
            "roofline_fraction": roofline / measured, "decode_steps_measured": len(at_full),
            "weight_gb": costs.weight_bytes / 1e9, "kv_gb_read_per_step": mean_ctx * costs.kv_bytes_per_token / 1e9}


def prefill_stats(costs: StepCosts, steps: list[StepRecord], rates: DeviceRates) -> dict[str, Any]:
    """Prefill tokens/s and MFU over steps that carry prompt tokens (matmuls + causal attention)."""
    prefill = [s for s in steps if not s.decode_only]
    if not prefill:
        return {}
    tokens = sum(s.num_tokens for s in prefill)
    seconds = sum(s.seconds for s in prefill)
    flops = sum(costs.flops(s) for s in prefill)
    return {"prefill_tokens": tokens, "prefill_s": seconds, "prefill_tok_s": tokens / seconds,
            "prefill_tflops": flops / seconds / 1e12, "prefill_mfu": flops / seconds / rates.flops}


def bound_stats(costs: StepCosts, seconds: float, steps: list[StepRecord], rates: DeviceRates) -> dict[str, Any]:
    """The engine's own bound on the run (each step at max(memory roofline, FLOPs at the matmul
    rate)) and the host time the device waited for between decode steps."""
    if not steps:
        return {}
    bound = sum(max(costs.roofline_s(s.sum_seq_lens, rates), costs.flops(s) / rates.flops) for s in steps)
    out = {"bound_s": bound, "e2e_roofline_fraction": bound / seconds}
    gaps = [a.device_end.elapsed_time(b.device_start) for a, b in zip(steps, steps[1:])
            if a.decode_only and b.decode_only and a.device_end is not None and b.device_start is not None]
    if gaps:
        out["host_ms_per_step"] = statistics.median(gaps)
    busy = [s.device_start.elapsed_time(s.device_end) for s in steps
            if s.decode_only and s.device_start is not None and s.device_end is not None]
    if busy:  # the forward and the draw of a decode step, on the device
        out["device_ms_per_step"] = statistics.median(busy)
    return out


def summarize(llm: LLM, reqs: list[BenchRequest], seconds: float, outs: list,
              steps: list[StepRecord], rates: DeviceRates) -> dict[str, Any]:
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(r.prompt_token_ids) for r in reqs)
    res = {"num_prompts": len(reqs), "input_len": statistics.mean(len(r.prompt_token_ids) for r in reqs),
           "output_len": statistics.mean(r.output_len for r in reqs), "elapsed_s": seconds,
           "requests_per_s": len(reqs) / seconds, "output_tok_s": num_out / seconds,
           "total_tok_s": (num_in + num_out) / seconds,
           "mem_bw_gb_s": rates.mem_bw / 1e9, "matmul_tflops": rates.flops / 1e12}
    costs = StepCosts.of(llm)
    res.update(decode_stats(costs, steps, rates))
    res.update(prefill_stats(costs, steps, rates))
    res.update(bound_stats(costs, seconds, steps, rates))
    if llm.engine.device.type == "cuda":
        res["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(llm.engine.device) / 1e9
    return res


def benchmark(llm: LLM, reqs: list[BenchRequest], rates: DeviceRates, seed: int = 0,
              ignore_eos: bool = True, sampling: SamplingParams = GREEDY) -> dict[str, Any]:
    """Warm up, run `reqs` once, and summarize with the device and model description."""
    run_requests(llm, warmup_requests(reqs, llm.engine.model_config.vocab_size, seed), sampling=sampling)
    seconds, outs, steps = run_requests(llm, reqs, ignore_eos, sampling)
    drawn = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
    return {**device_info(llm), **drawn, "async_scheduling": llm.engine.async_scheduling,
            **summarize(llm, reqs, seconds, outs, steps, rates)}


def warmup_requests(reqs: list[BenchRequest], vocab_size: int, seed: int) -> list[BenchRequest]:
    """The run's prompt lengths with other prompts and at most 4 new tokens: Triton compiles a
    kernel variant the first time it meets a new specialization, which must not land in the timed
    run, and other prompts keep prefix-cache hits out of it."""
    # seeds far from the run's own and from other warm-ups' (a reused prompt would hit the cache)
    return [random_requests(1, len(r.prompt_token_ids), min(r.output_len, 4), vocab_size,
                            (seed + 1) * 1_000_003 + i)[0] for i, r in enumerate(reqs)]


def compare_hf(llm: LLM, reqs: list[BenchRequest], batch_size: int, results: dict[str, Any]) -> None:
    """Add HF's throughput on the same prompts and the speed-up over it (frees kvtier's KV cache)."""
    results.update(hf_throughput(llm, reqs, batch_size))
    results["speedup_vs_hf"] = results["output_tok_s"] / results["hf_output_tok_s"]


def hf_throughput(llm: LLM, reqs: list[BenchRequest], batch_size: int) -> dict[str, Any]:
    """HF transformers `generate` (DynamicCache) on the same weights and prompts, in batches.

    Frees kvtier's KV cache first to give HF the memory: run it last."""
    llm.engine.worker.free_kv_cache()  # graphs, too: they hold the KV cache and their own memory pool
    gc.collect()
    if llm.engine.device.type == "cuda":
        torch.cuda.empty_cache()
    model = hf_model_sharing_weights(llm)
    dev = llm.engine.device
    num_out, t0 = 0, time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        out_len = max(r.output_len for r in chunk)
        ids = _left_pad([r.prompt_token_ids for r in chunk], dev)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        num_out += (out.shape[1] - ids["input_ids"].shape[1]) * len(chunk)
    synchronize(llm.engine.device)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return {"hf_elapsed_s": seconds, "hf_output_tok_s": num_out / seconds}


def _left_pad(prompts: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def hf_model_sharing_weights(llm: LLM):
    """An HF model whose parameters are kvtier's tensors (no copy): identical weights by construction."""
    import transformers
    cfg_dict = dict(llm.engine.model_config.hf_config_dict())
    cfg_dict.update(_nested_config(llm))
    model_type = cfg_dict.pop("model_type", None) or _MODEL_TYPES[llm.engine.model_config.architecture]
    hf_cfg = transformers.CONFIG_MAPPING[model_type](**cfg_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=llm.engine.dtype)
    state = hf_state_dict(llm.engine.runner.model)
    model.load_state_dict(state, strict=False, assign=True)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    _materialize_buffers(model, hf_cfg, llm.engine.device)
    return model.eval()


def _materialize_buffers(model, hf_cfg, device: torch.device) -> None:
    """Rebuild modules left with meta buffers (HF's rotary inv_freq) on the device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, type(module)(config=hf_cfg).to(device))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"HF buffers left uninitialized: {left}")


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "OPTForCausalLM": "opt"}


def _nested_config(llm: LLM) -> dict[str, Any]:
    scaling = llm.engine.model_config.rope_scaling_dict()
    return {"rope_scaling": scaling} if scaling else {}
