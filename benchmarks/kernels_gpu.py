"""Paged-attention Triton kernels at Llama-3-8B sizes on one GPU: correctness, time, roofline ratios.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_h100
    python benchmarks/kernels_gpu.py --out /tmp/k --sweep-splits      # also time every split count
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --out /tmp/k --smoke   # tiny, on the CPU

Per case: fresh random bf16 inputs (seeded from the clock unless --seed), the kernel checked
against the fp32 pure-torch reference (relative Frobenius error <= 1e-2; write_kv bit-exact), then
timed with CUDA events after warm-up, median of --iters runs, L2 flushed before each run. Attention
is timed eagerly and as a CUDA-graph replay (capture also proves the launchers sync-free).
Decode reports KV bytes read / time against a device-to-device copy measured in the same run;
prefill reports TFLOP/s (causal pairs only) against a bf16 matmul measured in the same run.
Writes kernels_gpu.json to --out and prints a table last; exits 1 if a check failed.
Written for torch >= 2.5 and Triton >= 3.0 (run on torch 2.11, Triton 3.6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtier.benchmarks.gpu_script import script_device  # noqa: E402
from kvtier.offload.hardware import matmul_flops, memory_bandwidth, time_ms  # noqa: E402
from kvtier.ops.attention import AttentionMetadata, paged_attention_ref, write_kv_ref  # noqa: E402

REL_TOL = 1e-2
L2_FLUSH_BYTES = 256 << 20  # well above an H100's 50 MB L2


@dataclasses.dataclass(frozen=True)
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "decode" | "prefill"
    batch: int
    context: int  # cached tokens before this step
    new: int  # tokens of this step per sequence (1 for decode)


FULL_CASES = [
    Case("decode_b64_ctx2048", "decode", 64, 2047, 1),
    Case("decode_b8_ctx512", "decode", 8, 511, 1),
    Case("prefill_b8_new2048", "prefill", 8, 0, 2048),
    Case("prefill_b8_prefix1536_new512", "prefill", 8, 1536, 512),
]
SMOKE_CASES = [
    Case("decode_b3_ctx40", "decode", 3, 39, 1),
    Case("decode_b2_ctx20", "decode", 2, 19, 1),
    Case("prefill_b2_new24", "prefill", 2, 0, 24),
    Case("prefill_b2_prefix16_new8", "prefill", 2, 16, 8),
]
SMOKE_SHAPE = Shape(num_heads=6, num_kv_heads=2, head_dim=32, block_size=16)


# ------------------------------------------------------------------------------------ inputs

@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # (T, Hq, D)
    k: torch.Tensor  # (T, Hkv, D) this step's keys
    v: torch.Tensor
    k_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_inputs(case: Case, shape: Shape, device: torch.device, gen: torch.Generator) -> Inputs:
    """Random caches (garbage in unused slots too), a shuffled block table, this step's K/V."""
    bs, seq_len = shape.block_size, case.context + case.new
    blocks_per_seq = -(-seq_len // bs)
    num_blocks = case.batch * blocks_per_seq + 8
    ids = torch.randperm(num_blocks, generator=gen, device=device)
    tables = ids[:case.batch * blocks_per_seq].view(case.batch, blocks_per_seq).to(torch.int32)
    pos = torch.arange(case.context, seq_len, device=device)  # (new,) positions of this step
    slots = tables[:, pos // bs].long() * bs + pos % bs  # (B, new)
    kv_shape = (num_blocks, bs, shape.num_kv_heads, shape.head_dim)
    rand = dict(generator=gen, device=device, dtype=torch.bfloat16)
    num_tokens = case.batch * case.new
    meta = AttentionMetadata(
        slot_mapping=slots.reshape(-1),
        block_tables=tables,
        seq_lens=torch.full((case.batch,), seq_len, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, num_tokens + 1, case.new, dtype=torch.int32, device=device),
        max_query_len=case.new, max_seq_len=seq_len,
        seq_lens_list=[seq_len] * case.batch, query_lens_list=[case.new] * case.batch)
    return Inputs(q=torch.randn(num_tokens, shape.num_heads, shape.head_dim, **rand),
                  k=torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, **rand),
                  v=torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, **rand),
                  k_cache=torch.randn(kv_shape, **rand), v_cache=torch.randn(kv_shape, **rand),
                  meta=meta)


# ------------------------------------------------------------------------------------ timing

