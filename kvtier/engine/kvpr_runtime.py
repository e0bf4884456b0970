"""KVPR on the worker: which kept layer inputs are whole, and each step's split into recomputed and
transferred blocks (arXiv 2411.17089; the planner's arithmetic is kvtier/offload/kvpr.py).

With --kvpr every forward keeps each layer's attention input per KV slot (ModelRunner.save_layer_inputs),
and every store of a block to the CPU tier carries its inputs beside its K/V (same CPU block id;
TransferEngine.enable_activations). When a step reads CPU-resident K/V -- far blocks loaded into the
staging ring (Pie), prefix hits and swap-ins loaded into GPU blocks -- `rewrite` sends part of them as
inputs instead: per sequence its first l tokens' blocks become a `Recompute` (inputs cross, the GPU
projects them to K/V before the layer's attention) and the rest stays a K/V load.

Kept inputs are whole only for blocks whose every token the GPU computed: a block is marked when a
forward writes its first slot (tokens fill a block in order, and a block loaded from the CPU is full
and never rewritten from its start), unmarked when K/V alone are loaded into it, and a CPU block
inherits the mark of the GPU block stored into it. Only marked CPU blocks are recomputed.

    per sequence, its CPU-resident blocks in position order:
        [ rec | rec | rec | kv | kv | kv ]      l = the planner's split (rounded to blocks,
          inputs cross, GPU    K/V cross          at most the leading marked blocks)
          recomputes K/V
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from kvtier.cache.storage import Kind, Tier
from kvtier.cache.transfers import Move, Operation, Recompute, Stage, TransferPlan
from kvtier.offload.kvpr import KVPRRates, KVPRShape, best_split, step_seconds

logger = logging.getLogger(__name__)

Block = tuple[int, int, int]  # (first token position, CPU block id, destination: GPU block or ring slot)
LINK_REFRESH_BYTES = 1 << 30  # the link rate follows the transfer engine's own timings past this much


class KVPRRuntime:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, shape: KVPRShape,
                 rates: KVPRRates, fraction: float | None = None, num_layers: int = 1):
        self.gpu_whole = np.zeros(num_gpu_blocks, bool)  # kept inputs of every token of the block
        self.cpu_whole = np.zeros(num_cpu_blocks, bool)
        self.block_size, self.shape, self.rates, self.fraction = block_size, shape, rates, fraction
        self.num_layers = num_layers
        self.num_candidate_blocks = 0  # CPU-resident blocks that steps read
        self.num_recomputed_blocks = 0
        self.last_split: tuple[float, float, float] | None = None  # (l / s, predicted T(l), T(0)) a layer

    # -- a step -------------------------------------------------------------------------------------

    def rewrite(self, plan: TransferPlan, ring_pairs: tuple[tuple[int, int], ...], ring_positions: tuple[int, ...],
                written: np.ndarray | None, positions_of: dict[int, tuple[int, int]] | None) -> TransferPlan:
        """The step's plan with part of its CPU -> GPU K/V as Recompute operations (ring_pairs: the
        far blocks' (CPU block, ring slot), appended as an ephemeral Move and Recompute); the marks
        follow the plan: BEFORE stores read blocks as they were, this step's forward writes
        `written`, AFTER stores read what it wrote."""
        ops: list[Operation] = []
        for op in plan.operations:
            if isinstance(op, Move) and op.stage is Stage.BEFORE and op.dst is Tier.CPU:
                self._stored(op)
        if written is not None:
            self.gpu_whole[written] = True
        for op in plan.operations:
            if isinstance(op, Move) and op.kind is Kind.KV and not op.ephemeral:
                if op.dst is Tier.CPU and op.stage is not Stage.BEFORE:
                    self._stored(op)
                if op.src is Tier.CPU and op.dst is Tier.GPU:
                    ops += self._split_load(op, positions_of or {})
                    continue
            ops.append(op)
        if ring_pairs:
            ops += self._split_ring(ring_pairs, ring_positions)
        return TransferPlan(plan.step_id, tuple(ops))

    def _stored(self, move: Move) -> None:
        for gpu_id, cpu_id in move.block_pairs:
            self.cpu_whole[cpu_id] = self.gpu_whole[gpu_id]

    def _split_load(self, move: Move, positions_of: dict[int, tuple[int, int]]) -> list[Operation]:
        """A K/V load into GPU blocks (prefix hits, swap-ins), split per sequence of the step; a
        block in no scheduled table stays a K/V load."""
        seqs: dict[int, list[Block]] = defaultdict(list)
        unplaced = []
        for cpu_id, gpu_id in move.block_pairs:
            if gpu_id in positions_of:
                seq, pos = positions_of[gpu_id]
                seqs[seq].append((pos, cpu_id, gpu_id))
            else:
                unplaced.append((cpu_id, gpu_id))
        recomputed, kept = self._choose([sorted(blocks) for blocks in seqs.values()])
        kept_pairs = [(c, g) for _, c, g in kept] + unplaced
        self.gpu_whole[[g for _, g in kept_pairs]] = False
        self.gpu_whole[[g for _, _, g in recomputed]] = True
        ops: list[Operation] = []
        if recomputed:
            ops.append(Recompute(tuple((c, g) for _, c, g in recomputed), tuple(p for p, _, _ in recomputed)))
            if kept_pairs and move.stage is Stage.BEFORE and move.layers is None:
                # the rest layer by layer behind each layer's inputs, so the projection overlaps it
                return ops + [Move(move.src, move.dst, move.kind, tuple(kept_pairs), Stage.PER_LAYER, (i, i + 1))
                              for i in range(self.num_layers)]
        if kept_pairs:
            ops.append(Move(move.src, move.dst, move.kind, tuple(kept_pairs), move.stage, move.layers))
        return ops

    def _split_ring(self, pairs: tuple[tuple[int, int], ...], positions: tuple[int, ...]) -> list[Operation]:
        """The step's far blocks: per sequence (its blocks are consecutive, from position 0) the
        first ones recomputed into their ring slots, the rest loaded."""
        seqs: list[list[Block]] = []
        for (cpu_id, slot), pos in zip(pairs, positions):
            if pos == 0:
                seqs.append([])
            seqs[-1].append((pos, cpu_id, slot))
        recomputed, kept = self._choose(seqs)
        ops: list[Operation] = []
        if kept:
            ops.append(Move(Tier.CPU, Tier.GPU, Kind.KV, tuple((c, s) for _, c, s in kept), Stage.PER_LAYER,
                            ephemeral=True))
        if recomputed:
            ops.append(Recompute(tuple((c, s) for _, c, s in recomputed), tuple(p for p, _, _ in recomputed),
                                 ephemeral=True))
        return ops

    def _choose(self, seqs: list[list[Block]]) -> tuple[list[Block], list[Block]]:
        """Per sequence, its CPU-resident blocks (position, CPU block, destination) in position
        order -> (recomputed, kept): its leading whole blocks up to the planned share."""
        num_blocks = sum(len(blocks) for blocks in seqs)
        self.num_candidate_blocks += num_blocks
        if not num_blocks:
            return [], []
        share = self._share(num_blocks * self.block_size // len(seqs), len(seqs))
        recomputed: list[Block] = []
        kept: list[Block] = []
        for blocks in seqs:
            n = min(round(share * len(blocks)), _leading(self.cpu_whole, [c for _, c, _ in blocks]))
            recomputed += blocks[:n]
            kept += blocks[n:]
        self.num_recomputed_blocks += len(recomputed)
        return recomputed, kept

    def _share(self, num_tokens: int, num_seqs: int) -> float:
        """l / s for `num_seqs` sequences of `num_tokens` CPU-resident tokens: the fixed --kvpr
        fraction, or the planner's split with the measured rates."""
        if self.fraction is not None:
            return self.fraction
        shape = KVPRShape(num_seqs, self.shape.hidden, self.shape.kv_width, self.shape.bytes_per_element)
        split = best_split(shape, self.rates, num_tokens, granularity=self.block_size)
        choice = (split / num_tokens if num_tokens else 0.0, step_seconds(shape, self.rates, num_tokens, split),
                  step_seconds(shape, self.rates, num_tokens, 0))
        if self.last_split is None or abs(choice[0] - self.last_split[0]) > 0.05:
            logger.info("kvtier: KVPR recomputes %.0f%% of %d CPU-resident tokens x %d sequences: %.2f ms a "
                        "layer predicted against %.2f ms for the K/V alone", 100 * choice[0], num_tokens,
                        num_seqs, choice[1] * 1e3, choice[2] * 1e3)
        self.last_split = choice
        return choice[0]

    # -- rates and stats ----------------------------------------------------------------------------

    def refresh_link(self, num_bytes: int, seconds: float) -> None:
        """The link rate from the transfer engine's own timings once they cover enough bytes."""
        if num_bytes >= LINK_REFRESH_BYTES and seconds > 0:
            self.rates = KVPRRates(num_bytes / seconds, self.rates.recompute_flops_per_s)

    def stats(self) -> dict[str, float]:
        return {"kvpr_link_gb_s": self.rates.link_bytes_per_s / 1e9,
                "kvpr_recompute_tflops": self.rates.recompute_flops_per_s / 1e12,
                "kvpr_candidate_blocks_total": self.num_candidate_blocks,
                "kvpr_recomputed_blocks_total": self.num_recomputed_blocks,
                "kvpr_split_fraction": self.num_recomputed_blocks / max(1, self.num_candidate_blocks)}


def _leading(whole: np.ndarray, cpu_ids: list[int]) -> int:
    """How many of `cpu_ids`, from the first, have whole kept inputs."""
    marks = whole[cpu_ids]
    return len(cpu_ids) if marks.all() else int(np.argmin(marks))
