"""Sweep the decode kernel's tuning constants at the engine's decode shapes (Llama-3-8B, bf16).

Per (batch, context) case and per setting of DECODE_BLOCK_N, DECODE_NUM_WARPS, DECODE_NUM_STAGES
and DECODE_PROGRAMS_PER_SM: the kernel (split + reduce) checked against the fp32 reference, then
timed as a CUDA-graph replay of LAYERS launches over LAYERS distinct caches (as a decode step
reads them: nothing stays in L2), median of the replays; GB/s of KV read. The current constants
are the first row of each case. Writes JSON with --out and prints the best settings last.

    python3 benchmarks/decode_sweep.py [--out sweep.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from kernels_gpu import Case, Shape, graph_of, make_inputs, reference, rel_error  # noqa: E402

from kvtier.ops import triton_attention as ta  # noqa: E402

LAYERS = 8  # distinct caches per replay; 8 x 0.54 GB at 64 x 2048 exceeds L2 160-fold
CASES = [Case("decode_b64_ctx2048", "decode", 64, 2047, 1), Case("decode_b256_ctx512", "decode", 256, 511, 1)]
GRID = {"DECODE_BLOCK_N": (32, 64, 128), "DECODE_NUM_WARPS": (2, 4, 8), "DECODE_NUM_STAGES": (2, 3, 4),
        "DECODE_PROGRAMS_PER_SM": (2, 4, 8)}
QUICK = {"DECODE_BLOCK_N": (64, 128), "DECODE_NUM_WARPS": (4, 8), "DECODE_NUM_STAGES": (2, 3),
         "DECODE_PROGRAMS_PER_SM": (4, 8)}


def time_setting(xs, scale: float, kv_bytes: int) -> dict:
    replay, _ = graph_of(lambda: [ta.paged_attention(x.q, x.k_cache, x.v_cache, x.meta, scale) for x in xs],
                         xs[0].q.device)
    for _ in range(3):
        replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(xs))
    ms = statistics.median(times)
    return {"ms_per_layer": ms, "GBps": kv_bytes / ms / 1e6}


def sweep_case(case: Case, grid: dict, device: torch.device) -> list[dict]:
    shape, gen = Shape(), torch.Generator(device=device).manual_seed(0)
    xs = [make_inputs(case, shape, device, gen) for _ in range(LAYERS)]
    for x in xs:  # this step's K/V in the cache, as the engine's write precedes the attention
        ta.write_kv(x.k, x.v, x.k_cache, x.v_cache, x.meta.slot_mapping)
    scale = shape.head_dim ** -0.5
    ref = reference(xs[0], scale)
    kv_bytes = case.batch * (case.context + 1) * 2 * shape.num_kv_heads * shape.head_dim * 2
    defaults = {name: getattr(ta, name) for name in grid}
    settings = [defaults] + [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    rows = []
    for setting in settings:
        for name, value in setting.items():
            setattr(ta, name, value)
        err = rel_error(ta.paged_attention(xs[0].q, xs[0].k_cache, xs[0].v_cache, xs[0].meta, scale), ref)
        rows.append({"case": case.name, **setting, "rel_error": err, **time_setting(xs, scale, kv_bytes)})
    for name, value in defaults.items():
        setattr(ta, name, value)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = [r for case in CASES for r in sweep_case(case, QUICK if args.quick else GRID, device)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    for case in CASES:
        mine = [r for r in rows if r["case"] == case.name]
        print(f"{case.name}: current {mine[0]['ms_per_layer'] * 1e3:.1f} us/layer ({mine[0]['GBps']:.0f} GB/s)")
        for r in sorted(mine[1:], key=lambda r: r["ms_per_layer"])[:5]:
            knobs = " ".join(f"{k.removeprefix('DECODE_')}={r[k]}" for k in GRID)
            print(f"  {r['ms_per_layer'] * 1e3:7.1f} us {r['GBps']:6.0f} GB/s err {r['rel_error']:.1e}  {knobs}")


if __name__ == "__main__":
    main()
