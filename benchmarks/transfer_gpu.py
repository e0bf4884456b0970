"""KV block transfers between the GPU cache and the pinned CPU pool at Llama-3-8B size, on one GPU.

    python3 benchmarks/transfer_gpu.py --out $OUT/transfer.json
    python3 benchmarks/transfer_gpu.py --out /tmp/transfer.json --dry-run   # tiny; CPU (interpreter) or GPU

Layouts as in the engine: the GPU cache (L, 2, Ng, bs, Hkv, D) bf16 and the pinned pool
(Nc, L, 2, bs, Hkv, D), both filled with fresh random data (seeded from the clock unless --seed).
A transfer moves 256 scattered blocks (random ids, 512 MiB): "reload" CPU -> GPU, "store" GPU -> CPU.
Timed with CUDA events after warm-up, medians of several runs, GB = 1e9 bytes.

Transfers compared (each checked byte for byte: destination blocks scribbled with NaN first):
  dma_256MiB     one pinned 256 MiB `copy_` (the link's rate: the baseline every rate is a fraction of)
  kernel         copy_blocks' persistent-grid UVA kernel, for every grid size x chunk in the sweep
  per_row_dma    one `copy_` per (block, layer, kv) row of 32 KiB (standalone only: far too slow)
  per_block_dma  one `copy_` per block (2 MiB on the CPU side; torch stages the strided GPU side)
  staged_dma     one D2D copy_blocks over the whole GPU into a contiguous staging buffer (or back)
                 plus one 2 MiB DMA per block: the copy engines move the bytes over the link
Once, for the default constants: no block outside the moved ones changes; reload + store at once.

Overlap: each transfer back to back on a side stream, spanning a "forward pass" on the current
stream, against the pass alone (timed the same way): the pass's slowdown, the transfer rate
meanwhile, and the hidden fraction = 1 - (extra pass time) / (time the bytes moved during the pass
take alone). Both are queued behind a GPU sleep, then start together, the copies ~50 us first
("copies_first", a step's own loads) or the pass first ("pass_first", a prefetch queued behind the
forward). The kernel is timed at every grid size with the default chunk. Two passes, bf16 matmuls of
one Llama-3-8B decoder layer (QKV, O, gate_up, down; no attention core; one layer's weights
reused) x 32 layers: prefill 2048 tokens (compute-bound), decode 64 tokens (memory-bound).

Writes the JSON to --out and prints a table last; exits 1 if a byte check failed or a section
raised (its traceback is under "errors"; the other sections still run).
Written for torch >= 2.4 and Triton >= 3.0 (to run on torch 2.11, Triton 3.6, an H100).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import pathlib
import statistics
import sys
import time
import traceback

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtier.benchmarks.gpu_script import script_device  # noqa: E402
from kvtier.offload.hardware import time_ms  # noqa: E402

DTYPE = torch.bfloat16
DIRECTIONS = ("reload", "store")
SWEEP_NUM_PROGRAMS = (8, 16, 32, 64)
SWEEP_CHUNK_BYTES = (8192, 16384, 32768)
TARGET_GBPS = 45.0
TARGET_FRACTION_OF_PINNED = 0.8
TARGET_SLOWDOWN = 0.10
OVERLAP_SPAN = 1.25  # queue transfers for this multiple of the pass time, so they cover it
GATE_CYCLES = 20_000_000  # ~10 ms GPU sleep: time to queue the pass and the copies before both start
ORDER_CYCLES = 100_000  # ~50 us: the one queued second starts this much after the other
ORDERS = ("copies_first", "pass_first")  # a step's own loads; a prefetch queued behind the forward
D2D_PROGRAMS_PER_SM = 4  # the staged copies' on-GPU leg uses the whole GPU, briefly


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    num_gpu_blocks: int = 4096  # 8 GiB
    num_cpu_blocks: int = 2048  # 4 GiB pinned
    num_moved_blocks: int = 256  # per transfer: 512 MiB
    baseline_bytes: int = 256 << 20
    hidden: int = 4096  # the forward passes: Llama-3-8B
    num_heads: int = 32
    intermediate: int = 14336
    prefill_tokens: int = 2048
    decode_tokens: int = 64
    pass_layers: int = 32

    @property
    def row_elems(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.row_elems * DTYPE.itemsize

    @property
    def moved_bytes(self) -> int:
        return self.num_moved_blocks * self.block_bytes


DRY_SHAPE = Shape(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, num_gpu_blocks=24,
                  num_cpu_blocks=16, num_moved_blocks=6, baseline_bytes=1 << 16, hidden=64,
                  num_heads=4, intermediate=128, prefill_tokens=32, decode_tokens=4, pass_layers=2)


# ------------------------------------------------------------------------------------ timing

class Clock:
    """Marks on the current stream: CUDA events on a GPU, perf_counter on the CPU (synchronous)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def sleep(self, cycles: int) -> None:
        """Hold the current stream (a gate: work queued behind it, on any stream, starts at once)."""
        if self.cuda:
            torch.cuda._sleep(cycles)

    def new_stream(self):
        return torch.cuda.Stream() if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def fork(self, stream) -> None:
        """stream waits for the work queued so far on the current stream."""
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())

    def join(self, stream) -> None:
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)


