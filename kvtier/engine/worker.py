"""Worker: executes a step plan on one device — `execute(plan) -> RunnerOutput`.

It owns what a GPU holds: the KV storage of every tier (kvtier/engine/kv_storage.py), the model
runner (inputs, forward, sampling) and the transfer engine (moves between tiers, dispatched to a
handler per (src, dst) tier). The engine process owns the scheduler and the block bookkeeping and
sends the worker only the plan (plain data, picklable: kvtier/scheduler/output.py), so one worker
per GPU can run the same plan (tensor parallelism).

One step:

    runner.update_states(plan)        finished requests dropped, block-table diffs applied
    runner.prepare_inputs(...)        the step's small arrays cross to the device first
    transfers.begin_step(plan.transfers) -> pipeline   BEFORE moves issued
    runner.execute_model(inputs, pipeline.hooks)       the forward waits / issues per layer
    pipeline.finish()                 the rest waited for; AFTER moves issued (also on failure)

`execute_async` returns once the step is issued: its tokens stay on the device, where the next
step's placeholder ids read them (async scheduling), and `StepFuture.result()` brings them to the
host. `execute` is the two at once.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvtier.cache.storage import Kind, Tier
from kvtier.cache.transfers import Move, Stage, TransferPlan
from kvtier.engine.kv_storage import KVStorage
from kvtier.engine.kvpr_runtime import KVPRRuntime
from kvtier.engine.model_runner import ModelInputs, ModelRunner
from kvtier.engine.sampler import DeviceSample
from kvtier.engine.transfer_engine import PREFETCH_DEPTH, TransferEngine, transfer_stats
from kvtier.models.config import ModelConfig
from kvtier.offload.kvpr import KVPRRates, KVPRShape
from kvtier.ops.attention import NO_HOOKS
from kvtier.scheduler.output import RunnerOutput, SchedulerOutput


@dataclasses.dataclass
class StepFuture:
    """A step issued to the device; `result()` waits for its sampled tokens' copy to the host."""
    sample: DeviceSample | None  # None: no request samples this step
    # when the step's device work began and ended (Worker.time_steps, on a GPU): benchmarks read
    # the gaps between steps, the host time the device waited for
    device_start: torch.cuda.Event | None = None
    device_end: torch.cuda.Event | None = None

    def result(self) -> RunnerOutput:
        if self.sample is None:
            return RunnerOutput({})
        tokens = self.sample.to_host()
        return RunnerOutput({item.request_id: token for item, token in zip(self.sample.items, tokens)})


