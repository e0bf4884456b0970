"""`kvtier bench expansion`: Pie's far fraction against the decode step, measured beside the cost model.

One engine, built with `--kv-expansion` at the largest fraction swept (that sizes the staging ring)
and the CPU tier large enough for the batch's KV. BATCH random prompts of INPUT_LEN tokens are
prefilled, then for each fraction f in increasing order (each point only adds far blocks: no loads
back) the running requests' oldest blocks go far until f of their full blocks are, and the median
decode step over STEPS steps is measured (CUDA events; the steps that still moved blocks far excluded).
Contexts grow while the sweep runs, so each point's reference is the step at f = 0 scaled by the
bytes a step reads (weights + KV, the roofline's numerator) at that point's context. Each point is
set beside `pipelined_step_seconds`: its reference plus the layer pipeline's wait for its far
blocks over the measured host link. The knee: the largest fraction whose step is within 3% of its
reference. Then the far blocks come back, and the adaptive controller (`--kv-expansion adaptive`'s)
runs from f = 0 for CONTROLLER_STEPS decode steps: `controller_fraction` is its median fraction
over the last third, `controller_slowdown` the median step there against the reference.

    kvtier bench expansion --model llama3-8b --load-format dummy --kv-offloading-size 24 \
        --kv-expansion 0.16 --batch 64 --input-len 2048 --output-json expansion.json --plot expansion.png
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from typing import Any

import torch

from kvtier.benchmarks.datasets import random_requests
from kvtier.benchmarks.plotting import new_figure
from kvtier.benchmarks.throughput import GREEDY, StepCosts, run_requests, start_decoding
from kvtier.engine.transfer_engine import _InFlight
from kvtier.entrypoints.llm import LLM
from kvtier.offload.expansion import pipelined_step_seconds
from kvtier.offload.hardware import host_link_bandwidth, synchronize

KNEE_SLOWDOWN = 0.03


@dataclasses.dataclass
class ExpansionBenchConfig:
    batch: int = 64
    input_len: int = 2048
    fractions: str = "0,0.01,0.02,0.04,0.08,0.16"
    sweep: bool = True
    steps: int = 20  # measured decode steps per fraction
    controller_steps: int = 150
    ring_load: str = "kernel"  # TransferEngine.ring_load
    ring_programs: int = 8  # the copy kernel's programs (ring_load "kernel")
    output_json: str | None = None
    plot: str | None = None

    def fraction_list(self) -> list[float]:
        values = sorted(float(f) for f in self.fractions.split(","))
        if not values or values[0] != 0.0 or values[-1] >= 1:
            raise ValueError(f"--fractions {self.fractions!r}: comma-separated, from 0 up to below 1, e.g. 0,0.02,0.08")
        return values


def _settle(llm: LLM, fraction: float, max_steps: int = 64) -> int:
    """Steps until the far share stops growing (blocks go far a step after their copy lands)."""
    kv = llm.engine.kv_cache
    kv.far_fraction = fraction
    last, steps = -1, 0
    while steps < max_steps and kv.num_far_blocks() != last:
        last = kv.num_far_blocks()
        for _ in range(3):
            llm.engine.step()
        steps += 3
    return steps


def _measure(llm: LLM, steps: int) -> tuple[float, int]:
    """Median decode step (device time between consecutive steps' starts) and the far blocks read."""
    engine = llm.engine
    engine.step_log = []
    for _ in range(steps + 1):
        engine.step()
    synchronize(engine.device)
    log, engine.step_log = engine.step_log, None
    starts = [r.device_start for r in log if r.device_start is not None]
    spans = [a.elapsed_time(b) / 1e3 for a, b in zip(starts, starts[1:])] if starts else [r.seconds for r in log]
    return statistics.median(spans), engine.kv_cache.num_far_blocks()


def run_sweep(llm: LLM, cfg: ExpansionBenchConfig) -> dict[str, Any]:
    engine = llm.engine
    fractions = cfg.fraction_list()
    if engine.kv_cache.max_far_blocks == 0:
        raise ValueError("build the engine with --kv-expansion set to the largest fraction swept (it sizes the ring)")
    engine.kv_cache.far_fraction = 0.0
    engine.worker.transfers.ring_load = cfg.ring_load
    engine.worker.transfers.ring_programs = cfg.ring_programs
    new_tokens = len(fractions) * (cfg.steps + 64) + cfg.controller_steps + 192
    start_decoding(llm, cfg.batch, cfg.input_len, new_tokens, GREEDY)
    link_dma = host_link_bandwidth(engine.device, 1 << 28)
    link = ring_load_rate(engine)  # what the load path itself moves, alone (the model's link)
    kv_bytes_per_token, layers = engine.kv_spec.bytes_per_token, engine.model_config.num_layers
    points = []
    for fraction in fractions:
        settle_steps = _settle(llm, fraction)
        seconds, far_blocks = _measure(llm, cfg.steps)
        context = sum(r.num_computed_tokens for r in engine.scheduler.running)
        full_blocks = sum(r.num_computed_tokens // engine.config.block_size for r in engine.scheduler.running)
        far_bytes = far_blocks * engine.config.block_size * kv_bytes_per_token
        points.append({"fraction": fraction, "far_blocks": far_blocks, "full_blocks": full_blocks,
                       "far_gb": far_bytes / 1e9, "kv_gb": context * kv_bytes_per_token / 1e9, "step_ms": seconds * 1e3,
                       "settle_steps": settle_steps})
    weights_gb = StepCosts.of(llm).weight_bytes / 1e9
    for p in points:  # f = 0's step at this point's context: the roofline's bytes scale it
        p["reference_ms"] = points[0]["step_ms"] * (weights_gb + p["kv_gb"]) / (weights_gb + points[0]["kv_gb"])
        p["predicted_ms"] = pipelined_step_seconds(p["reference_ms"] / 1e3, layers, p["far_gb"] * 1e9, link) * 1e3
        p["slowdown"] = p["step_ms"] / p["reference_ms"] - 1
        p["prediction_error"] = p["step_ms"] / p["predicted_ms"] - 1
    base = points[0]["step_ms"] / 1e3
    controller = _run_controller(llm, cfg, weights_gb, points[0], max(fractions))
    return {"feature": "expansion", "far_tier": "cpu", "device": _device_name(engine.device),
            "torch": torch.__version__, "model": engine.model_name, "batch": cfg.batch, "input_len": cfg.input_len,
            "link_gb_s": link / 1e9, "link_dma_gb_s": link_dma / 1e9, "ring_load": cfg.ring_load,
            "ring_programs": cfg.ring_programs, "points": points,
            "knee_fraction": max(p["fraction"] for p in points if p["slowdown"] <= KNEE_SLOWDOWN),
            "predicted_fraction": _predicted_knee(base, layers, points, link),
            **controller}


def _run_controller(llm: LLM, cfg: ExpansionBenchConfig, weights_gb: float, zero: dict[str, Any],
                    max_fraction: float) -> dict[str, Any]:
    """Every block back near, then the adaptive controller from f = 0 (as --kv-expansion adaptive)."""
    engine = llm.engine
    _settle(llm, 0.0)
    engine.start_adaptive_expansion(max_fraction)
    engine.step_log = []
    fractions = []
    for _ in range(cfg.controller_steps):
        engine.step()
        fractions.append(engine.kv_cache.far_fraction)
    synchronize(engine.device)
    log, engine.step_log = engine.step_log, None
    history, engine.expansion = engine.expansion.history, None
    tail = [r for r in log[-(len(log) // 3):] if r.device_start is not None]
    per_byte = zero["step_ms"] / (weights_gb + zero["kv_gb"])
    slowdowns = [a.device_start.elapsed_time(b.device_start) / (per_byte * (weights_gb + a.sum_seq_lens
                 * engine.kv_spec.bytes_per_token / 1e9)) - 1 for a, b in zip(tail, tail[1:])]
    return {"controller_fraction": statistics.median(fractions[-(len(fractions) // 3):]),
            "controller_slowdown": statistics.median(slowdowns) if slowdowns else None,
            "controller_trace": fractions, "controller_history": history}


def ring_load_rate(engine, num_blocks: int = 256, repeats: int = 5) -> float:
    """Bytes/s of the engine's ring loads alone: `num_blocks` scattered CPU blocks (every other one,
    so one run each, as far blocks of different requests are) into ring slots, every layer, the
    median of `repeats` (CUDA events). The host link's rate on a CPU-only machine."""
    transfers = engine.worker.transfers
    if not transfers.on_gpu:
        return host_link_bandwidth(engine.device, 1 << 24)
    n = min(num_blocks, transfers.ring.shape[1], transfers.num_cpu_blocks // 2)
    plan = transfers.plan_ring(tuple((2 * i, i) for i in range(n)))
    flight, seconds = _InFlight(-1, []), []
    for _ in range(repeats + 1):
        transfers.wait_for_compute()
        ends = [transfers.load_ring_layer(plan, layer, flight) for layer in range(transfers.num_layers)]
        ends[-1].synchronize()
        seconds.append(sum(start.elapsed_time(end) for _, start, end in flight.timed) / 1e3)
        flight.timed.clear()
    return n * transfers.block_bytes / statistics.median(seconds[1:])


def _predicted_knee(base: float, layers: int, points: list[dict[str, Any]], link: float) -> float:
    """The largest far fraction the pipeline model keeps within KNEE_SLOWDOWN of f = 0 (KV as measured)."""
    kv_bytes = max(p["kv_gb"] for p in points) * 1e9
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        slow = pipelined_step_seconds(base, layers, mid * kv_bytes, link) > base * (1 + KNEE_SLOWDOWN)
        lo, hi = (lo, mid) if slow else (mid, hi)
    return lo


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_points(result: dict[str, Any]) -> None:
    print(f"{'fraction':>9}{'far GB':>8}{'KV GB':>8}{'step ms':>9}{'reference':>10}{'predicted':>10}{'slowdown':>9}")
    for p in result["points"]:
        print(f"{p['fraction']:>9.3f}{p['far_gb']:>8.2f}{p['kv_gb']:>8.2f}{p['step_ms']:>9.2f}{p['reference_ms']:>10.2f}"
              f"{p['predicted_ms']:>10.2f}{p['slowdown']:>9.1%}")
    print(f"knee {result['knee_fraction']:.3f} (measured), {result['predicted_fraction']:.3f} (model); "
          f"link {result['link_gb_s']:.1f} GB/s")
    slowdown = result["controller_slowdown"]
    print(f"controller from 0: fraction {result['controller_fraction']:.4f}, slowdown "
          f"{'n/a' if slowdown is None else f'{slowdown:.1%}'}")


def plot_points(result: dict[str, Any], path: str) -> None:
    xs = [p["fraction"] for p in result["points"]]
    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(xs, [p["step_ms"] for p in result["points"]], "o-", label="measured")
    ax.plot(xs, [p["predicted_ms"] for p in result["points"]], "s--", label="pipeline model")
    ax.axvline(result["knee_fraction"], color="gray", linestyle=":", label="knee (measured)")
    ax.set_xlabel("far fraction of the KV")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"{result['model']}, batch {result['batch']} x {result['input_len']}, far tier {result['far_tier']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# -- capacity: a workload whose KV exceeds the GPU budget --------------------------------------------

CAPACITY_SETTINGS = {  # setting -> engine options over the user's
    "off": {"kv_offloading_size": 0.0, "kv_expansion": "off"},  # preemption recomputes
    "swap": {"kv_expansion": "off"},  # preemption swaps to the CPU tier
    "expansion": {},  # --kv-expansion as given (adaptive or a fraction), swap too
}


@dataclasses.dataclass
class CapacityConfig:
    prompts: int = 128
    input_len: int = 2048
    output_len: int = 512
    kv_over_budget: float = 1.25  # the workload's KV over the GPU budget
    settings: str = "off,swap,expansion"


def capacity_blocks(cfg: CapacityConfig, block_size: int) -> int:
    """GPU blocks that hold 1 / kv_over_budget of the workload's KV (every request's whole context)."""
    per_request = -(-(cfg.input_len + cfg.output_len) // block_size)
    return max(per_request, int(cfg.prompts * per_request / cfg.kv_over_budget))


def run_capacity(engine_kwargs: dict[str, Any], cfg: CapacityConfig) -> dict[str, Any]:
    """The same random requests on a fresh engine per setting, its GPU pool `capacity_blocks`:
    output tokens/s, preemptions, and the far share reached."""
    blocks = capacity_blocks(cfg, engine_kwargs.get("block_size") or 16)
    runs = {}
    for setting in cfg.settings.split(","):
        if setting not in CAPACITY_SETTINGS:
            raise ValueError(f"--capacity-settings: {setting!r} is not one of {tuple(CAPACITY_SETTINGS)}")
        llm = LLM(**{**engine_kwargs, "num_gpu_blocks_override": blocks, **CAPACITY_SETTINGS[setting]})
        reqs = random_requests(cfg.prompts, cfg.input_len, cfg.output_len, llm.engine.model_config.vocab_size)
        seconds, outs, steps = run_requests(llm, reqs)
        stats = llm.engine.stats()
        runs[setting] = {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
                         "seconds": seconds, "steps": len(steps), "num_preemptions": stats["num_preemptions_total"],
                         "num_swaps": stats["num_swaps_out_total"], "max_far_blocks": max(
                             (s.num_far_blocks for s in steps), default=0),
                         "kv_expansion_fraction": stats["kv_expansion_fraction"]}
        del llm
        gc.collect()
    return {"gpu_blocks": blocks, "prompts": cfg.prompts, "input_len": cfg.input_len, "output_len": cfg.output_len,
            "kv_over_budget": cfg.kv_over_budget, "settings": runs,
            "output_tok_s": {name: run["output_tok_s"] for name, run in runs.items()}}
