"""Time top_p_threshold (the Triton kernel) against the sort-based reference at the sampler's shapes
(V = 128256, rows 1 / 64 / 256), CUDA events after warm-up, median; checks the kernel's nucleus equals
the reference's where no cut lies within 1e-5 of top_p. Writes JSON with --out.

    python3 benchmarks/top_p_gpu.py [--out top_p.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kvtier.offload.hardware import time_ms  # noqa: E402
from kvtier.ops.top_p import top_p_threshold, top_p_threshold_ref  # noqa: E402

VOCAB = 128256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, rows = torch.device("cuda"), []
    for n in (1, 64, 256):
        gen = torch.Generator(device=device).manual_seed(n)
        probs = torch.softmax(torch.randn(n, VOCAB, device=device, generator=gen) * 3, dim=-1)
        top_p = torch.full((n,), 0.9, device=device)
        kernel = time_ms(lambda: top_p_threshold(probs, top_p), device)  # noqa: B023 (called at once)
        ref = time_ms(lambda: top_p_threshold_ref(probs, top_p), device)  # noqa: B023
        same = torch.equal(probs >= top_p_threshold(probs, top_p)[:, None],
                           probs >= top_p_threshold_ref(probs, top_p)[:, None])
        rows.append({"rows": n, "vocab": VOCAB, "kernel_ms": kernel, "sort_ms": ref, "same_nucleus": same})
        print(f"rows {n:>4}: kernel {kernel * 1e3:8.1f} us, sort {ref * 1e3:8.1f} us, same nucleus {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