class Worker:
    def __init__(self, model: nn.Module, cfg: ModelConfig, kv: KVStorage, device: torch.device,
                 seed: int = 0, attention_backend: str | None = None):
        self.kv = kv
        self.runner = ModelRunner(model, cfg, kv, device, seed, attention_backend)
        self.transfers = TransferEngine(kv) if kv.has_cpu_tier else None  # None: no CPU tier
        self.time_steps = False  # record device events around each step (the engine's step log)
        self.kvpr: KVPRRuntime | None = None  # enable_kvpr

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(plan).result()

    @torch.inference_mode()
    def execute_async(self, plan: SchedulerOutput) -> StepFuture:
        """Issue the step; its sampled ids stay on the device (the next step's placeholders read
        them) and reach the host through `StepFuture.result()`."""
        self.runner.update_states(plan)
        # the step's inputs cross to the device before its loads: one copy engine serves a direction
        # in order, so a small copy issued after 500 MiB of loads would wait for all of them
        inputs = None if plan.is_empty else self.runner.prepare_inputs(plan.scheduled)
        transfers = plan.transfers
        if self.kvpr is not None:  # part of what the step reads from the CPU tier recomputed
            transfers = self._kvpr_plan(plan, inputs)
        elif inputs is not None and inputs.ring_pairs:  # Pie: the far blocks, layer by layer into the ring
            ring_load = Move(Tier.CPU, Tier.GPU, Kind.KV, inputs.ring_pairs, Stage.PER_LAYER, ephemeral=True)
            transfers = TransferPlan(transfers.step_id, (*transfers.operations, ring_load))
        pipeline = self.transfers.begin_step(transfers) if self.transfers is not None else None
        try:
            if inputs is None:
                return StepFuture(None)
            start = self._event()  # after the inputs: a gap before it is the device waiting for the host
            sample = self.runner.execute_model(inputs, pipeline.hooks if pipeline is not None else NO_HOOKS)
            return StepFuture(sample, start, self._event())
        finally:  # also when the forward or the sampler raised: the step's copies still complete
            if pipeline is not None:
                pipeline.finish()

    def _kvpr_plan(self, plan: SchedulerOutput, inputs: ModelInputs | None) -> TransferPlan:
        assert self.kvpr is not None
        if inputs is None:
            return self.kvpr.rewrite(plan.transfers, (), (), None, None)
        loads = plan.transfers.pairs(Tier.CPU, Tier.GPU)  # prefix hits, swap-ins: placed by the step's tables
        positions_of = self.runner.block_positions(plan.scheduled) if loads else None
        return self.kvpr.rewrite(plan.transfers, inputs.ring_pairs, inputs.ring_first_positions,
                                 inputs.first_slot_blocks, positions_of)

    def enable_kvpr(self, cfg: ModelConfig, rates: KVPRRates, fraction: float | None) -> None:
        """KVPR: every forward keeps its layer inputs per KV slot, stores carry them to the CPU
        tier, and steps recompute part of what they read from it (after enable_far, before the
        graphs are captured: they write the kept inputs)."""
        if self.transfers is None or self.kv.gpu_acts is None:
            raise ValueError("KVPR needs the CPU tier and storage allocated with activations")
        self.runner.save_layer_inputs(self.kv.activation_rows(cfg.hidden_size))
        self.transfers.enable_activations(self.runner.recompute_kv)
        spec = self.kv.specs[Tier.GPU]
        shape = KVPRShape(1, cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, spec.torch_dtype().itemsize)
        self.kvpr = KVPRRuntime(self.kv.num_blocks(Tier.GPU), self.kv.num_blocks(Tier.CPU), spec.block_size,
                                shape, rates, fraction, spec.num_layers)

    def _event(self) -> torch.cuda.Event | None:
        """A timing event recorded now on the compute stream, when steps are timed on a GPU."""
        if not self.time_steps or self.kv.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    def forget_sampled(self) -> None:
        """After a failed step: the next plans carry no placeholder for what was drawn before."""
        self.runner.forget_sampled()

    def enable_far(self, num_slots: int) -> int:
        """Pie: a staging ring of `num_slots` far blocks, PREFETCH_DEPTH + 1 layers deep, shared by
        the transfer engine (which loads it) and the attention (which reads it). Returns its bytes."""
        if self.transfers is None:
            raise ValueError("far-resident KV needs the CPU tier (--kv-offloading-size)")
        ring = self.kv.staging_ring(PREFETCH_DEPTH + 1, num_slots)
        self.transfers.attach_ring(ring)
        self.runner.attach_ring(ring)
        return ring.numel() * ring.element_size()

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """One graph segment per layer group that CPU-tier loads may arrive by; per layer with
        far blocks (each layer waits for its own ring entry, which the layer before frees)."""
        starts = [layers.start for layers in self.transfers.group_layers] if self.transfers is not None else [0]
        if self.runner.ring_slots:
            starts = list(range(len(self.runner.kv_caches)))
        self.runner.capture_decode_graphs(max_num_seqs, max_model_len, starts)

    def free_kv_cache(self) -> None:
        """Drop every tier's KV tensors and what holds them (graphs, staging buffers): the engine
        cannot step after this (benchmarks give the memory to a peer run last)."""
        self.runner.kv_caches, self.runner.graphs, self.transfers = [], None, None
        self.kv.close()
        del self.kv

    def poll(self, wait: bool = False) -> list[int]:
        """Step ids whose moves have completed (wait: for all in flight first)."""
        if self.transfers is None:
            return []
        done = self.transfers.synchronize() if wait else self.transfers.poll()
        if self.kvpr is not None:
            self.kvpr.refresh_link(self.transfers.bytes["to_gpu"], self.transfers.seconds["to_gpu"])
        return done

    def num_blocks(self, tier: Tier) -> int:
        return self.kv.num_blocks(tier) if tier is Tier.GPU or self.kv.has_cpu_tier else 0

    def stats(self) -> dict[str, float]:
        if self.transfers is not None:
            return self.transfers.stats() | (self.kvpr.stats() if self.kvpr is not None else {})
        return transfer_stats({"to_cpu": 0, "to_gpu": 0}, {"to_cpu": 0.0, "to_gpu": 0.0})