def median_ms(clock: Clock, fn, warmup: int, iters: int, stream=None) -> float:
    """Median time of fn() on `stream` (default: the current one), calls back to back, timed on that stream."""
    clock.sync()
    clock.fork(stream)
    with clock.on(stream):
        ms = time_ms(fn, clock.device, iters, warmup, back_to_back=True)
    clock.join(stream)
    clock.sync()
    return ms


def gbps(num_bytes: float, ms: float) -> float:
    return num_bytes / ms / 1e6


# ------------------------------------------------------------------------------------ setup

@dataclasses.dataclass
class Setup:
    """The two tiers, their (block, layer, kv, elems) views, the moved blocks' ids, buffers.

    Reload reads cpu_ids[:n] into gpu_ids[:n]; store writes gpu_ids[n:2n] into cpu_ids[n:2n]:
    disjoint, so both may run at once. *_host are CPU copies for checks and per-block copies."""
    gpu_kv: torch.Tensor  # (L, 2, Ng, bs, Hkv, D)
    cpu_kv: torch.Tensor  # (Nc, L, 2, bs, Hkv, D) pinned
    gpu_view: torch.Tensor  # (Ng, L, 2, E)
    cpu_view: torch.Tensor  # (Nc, L, 2, E)
    gpu_ids: torch.Tensor  # (2n,) int64 on the GPU
    cpu_ids: torch.Tensor  # (2n,) int64 on the GPU (the kernel reads ids there)
    gpu_ids_host: torch.Tensor
    cpu_ids_host: torch.Tensor
    n: int
    staging: torch.Tensor  # (n, L, 2, E) on the GPU, contiguous: staged_dma's buffer
    host_buf: torch.Tensor  # (baseline_bytes,) uint8 pinned
    dev_buf: torch.Tensor  # (baseline_bytes,) uint8 on the GPU
    num_sms: int

    def transfer(self, direction: str):
        """(src, dst, src_ids, dst_ids, src_ids_host, dst_ids_host) of one direction."""
        n = self.n
        if direction == "reload":
            return (self.cpu_view, self.gpu_view, self.cpu_ids[:n], self.gpu_ids[:n],
                    self.cpu_ids_host[:n], self.gpu_ids_host[:n])
        return (self.gpu_view, self.cpu_view, self.gpu_ids[n:], self.cpu_ids[n:],
                self.gpu_ids_host[n:], self.cpu_ids_host[n:])


