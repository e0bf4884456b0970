"""Measured hardware rates: device memory bandwidth, matmul FLOP/s, the host link.

Benchmarks divide by them; the offload cost model plans with them (measured, never datasheet)."""

from __future__ import annotations

import statistics
import time

import torch


def _time_ms(fn, device: torch.device, iters: int = 30, warmup: int = 10) -> float:
    """Median milliseconds of fn(); CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting read + write (the roofline's denominator)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
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
        ms = _time_ms(lambda: a @ b, device, iters, warmup=max(1, iters // 3))
        best = max(best, 2 * size ** 3 / (ms / 1e3))
    return best


def host_link_bandwidth(device: torch.device, nbytes: int = 1 << 25, to_device: bool = True,
                        iters: int = 5) -> float:
    """Pinned host-to-device (or device-to-host) copy rate in bytes/s; on a CPU-only machine, the
    memcpy rate (there the "GPU tier" is ordinary memory and a transfer is a copy)."""
    host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    src, dst = (host, dev) if to_device else (dev, host)
    ms = _time_ms(lambda: dst.copy_(src, non_blocking=True), device, iters=iters, warmup=2)
    return nbytes / (ms / 1e3)
