"""int8 / int4 KV block quantization (kvtier.ops.kv_quant) at Llama-3-8B size on one GPU.

    python3 benchmarks/kv_quant_gpu.py --out $OUT/kv_quant.json
    python3 benchmarks/kv_quant_gpu.py --out /tmp/kv_quant.json --dry-run   # tiny; CPU (interpreter) or GPU

The GPU cache as the engine keeps it, layer-major (L, 2, Ng, bs, H, D) bf16, random normal (seeded
from the clock unless --seed), viewed as block rows. Each case quantizes 256 scattered blocks of it
(512 MiB of bf16: the leg before a store's DMA to pinned memory) and dequantizes them into 256
other scattered blocks (the leg after a load's DMA), and both back to back (round trip).
Cases: int8 and int4 x V group sizes 32, 64, 128 (K groups: the whole 16-token block).

Before timing, each case is checked on --check-blocks of its blocks: the kernel against the torch
reference bit for bit (payload, scales, zeros, dequantized values), and the round trip's error
against the original (max |error| / the group's half step must stay <= 1 + 1e-3: the stored
fp16 scale is within 2^-11 of the step).
Timed with CUDA events after warm-up (kvtier.offload.hardware.time_ms, back to back), medians of
--iters runs; GB/s = bf16 bytes of the blocks / time, GB = 1e9 bytes; for scale, the device's
copy rate (read + write) measured in the same run.
Writes the JSON to --out, prints a table last; exits 1 if a check failed.
Written for torch >= 2.4 and Triton >= 3.0 (no GPU was at hand when it was written: never run
at full size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtier.benchmarks.gpu_script import script_device  # noqa: E402
from kvtier.offload.hardware import memory_bandwidth, time_ms  # noqa: E402
from kvtier.ops import kv_quant  # noqa: E402  (imports no Triton until a kernel launches)

DTYPE = torch.bfloat16
BITS = (8, 4)


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    num_gpu_blocks: int = 1024  # 2 GiB
    num_moved_blocks: int = 256  # per call: 512 MiB of bf16
    group_sizes: tuple[int, ...] = (32, 64, 128)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * DTYPE.itemsize


DRY_SHAPE = Shape(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, num_gpu_blocks=12,
                  num_moved_blocks=4, group_sizes=(4, 8, 16))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="the JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on the CPU (interpreter)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; dry run 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls, median taken (default 50; dry run 2)")
    p.add_argument("--check-blocks", type=int, default=16, help="blocks of each case checked before timing")
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else 1 if args.dry_run else 10
    args.iters = args.iters if args.iters is not None else 2 if args.dry_run else 50
    return args


def make_cache(shape: Shape, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """(Ng, L, 2, bs, H, D): block rows viewing a layer-major (L, 2, Ng, bs, H, D) bf16 cache."""
    cache = torch.randn((shape.num_layers, 2, shape.num_gpu_blocks, shape.block_size, shape.num_kv_heads,
                         shape.head_dim), generator=gen, device=device, dtype=DTYPE)
    return cache.permute(2, 0, 1, 3, 4, 5)


def scattered_ids(shape: Shape, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids, destination ids), disjoint, each num_moved_blocks random blocks of the cache."""
    perm = torch.randperm(shape.num_gpu_blocks, generator=gen, device=device)
    n = shape.num_moved_blocks
    return perm[:n].contiguous(), perm[n:2 * n].contiguous()


def check_case(rows: torch.Tensor, ids: torch.Tensor, bits: int, group_size: int) -> dict:
    """Kernel vs reference on these blocks, bit for bit, and the round trip's worst error in half steps."""
    q = kv_quant.quantize_blocks(rows, bits, group_size, block_ids=ids, backend="triton")
    ref = kv_quant.quantize_blocks_ref(rows[ids], bits, group_size)
    same_codes = all(torch.equal(a, b) for a, b in zip(q.tensors(), ref.tensors()))
    out = torch.empty_like(rows[ids])
    kv_quant.dequantize_blocks(q, out, backend="triton")
    same_values = torch.equal(out, kv_quant.dequantize_blocks_ref(ref, DTYPE))
    err = (kv_quant.dequantize_blocks_ref(q, torch.float32) - rows[ids].float()).abs()
    half_steps = err / half_step(rows[ids].float(), q.spec)
    return {"bit_exact": same_codes and same_values, "max_abs_err": err.max().item(),
            "mean_abs_err": err.mean().item(), "max_err_in_half_steps": half_steps.max().item()}


