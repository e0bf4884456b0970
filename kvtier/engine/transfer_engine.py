"""Issues each step's KV copies between the GPU cache and the CPU tier, batched, on copy streams.

How a block moves (chosen by measurement, benchmarks/results/.../transfer_alternatives.json): a
GPU block is 2·L rows scattered over the cache (layer-major); the CPU tier keeps the layers in a
few groups, and within a group a block is one contiguous chunk (kvtier/engine/host_kv_pool.py).
Group by group:

    store:  cache rows --gather kernel--> staging (GPU) --DMA per run--> pinned pool
    load:   pinned pool --DMA per run--> staging --scatter kernel--> cache rows

The kernel leg is GPU-to-GPU over the whole device and takes ~1% of the time; the DMA leg moves
large contiguous chunks (runs of consecutive CPU blocks merge into one copy) at ~90% of the
pinned link rate and, being done by the copy engines, leaves the SMs to a running forward pass.
A kernel that reads pinned memory directly (UVA) reached the same rate alone but slowed a
concurrent forward by 15-40% (prefill) and more (decode), so it is not used here.

One step with stores and loads, on a GPU (see kvtier/cache/transfers.py for who plans what):

    store stream:  wait(compute) -> store g0, g1, ... ------------------> wait(compute) -> stores_after
    load stream:   wait(compute) -> wait(store g0) -> load g0 -> wait(store g1) -> load g1 ...
    compute:       [layers of g0] wait(load g0) -> ... -> [layers of g1] wait(load g1) -> ...

Stores wait for the compute stream because the blocks they read were written by earlier forwards;
loads wait for it because their destination blocks may still be read by an earlier forward, and
for the same group's stores because a block being loaded into may be one just evicted and still
being copied out. A layer of the forward waits for its group's loads (or, without loads, its
group's stores: it may write into a block being copied out), so the first layers compute while
the later groups are still crossing the link. A decode replayed as a CUDA graph waits for all of
them first. Write-through stores (stores_after) read blocks that stay referenced until they
complete, so nothing waits for them: they run beside later steps. On the CPU the same staged path
runs as plain copies, in order, and completes at once.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from kvtier.cache.transfers import KVTransfers
from kvtier.ops.kv_transfer import copy_blocks

STAGING_BYTES = 256 << 20  # per direction; a step moving more goes through it in rounds


def staging_blocks(block_bytes: int) -> int:
    return max(1, STAGING_BYTES // block_bytes)


@dataclasses.dataclass
class _InFlight:
    step_id: int
    timed: list[tuple[str, torch.cuda.Event, torch.cuda.Event]]  # (direction, start, end)


@dataclasses.dataclass
class LayerReady:
    """When each layer's KV of this step's copies is in place: the compute stream waits for
    events[g] before the first layer of group g (AttentionMetadata.layer_ready calls this)."""
    layers_per_group: int
    events: list[torch.cuda.Event]  # one per layer group
    device: torch.device
    _waited: int = 0  # groups the compute stream already waits for

    def __call__(self, layer: int) -> None:
        self._wait_through(layer // self.layers_per_group + 1)

    def wait_all(self) -> None:
        self._wait_through(len(self.events))

    def _wait_through(self, num_groups: int) -> None:
        stream = torch.cuda.current_stream(self.device)
        for event in self.events[self._waited:num_groups]:
            stream.wait_event(event)
        self._waited = max(self._waited, num_groups)


class TransferEngine:
    def __init__(self, gpu_kv: torch.Tensor, cpu_kv: torch.Tensor, block_bytes: int,
                 cpu_blocks_per_chunk: int | None = None):
        # gpu_kv: (L, 2, Ng, bs, Hkv, D) on the device; cpu_kv: (G, Nc, L/G, 2, bs, Hkv, D) pinned
        num_layers, num_groups, num_cpu_blocks = gpu_kv.shape[0], cpu_kv.shape[0], cpu_kv.shape[1]
        self.layers_per_group = num_layers // num_groups
        self.gpu_kv = gpu_kv
        self.gpu_blocks = gpu_kv.view(num_layers, 2, gpu_kv.shape[2], -1).permute(2, 0, 1, 3)  # (block, layer, kv, row)
        self.num_cpu_blocks = num_cpu_blocks
        lg = self.layers_per_group
        self.groups = [(self.gpu_blocks[:, g * lg:(g + 1) * lg], cpu_kv[g].view(num_cpu_blocks, lg, 2, -1))
                       for g in range(num_groups)]  # per group (GPU view, CPU view), both (block, layer, kv, row)
        self.device = gpu_kv.device
        self.block_bytes = block_bytes
        self.chunk = cpu_blocks_per_chunk or num_cpu_blocks  # a DMA run never crosses a pinned chunk
        self.on_gpu = self.device.type == "cuda"
        # one staging buffer per direction, seen per group as (blocks, L/G, 2, row): a round of one
        # group holds num_groups times the blocks of a whole-block round
        self.round_blocks = min(staging_blocks(block_bytes), num_cpu_blocks) * num_groups
        group_rows = (self.round_blocks,) + tuple(self.groups[0][1].shape[1:])
        self.staging = {d: torch.empty(group_rows, dtype=gpu_kv.dtype, device=self.device) for d in ("to_cpu", "to_gpu")}
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

    def _precompile(self) -> None:
        """Compile the copy kernel's variant for each direction now, not at the first transfer
        mid-serving: GPU block 0 to staging and back, which leaves the cache as it was."""
        gpu, _ = self.groups[0]
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        copy_blocks(gpu, self.staging["to_cpu"], zero, zero, **self.kernel_args)
        self.staging["to_gpu"][:1].copy_(self.staging["to_cpu"][:1])
        copy_blocks(self.staging["to_gpu"], gpu, zero, zero, **self.kernel_args)
        torch.cuda.synchronize(self.device)

    # -- issuing --------------------------------------------------------------------------------

    def before_forward(self, plan: KVTransfers) -> LayerReady | None:
        """Stores, then loads, group by group; returns what the forward must wait for per layer
        (None when nothing is in flight: the CPU, or a step that moves nothing, like most decodes)."""
        if plan.is_empty:
            return None
        loads = [(g, c) for c, g in plan.loads]
        if not self.on_gpu:
            self._copy_now("to_cpu", plan.stores)
            self._copy_now("to_gpu", loads)
            return None
        if not plan.stores and not loads:
            self._inflight.append(_InFlight(plan.step_id, []))
            return None
        compute = torch.cuda.current_stream(self.device)
        flight = _InFlight(plan.step_id, [])
        stored = None
        if plan.stores:
            self.streams["to_cpu"].wait_stream(compute)
            stored = self._issue("to_cpu", plan.stores, flight)
        ready = stored
        if loads:
            self.streams["to_gpu"].wait_stream(compute)
            ready = self._issue("to_gpu", loads, flight, after=stored)
        self._inflight.append(flight)
        return LayerReady(self.layers_per_group, ready, self.device)

    def after_forward(self, plan: KVTransfers) -> None:
        """Write-through stores of blocks the forward just filled; nothing waits for them."""
        if plan.is_empty:
            return
        if not self.on_gpu:
            self._copy_now("to_cpu", plan.stores_after)
            self._completed.append(plan.step_id)
        elif plan.stores_after:
            self.streams["to_cpu"].wait_stream(torch.cuda.current_stream(self.device))
            self._issue("to_cpu", plan.stores_after, self._inflight[-1])

    def _issue(self, direction: str, pairs: list[tuple[int, int]], flight: _InFlight,
               after: list[torch.cuda.Event] | None = None) -> list[torch.cuda.Event]:
        """pairs: (gpu_block_id, cpu_block_id), moved in `direction` on that direction's stream,
        group by group, group g after after[g]; returns one event per group marking its end."""
        stream = self.streams[direction]
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            ends = []
            for g, rounds in self._staged_rounds(direction, pairs):
                if after is not None:
                    stream.wait_event(after[g])
                for copy in rounds:
                    copy()
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record(stream)
        flight.timed.append((direction, start, ends[-1]))
        return ends

    def _copy_now(self, direction: str, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            start = time.perf_counter()
            for _, rounds in self._staged_rounds(direction, pairs):
                for copy in rounds:
                    copy()
            self.seconds[direction] += time.perf_counter() - start

    def _staged_rounds(self, direction: str, pairs: list[tuple[int, int]]):
        """Per layer group (g, its copies as callables): rounds of up to one staging buffer, each a
        kernel leg on the device and a DMA leg per run of consecutive CPU blocks (sorted by CPU
        block, so slot i of a round holds its i-th)."""
        staging = self.staging[direction]
        pairs = sorted(pairs, key=lambda p: p[1])
        rounds = []
        for lo in range(0, len(pairs), self.round_blocks):
            chunk = pairs[lo:lo + self.round_blocks]
            ids = torch.tensor([[g for g, _ in chunk], list(range(len(chunk)))], dtype=torch.int64)
            if self.on_gpu:
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            rounds.append((ids, _runs([c for _, c in chunk], self.chunk)))
        self.bytes[direction] += len(pairs) * self.block_bytes

        def copy(gpu: torch.Tensor, cpu: torch.Tensor, ids: torch.Tensor, runs) -> None:
            if direction == "to_cpu":
                copy_blocks(gpu, staging, ids[0], ids[1], **self.kernel_args)
            for slot, cpu_id, n in runs:
                if direction == "to_cpu":
                    cpu[cpu_id:cpu_id + n].copy_(staging[slot:slot + n], non_blocking=True)
                else:
                    staging[slot:slot + n].copy_(cpu[cpu_id:cpu_id + n], non_blocking=True)
            if direction == "to_gpu":
                copy_blocks(staging, gpu, ids[1], ids[0], **self.kernel_args)

        for g, (gpu, cpu) in enumerate(self.groups):
            yield g, [functools.partial(copy, gpu, cpu, ids, runs) for ids, runs in rounds]

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


def _runs(cpu_ids: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """Sorted CPU block ids -> (first slot, first CPU block, length) of each run of consecutive
    blocks within one `chunk`-block registration of the pinned pool."""
    runs: list[tuple[int, int, int]] = []
    for slot, cpu_id in enumerate(cpu_ids):
        if runs and runs[-1][1] + runs[-1][2] == cpu_id and cpu_id % chunk:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, cpu_id, 1))
    return runs
