"""KCache decode attention: K in GPU memory, V in pinned CPU memory, only the attended V rows cross the link.

    kcache_decode(q, k_cache, v_store, block_tables, seq_lens, scale, settings)   the launcher
    kcache_decode_ref(...)         the pure-torch reference: the definition below, one sequence at a time
    kcache_select_ref(...)         its attended set, (B, Hkv, max_seq_len) bool
    kcache_select(...)             the fast path's attended set as position lists (B, Hkv, n), -1 = unused
    kcache_scores(...)             q·Kᵀ·scale over the paged K cache (Triton), (B, Hq, max_seq_len) fp32
    gather_v_rows(...)             V rows of given positions from the store (Triton; reads pinned memory via UVA)
    kcache_link_bytes(positions, v_store)   bytes of V one step reads from the store (for rates)

Layout. k_cache and v_store are (num_blocks, block_size, Hkv, D), the paged layout of
kvtier/ops/attention.py, with the same block ids: V block b holds the V of K block b, and one block
table serves both. k_cache lives on the GPU; v_store in pinned CPU memory (or on the GPU, to time
the same operation without the link).

What one decode query attends (per sequence of L tokens and KV head h; the query is token L - 1,
its K and V already written):

    positions   0 .. sink-1 | sink ................................. L-window-1 | L-window .. L-1
                [   sink   ] [ candidates: top_n of them by aggregated score   ] [    window     ]

    S[g, p] = q[g] · K[p] · scale for the G query heads g of KV head h (exact, fp32)
    A[p]    = log Σ_g softmax(S[g])[p]    aggregate="sum": the group's attention mass on p (default)
            = log max_g softmax(S[g])[p]  aggregate="max": the mass of the head that wants p most
    row mode:  the top_n candidates by A
    page mode: pages are the cache's blocks; a page's score is the max of A over its candidates (as
               Quest and ArkVale do, approximately); the top_n / block_size best pages, whose
               candidates are all attended (top_n must be a multiple of block_size)
    attended = sink ∪ window ∪ chosen; every position when L <= sink + window + top_n (the budget)
    out[g]   = softmax(S[g, attended]) · V[attended]   (all G heads use the group's one set)

Why sum of probabilities: dropping position p costs query head g its probability P[g, p] of the
output (the error of head g is at most 2 Σ_dropped P[g, p] · max |V|), so summing P over the group
ranks positions by the error the whole group avoids by keeping them. Raw scores are not comparable
across heads (each softmax has its own offset); probabilities are. A is taken in the log domain
(log_softmax, logsumexp over the group), so small masses do not underflow into ties at 0.

The sets are deduplicated by construction: top_n and pages choose among candidates only, which are
outside the sink and the window; in the position lists the window starts after the sink when they
overlap (L < sink + window), and slots left over are -1.

The fast path (kcache_decode on CUDA, or on CPU tensors under TRITON_INTERPRET=1):
    1. kcache_scores: one Triton kernel reads each K tile once for the G heads that share it and
       writes S (B, Hq, L) fp32, -inf past each sequence's length;
    2. selection in torch: log_softmax, the group aggregate, torch.topk over rows or page maxima;
       the position list (B, Hkv, budget) = [sink | window | chosen];
    3. gather_v_rows: a Triton kernel given the pinned V store as is: Triton's launcher turns its
       data_ptr() into a device address (cuPointerGetAttribute; pinned memory is mapped into the
       unified address space, see kvtier/ops/kv_transfer.py), so the loads of the selected rows
       cross PCIe as the kernel issues them, one row (D elements, 256 B for bf16 D = 128) each,
       nothing for unused (-1) slots; rows land in a (B, Hkv, n, D) GPU buffer;
    4. softmax of the gathered S over the list, times the gathered rows (torch, fp32).
No step reads a device tensor on the host when max_seq_len is given (no sync; CUDA-graph safe).

This module imports nothing from kvtier beyond kvtier.ops. Triton is imported on first launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F

from kvtier.ops import lazy_kernels
from kvtier.ops.attention import check_paged_cache, check_query, gather_kv_ref, gather_padded_kv

# Tuning constants, NOT timed on a GPU (benchmarks/kcache_gpu.py times the whole operation; sweep
# these there). Scores: the decode kernel's key tile (kvtier/ops/triton_attention.py). Gather: 32
# rows of 256 B a program keep 8 KiB of host reads in flight per program, and at Llama-3-8B batch
# 16 the grid has thousands of programs, enough to cover PCIe latency (~1-2 us x 50 GB/s = 100 KB).
SCORES_BLOCK_N = 64
SCORES_NUM_WARPS = 4
GATHER_BLOCK_ROWS = 32
GATHER_NUM_WARPS = 4

MODES = ("row", "page")
AGGREGATES = ("sum", "max")
_INDEX_DTYPES = (torch.int32, torch.int64)
_BACKENDS = (None, "triton", "torch")
_MIN_DOT = 16  # tl.dot needs every dimension >= 16

# the kernel module, imported on first launch; `_INTERPRETED` as a module attribute
__getattr__, _kernel_module = lazy_kernels.accessors("_kcache_kernel")


@dataclasses.dataclass(frozen=True)
class KCacheSettings:
    """Which positions a decode query attends (see the module docstring), validated once.

    top_n: positions chosen by score besides the sink and the window (page mode: a multiple of the
    block size, top_n // block_size pages). sink: first tokens, always attended. window: last
    tokens, always attended; >= 1, so the query attends its own token and the set is never empty.
    mode: "row" or "page". aggregate: "sum" or "max" of the query group's softmax probabilities.
    """

    top_n: int
    sink: int = 4
    window: int = 64
    mode: str = "row"
    aggregate: str = "sum"

    def __post_init__(self) -> None:
        for name, least in (("top_n", 0), ("sink", 0), ("window", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")

    @property
    def budget(self) -> int:
        """The most positions a sequence attends; a context this long or shorter is attended whole."""
        return self.sink + self.window + self.top_n


# ---------------------------------------------------------------------------------------------
# public API: the launcher and the fast path's pieces
# ---------------------------------------------------------------------------------------------

def kcache_decode(q: torch.Tensor, k_cache: torch.Tensor, v_store: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, settings: KCacheSettings, *,
                  max_seq_len: int | None = None, backend: str | None = None) -> torch.Tensor:
    """q (B, Hq, D), one decode query per sequence at position seq_len - 1 -> (B, Hq, D) in q's dtype.

    k_cache (num_blocks, block_size, Hkv, D) on q's device; v_store the same shape and dtype, pinned
    on the CPU (or on q's device); block_tables (B, max_blocks) and seq_lens (B,) int32/int64 on q's
    device. max_seq_len bounds every seq_len (None: read from seq_lens, a sync on CUDA).
    backend None runs the fast path on CUDA or under TRITON_INTERPRET=1, else the reference;
    "triton" forces the fast path, "torch" the reference. A sequence of length 0 gives zeros.
    """
    _check_backend(backend)
    _check_inputs(q, k_cache, v_store, block_tables, seq_lens, scale, settings)
    if not _use_triton(q, backend):
        return kcache_decode_ref(q, k_cache, v_store, block_tables, seq_lens, scale, settings)
    _check_kernel_args(q, k_cache, v_store, block_tables)
    max_seq_len = _max_seq_len(seq_lens, max_seq_len, k_cache.shape[1], block_tables)
    scores = _launch_scores(q, k_cache, block_tables, seq_lens, scale, max_seq_len)  # (B, Hq, L)
    positions = _select_positions(scores, seq_lens, settings, k_cache.shape[2], k_cache.shape[1])  # (B, Hkv, n)
    v_rows = _launch_gather(v_store, block_tables, positions)  # (B, Hkv, n, D)
    return _attend_selected(scores, positions, v_rows).to(q.dtype)


def kcache_select(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  scale: float, settings: KCacheSettings, *, max_seq_len: int | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """The fast path's attended positions (B, Hkv, n) int64, n = min(budget, max_seq_len): each
    row lists distinct positions, -1 in unused slots. Arguments as for kcache_decode."""
    scores = kcache_scores(q, k_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len, backend=backend)
    _check_settings_for(settings, k_cache.shape[1])
    return _select_positions(scores, seq_lens, settings, k_cache.shape[2], k_cache.shape[1])


def kcache_scores(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  scale: float, *, max_seq_len: int | None = None, backend: str | None = None) -> torch.Tensor:
    """q (B, Hq, D) · K of each sequence -> S (B, Hq, max_seq_len) fp32, scaled, -inf past seq_len.
    backend as for kcache_decode (None: Triton on CUDA or interpreted, else kcache_scores_ref)."""
    _check_backend(backend)
    _check_inputs(q, k_cache, k_cache, block_tables, seq_lens, scale, None)
    max_seq_len = _max_seq_len(seq_lens, max_seq_len, k_cache.shape[1], block_tables)
    if not _use_triton(q, backend):
        return kcache_scores_ref(q, k_cache, block_tables, seq_lens, scale, max_seq_len)
    _check_kernel_args(q, k_cache, k_cache, block_tables)
    return _launch_scores(q, k_cache, block_tables, seq_lens, scale, max_seq_len)


def gather_v_rows(v_store: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """v_store (num_blocks, block_size, Hkv, D), positions (B, Hkv, n) int32/int64 (-1 = unused)
    -> (B, Hkv, n, D) in v_store's dtype on block_tables' device: row [b, h, r] is the V of KV
    head h at position positions[b, h, r] of sequence b (zeros for -1). v_store pinned when
    block_tables is on CUDA (read through UVA). backend as for kcache_decode."""
    _check_backend(backend)
    _check_gather_args(v_store, block_tables, positions)
    if not _use_triton(block_tables, backend):
        return gather_v_rows_ref(v_store, block_tables, positions)
    _check_kernel_device(block_tables, v_store)
    return _launch_gather(v_store, block_tables, positions)


def attended_mask(positions: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Position lists (B, Hkv, n), -1 = unused -> (B, Hkv, max_seq_len) bool, like kcache_select_ref."""
    mask = torch.zeros(*positions.shape[:2], max_seq_len + 1, dtype=torch.bool, device=positions.device)
    slots = torch.where(positions >= 0, positions.long(), max_seq_len)  # unused slots mark a spare column
    return mask.scatter_(2, slots, True)[..., :max_seq_len]


def kcache_link_bytes(positions: torch.Tensor, v_store: torch.Tensor) -> int:
    """Bytes of V one step reads from the store (across the link when it is pinned host memory):
    the used slots of positions (B, Hkv, n) times one row (D elements). Syncs: for benchmarks."""
    return int((positions >= 0).sum()) * v_store.shape[-1] * v_store.element_size()


# ---------------------------------------------------------------------------------------------
# the references
# ---------------------------------------------------------------------------------------------

def kcache_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_store: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, settings: KCacheSettings) -> torch.Tensor:
    """Pure-torch kcache_decode, one sequence and KV head at a time; V rows are read from the store
    by index. q (B, Hq, D) -> (B, Hq, D) in q's dtype."""
    _check_inputs(q, k_cache, v_store, block_tables, seq_lens, scale, settings)
    attended = kcache_select_ref(q, k_cache, block_tables, seq_lens, scale, settings)  # (B, Hkv, L)
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len:
            out[b] = _attend_one_ref(q[b], k_cache, v_store, block_tables[b], attended[b, :, :seq_len], scale)
    return out


def kcache_select_ref(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, settings: KCacheSettings) -> torch.Tensor:
    """The attended set of each sequence and KV head: (B, Hkv, max(seq_lens)) bool."""
    _check_inputs(q, k_cache, k_cache, block_tables, seq_lens, scale, settings)
    lens = seq_lens.tolist()
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    attended = torch.zeros(len(lens), num_kv_heads, max(lens, default=0), dtype=torch.bool, device=q.device)
    for b, seq_len in enumerate(lens):
        if seq_len:
            scores = _scores_one_ref(q[b], k_cache, block_tables[b], seq_len, scale)  # (Hkv, G, L)
            attended[b, :, :seq_len] = _select_one_ref(_aggregate(scores, settings.aggregate), settings, block_size)
    return attended


def kcache_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, max_seq_len: int) -> torch.Tensor:
    """Pure-torch kcache_scores: (B, Hq, max_seq_len) fp32, -inf past each seq_len."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = gather_padded_kv(k_cache, block_tables, max_seq_len)[:, :, :max_seq_len].float()  # (B, Hkv, L, D)
    qg = q.float().view(num_seqs, num_kv_heads, -1, head_dim)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(num_seqs, num_heads, max_seq_len) * scale
    past_end = torch.arange(max_seq_len, device=q.device) >= seq_lens.long()[:, None, None]  # (B, 1, L)
    return scores.masked_fill(past_end, float("-inf"))


def gather_v_rows_ref(v_store: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pure-torch gather_v_rows: index the store on its own device, move the rows to the tables'."""
    _, block_size, num_kv_heads, _ = v_store.shape
    valid = positions >= 0  # (B, Hkv, n)
    pos = positions.long().clamp(min=0)
    blocks = torch.gather(block_tables.long(), 1, (pos // block_size).flatten(1)).view_as(pos)
    blocks = torch.where(valid, blocks, 0)  # unused slots may point at garbage table entries
    heads = torch.arange(num_kv_heads, device=pos.device)[None, :, None].expand_as(pos)
    store = v_store.device
    rows = v_store[blocks.to(store), (pos % block_size).to(store), heads.to(store)]  # (B, Hkv, n, D)
    return rows.to(block_tables.device).masked_fill(~valid[..., None], 0)


def _scores_one_ref(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                    scale: float) -> torch.Tensor:
    """q (Hq, D) of one sequence -> S (Hkv, G, L) fp32."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = gather_kv_ref(k_cache, block_table, seq_len).float().transpose(0, 1)  # (Hkv, L, D)
    return torch.matmul(q.float().view(num_kv_heads, -1, head_dim), k.transpose(1, 2)) * scale


def _select_one_ref(agg: torch.Tensor, settings: KCacheSettings, block_size: int) -> torch.Tensor:
    """A (Hkv, L) of one sequence -> its attended set (Hkv, L) bool."""
    num_kv_heads, seq_len = agg.shape
    if seq_len <= settings.budget:
        return torch.ones_like(agg, dtype=torch.bool)
    pos = torch.arange(seq_len, device=agg.device)
    fixed = (pos < settings.sink) | (pos >= seq_len - settings.window)  # (L,)
    candidates = agg.masked_fill(fixed, float("-inf"))
    if settings.mode == "row":
        top = candidates.topk(settings.top_n, dim=-1).indices  # more than top_n candidates: all finite
        return fixed | torch.zeros_like(fixed.expand(num_kv_heads, -1)).scatter_(1, top, True)
    num_pages = -(-seq_len // block_size)
    pages = F.pad(candidates, (0, num_pages * block_size - seq_len), value=float("-inf"))
    best = pages.view(num_kv_heads, num_pages, block_size).amax(-1).topk(settings.top_n // block_size, -1).indices
    chosen = torch.zeros(num_kv_heads, num_pages, dtype=torch.bool, device=agg.device).scatter_(1, best, True)
    return fixed | chosen.repeat_interleave(block_size, 1)[:, :seq_len]


def _attend_one_ref(q: torch.Tensor, k_cache: torch.Tensor, v_store: torch.Tensor, block_table: torch.Tensor,
                    attended: torch.Tensor, scale: float) -> torch.Tensor:
    """q (Hq, D) of one sequence, its attended set (Hkv, L) -> (Hq, D) in q's dtype."""
    num_kv_heads, seq_len = attended.shape
    block_size, group = k_cache.shape[1], q.shape[0] // num_kv_heads
    k = gather_kv_ref(k_cache, block_table, seq_len).float()  # (L, Hkv, D)
    out = []
    for h in range(num_kv_heads):
        pos = attended[h].nonzero().squeeze(1)  # (n,)
        blocks = block_table.long()[pos // block_size]
        v = v_store[blocks.to(v_store.device), (pos % block_size).to(v_store.device), h].to(q.device)  # (n, D)
        scores = q[h * group:(h + 1) * group].float() @ k[pos, h].T * scale  # (G, n)
        out.append(torch.softmax(scores, dim=-1) @ v.float())
    return torch.cat(out).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# selection and attention of the fast path (torch ops on the scores' device, no host reads)
# ---------------------------------------------------------------------------------------------

def _aggregate(scores: torch.Tensor, how: str) -> torch.Tensor:
    """S (..., G, L) -> A (..., L): log of the sum (or max) over the G query heads of their softmax
    probabilities. Rows that are all -inf (empty contexts) give NaN: callers mask them."""
    log_probs = torch.log_softmax(scores, dim=-1)
    return torch.logsumexp(log_probs, dim=-2) if how == "sum" else log_probs.amax(dim=-2)


def _select_positions(scores: torch.Tensor, seq_lens: torch.Tensor, settings: KCacheSettings,
                      num_kv_heads: int, block_size: int) -> torch.Tensor:
    """S (B, Hq, L) -> position lists (B, Hkv, n) int64, -1 = unused; n = min(budget, L).

        list of one (sequence, KV head):  [ sink slots | window slots | top_n slots (rows or pages) ]
        a sequence with seq_len <= budget: [ 0, 1, ..., seq_len - 1, -1, ... ]
    """
    num_seqs, num_heads, max_len = scores.shape
    lens = seq_lens.long().view(-1, 1, 1)  # (B, 1, 1)
    if max_len <= settings.budget:  # every context fits the budget: attend everything
        return _all_positions(lens, max_len).expand(-1, num_kv_heads, -1)
    agg = _aggregate(scores.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, max_len), settings.aggregate)
    pos = torch.arange(max_len, device=scores.device)
    candidate = (pos >= settings.sink) & (pos < lens - settings.window)  # (B, 1, L)
    agg = agg.masked_fill(~candidate, float("-inf"))  # (B, Hkv, L); also clears empty contexts' NaN
    if settings.mode == "row":
        chosen = _top_rows(agg, settings.top_n)
    else:
        chosen = _top_pages(agg, lens, settings, block_size)
    fixed = _fixed_positions(lens, settings.sink, settings.window).expand(-1, num_kv_heads, -1)
    selected = torch.cat([fixed, chosen], dim=-1)  # (B, Hkv, budget)
    return torch.where(lens <= settings.budget, _all_positions(lens, settings.budget), selected)


def _all_positions(lens: torch.Tensor, n: int) -> torch.Tensor:
    """lens (B, 1, 1) -> (B, 1, n): 0 .. seq_len - 1, then -1."""
    pos = torch.arange(n, device=lens.device)
    return torch.where(pos < lens, pos, -1)


def _fixed_positions(lens: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """lens (B, 1, 1) -> (B, 1, sink + window): the sink, then the window from past the sink on."""
    head = torch.arange(sink, device=lens.device)
    tail = lens - window + torch.arange(window, device=lens.device)  # (B, 1, window)
    return torch.cat([torch.where(head < lens, head, -1), torch.where(tail >= sink, tail, -1)], dim=-1)


def _top_rows(agg: torch.Tensor, top_n: int) -> torch.Tensor:
    """A (B, Hkv, L), -inf off the candidates -> the top_n candidates (B, Hkv, top_n), -1 where a
    sequence has fewer (only sequences within the budget, which take every position instead)."""
    values, pos = agg.topk(top_n, dim=-1)
    return torch.where(values > float("-inf"), pos, -1)


def _top_pages(agg: torch.Tensor, lens: torch.Tensor, settings: KCacheSettings, block_size: int) -> torch.Tensor:
    """A (B, Hkv, L), -inf off the candidates -> the candidates of the top_n / block_size pages by
    their best candidate, (B, Hkv, top_n); -1 for non-candidates (the sink, the window) and pages
    with no candidate."""
    num_seqs, num_kv_heads, max_len = agg.shape
    num_pages = -(-max_len // block_size)
    padded = F.pad(agg, (0, num_pages * block_size - max_len), value=float("-inf"))
    page_scores = padded.view(num_seqs, num_kv_heads, num_pages, block_size).amax(-1)  # (B, Hkv, P)
    values, pages = page_scores.topk(settings.top_n // block_size, dim=-1)  # (B, Hkv, k)
    pos = (pages[..., None] * block_size + torch.arange(block_size, device=agg.device)).flatten(-2)
    keep = (values > float("-inf")).repeat_interleave(block_size, -1)
    keep &= (pos >= settings.sink) & (pos < lens - settings.window)
    return torch.where(keep, pos, -1)


def _attend_selected(scores: torch.Tensor, positions: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
    """S (B, Hq, L), positions (B, Hkv, n), their V rows (B, Hkv, n, D) -> (B, Hq, D) fp32."""
    num_seqs, num_heads, max_len = scores.shape
    _, num_kv_heads, n = positions.shape
    group = num_heads // num_kv_heads
    index = positions.clamp(min=0)[:, :, None, :].expand(-1, -1, group, -1)  # (B, Hkv, G, n)
    picked = scores.view(num_seqs, num_kv_heads, group, max_len).gather(-1, index)
    picked = picked.masked_fill((positions < 0)[:, :, None, :], float("-inf"))
    probs = torch.softmax(picked, dim=-1).nan_to_num(0.0)  # an empty context: no row, zeros out
    return torch.matmul(probs, v_rows.float()).view(num_seqs, num_heads, -1)  # (B, Hkv, G, D) -> (B, Hq, D)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _launch_scores(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, max_seq_len: int) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, group = k_cache.shape[2], num_heads // k_cache.shape[2]
    scores = torch.empty(num_seqs, num_heads, max_seq_len, dtype=torch.float32, device=q.device)
    if scores.numel() == 0:
        return scores
    kernel = _kernel_module()
    grid = (num_seqs, num_kv_heads, -(-max_seq_len // SCORES_BLOCK_N))
    with _on_device(q.device):
        kernel._scores_kernel[grid](
            q, k_cache, block_tables, seq_lens, scores, float(scale), max_seq_len,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], block_tables.stride(0), *scores.stride()[:2],
            GROUP=group, GROUP_PAD=max(_MIN_DOT, kernel.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_N=SCORES_BLOCK_N, FP32_DOT=_fp32_dot(q.dtype),
            num_warps=SCORES_NUM_WARPS)
    return scores


def _launch_gather(v_store: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    num_seqs, num_kv_heads, num_rows = positions.shape
    positions = positions.contiguous()  # the kernel steps along a list with stride 1
    out = torch.zeros(num_seqs, num_kv_heads, num_rows, v_store.shape[3], dtype=v_store.dtype,
                      device=block_tables.device)
    if out.numel() == 0:
        return out
    grid = (num_seqs, num_kv_heads, -(-num_rows // GATHER_BLOCK_ROWS))
    with _on_device(block_tables.device):
        _kernel_module()._gather_v_rows_kernel[grid](
            v_store, block_tables, positions, out, num_rows, *v_store.stride()[:3], block_tables.stride(0),
            positions.stride(0), positions.stride(1), *out.stride()[:3],
            HEAD_DIM=v_store.shape[3], BLOCK_SIZE=v_store.shape[1], BLOCK_R=GATHER_BLOCK_ROWS,
            num_warps=GATHER_NUM_WARPS)
    return out


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernel's dot runs in full fp32: for fp32 inputs (no tf32), and for bf16 under
    the interpreter, whose bf16 dot is wrong (see _dot in kvtier/ops/triton_attention.py)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and lazy_kernels.interpreted(globals(), "_kcache_kernel"))


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    if backend is not None:
        return backend == "triton"
    if _kernel_module() is None:
        return False
    return x.is_cuda or lazy_kernels.interpreted(globals(), "_kcache_kernel")


def _max_seq_len(seq_lens: torch.Tensor, max_seq_len: int | None, block_size: int,
                 block_tables: torch.Tensor) -> int:
    """The bound on every seq_len the grids are sized from: given, or read (a sync on CUDA)."""
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 0:
        raise ValueError(f"max_seq_len must be an int >= 0, got {max_seq_len!r}")
    if block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(f"block_tables has {block_tables.shape[1]} blocks of {block_size} tokens, "
                         f"fewer than max_seq_len = {max_seq_len}")
    return max_seq_len


# ---------------------------------------------------------------------------------------------
# host-side checks (no device reads)
# ---------------------------------------------------------------------------------------------

def _check_backend(backend: str | None) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_store: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, settings: KCacheSettings | None) -> None:
    """Shapes, dtypes and devices of every argument; settings None: not needed (scores only)."""
    check_paged_cache(k_cache, v_store, "v_store")  # V block b holds the V of K block b
    check_query(q, k_cache)
    _check_metadata(block_tables, seq_lens, q.shape[0])
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number, got {scale!r}")
    if settings is not None:
        _check_settings_for(settings, k_cache.shape[1])
    for name, x in (("k_cache", k_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, expected {q.device} like q")
    if v_store.device.type != "cpu" and v_store.device != q.device:
        raise ValueError(f"v_store is on {v_store.device}: it must be in CPU memory or on q's device {q.device}")


def _check_metadata(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_seqs: int) -> None:
    if seq_lens.dim() != 1 or seq_lens.shape[0] != num_seqs or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"seq_lens must be ({num_seqs},) int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype not in _INDEX_DTYPES:
        raise ValueError(f"block_tables must be ({num_seqs}, max_blocks) int32/int64, "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}")


def _check_settings_for(settings: KCacheSettings, block_size: int) -> None:
    if not isinstance(settings, KCacheSettings):
        raise ValueError(f"settings must be a KCacheSettings, got {type(settings).__name__}")
    if settings.mode == "page" and settings.top_n % block_size:
        raise ValueError(f"page mode chooses whole pages: top_n ({settings.top_n}) must be a multiple "
                         f"of the block size ({block_size})")


def _check_gather_args(v_store: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> None:
    if v_store.dim() != 4:
        raise ValueError(f"v_store must be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got shape {tuple(v_store.shape)}")
    num_seqs, num_kv_heads = block_tables.shape[0], v_store.shape[2]
    if positions.dim() != 3 or tuple(positions.shape[:2]) != (num_seqs, num_kv_heads):
        raise ValueError(f"positions must be ({num_seqs}, {num_kv_heads}, n), got {tuple(positions.shape)}")
    if positions.dtype not in _INDEX_DTYPES or block_tables.dtype not in _INDEX_DTYPES or block_tables.dim() != 2:
        raise ValueError(f"positions and block_tables (2-D) must be int32/int64, got {positions.dtype} "
                         f"and {block_tables.dtype} {tuple(block_tables.shape)}")
    if positions.device != block_tables.device:
        raise ValueError(f"positions is on {positions.device}, block_tables on {block_tables.device}")
    if v_store.device.type != "cpu" and v_store.device != block_tables.device:
        raise ValueError(f"v_store is on {v_store.device}: CPU memory or block_tables' device")


def _check_kernel_args(q: torch.Tensor, k_cache: torch.Tensor, v_store: torch.Tensor,
                       block_tables: torch.Tensor) -> None:
    """What the Triton kernels need beyond _check_inputs."""
    head_dim = k_cache.shape[3]
    if head_dim < _MIN_DOT or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton path needs head_dim a power of two >= {_MIN_DOT}, got {head_dim}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_store", v_store), ("block_tables", block_tables)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, strides {x.stride()}")
    _check_kernel_device(q, v_store)


def _check_kernel_device(x: torch.Tensor, v_store: torch.Tensor) -> None:
    """x: a tensor on the device the kernels run on."""
    if _kernel_module() is None:
        raise ValueError("backend 'triton' needs the triton package")
    if not x.is_cuda and not lazy_kernels.interpreted(globals(), "_kcache_kernel"):
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                         "is imported, to run them on the CPU)")
    if x.is_cuda and v_store.device.type == "cpu" and not v_store.is_pinned():
        raise ValueError("v_store is in pageable CPU memory: the gather reads it through UVA, which needs "
                         "pinned memory (pin_memory=True)")
