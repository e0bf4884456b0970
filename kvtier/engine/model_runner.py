"""Model runner: the model, its inputs and its sampler; turns a plan's requests into one forward + sampling.

The worker (kvtier/engine/worker.py) runs it between the step's moves; it reads the GPU tier's
tensors through the per-layer views the storage owner (kvtier/engine/kv_storage.py) gives it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kvtier.cache.storage import Tier
from kvtier.engine.cuda_graphs import DecodeGraphs
from kvtier.engine.kv_storage import KVStorage
from kvtier.engine.sampler import DeviceSample, PromptChunk, PromptLogprobs, Sampler
from kvtier.models.attention_backends import make_attention_backend
from kvtier.models.config import ModelConfig
from kvtier.ops.attention import NO_HOOKS, AttentionMetadata, FarPrefix, LayerHooks
from kvtier.scheduler.output import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput

# A step whose longest query has at most this many tokens, over a context of at least
# PER_TOKEN_MIN_CONTEXT, runs attention as one decode per token (H100: 16 queries over 4112 keys
# took 137 us per layer in the prefill kernel, which parallelizes over queries and heads only).
PER_TOKEN_MAX_QUERY = 16
PER_TOKEN_MIN_CONTEXT = 512
# With CUDA graphs, any step of at most the largest graph's rows whose rows x longest context is at
# most this also runs as per-token decodes, by graph: a decode batch plus a user's next message
# (tens to a few hundred tokens over a short history) is otherwise an eager forward, which on an
# H100 spends ~12 ms launching ~8 ms of Llama-3-8B work. Each row re-reads its context, but one
# layer's K/V of a few thousand tokens stays in L2 (4 KiB per token and layer for Llama-3-8B).
PER_TOKEN_GRAPH_WORK = 256 * 2048


@dataclasses.dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (S,) rows of the hidden states to sample from
    sample_items: list[ScheduledRequest]
    # Pie: (CPU block, ring slot) of every far block the step reads; the worker loads them into
    # the staging ring layer by layer
    ring_pairs: tuple[tuple[int, int], ...] = ()
    ring_first_positions: tuple[int, ...] = ()  # each far block's first token position
    # KVPR: GPU blocks whose first slot this step writes (all their tokens are computed here)
    first_slot_blocks: np.ndarray | None = None
    # SamplingParams.prompt_logprobs: the prompt chunks whose tokens the step scores
    prompt_chunks: list[PromptChunk] = dataclasses.field(default_factory=list)


def default_attention_backend(device: torch.device) -> str:
    """Triton kernels on a GPU when Triton is installed; the pure-torch reference otherwise."""
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, kv: KVStorage, device: torch.device, seed: int = 0,
                 attention_backend: str | None = None):
        self.model, self.cfg, self.kv_caches = model, cfg, kv.layer_views()  # per layer (K, V) views
        self.block_size, self.device = kv.specs[Tier.GPU].block_size, device
        self.dtype = next(model.parameters()).dtype  # the model's; the cache's may be fp8
        self.attention_backend = attention_backend or default_attention_backend(device)
        for layer in model.attention_layers():  # one backend object per layer: a layer may differ
            layer.backend = make_attention_backend(self.attention_backend)
        if device.type == "cuda" and self.attention_backend == "triton":
            # every Triton kernel variant a step can launch compiles now, not mid-serving
            # (~1 s each; what makes a variant: the top of kvtier/ops/triton_attention.py)
            from kvtier.ops import triton_attention  # here: importing kvtier must not import Triton
            triton_attention.precompile(*self.kv_caches[0], cfg.num_heads, compute_dtype=self.dtype)
            model.precompile(self.dtype, device)
        self.graphs: DecodeGraphs | None = None
        self.ring_slots = 0  # Pie's staging ring (attach_ring): far blocks a step may read
        self.keeps_inputs = False  # KVPR (save_layer_inputs)
        self._attentions: list[nn.Module] = []
        self.sampler = Sampler(device, seed)
        self.prompt_logprobs = PromptLogprobs(device)
        self.num_computed_tokens = 0  # tokens run through the model since start (a counter)
        # Each running request's block table as a numpy row, kept from the plans' diffs
        # (ScheduledRequest.new_block_ids): grown only when a request gains a block.
        self._tables: dict[str, np.ndarray] = {}
        # the last step's sampled ids on the device, and each request's row in them
        self._sampled: tuple[dict[str, int], torch.Tensor | None] = ({}, None)

    def attach_ring(self, ring: torch.Tensor) -> None:
        """Pie: layer i's attention reads far blocks from ring entry i % entries (ring: KVStorage.staging_ring)."""
        self.ring_slots = ring.shape[1]
        k_cache = self.kv_caches[0][0]
        for i, layer in enumerate(self.model.attention_layers()):
            entry = ring[i % ring.shape[0]]  # (slots, 2, row)
            layer.backend.far_kv = tuple(entry[:, part].unflatten(-1, k_cache.shape[1:]) for part in range(2))
        if self.device.type == "cuda" and self.attention_backend == "triton":  # the far variants, now
            from kvtier.ops import triton_attention
            triton_attention.precompile(*self.kv_caches[0], self.cfg.num_heads, compute_dtype=self.dtype,
                                        far_kv=self.model.attention_layers()[0].backend.far_kv)

    def block_positions(self, scheduled: list[ScheduledRequest]) -> dict[int, tuple[int, int]]:
        """KVPR: every GPU block in the step's block tables -> (its sequence's index in the step, its
        first token position)."""
        bs = self.block_size
        return {int(g): (i, j * bs) for i, s in enumerate(scheduled) for j, g in enumerate(self._tables[s.request_id])}

    def recompute_kv(self, layer: int, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KVPR: layer `layer`'s K, V (T, Hkv, D) of kept inputs x (T, h) at `positions` (T,)."""
        return self._attentions[layer].kv_from_input(positions, x)

    def save_layer_inputs(self, rows: list[torch.Tensor]) -> None:
        """KVPR: every forward writes each layer's attention input into `rows` (KVStorage.activation_rows)
        at its tokens' KV slots, from which `kv_from_input` recomputes their K/V; from now on the
        step's inputs also say which blocks and far blocks KVPR needs to know of."""
        self._attentions = self.model.attention_modules()
        for layer, layer_rows in zip(self._attentions, rows):
            layer.saved_inputs = layer_rows
        self.keeps_inputs = True

    def update_states(self, plan: SchedulerOutput) -> None:
        """Forget finished and preempted requests, apply the plan's block-table diffs: first in a
        step, before anything can fail, so the kept tables stay in step with the plans."""
        for request_id in plan.finished_request_ids + plan.preempted_request_ids:
            self._tables.pop(request_id, None)
        self.prompt_logprobs.forget(plan.finished_request_ids)  # a preempted one resumes its prompt
        self.apply_block_diffs(plan.scheduled)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int, segment_starts: list[int]) -> None:
        """segment_starts: the first layer of each graph segment (where the step's moves may be
        waited for; kvtier/engine/cuda_graphs.py)."""
        if self.device.type != "cuda" or self.attention_backend != "triton":
            raise ValueError("CUDA graphs need a CUDA device and the Triton attention backend")
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                   self.block_size, self.device, segment_starts, far=self.ring_slots > 0)
        self.graphs.capture()

    def execute_model(self, inputs: ModelInputs, hooks: LayerHooks = NO_HOOKS) -> DeviceSample | None:
        """The forward (with `hooks` around each layer) and the draw of prepared inputs; the
        tokens stay on the device (their copy to the host under way). None: nothing samples."""
        inputs.meta.hooks = hooks
        self.num_computed_tokens += inputs.input_ids.shape[0]
        logits = self._logits(inputs)
        if logits is None:
            return None
        # each row's last input token: a repetition penalty counts it as seen
        sample = self.sampler.sample(logits, inputs.sample_items, (inputs.input_ids, inputs.logits_indices))
        if inputs.prompt_chunks:  # prompts complete this step travel with their first sampled token
            done = {c.request_id for c in inputs.prompt_chunks if c.last}
            sample.prompt = {i: self.prompt_logprobs.deliver(item.request_id)
                             for i, item in enumerate(inputs.sample_items) if item.request_id in done}
        # the next step's placeholders (async scheduling) read these rows
        self._sampled = ({item.request_id: i for i, item in enumerate(inputs.sample_items)}, sample.token_ids)
        return sample

    def forget_sampled(self) -> None:
        """Steps after a failed one are planned again without placeholders."""
        self._sampled = ({}, None)

    def _logits(self, inputs: ModelInputs) -> torch.Tensor | None:
        """(S, vocab) fp32 for the sequences that sample. Decode steps, and short prefills seen as
        per-token decodes, replay a CUDA graph."""
        meta = inputs.meta
        decode = meta if meta.is_decode_only else meta.per_token
        if self.graphs is not None and decode is not None and self.graphs.can_run(decode.num_seqs):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, decode, meta.hooks)
            if inputs.prompt_chunks:
                self._score_prompts(inputs, lambda a, b: logits[a:b])
            if len(inputs.sample_items) == decode.num_seqs:  # every row samples (decodes)
                return logits
            return logits[inputs.logits_indices] if inputs.sample_items else None
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)  # (T, h)
        if inputs.prompt_chunks:
            self._score_prompts(inputs, lambda a, b: self.model.compute_logits(hidden[a:b]))
        if not inputs.sample_items:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def _score_prompts(self, inputs: ModelInputs, logits_of: Callable[[int, int], torch.Tensor]) -> None:
        """Prompt logprobs of the step's prompt chunks; logits_of(a, b): (b - a, V) fp32 of rows [a, b)."""
        for chunk in inputs.prompt_chunks:
            self.prompt_logprobs.score(chunk, inputs.input_ids, logits_of)

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> ModelInputs:
        """Flatten the step's tokens; numpy on the host, then one copy to the device. The block
        tables are the kept ones (apply_block_diffs first)."""
        bs = self.block_size
        query_lens = np.fromiter((len(s.token_ids) for s in scheduled), np.int64, len(scheduled))
        start_pos = np.fromiter((s.start_pos for s in scheduled), np.int64, len(scheduled))
        seq_lens = start_pos + query_lens
        starts = np.zeros(len(scheduled) + 1, np.int64)
        np.cumsum(query_lens, out=starts[1:])
        rows = [self._tables[s.request_id] for s in scheduled]
        tables = np.zeros((len(scheduled), max(len(row) for row in rows)), np.int32)
        for i, row in enumerate(rows):
            tables[i, :len(row)] = row
        # position of every token, then its slot through its sequence's block table
        seq_of_token = np.repeat(np.arange(len(scheduled)), query_lens)
        positions = np.arange(starts[-1]) - starts[seq_of_token] + start_pos[seq_of_token]
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        input_ids = np.fromiter((t for s in scheduled for t in s.token_ids), np.int64, int(starts[-1]))
        sample = [i for i, s in enumerate(scheduled) if s.sample]
        fill = self._placeholders(scheduled, starts)
        arrays = [input_ids, positions, slots, tables, seq_lens, starts, starts[1:][sample] - 1, *fill]
        per_token = self._per_token_view(query_lens, seq_lens)
        if per_token:
            arrays += [tables[seq_of_token], positions + 1, np.arange(starts[-1] + 1)]
        far, ring_pairs, ring_positions = self._far_arrays(scheduled)
        if far:
            arrays += far + ([far[0][seq_of_token], far[1][seq_of_token]] if per_token else [])
        ids_d, pos_d, slots_d, tables_d, seq_lens_d, starts_d, logits_d, *view = self._to_device(arrays)
        if fill:  # placeholder ids from the last step's draw, device to device
            (fill_at, fill_from), view = view[:2], view[2:]
            ids_d[fill_at] = self._sampled[1][fill_from]
        meta = AttentionMetadata(
            slot_mapping=slots_d, block_tables=tables_d, seq_lens=seq_lens_d, query_start_loc=starts_d,
            max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
            seq_lens_list=seq_lens.tolist(), query_lens_list=query_lens.tolist())
        if per_token:
            meta.per_token = AttentionMetadata(slots_d, view[0], view[1], view[2], 1, meta.max_seq_len)
            view = view[3:]
        if far:
            meta.far = FarPrefix(view[0], view[1], far[0].tolist(), far[1].tolist())
            if per_token:
                meta.per_token.far = FarPrefix(view[2], view[3], far[0][seq_of_token].tolist(),
                                               far[1][seq_of_token].tolist())
        return ModelInputs(ids_d, pos_d, meta, logits_d, [scheduled[i] for i in sample], ring_pairs,
                           ring_positions, slots[slots % bs == 0] // bs if self.keeps_inputs else None,
                           _prompt_chunks(scheduled, starts))

    def _far_arrays(self, scheduled: list[ScheduledRequest]
                    ) -> tuple[list[np.ndarray], tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Pie: [far blocks, first ring slot] per sequence, the (CPU block, ring slot) pairs of the
        step's far blocks, slots given out in batch order, and each one's first token position
        (a sequence's far blocks are its first); ([], (), ()) when nothing is far."""
        counts = np.fromiter((len(s.far_block_ids) for s in scheduled), np.int64, len(scheduled))
        if not counts.any():
            return [], (), ()
        if counts.sum() > self.ring_slots:
            raise RuntimeError(f"{int(counts.sum())} far blocks in one step; the staging ring holds {self.ring_slots}")
        ring_start = np.zeros(len(scheduled), np.int64)
        np.cumsum(counts[:-1], out=ring_start[1:])
        pairs = tuple((cpu_id, int(first) + j) for s, first in zip(scheduled, ring_start)
                      for j, cpu_id in enumerate(s.far_block_ids))
        positions = (tuple(j * self.block_size for s in scheduled for j in range(len(s.far_block_ids)))
                     if self.keeps_inputs else ())  # only KVPR reads them
        return [counts, ring_start], pairs, positions

    def _placeholders(self, scheduled: list[ScheduledRequest], starts: np.ndarray) -> list[np.ndarray]:
        """[token indices, rows of the last draw] of the step's placeholder ids (async scheduling:
        each is a request's last token, sampled by the step before); [] when there are none."""
        rows, last_draw = self._sampled
        at = [i for i, s in enumerate(scheduled) if s.token_ids and s.token_ids[-1] == PLACEHOLDER_TOKEN_ID]
        if not at:
            return []
        missing = [scheduled[i].request_id for i in at if scheduled[i].request_id not in rows]
        if missing or last_draw is None:
            raise RuntimeError(f"placeholder tokens of {missing} but the last step drew none for them")
        return [starts[1:][at] - 1, np.array([rows[scheduled[i].request_id] for i in at], np.int64)]

    def _per_token_view(self, query_lens: np.ndarray, seq_lens: np.ndarray) -> bool:
        """Short prefills over long contexts attend faster as one decode per token (Triton only);
        small mixed steps run faster so as well, replaying a decode graph (see PER_TOKEN_GRAPH_WORK)."""
        if self.attention_backend != "triton" or query_lens.max() <= 1:
            return False
        if query_lens.max() <= PER_TOKEN_MAX_QUERY and seq_lens.max() >= PER_TOKEN_MIN_CONTEXT:
            return True
        rows = int(query_lens.sum())
        return (self.graphs is not None and self.graphs.can_run(rows)
                and rows * int(seq_lens.max()) <= PER_TOKEN_GRAPH_WORK)

    def apply_block_diffs(self, scheduled: list[ScheduledRequest]) -> None:
        """Bring the kept block tables up to date with a plan: a reset replaces a table, other
        plans append the blocks the request gained since its last plan."""
        for s in scheduled:  # most decode steps gain no block: nothing to build for them
            if s.reset_block_table:
                self._tables[s.request_id] = np.asarray(s.new_block_ids, np.int32)
            elif s.new_block_ids:
                self._tables[s.request_id] = np.concatenate(
                    [self._tables[s.request_id], np.asarray(s.new_block_ids, np.int32)])

    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """All of a step's index arrays in one host-to-device copy (int64), returned as views."""
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64, copy=False))
        if self.device.type == "cuda":  # a pageable source would make the copy wait on the stream
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        out, offset = [], 0
        for a in arrays:
            out.append(flat[offset:offset + a.size].view(a.shape))
            offset += a.size
        return out


def _prompt_chunks(scheduled: list[ScheduledRequest], starts: np.ndarray) -> list[PromptChunk]:
    """The chunks of prompts whose logprobs are asked for. Only before the first output token: a
    request preempted after it recomputes its prompt, whose logprobs went out with that token."""
    return [PromptChunk(s.request_id, s.params.prompt_logprobs, s.num_prompt_tokens, s.start_pos, int(starts[i]),
                        len(s.token_ids))
            for i, s in enumerate(scheduled) if s.params.prompt_logprobs is not None and s.num_output_tokens == 0]
