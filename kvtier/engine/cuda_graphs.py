"""CUDA graphs for decode steps: one graph per padded batch size, sharing one memory pool.

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch
overhead. Inputs live in static buffers that each replay overwrites:

    rows [0, n)        the step's sequences
    rows [n, size)     padding: slot -1 (no KV write), seq_len 0 (the kernel writes zeros), discarded

Attention is captured with max_seq_len = max_model_len, so the decode kernel's grid (its context
splits) is fixed; each program reads its sequence's true length from seq_lens.

With the CPU tier, a step may have to wait for KV still being loaded, one layer group at a time
(kvtier/engine/transfer_engine.py). A graph cannot wait in its middle for an event recorded
outside it, so each batch size is captured as one graph per layer group ("segments", cut at the
model's before_layer hooks, sharing the pool: a segment's output is the next one's input), and
the replay runs the step's hooks at segment bounds (kvtier/ops/attention.py's LayerHooks): before
segment g, before_layer of each of its layers (which waits for group g's loads), after it
after_layer of each. Without the tier there is one segment. With far blocks (Pie) there is one
segment per layer, and the graphs read each sequence's far prefix from static buffers (zeros: none);
each batch size also gets a whole-model graph, replayed by steps that move nothing and read nothing
far (the 32 segments cost 0.43 ms a step on an H200, Llama-3-8B at 64 x 2048).
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from kvtier.ops.attention import NO_HOOKS, AttentionMetadata, FarPrefix, LayerHooks

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, segment_starts: list[int] | None = None,
                 far: bool = False):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.segment_starts = segment_starts or [0]  # first layer of each segment
        self.segment_ends = [first - 1 for first in self.segment_starts[1:]] + [len(kv_caches) - 1]  # last layers
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Pie: each row's far blocks and first ring slot (FarPrefix); None without far blocks
        self.far = (torch.zeros(n, dtype=torch.int64, device=device), torch.zeros(n, dtype=torch.int64, device=device)
                    ) if far else None
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # size -> its segments
        # size -> (logits, one graph of the whole forward): with far blocks' per-layer segments only
        self.whole: dict[int, tuple[torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.capture_whole = far and len(self.segment_starts) > 1
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, size: int) -> AttentionMetadata:
        meta = AttentionMetadata(self.slot_mapping[:size], self.block_tables[:size], self.seq_lens[:size],
                                 self.query_start_loc[:size + 1], 1, self.max_model_len)
        if self.far is not None:
            meta.far = FarPrefix(self.far[0][:size], self.far[1][:size])
        return meta

    def _forward(self, size: int, meta: AttentionMetadata | None = None) -> torch.Tensor:
        meta = meta or self._meta(size)
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # (size, vocab) fp32

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so smaller graphs reuse the pool's blocks."""
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            for _ in range(2):  # compile kernels, settle the allocator
                self._forward(size)
            torch.cuda.synchronize(self.device)
            with torch.cuda.stream(stream):
                self.logits[size], self.graphs[size] = self._capture_segments(size)
                if self.capture_whole:
                    self.whole[size] = self._capture_whole(size)
            torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s, %d segment(s) each)", len(self.graphs),
                    self.sizes, len(self.segment_starts))

    def _capture_segments(self, size: int) -> tuple[torch.Tensor, list[torch.CUDAGraph]]:
        """One forward, its capture ended and restarted at each segment's first layer."""
        segments = [torch.cuda.CUDAGraph()]

        def cut(layer: int) -> None:
            if layer in self.segment_starts[1:]:
                segments[-1].capture_end()
                segments.append(torch.cuda.CUDAGraph())
                segments[-1].capture_begin(pool=self.pool)

        meta = self._meta(size)
        meta.hooks = LayerHooks(before=cut)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        segments[0].capture_begin(pool=self.pool)
        logits = self._forward(size, meta)
        segments[-1].capture_end()
        return logits, segments

    def _copy_far(self, far: FarPrefix | None, n: int) -> None:
        """The step's far prefixes, or none; padding rows (seq_len 0) read nothing whatever theirs say."""
        assert self.far is not None
        if far is None:
            self.far[0].zero_()  # far_blocks 0: ring_start is never read
            return
        self.far[0][:n].copy_(far.far_blocks, non_blocking=True)
        self.far[1][:n].copy_(far.ring_start, non_blocking=True)

    def _capture_whole(self, size: int) -> tuple[torch.Tensor, torch.cuda.CUDAGraph]:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        logits = self._forward(size)
        graph.capture_end()
        return logits, graph

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        """Replay the smallest graph that fits, with the step's hooks at segment bounds (before
        each segment the wait for its layers' KV); returns logits (n, vocab)."""
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(0)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if self.far is not None:
            self._copy_far(meta.far, n)
        if hooks is NO_HOOKS:  # most decode steps: nothing moves between tiers
            if size in self.whole:
                logits, graph = self.whole[size]
                graph.replay()
                return logits[:n]
            for segment in self.graphs[size]:
                segment.replay()
            return self.logits[size][:n]
        for first_layer, last_layer, segment in zip(self.segment_starts, self.segment_ends, self.graphs[size]):
            for layer in range(first_layer, last_layer + 1):  # what any layer of the segment reads
                hooks.before_layer(layer)
            segment.replay()
            for layer in range(first_layer, last_layer + 1):
                hooks.after_layer(layer)
        return self.logits[size][:n]
