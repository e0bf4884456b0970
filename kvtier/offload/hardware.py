"""Measured hardware rates: device memory bandwidth, matmul FLOP/s, the host link; and time_ms,
the one timer that measures them and every GPU benchmark script.

Benchmarks divide by them; the offload cost model plans with them (measured, never datasheet)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's work (a no-op on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 30, warmup: int = 10,
            setup: Callable[[], object] | None = None, back_to_back: bool = False) -> float:
    """Median milliseconds of `iters` calls of fn() after `warmup` untimed ones.

    On a GPU, CUDA events on the current stream time the device's work. By default the host waits
    for each call before issuing the next, so each starts on an idle device (a copy, a matmul);
    back_to_back issues every call and waits once at the end, so that the host's launch gaps do
    not count (short kernels). On the CPU, perf_counter around each (synchronous) call.
    setup() runs before each timed call, outside its time (e.g. an L2 flush)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    for _ in range(iters):
        if setup is not None:
            setup()
        if device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        # torch.cuda.Event's __init__ carries no annotations
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        if not back_to_back:
            end.synchronize()
        events.append((start, end))
    if events:
        events[-1][1].synchronize()  # the last end on this stream: every earlier event has completed
        times = [start.elapsed_time(end) for start, end in events]
    return statistics.median(times)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting read + write (the roofline's denominator)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms / 1e3)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 30) -> float:
    """Dense square matmul rate in FLOP/s (fresh random inputs, never zeros); the best of a few
    sizes, since the peak is the denominator of MFU and a low one would flatter it."""
    if device.type != "cuda":
        n = min(n, 1024)
    best = 0.0
    for size in (n // 2, n):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        ms = time_ms(lambda: a @ b, device, iters, warmup=max(1, iters // 3))  # noqa: B023 (called at once)
        best = max(best, 2 * size ** 3 / (ms / 1e3))
    return best


def skinny_matmul_flops(device: torch.device, dtype: torch.dtype, rows: int, hidden: int, width: int,
                        iters: int = 20) -> float:
    """FLOP/s of (rows, hidden) @ (hidden, width) on fresh random inputs: KVPR's recomputation is
    this GEMM (rows = recomputed tokens, width = K and V), far from the square matmul's rate when
    rows are few."""
    if min(rows, hidden, width) < 1:
        raise ValueError(f"rows, hidden and width must be positive, got {rows}, {hidden}, {width}")
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.randn(width, hidden, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.nn.functional.linear(x, w), device, iters, warmup=max(1, iters // 4))
    return 2 * rows * hidden * width / (ms / 1e3)


def host_link_bandwidth(device: torch.device, nbytes: int = 1 << 25, to_device: bool = True,
                        iters: int = 5) -> float:
    """Pinned host-to-device (or device-to-host) copy rate in bytes/s; on a CPU-only machine, the
    memcpy rate (there the "GPU tier" is ordinary memory and a transfer is a copy)."""
    host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    src, dst = (host, dev) if to_device else (dev, host)
    ms = time_ms(lambda: dst.copy_(src, non_blocking=True), device, iters=iters, warmup=2)
    return nbytes / (ms / 1e3)
