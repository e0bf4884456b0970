"""LayerPipeline: one step's moves between tiers, issued and waited for around the forward's layers.

The worker makes one per step that moves anything (TransferEngine.begin_step) and hands the
forward its `hooks`. Per layer i of the forward (kvtier/models/decoder.py calls them in order; a
CUDA graph replayed in segments calls them for every layer of a segment before and after it):

    before_layer(i)  issue the PER_LAYER loads that layer i + prefetch_depth reads (the first
                     layers' at the start), then make the compute stream wait for every copy
                     that layers <= i read: BEFORE stores (at layer 0), BEFORE loads per layer
                     group, PER_LAYER loads per layer range
                     and (Pie) the staging-ring load of layer i + d's far blocks, after the layer
                     that last read its ring entry (i - 1); (KVPR) before those, the kept layer
                     inputs of layer i + d of each Recompute's blocks; then, once layer i's
                     inputs are in, their K/V projection on the compute stream
    after_layer(i)   issue the PER_LAYER stores of ranges ending at layer i (what the layer wrote)
    finish()         wait for whatever is left, then issue the AFTER moves (write-through), which
                     nothing in the step waits for

Ordering inside one step (which handler waits for which stream) is the transfer engine's; this
object only says when each move is issued and where the forward waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvtier.cache.storage import Tier
from kvtier.cache.transfers import Move, Recompute, Stage, TransferPlan
from kvtier.ops.attention import LayerHooks

if TYPE_CHECKING:
    from kvtier.engine.transfer_engine import RecomputePlan, RingPlan, TransferEngine, _InFlight


class LayerPipeline:
    def __init__(self, engine: TransferEngine, plan: TransferPlan, flight: _InFlight):
        self.engine, self.plan, self.flight = engine, plan, flight
        self.stores_end: torch.cuda.Event | None = None  # this step's BEFORE stores (its loads wait)
        self._waits: list[list[torch.cuda.Event]] = [[] for _ in range(engine.num_layers)]
        self._waited = 0  # layers [0, _waited) are waited for
        self._loads_at: dict[int, list[Move]] = {}  # layer -> PER_LAYER loads issued before it
        self._stores_at: dict[int, list[Move]] = {}  # layer -> PER_LAYER stores issued after it
        self._ring: RingPlan | None = None  # Pie: the far blocks, loaded into the ring every layer
        self._ring_next = 0  # the next layer whose ring load (and recompute inputs) is to be issued
        self._recompute: list[RecomputePlan] = []  # KVPR, run layer by layer
        self._inputs_in: list[list[torch.cuda.Event]] = [[] for _ in range(engine.num_layers)]
        for op in plan.operations:
            if isinstance(op, Recompute):
                self._recompute.append(engine.plan_recompute(op))
            elif isinstance(op, Move) and op.ephemeral:  # checked by the engine: the staging ring (one a step)
                self._ring = engine.plan_ring(op.block_pairs)
            elif isinstance(op, Move) and op.stage is Stage.PER_LAYER:
                assert op.layers is not None  # checked by the engine's handler lookup
                if op.dst is Tier.GPU:  # a load: layer layers[0] reads it
                    self._loads_at.setdefault(max(0, op.layers[0] - engine.prefetch_depth), []).append(op)
                else:
                    self._stores_at.setdefault(op.layers[1] - 1, []).append(op)
        self._issue_stage(Stage.BEFORE)
        self.hooks = LayerHooks(before=self.before_layer, after=self.after_layer)

    def wait_before(self, layer: int, event: torch.cuda.Event) -> None:
        """The compute stream waits for `event` before running layer `layer`."""
        if layer < self._waited:  # issued late (a move for a layer already running): wait now
            torch.cuda.current_stream(self.engine.device).wait_event(event)
        else:
            self._waits[layer].append(event)

    @property
    def _per_layer_loads(self) -> bool:
        return self._ring is not None or bool(self._recompute)

    def before_layer(self, layer: int) -> None:
        if self._per_layer_loads:
            self._issue_ring(layer)
        for move in self._loads_at.pop(layer, ()):
            self.engine.issue(move, self)
        if self._recompute:
            self._recompute_layer(layer)
        self._wait_through(layer + 1)

    def _recompute_layer(self, layer: int) -> None:
        """KVPR: once layer `layer`'s kept inputs are in, their K/V on the compute stream (the
        layer's other copies are waited for after it, so the projection overlaps them)."""
        self._wait_through(layer)
        if self.engine.on_gpu:
            stream = torch.cuda.current_stream(self.engine.device)
            for event in self._inputs_in[layer]:
                stream.wait_event(event)
        for plan in self._recompute:
            self.engine.recompute_layer(plan, layer)

    def after_layer(self, layer: int) -> None:
        for move in self._stores_at.pop(layer, ()):
            self.engine.issue(move, self)

    def finish(self) -> None:
        """Once the forward is done, or failed: every issued copy is waited for by later work on
        the compute stream, what was never issued is issued now, then the AFTER moves."""
        for layer in sorted(self._loads_at):
            self.before_layer(layer)
        for layer in sorted(self._stores_at):
            self.after_layer(layer)
        self._wait_through(len(self._waits))
        self._issue_stage(Stage.AFTER)
        self.engine.step_done(self.plan.step_id)

    def _issue_ring(self, layer: int) -> None:
        """Ring loads through layer + depth, each layer's recompute inputs first: the load stream
        first waits for the compute stream, as far as it is issued (layers < `layer`), since layer +
        depth's entry is layer - 1's."""
        engine = self.engine
        last = min(layer + engine.prefetch_depth, engine.num_layers - 1)
        if self._ring_next > last:
            return
        engine.wait_for_compute()
        while self._ring_next <= last:
            for plan in self._recompute:
                end = engine.load_acts_layer(plan, self._ring_next, self.flight)
                if end is not None:
                    self._inputs_in[self._ring_next].append(end)
            if self._ring is not None:
                end = engine.load_ring_layer(self._ring, self._ring_next, self.flight)
                if end is not None:
                    self.wait_before(self._ring_next, end)
            self._ring_next += 1

    def _wait_through(self, num_layers: int) -> None:
        if num_layers <= self._waited:
            return
        if self.engine.on_gpu:
            stream = torch.cuda.current_stream(self.engine.device)
            for events in self._waits[self._waited:num_layers]:
                for event in events:
                    stream.wait_event(event)
        self._waited = num_layers

    def _issue_stage(self, stage: Stage) -> None:
        for op in self.plan.operations:
            if isinstance(op, Move) and op.stage is stage:
                self.engine.issue(op, self)