def make_setup(shape: Shape, device: torch.device, seed: int) -> Setup:
    gen = torch.Generator(device=device).manual_seed(seed)
    host_gen = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"
    L, Ng, Nc, n = shape.num_layers, shape.num_gpu_blocks, shape.num_cpu_blocks, shape.num_moved_blocks
    row = (shape.block_size, shape.num_kv_heads, shape.head_dim)
    gpu_kv = torch.randn((L, 2, Ng, *row), generator=gen, device=device, dtype=DTYPE)
    cpu_kv = torch.empty((Nc, L, 2, *row), dtype=DTYPE, pin_memory=pin)
    for start in range(0, Nc, 64):  # random on the GPU, 64 blocks at a time: fast even for 4 GiB
        chunk = cpu_kv[start:start + 64]
        chunk.copy_(torch.randn(chunk.shape, generator=gen, device=device, dtype=DTYPE))
    dev_buf = torch.randint(0, 256, (shape.baseline_bytes,), generator=gen, device=device, dtype=torch.uint8)
    host_buf = torch.empty(shape.baseline_bytes, dtype=torch.uint8, pin_memory=pin)
    host_buf.copy_(dev_buf)
    gpu_ids_host = torch.randperm(Ng, generator=host_gen)[:2 * n]
    cpu_ids_host = torch.randperm(Nc, generator=host_gen)[:2 * n]
    return Setup(gpu_kv=gpu_kv, cpu_kv=cpu_kv,
                 gpu_view=gpu_kv.view(L, 2, Ng, -1).permute(2, 0, 1, 3),
                 cpu_view=cpu_kv.view(Nc, L, 2, -1),
                 gpu_ids=gpu_ids_host.to(device), cpu_ids=cpu_ids_host.to(device),
                 gpu_ids_host=gpu_ids_host, cpu_ids_host=cpu_ids_host, n=n,
                 staging=torch.empty((n, L, 2, shape.row_elems), device=device, dtype=DTYPE),
                 host_buf=host_buf, dev_buf=dev_buf,
                 num_sms=torch.cuda.get_device_properties(device).multi_processor_count if pin else 1)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)  # bf16 bytes: equality is byte equality


# ------------------------------------------------------------------------------------ transfers

@dataclasses.dataclass
class Transfer:
    name: str  # kernel | per_row_dma | per_block_dma | staged_dma | dma_256MiB
    direction: str  # reload (to the GPU) | store (to the CPU)
    run: object  # () -> None, queues the whole transfer on the current stream
    num_bytes: int
    checked: bool = True  # moves setup's blocks (byte-checkable); dma_256MiB moves a raw buffer
    overlap: bool = True  # worth timing beside a pass
    config: dict = dataclasses.field(default_factory=dict)

    def label(self) -> dict:
        return {"transfer": self.name, "direction": self.direction, **self.config}


def kernel_transfer(kt, setup: Setup, direction: str, num_programs: int, chunk_bytes: int,
                    num_bytes: int) -> Transfer:
    src, dst, src_ids, dst_ids, _, _ = setup.transfer(direction)

    def run():
        kt.copy_blocks(src, dst, src_ids, dst_ids, backend="triton", num_programs=num_programs,
                       chunk_bytes=chunk_bytes)
    return Transfer("kernel", direction, run, num_bytes, overlap=chunk_bytes == kt.COPY_CHUNK_BYTES,
                    config={"num_programs": num_programs, "chunk_bytes": chunk_bytes})


def per_row_transfer(setup: Setup, direction: str, num_bytes: int) -> Transfer:
    """One DMA copy_ per (block, layer, kv) row."""
    src, dst, _, _, src_ids, dst_ids = setup.transfer(direction)
    pairs = list(zip(src_ids.tolist(), dst_ids.tolist()))

    def run():
        for s, d in pairs:
            src_block, dst_block = src[s], dst[d]
            for layer in range(src.shape[1]):
                for kv in range(src.shape[2]):
                    dst_block[layer, kv].copy_(src_block[layer, kv], non_blocking=True)
    return Transfer("per_row_dma", direction, run, num_bytes, overlap=False)


def per_block_transfer(setup: Setup, direction: str, num_bytes: int) -> Transfer:
    """One copy_ per block: a 2 MiB DMA plus, for the strided GPU side, torch's own staging copy."""
    src, dst, _, _, src_ids, dst_ids = setup.transfer(direction)
    pairs = list(zip(src_ids.tolist(), dst_ids.tolist()))

    def run():
        for s, d in pairs:
            dst[d].copy_(src[s], non_blocking=True)
    return Transfer("per_block_dma", direction, run, num_bytes)


