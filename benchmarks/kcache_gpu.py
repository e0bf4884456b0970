"""KCache decode attention at one Llama-3-8B layer's shape on one GPU: K in GPU memory, V in pinned
CPU memory, only the attended V rows cross the link; against exact paged attention with V on the GPU.

    python benchmarks/kcache_gpu.py --out benchmarks/results/kcache_h200.json
    python benchmarks/kcache_gpu.py --smoke --out /tmp/kcache.json   # tiny, on the CPU, Triton interpreted

Shape: batch 16, 32 query heads, 8 KV heads, head_dim 128, bf16, block size 16, sink 4, window 64;
contexts of 16K and 32K tokens (every sequence full), fresh random inputs (never zeros), scattered
block tables. Per context: exact paged attention (kvtier/ops/triton_attention.paged_decode_attention,
K and V on the GPU) and the pinned host-to-device copy rate, measured in the same run. Then per mode
(row, page) and top_n (256, 1024, 2048):

    kcache_ms        kcache_decode: Triton scores over K, torch top-k, the V gather from pinned memory, softmax·V
    select_ms        kcache_select alone (scores + top-k)
    gather_ms        gather_v_rows alone, reading the pinned V store through UVA
    v_on_gpu_ms      kcache_decode with the V store on the GPU: the same operation without the link
    v_bytes          V bytes one step fetches (kcache_link_bytes)
    gather_GBps      v_bytes / gather_ms: the link rate of the gather (compare with the copy rate)
    effective_GBps   v_bytes / kcache_ms
    rel_err_vs_exact relative Frobenius error against exact attention: random q and K give flat
                     attention, the worst case for top-n, so this is no measure of a model's quality
    ref_rel_err      against kcache_decode_ref (pure torch) at top_n 256: the kernels' correctness

Times are CUDA events, the median of --iters runs after --warmup (kvtier.offload.hardware.time_ms).
Writes JSON to --out and prints a table; exits 1 if a check against the reference fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtier.benchmarks.gpu_script import script_device  # noqa: E402
from kvtier.offload.hardware import host_link_bandwidth, time_ms  # noqa: E402
from kvtier.ops.attention import AttentionMetadata  # noqa: E402
from kvtier.ops.kcache import (  # noqa: E402
    KCacheSettings,
    gather_v_rows,
    kcache_decode,
    kcache_decode_ref,
    kcache_link_bytes,
    kcache_select,
)

REF_TOL = 1e-2  # bf16 outputs; a near-tie may also pick another row (see check_against_reference)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    sink: int = 4
    window: int = 64
    contexts: tuple[int, ...] = (16384, 32768)
    top_ns: tuple[int, ...] = (256, 1024, 2048)
    dtype: torch.dtype = torch.bfloat16


FULL = Shape()
SMOKE = Shape(batch=2, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, sink=2, window=8,
              contexts=(96, 160), top_ns=(8, 32), dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class Timer:
    device: torch.device
    iters: int
    warmup: int

    def ms(self, fn) -> float:
        """Median ms of fn() (CUDA events after warm-up; see kvtier.offload.hardware.time_ms)."""
        return time_ms(fn, self.device, self.iters, self.warmup)


@dataclasses.dataclass
class Layer:
    """One layer's decode step: q (B, Hq, D); K cache and V on the GPU and V in pinned memory, each
    (num_blocks, block_size, Hkv, D); block tables (B, max_blocks) int32; every seq_len = context."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_gpu: torch.Tensor
    v_pinned: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    context: int
    scale: float

    def args(self, v_store: torch.Tensor) -> tuple:
        return self.q, self.k_cache, v_store, self.block_tables, self.seq_lens, self.scale


def make_layer(shape: Shape, context: int, device: torch.device, seed: int) -> Layer:
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-context // shape.block_size)
    num_blocks = shape.batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    v_gpu = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    v_pinned = torch.empty(cache_shape, dtype=shape.dtype, pin_memory=device.type == "cuda").copy_(v_gpu)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(shape.batch, -1).to(torch.int32)
    q = torch.randn(shape.batch, shape.num_heads, shape.head_dim, generator=gen, device=device).to(shape.dtype)
    seq_lens = torch.full((shape.batch,), context, dtype=torch.int32, device=device)
    return Layer(q, k_cache, v_gpu, v_pinned, tables, seq_lens, context, shape.head_dim ** -0.5)


def exact_attention(layer: Layer, timer: Timer) -> tuple[torch.Tensor, float]:
    """Output and time of exact paged decode attention with K and V on the GPU."""
    from kvtier.ops.triton_attention import paged_decode_attention  # imports Triton: after script_device
    batch, device = layer.q.shape[0], layer.q.device
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=device),
        block_tables=layer.block_tables, seq_lens=layer.seq_lens,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        max_query_len=1, max_seq_len=layer.context, seq_lens_list=[layer.context] * batch,
        query_lens_list=[1] * batch)

    def run() -> torch.Tensor:
        return paged_decode_attention(layer.q, layer.k_cache, layer.v_gpu, meta, layer.scale)
    return run(), timer.ms(run)


