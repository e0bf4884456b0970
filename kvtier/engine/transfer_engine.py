"""Issues each step's KV copies between the GPU cache and the CPU tier, batched, on copy streams.

How a block moves (chosen by measurement, benchmarks/results/.../transfer.json): a GPU block is
2·L rows scattered over the cache (layer-major), a CPU block one contiguous chunk (block-major).

    store:  cache rows --gather kernel--> staging (GPU, block-major) --DMA per run--> pinned pool
    load:   pinned pool --DMA per run--> staging --scatter kernel--> cache rows

The kernel leg is GPU-to-GPU over the whole device and takes ~1% of the time; the DMA leg moves
≥ 2 MiB contiguous chunks (runs of consecutive CPU blocks merge into one copy) at ~90% of the
pinned link rate and, being done by the copy engines, leaves the SMs to a running forward pass.
A kernel that reads pinned memory directly (UVA) reached the same rate alone but slowed a
concurrent forward by 15-40% (prefill) and more (decode), so it is not used here.

One step, on a GPU (see kvtier/cache/transfers.py for who plans what):

    store stream:  wait(compute) -> stores --------------------------> wait(compute) -> stores_after
    load stream:   wait(compute, this step's stores) -> loads
    compute:                               wait(loads, this step's stores) -> forward -> ...

Stores wait for the compute stream because the blocks they read were written by earlier forwards;
loads wait for it because their destination blocks may still be read by an earlier forward, and
for this step's stores because a block being loaded into may be one just evicted and still being
copied out. The forward waits for both. Write-through stores (stores_after) read blocks that stay
referenced until they complete, so nothing waits for them: they run beside later steps. On the CPU the same
staged path runs as plain copies, in order, and completes at once.
"""

from __future__ import annotations

import dataclasses
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


class TransferEngine:
    def __init__(self, gpu_kv: torch.Tensor, cpu_kv: torch.Tensor, block_bytes: int,
                 cpu_blocks_per_chunk: int | None = None):
        # gpu_kv: (L, 2, Ng, bs, Hkv, D) on the device; cpu_kv: (Nc, L, 2, bs, Hkv, D) pinned
        num_layers = gpu_kv.shape[0]
        self.gpu_blocks = gpu_kv.view(num_layers, 2, gpu_kv.shape[2], -1).permute(2, 0, 1, 3)
        self.cpu_blocks = cpu_kv.view(cpu_kv.shape[0], num_layers, 2, -1)  # (block, layer, kv, row)
        self.device = gpu_kv.device
        self.block_bytes = block_bytes
        self.chunk = cpu_blocks_per_chunk or cpu_kv.shape[0]  # a DMA run never crosses a pinned chunk
        self.on_gpu = self.device.type == "cuda"
        rows = (min(staging_blocks(block_bytes), cpu_kv.shape[0]),) + tuple(self.cpu_blocks.shape[1:])
        self.staging = {d: torch.empty(rows, dtype=gpu_kv.dtype, device=self.device) for d in ("to_cpu", "to_gpu")}
        if self.on_gpu:
            self.streams = {d: torch.cuda.Stream(self.device) for d in ("to_cpu", "to_gpu")}
            self.kernel_args = {"num_programs": 4 * torch.cuda.get_device_properties(self.device).multi_processor_count}
        else:
            self.kernel_args = {}
        self._inflight: list[_InFlight] = []
        self._completed: list[int] = []
        self.seconds = {"to_cpu": 0.0, "to_gpu": 0.0}
        self.bytes = {"to_cpu": 0, "to_gpu": 0}

    # -- issuing --------------------------------------------------------------------------------

    def before_forward(self, plan: KVTransfers) -> None:
        """Stores, then loads; the compute stream waits for them before the forward.

        A step that moves nothing costs nothing here (most decode steps)."""
        if plan.is_empty:
            return
        loads = [(g, c) for c, g in plan.loads]
        if not self.on_gpu:
            self._copy_now("to_cpu", plan.stores)
            self._copy_now("to_gpu", loads)
            return
        compute = torch.cuda.current_stream(self.device)
        flight = _InFlight(plan.step_id, [])
        stored = None
        if plan.stores:
            self.streams["to_cpu"].wait_stream(compute)
            stored = self._issue("to_cpu", plan.stores, flight)
        if loads:
            load = self.streams["to_gpu"]
            load.wait_stream(compute)
            if stored is not None:  # only this step's stores: earlier write-through ones may run on
                load.wait_event(stored)
            compute.wait_event(self._issue("to_gpu", loads, flight))
        if stored is not None:
            compute.wait_event(stored)
        self._inflight.append(flight)

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

    def _issue(self, direction: str, pairs: list[tuple[int, int]], flight: _InFlight) -> torch.cuda.Event:
        """pairs: (gpu_block_id, cpu_block_id), moved in `direction` on that direction's stream;
        returns the event marking their end."""
        stream = self.streams[direction]
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._staged_copy(direction, pairs)
            end.record(stream)
        flight.timed.append((direction, start, end))
        return end

    def _copy_now(self, direction: str, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            start = time.perf_counter()
            self._staged_copy(direction, pairs)
            self.seconds[direction] += time.perf_counter() - start

    def _staged_copy(self, direction: str, pairs: list[tuple[int, int]]) -> None:
        """Rounds of up to one staging buffer: kernel leg on the device, DMA leg per run of
        consecutive CPU blocks (sorted by CPU block, so slot i of a round holds its i-th)."""
        staging = self.staging[direction]
        pairs = sorted(pairs, key=lambda p: p[1])
        for lo in range(0, len(pairs), staging.shape[0]):
            chunk = pairs[lo:lo + staging.shape[0]]
            ids = torch.tensor([[g for g, _ in chunk], list(range(len(chunk)))], dtype=torch.int64)
            if self.on_gpu:
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            if direction == "to_cpu":
                copy_blocks(self.gpu_blocks, staging, ids[0], ids[1], **self.kernel_args)
            for slot, cpu_id, n in _runs([c for _, c in chunk], self.chunk):
                if direction == "to_cpu":
                    self.cpu_blocks[cpu_id:cpu_id + n].copy_(staging[slot:slot + n], non_blocking=True)
                else:
                    staging[slot:slot + n].copy_(self.cpu_blocks[cpu_id:cpu_id + n], non_blocking=True)
            if direction == "to_gpu":
                copy_blocks(staging, self.gpu_blocks, ids[1], ids[0], **self.kernel_args)
        self.bytes[direction] += len(pairs) * self.block_bytes

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