def staged_transfer(kt, setup: Setup, direction: str, num_bytes: int) -> Transfer:
    """Scattered GPU rows <-> a contiguous staging buffer by one D2D kernel over the whole GPU;
    staging <-> pinned pool by one 2 MiB DMA per block."""
    _, _, src_ids, dst_ids, src_host, dst_host = setup.transfer(direction)
    local = torch.arange(setup.n, device=setup.gpu_ids.device)
    d2d = dict(backend="triton", num_programs=D2D_PROGRAMS_PER_SM * setup.num_sms)
    staging, gpu_view, cpu_view = setup.staging, setup.gpu_view, setup.cpu_view
    cpu_blocks = (src_host if direction == "reload" else dst_host).tolist()

    def reload():
        for i, c in enumerate(cpu_blocks):
            staging[i].copy_(cpu_view[c], non_blocking=True)
        kt.copy_blocks(staging, gpu_view, local, dst_ids, **d2d)

    def store():
        kt.copy_blocks(gpu_view, staging, src_ids, local, **d2d)
        for i, c in enumerate(cpu_blocks):
            cpu_view[c].copy_(staging[i], non_blocking=True)
    return Transfer("staged_dma", direction, reload if direction == "reload" else store, num_bytes,
                    config={"d2d_num_programs": d2d["num_programs"]})


def dma_transfer(setup: Setup, direction: str) -> Transfer:
    host, dev = setup.host_buf, setup.dev_buf
    if direction == "reload":
        run = lambda: dev.copy_(host, non_blocking=True)  # noqa: E731
    else:
        run = lambda: host.copy_(dev, non_blocking=True)  # noqa: E731
    return Transfer("dma_256MiB", direction, run, host.numel(), checked=False)


def all_transfers(kt, setup: Setup, shape: Shape) -> list[Transfer]:
    out, moved = [], shape.moved_bytes
    for direction in DIRECTIONS:
        out.append(dma_transfer(setup, direction))
        out += [kernel_transfer(kt, setup, direction, p, c, moved)
                for p in SWEEP_NUM_PROGRAMS for c in SWEEP_CHUNK_BYTES]
        out += [per_row_transfer(setup, direction, moved), per_block_transfer(setup, direction, moved),
                staged_transfer(kt, setup, direction, moved)]
    return out


# ------------------------------------------------------------------------------------ checks

def check_transfer(clock: Clock, setup: Setup, t: Transfer, stream=None) -> bool:
    """Scribble NaN over the destination blocks, transfer, compare them with the source blocks."""
    src, dst, _, _, src_ids, dst_ids = setup.transfer(t.direction)
    clock.sync()
    expected = src[src_ids.to(src.device)]  # (n, L, 2, E)
    dst[dst_ids.to(dst.device)] = float("nan")
    clock.sync()
    clock.fork(stream)
    with clock.on(stream):
        t.run()
    clock.join(stream)
    clock.sync()
    got = dst[dst_ids.to(dst.device)]
    return torch.equal(bits(got), bits(expected.to(got.device)))


def check_untouched(clock: Clock, setup: Setup, t: Transfer, device: torch.device) -> bool:
    """One transfer; then the whole destination tier equals its snapshot with the moved blocks replaced."""
    src, dst, _, _, src_ids, dst_ids = setup.transfer(t.direction)
    whole = setup.gpu_kv if t.direction == "reload" else setup.cpu_kv
    clock.sync()
    expected = whole.to(device, copy=True)
    t.run()
    clock.sync()
    got = whole.to(device, copy=True)
    if t.direction == "reload":  # the same (block, layer, kv, elems) view as dst, of the snapshot
        expected_view = expected.view(setup.gpu_kv.shape[0], 2, dst.shape[0], -1).permute(2, 0, 1, 3)
    else:
        expected_view = expected.view(dst.shape)
    expected_view[dst_ids.to(device)] = src[src_ids.to(src.device)].to(device)
    ok = torch.equal(bits(got), bits(expected))
    del expected, got
    return ok


# ------------------------------------------------------------------------------------ forward passes