def run_case(layer: Layer, settings: KCacheSettings, exact: torch.Tensor, timer: Timer) -> dict:
    context = layer.context

    def decode(v_store: torch.Tensor) -> torch.Tensor:
        return kcache_decode(*layer.args(v_store), settings, max_seq_len=context)

    select_args = (layer.q, layer.k_cache, layer.block_tables, layer.seq_lens, layer.scale, settings)
    positions = kcache_select(*select_args, max_seq_len=context)  # (B, Hkv, n)
    v_bytes = kcache_link_bytes(positions, layer.v_pinned)
    row = {"mode": settings.mode, "top_n": settings.top_n, "context": context, "v_bytes": v_bytes,
           "kcache_ms": timer.ms(lambda: decode(layer.v_pinned)),
           "select_ms": timer.ms(lambda: kcache_select(*select_args, max_seq_len=context)),
           "gather_ms": timer.ms(lambda: gather_v_rows(layer.v_pinned, layer.block_tables, positions)),
           "v_on_gpu_ms": timer.ms(lambda: decode(layer.v_gpu)),
           "rel_err_vs_exact": rel_error(decode(layer.v_pinned), exact)}
    row["gather_GBps"] = v_bytes / row["gather_ms"] / 1e6
    row["effective_GBps"] = v_bytes / row["kcache_ms"] / 1e6
    return row


def check_against_reference(layer: Layer, settings: KCacheSettings) -> float:
    """Relative error of the fast path against kcache_decode_ref (V read by index from the pinned
    store). bf16 scores from the kernel and fp32 ones from the reference may order a near-tie
    differently and pick another row of nearly the same weight: a small error, not a mismatch."""
    fast = kcache_decode(*layer.args(layer.v_pinned), settings, max_seq_len=layer.context)
    return rel_error(fast, kcache_decode_ref(*layer.args(layer.v_pinned), settings))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def run_context(shape: Shape, context: int, timer: Timer, seed: int) -> dict:
    layer = make_layer(shape, context, timer.device, seed)
    exact, exact_ms = exact_attention(layer, timer)
    cases, ref_errors = [], {}
    for mode in ("row", "page"):
        for top_n in shape.top_ns:
            settings = KCacheSettings(top_n=top_n, sink=shape.sink, window=shape.window, mode=mode)
            cases.append(run_case(layer, settings, exact, timer) | {"exact_ms": exact_ms})
        ref_errors[mode] = check_against_reference(layer, dataclasses.replace(settings, top_n=shape.top_ns[0]))
    return {"context": context, "exact_ms": exact_ms, "ref_rel_err": ref_errors, "cases": cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = script_device(args.smoke, "--smoke")
    timer = Timer(device, *((2, 1) if args.smoke else (args.iters, args.warmup)))
    shape = SMOKE if args.smoke else FULL
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "seed": args.seed,
              "shape": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in dataclasses.asdict(shape).items()},
              "pinned_h2d_GBps": host_link_bandwidth(device, 1 << 28) / 1e9,
              "contexts": [run_context(shape, context, timer, args.seed) for context in shape.contexts]}
    print_table(result)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    ok = all(err <= REF_TOL for c in result["contexts"] for err in c["ref_rel_err"].values())
    return 0 if ok else 1


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['torch']}  pinned host->device copy {result['pinned_h2d_GBps']:.1f} GB/s")
    print(f"{'context':>7} {'mode':<5} {'top_n':>5} {'exact ms':>9} {'kcache ms':>9} {'select':>7} {'gather':>7} "
          f"{'V on GPU':>8} {'V MB':>7} {'gather GB/s':>11} {'eff GB/s':>8} {'err':>7}")
    for c in result["contexts"]:
        for r in c["cases"]:
            print(f"{r['context']:>7} {r['mode']:<5} {r['top_n']:>5} {r['exact_ms']:9.3f} {r['kcache_ms']:9.3f} "
                  f"{r['select_ms']:7.3f} {r['gather_ms']:7.3f} {r['v_on_gpu_ms']:8.3f} {r['v_bytes'] / 1e6:7.1f} "
                  f"{r['gather_GBps']:11.1f} {r['effective_GBps']:8.1f} {r['rel_err_vs_exact']:7.3f}")
        print(f"{c['context']:>7} vs kcache_decode_ref: " +
              ", ".join(f"{mode} {err:.1e}" for mode, err in c["ref_rel_err"].items()))


if __name__ == "__main__":
    sys.exit(main())
