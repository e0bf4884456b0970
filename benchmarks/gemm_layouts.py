"""How fast cuBLAS streams a decode step's weights, by weight layout (Llama-3-8B shapes, bf16).

A decode step's matmuls read every weight once with few rows (M = batch), so they should run at
the memory's rate. This times, in one CUDA graph per case, the 32 layers' chain qkv -> o -> gate_up
-> down (32 distinct weights each, so nothing stays in L2) plus the lm_head, for M in {64, 256},
with the weights stored two ways:

    TN   W (N, K) row-major, y = x @ W.T (F.linear; the engine today)
    NN   W.T stored (K, N) row-major, y = x @ Wt

and prints each shape's and the chain's time, GB/s of weights and TFLOP/s. CUDA events, warm-up,
median of REPEATS replays. Writes JSON with --out.

    python3 benchmarks/gemm_layouts.py [--out gemm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

LAYERS = 32
HIDDEN, INTER, VOCAB = 4096, 14336, 128256
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}  # name -> (N out, K in)
REPEATS = 20


def make_weights(n: int, k: int, count: int, layout: str) -> list[torch.Tensor]:
    shape = (n, k) if layout == "TN" else (k, n)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def matmul(x: torch.Tensor, w: torch.Tensor, layout: str) -> torch.Tensor:
    return F.linear(x, w) if layout == "TN" else torch.mm(x, w)


def time_graph(fn) -> float:
    """Median ms of one replay of fn captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(name: str, m: int, layout: str, ms: float, weight_bytes: int, flops: int) -> dict:
    return {"what": name, "m": m, "layout": layout, "ms": ms, "weight_gb_s": weight_bytes / ms / 1e6,
            "tflops": flops / ms / 1e9}


def bench_layout(m: int, layout: str) -> list[dict]:
    weights = {name: make_weights(n, k, LAYERS, layout) for name, (n, k) in SHAPES.items()}
    lm_head = make_weights(VOCAB, HIDDEN, 1, layout)[0]
    x = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    rows = []
    for name, (n, k) in SHAPES.items():
        ms = time_graph(lambda ws=weights[name], k=k: [matmul(x[k], w, layout) for w in ws])
        rows.append(row(name, m, layout, ms, LAYERS * n * k * 2, LAYERS * 2 * m * n * k))
    ms = time_graph(lambda: matmul(x[HIDDEN], lm_head, layout))
    rows.append(row("lm_head", m, layout, ms, VOCAB * HIDDEN * 2, 2 * m * VOCAB * HIDDEN))

    def chain() -> None:
        for i in range(LAYERS):
            for name, (_, k) in SHAPES.items():
                matmul(x[k], weights[name][i], layout)
        matmul(x[HIDDEN], lm_head, layout)
    total = LAYERS * sum(n * k for n, k in SHAPES.values()) + VOCAB * HIDDEN
    rows.append(row("chain", m, layout, time_graph(chain), total * 2, 2 * m * total))
    return rows  # the weights are freed on return, before the next layout's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [r for m in (64, 256) for layout in ("TN", "NN") for r in bench_layout(m, layout)]
    print(f"{'what':<9}{'M':>5}{'layout':>7}{'ms':>9}{'GB/s':>9}{'TFLOP/s':>9}")
    for r in rows:
        print(f"{r['what']:<9}{r['m']:>5}{r['layout']:>7}{r['ms']:>9.3f}{r['weight_gb_s']:>9.0f}{r['tflops']:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