class ForwardPass:
    """bf16 matmuls of one Llama-3-8B decoder layer (QKV, O, gate_up, down) over `tokens`, repeated."""

    def __init__(self, shape: Shape, tokens: int, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed + tokens)
        h, inter = shape.hidden, shape.intermediate
        kv_dim = shape.num_kv_heads * (shape.hidden // shape.num_heads)
        rand = lambda *size: torch.randn(size, generator=gen, device=device, dtype=DTYPE)  # noqa: E731
        x, act = rand(tokens, h), rand(tokens, inter)
        self.mms = [(x, rand(h, h + 2 * kv_dim)), (x, rand(h, h)), (x, rand(h, 2 * inter)),
                    (act, rand(inter, h))]
        self.outs = [torch.empty(tokens, w.shape[1], device=device, dtype=DTYPE) for _, w in self.mms]
        self.num_layers = shape.pass_layers
        self.tokens = tokens
        self.weight_bytes = sum(w.numel() for _, w in self.mms) * DTYPE.itemsize * self.num_layers
        self.flops = 2 * tokens * self.weight_bytes // DTYPE.itemsize

    def __call__(self) -> None:
        for _ in range(self.num_layers):
            for (a, w), out in zip(self.mms, self.outs):
                torch.mm(a, w, out=out)

    def describe(self, ms: float) -> dict:
        return {"tokens": self.tokens, "layers": self.num_layers, "ms": ms,
                "tflops": self.flops / ms / 1e9, "weight_GBps": gbps(self.weight_bytes, ms)}


def overlapped(clock: Clock, fwd: ForwardPass, copy, num_copies: int, reps: int, order: str) -> dict:
    """The pass on the current stream while num_copies transfers run back to back on a side stream.

    num_copies = 0 times the pass alone, the same way."""
    side = clock.new_stream()
    runs = []
    for rep in range(reps + 1):  # the first run warms up
        clock.sync()
        clock.sleep(GATE_CYCLES)
        clock.fork(side)
        if order == "copies_first":
            clock.sleep(ORDER_CYCLES)
        p0 = clock.mark()  # the pass is queued first: copies slow to queue must not delay it
        fwd()
        p1 = clock.mark()
        with clock.on(side):
            if order == "pass_first":
                clock.sleep(ORDER_CYCLES)
            c0 = clock.mark()
            for _ in range(num_copies):
                copy()
            c1 = clock.mark()
        clock.join(side)
        if rep:
            runs.append((c0, c1, p0, p1))
    clock.sync()
    med = lambda f: statistics.median(f(*r) for r in runs)  # noqa: E731
    return {"num_copies": num_copies, "pass_ms": med(lambda c0, c1, p0, p1: clock.ms(p0, p1)),
            "copy_ms": med(lambda c0, c1, p0, p1: clock.ms(c0, c1)),
            "copy_end_after_pass_ms": med(lambda c0, c1, p0, p1: clock.ms(p1, c1))}


def overlap_row(t: Transfer, kind: str, order: str, run: dict, alone_pass_ms: float,
                alone_copy_ms: float) -> dict:
    rate = gbps(run["num_copies"] * t.num_bytes, run["copy_ms"])
    moved_during_pass = rate * 1e6 * min(run["copy_ms"], run["pass_ms"])  # bytes; both start together
    serial_ms = moved_during_pass / (t.num_bytes / alone_copy_ms)
    extra_ms = run["pass_ms"] - alone_pass_ms
    return {**t.label(), "pass": kind, "order": order, **run, "slowdown": extra_ms / alone_pass_ms,
            "copy_GBps_overlapped": rate, "hidden_fraction": 1 - extra_ms / serial_ms}


# ------------------------------------------------------------------------------------ sections

def run_standalone(clock: Clock, setup: Setup, transfers: list[Transfer], args) -> list[dict]:
    """Every transfer alone: byte check (which also compiles the kernel), then median time."""
    rows, pinned = [], {}
    for t in transfers:
        side = clock.new_stream() if t.name.endswith("dma") else None
        exact = check_transfer(clock, setup, t, side) if t.checked else None
        slow = t.name == "per_row_dma"
        ms = median_ms(clock, t.run, 1 if slow else args.warmup, 3 if slow else args.iters, side)
        rate = gbps(t.num_bytes, ms)
        if t.name == "dma_256MiB":
            pinned[t.direction] = rate
        rows.append({**t.label(), "bytes": t.num_bytes, "ms": ms, "GBps": rate, "exact": exact,
                     "fraction_of_pinned": rate / pinned[t.direction] if t.direction in pinned else None})
    return rows


def run_once_checks(kt, clock: Clock, setup: Setup, shape: Shape, device: torch.device, args) -> dict:
    default = (kt.COPY_NUM_PROGRAMS, kt.COPY_CHUNK_BYTES, shape.moved_bytes)
    out = {f"untouched_blocks_unchanged_{d}": check_untouched(
        clock, setup, kernel_transfer(kt, setup, d, *default), device) for d in DIRECTIONS}
    pair = [kernel_transfer(kt, setup, d, *default).run for d in DIRECTIONS]
    streams = (clock.new_stream(), clock.new_stream())

    def duplex():
        for stream, run in zip(streams, pair):
            clock.fork(stream)
            with clock.on(stream):
                run()
        for stream in streams:
            clock.join(stream)
    ms = median_ms(clock, duplex, args.warmup, args.iters)
    out["duplex_kernel"] = {"ms": ms, "total_GBps": gbps(2 * shape.moved_bytes, ms)}
    return out


def run_overlap(clock: Clock, shape: Shape, device: torch.device, transfers: list[Transfer],
                args) -> dict:
    out = {"passes": {}, "runs": []}
    for kind, tokens in (("prefill", shape.prefill_tokens), ("decode", shape.decode_tokens)):
        fwd = ForwardPass(shape, tokens, device, args.seed)
        alone = overlapped(clock, fwd, None, 0, args.overlap_reps + 2, "copies_first")["pass_ms"]
        out["passes"][kind] = fwd.describe(alone)
        for t in (t for t in transfers if t.overlap):
            one = median_ms(clock, t.run, 1, 3)
            num = max(1, math.ceil(OVERLAP_SPAN * alone / one))
            for order in ORDERS:
                run = overlapped(clock, fwd, t.run, num, args.overlap_reps, order)
                out["runs"].append(overlap_row(t, kind, order, run, alone, one))
        del fwd
    return out


# ------------------------------------------------------------------------------------ verdict

def verdict(kt, result: dict) -> dict:
    """The acceptance checks for the default constants, and the best kernel config measured."""
    default = (kt.COPY_NUM_PROGRAMS, kt.COPY_CHUNK_BYTES)
    alone = {(r["direction"], r["num_programs"], r["chunk_bytes"]): r
             for r in result.get("standalone", []) if r["transfer"] == "kernel"}
    over = {(r["pass"], r["direction"], r["num_programs"], r["chunk_bytes"]): r
            for r in result.get("overlap", {}).get("runs", [])
            if r["transfer"] == "kernel" and r["order"] == "copies_first"}
    out = {"default": {"num_programs": default[0], "chunk_bytes": default[1]}}
    for d in DIRECTIONS:
        s = alone.get((d, *default))
        if s:
            out[f"{d}_GBps_ge_{TARGET_GBPS:g}"] = s["GBps"] >= TARGET_GBPS
            if s["fraction_of_pinned"] is not None:
                out[f"{d}_ge_{TARGET_FRACTION_OF_PINNED:.0%}_of_pinned"] = (
                    s["fraction_of_pinned"] >= TARGET_FRACTION_OF_PINNED)
        for kind in ("prefill", "decode"):
            o = over.get((kind, d, *default))
            if o:
                out[f"{d}_beside_{kind}_slows_it_lt_{TARGET_SLOWDOWN:.0%}"] = o["slowdown"] < TARGET_SLOWDOWN
    out["best_standalone"] = best_standalone(alone)
    out["best_overlapped"] = {kind: best_overlapped(over, kind, default[1]) for kind in ("prefill", "decode")}
    return out


def best_standalone(alone: dict) -> dict | None:
    """The fewest programs (then the smallest chunk) within 2% of the best rate in both directions."""
    best = {d: max((r["GBps"] for (dd, _, _), r in alone.items() if dd == d), default=None)
            for d in DIRECTIONS}
    for p in SWEEP_NUM_PROGRAMS:
        for c in SWEEP_CHUNK_BYTES:
            rows = [alone.get((d, p, c)) for d in DIRECTIONS]
            if None not in rows and all(r["GBps"] >= 0.98 * best[r["direction"]] for r in rows):
                rates = {f"{r['direction']}_GBps": r["GBps"] for r in rows}
                return {"num_programs": p, "chunk_bytes": c, **rates}
    return None


def best_overlapped(over: dict, kind: str, chunk_bytes: int) -> dict | None:
    """Copies first: the highest overlapped rate (the slower direction) among grid sizes slowing
    the pass < target, else the smallest slowdown."""
    scored = []
    for p in SWEEP_NUM_PROGRAMS:
        for c in (chunk_bytes,):
            rows = [over.get((kind, d, p, c)) for d in DIRECTIONS]
            if None in rows:
                continue
            slow = max(r["slowdown"] for r in rows)
            rate = min(r["copy_GBps_overlapped"] for r in rows)
            within = slow < TARGET_SLOWDOWN
            scored.append(((within, rate if within else -slow), p, c, slow, rate))
    if not scored:
        return None
    (within, _), p, c, slow, rate = max(scored)
    return {"num_programs": p, "chunk_bytes": c, "min_overlapped_GBps": rate, "max_slowdown": slow,
            "within_slowdown_target": within}


# ------------------------------------------------------------------------------------ main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=pathlib.Path, help="the JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; runs on the CPU interpreter too")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed runs per standalone transfer")
    p.add_argument("--overlap-reps", type=int, default=4, help="timed runs per overlap measurement")
    p.add_argument("--seed", type=int, default=None, help="default: from the clock")
    args = p.parse_args()
    if args.seed is None:
        args.seed = time.time_ns() % (1 << 31)
    if args.dry_run:
        args.warmup, args.iters, args.overlap_reps = 1, 2, 2
    return args


def section(result: dict, name: str, fn):
    """Run one section; an exception is recorded under result['errors'] and the run goes on."""
    try:
        result[name] = fn()
    except Exception:  # noqa: BLE001 -- one failed section must not lose the others' numbers
        result.setdefault("errors", {})[name] = traceback.format_exc()
        print(f"section {name} FAILED:\n{result['errors'][name]}", file=sys.stderr)
    return result.get(name)


def main() -> int:
    args = parse_args()
    device = script_device(args.dry_run, "--dry-run")  # before triton is imported below
    import triton

    import kvtier.ops.kv_transfer as kt

    shape = DRY_SHAPE if args.dry_run else Shape()
    clock = Clock(device)
    result = {"device": torch.cuda.get_device_name(device) if clock.cuda else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seed": args.seed, "dry_run": args.dry_run, "dtype": str(DTYPE).removeprefix("torch."),
              "shape": dataclasses.asdict(shape), "moved_bytes": shape.moved_bytes, "gb": "1e9 bytes",
              "warmup": args.warmup, "iters": args.iters, "overlap_reps": args.overlap_reps,
              "constants": {k: getattr(kt, k) for k in dir(kt) if k.startswith("COPY_")}}
    t0 = time.perf_counter()
    setup = section(result, "setup", lambda: make_setup(shape, device, args.seed))
    if setup is not None:
        transfers = all_transfers(kt, setup, shape)
        section(result, "standalone", lambda: run_standalone(clock, setup, transfers, args))
        section(result, "once", lambda: run_once_checks(kt, clock, setup, shape, device, args))
        section(result, "overlap", lambda: run_overlap(clock, shape, device, transfers, args))
    result.pop("setup", None)
    result["verdict"] = verdict(kt, result)
    result["seconds"] = time.perf_counter() - t0
    result["exact"] = all_exact(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0 if result["exact"] and "errors" not in result else 1


def all_exact(result: dict) -> bool:
    checks = [r["exact"] for r in result.get("standalone", []) if r["exact"] is not None]
    checks += [v for k, v in result.get("once", {}).items() if k.startswith("untouched")]
    return bool(checks) and all(checks)


# ------------------------------------------------------------------------------------ table

def print_table(result: dict) -> None:
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  seed {result['seed']}"
          f"  {_size(result['moved_bytes'])} per transfer  ({result['seconds']:.0f} s)")
    passes = result.get("overlap", {}).get("passes", {})
    if passes:
        print("passes alone: " + "   ".join(
            f"{k} {p['tokens']} tok {p['ms']:.2f} ms ({p['tflops']:.0f} TFLOP/s, "
            f"{p['weight_GBps']:.0f} GB/s weights)"
            for k, p in passes.items()))
    alone = {(r["transfer"], r["direction"], r.get("num_programs"), r.get("chunk_bytes")): r
             for r in result.get("standalone", [])}
    over = {(r["transfer"], r["direction"], r.get("num_programs"), r.get("chunk_bytes"), r["pass"],
             r["order"]): r for r in result.get("overlap", {}).get("runs", [])}
    columns = [(kind, order) for kind in ("prefill", "decode") for order in ORDERS]
    print("\nalone: GB/s (% of dma_256MiB) | beside a pass, copies or pass queued first: "
          "the pass's slowdown, the transfer's GB/s")
    print(f"{'transfer':<22} {'dir':<6} | {'alone':>11} | "
          + " | ".join(f"{k} {o.split('_')[0]:>6}".rjust(12) for k, o in columns) + " | exact")
    names = [("dma_256MiB", None, None)]
    names += [("kernel", p, c) for p in SWEEP_NUM_PROGRAMS for c in SWEEP_CHUNK_BYTES]
    names += [("per_row_dma", None, None), ("per_block_dma", None, None), ("staged_dma", None, None)]
    for name, p, c in names:
        for d in DIRECTIONS:
            a = alone.get((name, d, p, c))
            if a is None:
                continue
            label = f"kernel {p}x{c >> 10}Ki" if name == "kernel" else name
            cells = [f"{a['GBps']:5.1f} {_pct(a['fraction_of_pinned'])}"]
            for kind, order in columns:
                o = over.get((name, d, p, c, kind, order))
                cells.append(f"{o['slowdown']:+5.0%} {o['copy_GBps_overlapped']:5.1f}"
                             if o else f"{'-':>11}")
            print(f"{label:<22} {d:<6} | " + " | ".join(cells) + f" | {_yes(a['exact'])}")
    once = result.get("once", {})
    if once:
        print(f"kernel reload + store at once: {once['duplex_kernel']['total_GBps']:.1f} GB/s total;  "
              "untouched blocks unchanged: " + "  ".join(
                  f"{d} {_yes(once.get(f'untouched_blocks_unchanged_{d}'))}" for d in DIRECTIONS))
    _print_verdict(result)


def _print_verdict(result: dict) -> None:
    v = result["verdict"]
    checks = [f"{k} {_yes(x)}" for k, x in v.items() if isinstance(x, bool)]
    default = v["default"]
    print(f"default kernel {default['num_programs']} programs x {default['chunk_bytes'] >> 10} KiB: "
          + ("\n  ".join(["  ".join(c for c in checks if "beside" not in c),
                           "  ".join(c for c in checks if "beside" in c)]) if checks else "not measured"))
    if v.get("best_standalone"):
        b = v["best_standalone"]
        print(f"fewest programs at full rate alone: {b['num_programs']} x {b['chunk_bytes'] >> 10} KiB")
    for kind, b in v.get("best_overlapped", {}).items():
        if b:
            print(f"best kernel beside {kind}: {b['num_programs']} x {b['chunk_bytes'] >> 10} KiB, "
                  f"{b['min_overlapped_GBps']:.1f} GB/s, pass slowdown {b['max_slowdown']:+.0%}")
    print(f"exact {_yes(result['exact'])}" + (f"  ERRORS in {sorted(result['errors'])}"
                                              if "errors" in result else ""))


def _size(num_bytes: int) -> str:
    return f"{num_bytes >> 20} MiB" if num_bytes >= 1 << 20 else f"{num_bytes >> 10} KiB"


def _pct(x) -> str:
    return f"{x:>5.0%}" if x is not None else f"{'-':>5}"


def _yes(x) -> str:
    return "-" if x is None else ("yes" if x else "NO")


if __name__ == "__main__":
    sys.exit(main())