class Timer:
    """Median of `iters` runs after `warmup`, issued back to back, with an L2 flush before each."""

    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        flush_bytes = L2_FLUSH_BYTES if device.type == "cuda" else 1 << 20
        self.flush_buf = torch.empty(flush_bytes, dtype=torch.uint8, device=device)

    def median_ms(self, fn) -> float:
        return time_ms(fn, self.device, self.iters, self.warmup, setup=self.flush_buf.zero_, back_to_back=True)


def graph_of(fn, device: torch.device):
    """(replay, output) of fn captured in a CUDA graph, or None off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def measure_hardware(device: torch.device, smoke: bool) -> dict:
    """The denominators, measured the same way as the engine benchmarks measure them."""
    n = (1 << 20) if smoke else (1 << 30)  # bytes per copy buffer
    m = 64 if smoke else 8192
    return {"copy_bytes": n, "copy_read_write_GBps": memory_bandwidth(device, n) / 1e9,
            "matmul_n": m, "matmul_bf16_tflops": matmul_flops(device, torch.bfloat16, m) / 1e12}


# ------------------------------------------------------------------------------------ cases

def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def reference(x: Inputs, scale: float) -> torch.Tensor:
    return paged_attention_ref(x.q.float(), x.k_cache.float(), x.v_cache.float(), x.meta, scale)


def run_write_kv(ta, x: Inputs, case: Case, timer: Timer) -> dict:
    k_ref, v_ref = x.k_cache.clone(), x.v_cache.clone()
    write_kv_ref(x.k, x.v, k_ref, v_ref, x.meta.slot_mapping)
    ta.write_kv(x.k, x.v, x.k_cache, x.v_cache, x.meta.slot_mapping)
    exact = torch.equal(x.k_cache, k_ref) and torch.equal(x.v_cache, v_ref)
    del k_ref, v_ref
    ms = timer.median_ms(lambda: ta.write_kv(x.k, x.v, x.k_cache, x.v_cache, x.meta.slot_mapping))
    moved = 2 * 2 * x.k.numel() * x.k.element_size()  # K and V, read once and written once
    return {"name": f"write_kv_{case.name}", "kernel": "write_kv", "tokens": x.k.shape[0],
            "ok": exact, "check": "bit-exact vs write_kv_ref", "eager_ms": ms,
            "GBps": moved / ms / 1e6}


def run_attention(ta, x: Inputs, case: Case, shape: Shape, timer: Timer, hw: dict,
                  device: torch.device) -> dict:
    scale = shape.head_dim ** -0.5

    def fn() -> torch.Tensor:
        return ta.paged_attention(x.q, x.k_cache, x.v_cache, x.meta, scale)

    err = rel_error(fn(), reference(x, scale))
    row = {"name": case.name, "kernel": f"paged_{case.kind}_attention", "batch": case.batch,
           "context": case.context, "new_tokens": case.new, "rel_err": err, "ok": err <= REL_TOL,
           "eager_ms": timer.median_ms(fn)}
    graph = graph_of(fn, device)
    if graph is not None:
        replay, out = graph
        replay()
        row["graph_matches_eager"] = torch.equal(out, fn())
        row["ok"] = row["ok"] and row["graph_matches_eager"]
        row["graph_ms"] = timer.median_ms(replay)
    ms = row.get("graph_ms", row["eager_ms"])
    if case.kind == "decode":
        num_kv_heads = shape.num_kv_heads
        row["num_splits"] = ta.num_decode_splits(case.batch, num_kv_heads, x.meta.max_seq_len,
                                                 ta._num_sms(device))
        row["kv_bytes"] = 2 * case.batch * x.meta.max_seq_len * num_kv_heads * shape.head_dim * 2
        row["GBps"] = row["kv_bytes"] / ms / 1e6
        row["ratio_to_copy_bw"] = row["GBps"] / hw["copy_read_write_GBps"]
    else:
        pairs = case.batch * sum(case.context + j + 1 for j in range(case.new))  # causal (q, k)
        row["flops"] = 4 * pairs * shape.num_heads * shape.head_dim  # QK^T and PV
        row["tflops"] = row["flops"] / ms / 1e9
        row["ratio_to_matmul"] = row["tflops"] / hw["matmul_bf16_tflops"]
    return row


def sweep_splits(ta, x: Inputs, case: Case, shape: Shape, timer: Timer) -> dict:
    """Decode time per forced split count (eager; the L2 flush hides launch latency)."""
    scale, times = shape.head_dim ** -0.5, {}
    for n in (1, 2, 4, 8, 16, 32, 64):
        if n > 1 and -(-x.meta.max_seq_len // n) < 16:
            break
        times[str(n)] = timer.median_ms(lambda: ta.paged_decode_attention(
            x.q, x.k_cache, x.v_cache, x.meta, scale, num_splits=n))  # noqa: B023 (called at once)
    return times


def sdpa_baseline(case: Case, shape: Shape, timer: Timer, device: torch.device) -> dict:
    """torch SDPA (flash backend) on contiguous K/V for a prefill without prefix, for scale."""
    if case.kind != "prefill" or case.context or device.type != "cuda":
        return {}
    rand = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(case.batch, shape.num_heads, case.new, shape.head_dim, **rand)
    kv = torch.randn(2, case.batch, shape.num_kv_heads, case.new, shape.head_dim, **rand)
    try:
        ms = timer.median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kv[0], kv[1], is_causal=True, enable_gqa=True))
    except (RuntimeError, TypeError) as e:  # older torch without enable_gqa
        return {"sdpa_error": repr(e)}
    return {"sdpa_contiguous_ms": ms}


# ------------------------------------------------------------------------------------ main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=pathlib.Path, help="directory for kernels_gpu.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU interpreter")
    p.add_argument("--sweep-splits", action="store_true", help="time decode at every split count")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (>= 20)")
    p.add_argument("--seed", type=int, default=None, help="default: from the clock")
    args = p.parse_args()
    if args.smoke:
        args.warmup, args.iters = 1, 3
    elif args.iters < 20:
        p.error("--iters must be >= 20")
    return args


def main() -> int:
    args = parse_args()
    device = script_device(args.smoke, "--smoke")  # before triton is imported below
    import triton

    import kvtier.ops.triton_attention as ta

    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 31)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape, cases = (SMOKE_SHAPE, SMOKE_CASES) if args.smoke else (Shape(), FULL_CASES)
    timer = Timer(device, args.warmup, args.iters)
    hw = measure_hardware(device, args.smoke)
    rows, sweeps = [], {}
    for case in cases:
        x = make_inputs(case, shape, device, gen)
        rows.append(run_write_kv(ta, x, case, timer))
        row = run_attention(ta, x, case, shape, timer, hw, device)
        row.update(sdpa_baseline(case, shape, timer, device))
        rows.append(row)
        if args.sweep_splits and case.kind == "decode":
            sweeps[case.name] = sweep_splits(ta, x, case, shape, timer)
        del x
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "num_sms": ta._num_sms(device), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "seed": seed, "smoke": args.smoke, "dtype": "bfloat16",
        "shape": dataclasses.asdict(shape), "warmup": args.warmup, "iters": args.iters,
        "l2_flush_bytes": timer.flush_buf.numel(), "hardware": hw, "cases": rows,
        "split_sweep_ms": sweeps, "tuning": tuning_constants(ta)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_gpu.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0 if all(r["ok"] for r in rows) else 1


def tuning_constants(ta) -> dict:
    return {name: getattr(ta, name) for name in dir(ta) if name.startswith(("DECODE_", "PREFILL_"))}


def print_table(result: dict) -> None:
    hw = result["hardware"]
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  seed {result['seed']}")
    print(f"copy (read+write) {hw['copy_read_write_GBps']:.0f} GB/s   "
          f"bf16 matmul {hw['matmul_bf16_tflops']:.0f} TFLOP/s")
    print(f"{'case':<40} {'ok':<4} {'err':>8} {'eager ms':>9} {'graph ms':>9}  rate")
    for r in result["cases"]:
        if "GBps" in r and "ratio_to_copy_bw" in r:
            rate = f"{r['GBps']:.0f} GB/s = {r['ratio_to_copy_bw']:.0%} of copy, {r['num_splits']} splits"
        elif "tflops" in r:
            rate = f"{r['tflops']:.1f} TFLOP/s = {r['ratio_to_matmul']:.0%} of matmul"
            if "sdpa_contiguous_ms" in r:
                rate += f", SDPA contiguous {r['sdpa_contiguous_ms']:.3f} ms"
        else:
            rate = f"{r['GBps']:.0f} GB/s moved"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "exact"
        graph = f"{r['graph_ms']:9.3f}" if "graph_ms" in r else f"{'-':>9}"
        print(f"{r['name']:<40} {'yes' if r['ok'] else 'NO':<4} {err:>8} {r['eager_ms']:9.3f} "
              f"{graph}  {rate}")
    for name, times in result["split_sweep_ms"].items():
        print(f"splits {name}: " + "  ".join(f"{n}:{ms:.3f}" for n, ms in times.items()))


if __name__ == "__main__":
    sys.exit(main())