def half_step(x: torch.Tensor, spec: kv_quant.QuantSpec) -> torch.Tensor:
    """Half the quantization step of every element's group, x (n, L, 2, bs, H, D) fp32."""
    k = x[:, :, 0].unflatten(2, (spec.block_size // spec.k_group_size, spec.k_group_size))
    v = x[:, :, 1].unflatten(-1, (spec.head_dim // spec.group_size, spec.group_size))
    k_range = (k.amax(3, keepdim=True) - k.amin(3, keepdim=True)).expand_as(k).flatten(2, 3)
    v_range = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)).expand_as(v).flatten(-2)
    return torch.stack([k_range, v_range], dim=2) / ((1 << spec.bits) - 1) / 2 + 1e-30


def time_case(rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, bits: int, group_size: int,
              device: torch.device, args: argparse.Namespace) -> dict:
    q = kv_quant.quantize_blocks(rows, bits, group_size, block_ids=src)

    def quantize() -> None:
        kv_quant.quantize_blocks(rows, bits, group_size, block_ids=src)

    def dequantize() -> None:
        kv_quant.dequantize_blocks(q, rows, block_ids=dst)

    def round_trip() -> None:
        kv_quant.dequantize_blocks(kv_quant.quantize_blocks(rows, bits, group_size, block_ids=src), rows,
                                   block_ids=dst)

    return {name: time_ms(fn, device, args.iters, args.warmup, back_to_back=True)
            for name, fn in (("quantize_ms", quantize), ("dequantize_ms", dequantize), ("round_trip_ms", round_trip))}


def run_case(rows: torch.Tensor, ids: tuple[torch.Tensor, torch.Tensor], bits: int, group_size: int,
             shape: Shape, device: torch.device, args: argparse.Namespace) -> dict:
    src, dst = ids
    block_bytes = kv_quant.quantized_block_bytes(shape.block_shape, bits, group_size)
    row = {"bits": bits, "group_size": group_size, "k_group_size": shape.block_size,
           "bytes_per_block": block_bytes, "bf16_bytes_per_block": shape.block_bytes,
           "compression": shape.block_bytes / block_bytes}
    row.update(check_case(rows, src[:args.check_blocks], bits, group_size))
    row["ok"] = row["bit_exact"] and row["max_err_in_half_steps"] <= 1 + 1e-3
    row.update(time_case(rows, src, dst, bits, group_size, device, args))
    moved = shape.num_moved_blocks * shape.block_bytes
    for name in ("quantize", "dequantize", "round_trip"):
        row[f"{name}_GBps"] = moved / (row[f"{name}_ms"] / 1e3) / 1e9
    return row


def main() -> int:
    args = parse_args()
    device = script_device(args.dry_run, "--dry-run")  # sets TRITON_INTERPRET on the CPU, before triton
    import triton

    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 31)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = DRY_SHAPE if args.dry_run else Shape()
    rows = make_cache(shape, device, gen)
    ids = scattered_ids(shape, device, gen)
    cases = [run_case(rows, ids, bits, g, shape, device, args) for bits in BITS for g in shape.group_sizes]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "seed": seed, "dry_run": args.dry_run, "dtype": "bfloat16", "shape": dataclasses.asdict(shape),
        "warmup": args.warmup, "iters": args.iters, "num_warps": kv_quant.QUANT_NUM_WARPS,
        "copy_read_write_GBps": memory_bandwidth(device) / 1e9, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0 if all(c["ok"] for c in cases) else 1


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  seed {result['seed']}  "
          f"copy (read+write) {result['copy_read_write_GBps']:.0f} GB/s")
    print(f"{'bits':>4} {'G':>4} {'KiB/block':>9} {'x':>5} {'ok':<4} {'err/half':>8} "
          f"{'quant ms':>9} {'GB/s':>6} {'deq ms':>8} {'GB/s':>6} {'trip ms':>8} {'GB/s':>6}")
    for c in result["cases"]:
        print(f"{c['bits']:>4} {c['group_size']:>4} {c['bytes_per_block'] / 1024:>9.0f} {c['compression']:>5.2f} "
              f"{'yes' if c['ok'] else 'NO':<4} {c['max_err_in_half_steps']:>8.4f} "
              f"{c['quantize_ms']:>9.3f} {c['quantize_GBps']:>6.0f} {c['dequantize_ms']:>8.3f} "
              f"{c['dequantize_GBps']:>6.0f} {c['round_trip_ms']:>8.3f} {c['round_trip_GBps']:>6.0f}")


if __name__ == "__main__":
    sys.exit(main())
