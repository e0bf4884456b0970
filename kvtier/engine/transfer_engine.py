"""Issues each step's KV copies between the GPU cache and the CPU tier, batched, on copy streams.

How a block moves (chosen by measurement, benchmarks/results/.../transfer_alternatives.json): a
GPU block is 2·L rows scattered over the cache (layer-major), a CPU block one contiguous chunk
(block-major; both tiers' tensors are owned by kvtier/engine/kv_storage.py).

    store:  cache rows --gather kernel--> staging (GPU, block-major) --DMA per run--> pinned pool
    load:   pinned pool --DMA per run--> staging --scatter kernel--> cache rows

The kernel leg is GPU-to-GPU over the whole device and takes ~1% of the time; the DMA leg moves
large contiguous chunks (runs of consecutive CPU blocks merge into one copy) at ~90% of the
pinned link rate and, being done by the copy engines, leaves the SMs to a running forward pass.
A kernel that reads pinned memory directly (UVA) reached the same rate alone but slowed a
concurrent forward by 15-40% (prefill) and more (decode), so it is not used here.

Layer-wise loads (Pie). A load whose CPU blocks come in runs (on average at least
SPLIT_MIN_RUN consecutive blocks) moves one group of layers at a time (LAYER_GROUPS groups),
each run's group as one 2-D DMA copy (kvtier/ops/dma.py), and records an event per group; the
forward's layer i waits only for its group, so the first layers compute while later groups still
cross the link. A load of scattered blocks moves whole blocks instead: a block's groups as
separate copies would double the per-copy cost (H100: 256 scattered blocks reloaded at 48.5 GB/s
whole, 43.6 GB/s in two groups, 40.9 in four).

A step's plan is a tuple of typed operations (kvtier/cache/transfers.py, which says who plans
what); each `Move` goes to the handler registered for its (src tier, dst tier): `_store` for
GPU -> CPU, `_load` for CPU -> GPU. When each runs is the step's `LayerPipeline`
(kvtier/engine/layer_pipeline.py): BEFORE moves as the step begins, PER_LAYER loads of layers
[a, b) at before_layer(a - prefetch_depth), PER_LAYER stores after layer b - 1, AFTER moves
when the forward is done. An operation no handler executes (a Recompute without --kvpr, a Move
between other tiers, into a staging slot) fails the step before anything is issued.

KVPR (enable_activations). Every store of K/V blocks also copies their kept layer inputs beside
them (same CPU block ids). A `Recompute` runs per layer like the ring: its blocks' inputs of layer
i + d cross on the load stream first (the copy kernel, into the activation ring or the GPU blocks'
input rows), and before layer i the compute stream waits for them and projects them to K/V, into
the staging ring's slots or the GPU blocks, while the rest of the step's K/V still crosses.

One step with stores and loads, on a GPU:

    store stream:  wait(compute) -> stores --------------------------------> wait(compute) -> AFTER stores
    load stream:   wait(compute, this step's stores) -> load g0 -> load g1 ...
    compute:       [layers of g0] wait(load g0) -> ... -> [layers of g1] wait(load g1) -> ...

Stores wait for the compute stream because the blocks they read were written by earlier forwards;
loads wait for it because their destination blocks may still be read by an earlier forward, and
for this step's stores because a block being loaded into may be one just evicted and still being
copied out. The forward waits for the loads layer group by layer group (without loads, for the
stores before its first layer: it may write into a block being copied out); a decode replayed as
a CUDA graph waits segment by segment (kvtier/engine/cuda_graphs.py). Write-through stores
(the AFTER moves) read blocks that stay referenced until they complete, so nothing waits for them:
they run beside later steps. On the CPU the same staged path runs as plain copies, in order, and
completes at once.

A quantized CPU tier (--kv-offloading-dtype int8 / int4, kvtier/ops/kv_quant.py) keeps both legs;
the kernel leg converts, so the link carries the quantized bytes (what `bytes` counts):

    store:  cache rows --quantize kernel--> staging QuantizedBlocks (GPU) --DMA per run and tensor--> pinned pool
    load:   pinned pool --DMA per run and tensor--> staging QuantizedBlocks --dequantize kernel--> cache rows

Each of the format's five tensors is block-major with the layer next, and no scale group spans two
layers, so a range of layers quantizes, crosses and dequantizes alone (layer-group loads, PER_LAYER
moves) to the codes a whole block gets. On the CPU the kernels' torch references run (backend
"torch", never the Triton interpreter). Pie's ring and KVPR read the tier's raw rows: the config
refuses them with a quantized tier.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator

import torch

from kvtier.cache.storage import Kind, Tier
from kvtier.cache.transfers import Move, Operation, Recompute, Stage, TransferPlan
from kvtier.engine.host_kv_pool import PIN_CHUNK_BYTES
from kvtier.engine.kv_storage import KVStorage
from kvtier.engine.layer_pipeline import LayerPipeline
from kvtier.ops import dma
from kvtier.ops.kv_quant import QuantizedBlocks, QuantSpec, dequantize_blocks, quantize_blocks
from kvtier.ops.kv_transfer import copy_blocks

STAGING_BYTES = 256 << 20  # per direction; a step moving more goes through it in rounds
LAYER_GROUPS = 2  # at most; the largest divisor of the layer count not above it
SPLIT_MIN_RUN = 2.0  # mean consecutive CPU blocks per DMA run for a load to go group by group
PREFETCH_DEPTH = 1  # a PER_LAYER load of layers [a, b) is issued before layer a - PREFETCH_DEPTH
# How a layer's far blocks reach the staging ring (Pie): "dma", one 2-D copy per run of consecutive
# CPU blocks on a copy engine; "kernel", one launch of the copy kernel reading pinned memory (UVA)
# with RING_KERNEL_PROGRAMS programs. `kvtier bench expansion --ring-load` compares them. H200, Llama-3-8B
# 64 x 2048 (benchmarks/results/h200-2026-12-01/issue13): the DMA's 64 copies a layer (one per
# request) cost 16.1 ms a step at 1% far against 9.9 ms by the kernel (9.3 with nothing far); at
# 16% both are link-bound (60.4 / 59.5 ms). 4 programs: 9.7 ms at 1%, 16.3 at 3%; 8: 10.0 and 12.6.
RING_LOAD = "kernel"
RING_KERNEL_PROGRAMS = 8
# ...but a step reading more far blocks goes by DMA: the kernel path hit an illegal memory access on
# the H200 with OPT-13B at 64 x 512 and every block far (~1100-2100 blocks a step; three runs, not
# with CUDA_LAUNCH_BLOCKING=1, cause not found), where DMA ran clean; the kernel was validated up
# to ~1330 far blocks a step (Llama-3-8B 64 x 2048 at 16% far). Per-copy cost matters less there.
RING_KERNEL_MAX_BLOCKS = 1024


def staging_blocks(block_bytes: int) -> int:
    return max(1, STAGING_BYTES // block_bytes)


def layer_groups(num_layers: int) -> int:
    return max(g for g in range(1, min(LAYER_GROUPS, num_layers) + 1) if num_layers % g == 0)


@dataclasses.dataclass
class RingPlan:
    """One step's far blocks, ready to load layer by layer: for the copy kernel, the CPU block ids
    and ring slots on the device; for DMA (and on the CPU), runs (first ring slot, first CPU block,
    count) of blocks consecutive in both."""
    num_blocks: int
    ids: torch.Tensor | None = None  # (2, n)
    runs: list[tuple[int, int, int]] | None = None


@dataclasses.dataclass
class RecomputePlan:
    """One Recompute ready to run layer by layer: its CPU blocks and destinations (ring slots or
    GPU blocks) as device ids, and every recomputed token's position, (n * block_size,)."""
    op: Recompute
    cpu_ids: torch.Tensor
    dst_ids: torch.Tensor
    positions: torch.Tensor
    runs: list[tuple[int, int, int]] | None = None  # ring_load "dma": (first slot, first CPU block, count)

    @property
    def num_blocks(self) -> int:
        return len(self.op.block_pairs)


