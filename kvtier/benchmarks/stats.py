"""Summary statistics of latencies, shared by `kvtier bench serve` and `kvtier bench multiturn`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latency_stats(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Mean, median, standard deviation and 99th percentile of values x scale (e.g. 1000 for
    seconds to ms). Percentiles interpolate linearly between samples (numpy's default, as in
    vLLM's benchmarks). At least one value: an empty list has no percentiles."""
    arr = np.asarray(values, dtype=float) * scale
    return {"mean": float(arr.mean()), "median": float(np.percentile(arr, 50)),
            "std": float(arr.std()), "p99": float(np.percentile(arr, 99))}