# KVPR: (layer, positions (T,), layer inputs (T, h)) -> K, V (T, Hkv, D), as the forward writes them
RecomputeKV = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class _InFlight:
    step_id: int
    timed: list[tuple[str, torch.cuda.Event, torch.cuda.Event]]  # (direction, start, end)


MoveHandler = Callable[[Move, LayerPipeline], None]


class TransferEngine:
    def __init__(self, kv: KVStorage):
        self.kv = kv
        self.gpu_blocks = kv.block_rows(Tier.GPU)  # (Ng, L, 2, row) views of the owner's tensors
        self.quant: QuantSpec | None = kv.quant_spec(Tier.CPU)  # None: the CPU tier holds the GPU's dtype
        self.cpu_blocks = kv.block_rows(Tier.CPU) if self.quant is None else None  # (Nc, L, 2, row), pinned
        self.num_layers, self.num_cpu_blocks = self.gpu_blocks.shape[1], kv.num_blocks(Tier.CPU)
        self.device = kv.device
        self.block_bytes = kv.specs[Tier.CPU].bytes_per_block  # the bytes that cross the link
        self.chunk = kv.cpu_blocks_per_chunk or self.num_cpu_blocks  # a DMA run never crosses a pinned chunk
        self.on_gpu = self.device.type == "cuda"
        per_group = self.num_layers // layer_groups(self.num_layers)
        self.group_layers = [slice(first, first + per_group) for first in range(0, self.num_layers, per_group)]
        self.can_split = len(self.group_layers) > 1 and dma.rows_available(self.device)
        self.prefetch_depth = PREFETCH_DEPTH
        self._init_staging(min(staging_blocks(self.block_bytes), self.num_cpu_blocks))
        if self.on_gpu:
            self.streams = {d: torch.cuda.Stream(self.device) for d in ("to_cpu", "to_gpu")}
            self.kernel_args = {"num_programs": 4 * torch.cuda.get_device_properties(self.device).multi_processor_count}
            self._precompile()
        else:
            self.kernel_args = {}
        self._inflight: list[_InFlight] = []
        self._completed: list[int] = []
        self.seconds = {"to_cpu": 0.0, "to_gpu": 0.0}
        self.bytes = {"to_cpu": 0, "to_gpu": 0}
        self.num_split_loads = 0  # loads that went layer group by layer group
        self.ring: torch.Tensor | None = None  # Pie's staging ring (attach_ring), (entries, slots, 2, row)
        self.ring_load, self.ring_programs = RING_LOAD, RING_KERNEL_PROGRAMS
        self.handlers: dict[tuple[Tier, Tier], MoveHandler] = {}
        # KVPR (enable_activations): kept layer inputs per tier, (blocks, L, 1, bs * h); the ring's
        self.acts: dict[Tier, torch.Tensor] = {}
        self.act_ring: torch.Tensor | None = None  # (entries, slots, bs * h)
        self.recompute_kv: RecomputeKV | None = None
        self.num_recomputed_blocks = 0
        self.register(Tier.GPU, Tier.CPU, self._store)
        self.register(Tier.CPU, Tier.GPU, self._load)

    def _init_staging(self, num_blocks: int) -> None:
        """Device buffers of `num_blocks` CPU-tier blocks. A quantized tier keeps one for loads
        only: quantize_blocks makes its own output, the stores' staging (on a GPU the caching
        allocator hands the same memory back each round, ordered on the store stream)."""
        self.num_staging = num_blocks
        self.staging: dict[str, torch.Tensor] = {}  # (n, L, 2, row) a direction
        self.quant_staging: QuantizedBlocks | None = None
        if self.quant is None:
            self.staging = {d: self.kv.staging(Tier.CPU, num_blocks) for d in ("to_cpu", "to_gpu")}
            return
        self.quant_staging = self.kv.quantized_staging(Tier.CPU, num_blocks)
        self.cpu_quantized = self.kv.quantized_blocks(Tier.CPU)  # pinned, each tensor (Nc, L, ...)
        self.gpu_kv = self.kv.gpu.permute(2, 0, 1, 3, 4, 5)  # (Ng, L, 2, bs, H, D): the cache as blocks
        self.quant_backend = None if self.on_gpu else "torch"  # Triton on a GPU; never the interpreter

    def attach_ring(self, ring: torch.Tensor) -> None:
        """Pie: far blocks are loaded layer by layer into this ring (KVStorage.staging_ring);
        layer i's into entry i % entries, so a ring of d + 1 entries prefetches d layers ahead."""
        if self.quant is not None:
            raise NotImplementedError("the staging ring loads raw K/V: not from a quantized CPU tier")
        self.ring = ring
        self.prefetch_depth = ring.shape[0] - 1

    def enable_activations(self, recompute_kv: RecomputeKV) -> None:
        """KVPR: stores carry the kept layer inputs too, and Recompute operations run through
        `recompute_kv` (the model's K/V projection of a layer)."""
        if self.quant is not None:
            raise NotImplementedError("KVPR keeps no layer inputs beside a quantized CPU tier")
        self.acts = {tier: self.kv.activation_blocks(tier) for tier in (Tier.GPU, Tier.CPU)}
        self.recompute_kv = recompute_kv
        if self.ring is not None:
            self.act_ring = self.kv.activation_ring(self.ring.shape[0], self.ring.shape[1])

    def _precompile(self) -> None:
        """Compile the copy kernel's variants now, not at the first transfer mid-serving: GPU
        block 0 to staging and back (whole blocks and one layer group), which leaves the cache
        as it was."""
        if self.quant is not None:
            self._precompile_quantized()
            return
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        for layers in (slice(None), self.group_layers[0]):  # one variant each (the same with one group)
            copy_blocks(self.gpu_blocks[:, layers], self.staging["to_cpu"][:, layers], zero, zero, **self.kernel_args)
            self.staging["to_gpu"][:1].copy_(self.staging["to_cpu"][:1])
            copy_blocks(self.staging["to_gpu"][:, layers], self.gpu_blocks[:, layers], zero, zero, **self.kernel_args)
        torch.cuda.synchronize(self.device)

    def _precompile_quantized(self) -> None:
        """As _precompile, for a quantized tier's kernels: GPU block 0 quantized and dequantized
        back (whole blocks and one layer group), then restored, the round trip being lossy."""
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        saved = self.gpu_kv[0].clone()
        for layers in (slice(None), self.group_layers[0]):
            dequantize_blocks(self._quantize(layers, zero), self.gpu_kv[:, layers], block_ids=zero)
        self.gpu_kv[0].copy_(saved)
        torch.cuda.synchronize(self.device)

    # -- issuing --------------------------------------------------------------------------------

    def register(self, src: Tier, dst: Tier, handler: MoveHandler) -> None:
        """The handler that issues every Move src -> dst (one per pair of tiers)."""
        self.handlers[src, dst] = handler

    def begin_step(self, plan: TransferPlan) -> LayerPipeline | None:
        """Checks every operation has a handler, then issues the BEFORE moves in plan order; the
        returned pipeline runs the rest around the forward's layers (None when the step moves
        nothing, like most decodes)."""
        if plan.is_empty:
            return None
        for op in plan.operations:
            self._handler(op)
        pipeline = LayerPipeline(self, plan, _InFlight(plan.step_id, []))
        if self.on_gpu:
            self._inflight.append(pipeline.flight)
        return pipeline

    def issue(self, move: Move, pipeline: LayerPipeline) -> None:
        self._handler(move)(move, pipeline)

    def step_done(self, step_id: int) -> None:
        """The pipeline of `step_id` issued its last move (on the CPU: all of them ran)."""
        if not self.on_gpu:
            self._completed.append(step_id)

    def _handler(self, op: Operation) -> MoveHandler:
        """The handler of a Move; a clear error for what no handler executes."""
        if isinstance(op, Recompute):
            if self.recompute_kv is None or (op.ephemeral and self.act_ring is None):
                raise NotImplementedError(f"{op}: recomputation needs an engine with --kvpr "
                                          "(into ring slots: and --kv-expansion)")
            return self._no_handler  # the step's LayerPipeline runs it layer by layer
        handler = self.handlers.get((op.src, op.dst))
        if handler is None:
            raise NotImplementedError(f"{op.src.value} -> {op.dst.value}: no handler registered for this "
                                      f"pair of tiers (handled: {[f'{s.value}->{d.value}' for s, d in self.handlers]})")
        if op.ephemeral:
            if not (op.src is Tier.CPU and op.dst is Tier.GPU and op.stage is Stage.PER_LAYER
                    and op.kind is Kind.KV and op.layers in (None, (0, self.num_layers)) and self.ring is not None):
                raise NotImplementedError(f"{op}: staging-slot moves are whole-model PER_LAYER CPU -> GPU KV "
                                          "loads into the staging ring (--kv-expansion)")
            return handler  # the step's LayerPipeline issues it layer by layer (load_ring_layer)
        if op.kind is not Kind.KV:
            raise NotImplementedError(f"{op}: the GPU<->CPU handlers move KV blocks")
        if op.stage is Stage.PER_LAYER and op.layers is None:
            raise ValueError(f"{op}: a per-layer move names its layers")
        if op.layers is not None and not 0 <= op.layers[0] < op.layers[1] <= self.num_layers:
            raise ValueError(f"{op}: layers must be [first, end) within [0, {self.num_layers})")
        return handler

    @staticmethod
    def _no_handler(move: Move, pipeline: LayerPipeline) -> None:
        raise AssertionError("issued by the step's LayerPipeline")

    def _store(self, move: Move, pipeline: LayerPipeline) -> None:
        """GPU -> CPU: block_pairs (gpu_block_id, cpu_block_id). Waits for the forwards (or, per
        layer, the layers) that wrote its blocks; a BEFORE store is waited for by the forward's
        first layer and by this step's loads."""
        pairs = list(move.block_pairs)
        ranges = [_layer_slice(move.layers)]
        if not self.on_gpu:
            self._copy_now("to_cpu", pairs, ranges)
            self._store_acts(pairs, ranges[0], pipeline.flight)
            return
        self.streams["to_cpu"].wait_stream(torch.cuda.current_stream(self.device))
        ends = self._issue("to_cpu", pairs, pipeline.flight, ranges)
        if self.acts:
            ends.append(self._store_acts(pairs, ranges[0], pipeline.flight))
        if move.stage is Stage.BEFORE:
            pipeline.stores_end = ends[-1]
            pipeline.wait_before(0, ends[-1])

    def _store_acts(self, pairs: list[tuple[int, int]], layers: slice, flight: _InFlight) -> torch.cuda.Event | None:
        """KVPR: the stored blocks' kept layer inputs beside their K/V (pairs: GPU, CPU block), by
        the copy kernel writing pinned memory, after the K/V on the store stream; returns its end."""
        if not self.acts or not pairs:
            return None
        ids = torch.tensor(list(zip(*pairs)), dtype=torch.int64)  # (2, n): GPU, CPU block ids
        src, dst = self.acts[Tier.GPU][:, layers], self.acts[Tier.CPU][:, layers]
        self.bytes["to_cpu"] += len(pairs) * dst[0].numel() * dst.element_size()
        if not self.on_gpu:
            copy_blocks(src, dst, ids[0], ids[1])
            return None
        return self._timed_kernel("to_cpu", flight, lambda: copy_blocks(
            src, dst, *ids.pin_memory().to(self.device, non_blocking=True), num_programs=self.ring_programs))

    def _timed_kernel(self, direction: str, flight: _InFlight, launch: Callable[[], None]) -> torch.cuda.Event:
        """`launch` on `direction`'s stream between two timing events the step waits for; its end."""
        stream = self.streams[direction]
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            launch()
            end.record(stream)
        flight.timed.append((direction, start, end))
        return end

    # -- KVPR: recomputation from kept layer inputs --------------------------------------------

    def plan_recompute(self, op: Recompute) -> RecomputePlan:
        """A Recompute's ids and token positions on the device (one copy each, at step start)."""
        bs = self.kv.specs[Tier.GPU].block_size
        ids = torch.tensor(list(zip(*op.block_pairs)), dtype=torch.int64)  # (2, n): CPU block, destination
        positions = (torch.tensor(op.first_positions, dtype=torch.int64)[:, None] + torch.arange(bs)).flatten()
        runs = None
        if self.on_gpu and op.ephemeral and self._ring_by_dma(len(op.block_pairs)):  # slot i: the i-th block
            acts = self.acts[Tier.CPU]
            runs = _runs(ids[0].tolist(), max(1, PIN_CHUNK_BYTES // (acts[0].numel() * acts.element_size())))
        if self.on_gpu:
            ids, positions = (t.pin_memory().to(self.device, non_blocking=True) for t in (ids, positions))
        return RecomputePlan(op, ids[0], ids[1], positions, runs)

    def load_acts_layer(self, plan: RecomputePlan, layer: int, flight: _InFlight) -> torch.cuda.Event | None:
        """Layer `layer`'s kept inputs of the plan's blocks, by the copy kernel from pinned memory:
        into activation ring entry layer % entries (ephemeral; slot i for the plan's i-th block) or
        the destination GPU blocks' input rows. Returns its end (None on the CPU, where it ran)."""
        src = self.acts[Tier.CPU][:, layer:layer + 1]
        if plan.op.ephemeral:
            assert self.act_ring is not None
            dst = self.act_ring[layer % self.act_ring.shape[0]].unsqueeze(1).unsqueeze(1)  # (slots, 1, 1, row)
            dst_ids = torch.arange(plan.num_blocks, device=plan.cpu_ids.device)
        else:
            dst, dst_ids = self.acts[Tier.GPU][:, layer:layer + 1], plan.dst_ids
        self.bytes["to_gpu"] += plan.num_blocks * src[0].numel() * src.element_size()
        if not self.on_gpu:
            copy_blocks(src, dst, plan.cpu_ids, dst_ids)
            return None
        runs = plan.runs
        if runs is not None:
            return self._timed_kernel("to_gpu", flight, lambda: self._ring_dma(dst[:, 0], src[:, 0], runs))
        return self._timed_kernel("to_gpu", flight, lambda: copy_blocks(
            src, dst, plan.cpu_ids, dst_ids, num_programs=self.ring_programs))

    def recompute_layer(self, plan: RecomputePlan, layer: int) -> None:
        """On the compute stream, once the layer's inputs are in: their K/V of `layer` into the
        ring entry's slots or the GPU blocks."""
        assert self.recompute_kv is not None
        n, bs = plan.num_blocks, self.kv.specs[Tier.GPU].block_size
        if plan.op.ephemeral:
            assert self.act_ring is not None and self.ring is not None
            x = self.act_ring[layer % self.act_ring.shape[0]][:n]  # (n, bs * h)
            rows = self.ring[layer % self.ring.shape[0]]  # (slots, 2, row)
        else:
            x = self.acts[Tier.GPU][:, layer, 0].index_select(0, plan.dst_ids)
            rows = self.gpu_blocks[:, layer]  # (Ng, 2, row)
        k, v = self.recompute_kv(layer, plan.positions, x.reshape(n * bs, -1))
        for part, kv in enumerate((k, v)):
            rows[:, part].index_copy_(0, plan.dst_ids, kv.reshape(n, -1).to(rows.dtype))
        if layer == 0:
            self.num_recomputed_blocks += n

    def _load(self, move: Move, pipeline: LayerPipeline) -> None:
        """CPU -> GPU: block_pairs (cpu_block_id, gpu_block_id). Waits for the forwards that may
        still read its destination blocks, and for this step's stores (only those: earlier
        write-through ones may run on); the forward waits for it layer group by layer group."""
        pairs = [(g, c) for c, g in move.block_pairs]
        ranges = [_layer_slice(move.layers)] if move.layers is not None else self._load_ranges(pairs)
        if not self.on_gpu:
            self._copy_now("to_gpu", pairs, ranges)
            return
        load = self.streams["to_gpu"]
        load.wait_stream(torch.cuda.current_stream(self.device))
        if pipeline.stores_end is not None:
            load.wait_event(pipeline.stores_end)
        for layers, end in zip(ranges, self._issue("to_gpu", pairs, pipeline.flight, ranges)):
            pipeline.wait_before(layers.start or 0, end)

    def _ring_by_dma(self, num_blocks: int) -> bool:
        """Whether a step's `num_blocks` far blocks (or their kept inputs) reach the ring by DMA."""
        return self.ring_load == "dma" or num_blocks > RING_KERNEL_MAX_BLOCKS

    def plan_ring(self, pairs: tuple[tuple[int, int], ...]) -> RingPlan:
        """A step's (CPU block, ring slot) pairs, distinct slots (the runner gives them out in batch
        order; KVPR leaves out the recomputed ones), as device ids for the kernel or as runs for DMA
        and the CPU."""
        slots, cpu_ids = zip(*sorted((s, c) for c, s in pairs)) if pairs else ((), ())
        if self.on_gpu and not self._ring_by_dma(len(pairs)):
            ids = torch.tensor([cpu_ids, slots], dtype=torch.int64)
            return RingPlan(len(cpu_ids), ids=ids.pin_memory().to(self.device, non_blocking=True))
        return RingPlan(len(cpu_ids), runs=_runs(list(cpu_ids), self.chunk, list(slots)))

    def load_ring_layer(self, plan: RingPlan, layer: int, flight: _InFlight) -> torch.cuda.Event | None:
        """One layer of the step's far blocks into ring entry layer % entries: per run of consecutive
        CPU blocks one 2-D DMA of that layer's rows (or one copy-kernel launch for all). On the load
        stream after what it was told to wait for (wait_for_compute); returns the event that marks
        its end (None on the CPU, where it has run)."""
        assert self.ring is not None and self.cpu_blocks is not None
        entry, cpu = self.ring[layer % self.ring.shape[0]], self.cpu_blocks[:, layer]  # (slots, 2, row), (Nc, 2, row)
        self.bytes["to_gpu"] += plan.num_blocks * self.block_bytes // self.num_layers
        if not self.on_gpu:
            assert plan.runs is not None
            for slot, cpu_id, n in plan.runs:
                entry[slot:slot + n].copy_(cpu[cpu_id:cpu_id + n])
            return None
        stream = self.streams["to_gpu"]
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            if plan.ids is not None:
                copy_blocks(cpu.unsqueeze(1), entry.unsqueeze(1), plan.ids[0], plan.ids[1],
                            num_programs=self.ring_programs)
            else:
                assert plan.runs is not None
                self._ring_dma(entry, cpu, plan.runs)
            end.record(stream)
        flight.timed.append(("to_gpu", start, end))
        return end

    @staticmethod
    def _ring_dma(entry: torch.Tensor, cpu: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
        """One 2-D copy per run, from raw addresses (a tensor slice per copy would cost more host
        time than the copy's issue itself)."""
        dst, dst_pitch = entry.data_ptr(), entry.stride(0) * entry.element_size()
        src, src_pitch = cpu.data_ptr(), cpu.stride(0) * cpu.element_size()
        row = entry[0].numel() * entry.element_size()
        for slot, cpu_id, n in runs:
            dma.copy_2d(dst + slot * dst_pitch, dst_pitch, src + cpu_id * src_pitch, src_pitch, row, n, entry.device)

    def wait_for_compute(self) -> None:
        """The load stream waits for the work issued so far on the compute stream."""
        if self.on_gpu:
            self.streams["to_gpu"].wait_stream(torch.cuda.current_stream(self.device))

    def _load_ranges(self, loads: list[tuple[int, int]]) -> list[slice]:
        """A whole-model load goes layer group by layer group only when its CPU blocks come in runs."""
        split = bool(loads) and self.can_split and len(loads) >= SPLIT_MIN_RUN * len(
            _runs(sorted(c for _, c in loads), self.chunk))
        self.num_split_loads += split
        return self.layer_ranges(split)

    def layer_ranges(self, split: bool) -> list[slice]:
        return list(self.group_layers) if split else [slice(None)]

    def _issue(self, direction: str, pairs: list[tuple[int, int]], flight: _InFlight,
               ranges: list[slice]) -> list[torch.cuda.Event]:
        """pairs: (gpu_block_id, cpu_block_id), moved in `direction` on that direction's stream;
        returns an event per layer range marking its end."""
        stream = self.streams[direction]
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            ends = []
            for copies in self._staged_copies(direction, pairs, ranges):
                for copy in copies:
                    copy()
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record(stream)
        flight.timed.append((direction, start, ends[-1]))
        return ends

    def _copy_now(self, direction: str, pairs: list[tuple[int, int]], ranges: list[slice]) -> None:
        if pairs:
            start = time.perf_counter()
            for copies in self._staged_copies(direction, pairs, ranges):
                for copy in copies:
                    copy()
            self.seconds[direction] += time.perf_counter() - start

    def _staged_copies(self, direction: str, pairs: list[tuple[int, int]],
                       ranges: list[slice]) -> Iterator[list[Callable[[], None]]]:
        """Per layer range, its copies as callables: rounds of up to one staging buffer, each a
        kernel leg on the device and a DMA leg per run of consecutive CPU blocks (sorted by CPU
        block, so slot i of a round holds its i-th)."""
        pairs = sorted(pairs, key=lambda p: p[1])
        rounds = []
        for lo in range(0, len(pairs), self.num_staging):
            chunk = pairs[lo:lo + self.num_staging]
            ids = torch.tensor([[g for g, _ in chunk], list(range(len(chunk)))], dtype=torch.int64)
            if self.on_gpu:
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            rounds.append((ids, _runs([c for _, c in chunk], self.chunk)))
        moved_layers = sum(len(range(self.num_layers)[layers]) for layers in ranges)
        self.bytes[direction] += len(pairs) * self.block_bytes * moved_layers // self.num_layers
        copy = self._copy_rows if self.quant is None else self._copy_quantized
        for layers in ranges:
            yield [functools.partial(copy, direction, layers, ids, runs) for ids, runs in rounds]

    def _copy_rows(self, direction: str, layers: slice, ids: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
        """One round in the GPU cache's dtype. ids (2, n): GPU blocks, staging slots."""
        assert self.cpu_blocks is not None
        gpu, cpu, stage = self.gpu_blocks[:, layers], self.cpu_blocks[:, layers], self.staging[direction][:, layers]
        if direction == "to_cpu":
            copy_blocks(gpu, stage, ids[0], ids[1], **self.kernel_args)
        for slot, cpu_id, n in runs:
            if direction == "to_cpu":
                dma.copy_rows(cpu[cpu_id:cpu_id + n], stage[slot:slot + n])
            else:
                dma.copy_rows(stage[slot:slot + n], cpu[cpu_id:cpu_id + n])
        if direction == "to_gpu":
            copy_blocks(stage, gpu, ids[1], ids[0], **self.kernel_args)

    def _copy_quantized(self, direction: str, layers: slice, ids: torch.Tensor,
                        runs: list[tuple[int, int, int]]) -> None:
        """One round of a quantized tier. ids (2, n): GPU blocks, staging slots (slot i = the
        round's i-th block). A store quantizes the GPU blocks into staging, then each of its
        tensors crosses per run; a load crosses into staging, then dequantizes into the GPU blocks."""
        assert self.quant is not None and self.quant_staging is not None
        if direction == "to_cpu":
            stage = self._quantize(layers, ids[0])
        else:
            layer_spec = dataclasses.replace(self.quant, num_layers=len(range(self.num_layers)[layers]))
            stage = _leading_view(self.quant_staging, layer_spec, ids.shape[1])
        cpu_tensors = [t[:, layers] for t in self.cpu_quantized.tensors()]  # each (Nc, L', ...)
        for cpu, staged in zip(cpu_tensors, stage.tensors()):  # staged (n, L', ...)
            for slot, cpu_id, n in runs:
                if direction == "to_cpu":
                    dma.copy_rows(cpu[cpu_id:cpu_id + n], staged[slot:slot + n])
                else:
                    dma.copy_rows(staged[slot:slot + n], cpu[cpu_id:cpu_id + n])
        if direction == "to_gpu":
            dequantize_blocks(stage, self.gpu_kv[:, layers], block_ids=ids[0], backend=self.quant_backend)

    def _quantize(self, layers: slice, gpu_ids: torch.Tensor) -> QuantizedBlocks:
        """GPU blocks gpu_ids (n,), their `layers`, quantized where the cache is: (n, L', ...) blocks."""
        assert self.quant is not None
        return quantize_blocks(self.gpu_kv[:, layers], self.quant.bits, self.quant.group_size,
                               k_group_size=self.quant.k_group_size, block_ids=gpu_ids, backend=self.quant_backend)

    # -- completion -----------------------------------------------------------------------------

    def poll(self) -> list[int]:
        """Step ids whose copies have all completed since the last poll (never blocks)."""
        done, self._completed = self._completed, []
        still = []
        for flight in self._inflight:
            if all(end.query() for _, _, end in flight.timed):
                for direction, start, end in flight.timed:
                    self.seconds[direction] += start.elapsed_time(end) / 1e3
                done.append(flight.step_id)
            else:
                still.append(flight)
        self._inflight = still
        return done

    def synchronize(self) -> list[int]:
        """Wait for every in-flight copy (tests and shutdown); returns the completed step ids."""
        if self.on_gpu:
            for stream in self.streams.values():
                stream.synchronize()
        return self.poll()

    def stats(self) -> dict[str, float]:
        return transfer_stats(self.bytes, self.seconds)


def transfer_stats(num_bytes: dict[str, int], seconds: dict[str, float]) -> dict[str, float]:
    """The stats() keys of the transfers (also those of an engine without a CPU tier: zeros)."""
    return {"bytes_to_cpu_total": num_bytes["to_cpu"], "bytes_to_gpu_total": num_bytes["to_gpu"],
            "transfer_seconds_to_cpu_total": seconds["to_cpu"], "transfer_seconds_to_gpu_total": seconds["to_gpu"]}


def _leading_view(blocks: QuantizedBlocks, spec: QuantSpec, num_blocks: int) -> QuantizedBlocks:
    """`num_blocks` blocks of `spec` (e.g. fewer layers) over the first elements of `blocks`'
    tensors: contiguous, as dequantize_blocks needs, where a slice of layers would not be."""
    shapes = spec.shapes(num_blocks).values()  # in QuantizedBlocks' field order
    return QuantizedBlocks(spec, *(t.view(-1)[:math.prod(shape)].view(shape)
                                   for t, shape in zip(blocks.tensors(), shapes)))


def _layer_slice(layers: tuple[int, int] | None) -> slice:
    return slice(None) if layers is None else slice(*layers)


def _runs(cpu_ids: list[int], chunk: int, slots: list[int] | None = None) -> list[tuple[int, int, int]]:
    """CPU block ids, slot i holding the i-th (or slots[i]) -> (first slot, first CPU block, length)
    of each run of blocks consecutive in both within one `chunk`-block registration of the pinned pool."""
    runs: list[tuple[int, int, int]] = []
    for i, cpu_id in enumerate(cpu_ids):
        slot = i if slots is None else slots[i]
        if runs and runs[-1][1] + runs[-1][2] == cpu_id and runs[-1][0] + runs[-1][2] == slot and cpu_id % chunk:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, cpu_id, 1))
    return runs
