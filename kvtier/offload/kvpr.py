"""KVPR's planner: how much of a far-resident context to send as activations and recompute on the GPU.

For `s` far tokens of a layer, the CPU may send the first `l` as the layer's input activations
(`h` wide) instead of their K and V (`2 * h_kv` wide); the GPU recomputes their K/V (two GEMMs,
`4 * h * h_kv` FLOPs a token) while the remaining `s - l` tokens' K/V cross the link:

    T(l) = b*l*h*p / link  +  max(4*b*l*h*h_kv / flops,  2*b*(s - l)*h_kv*p / link)
           activations first   recompute        while    the rest of the K/V crosses

T is convex and piecewise linear in l, so its minimum lies at a breakpoint: l = 0, l = s, or where
recompute and transfer take equally long,

    l_x = 2*s*h_kv*p/link / (4*h*h_kv/flops + 2*h_kv*p/link).

Below l_x the transfer is the longer branch and T's slope is b*p*(h - 2*h_kv)/link: sending
activations pays only when they are narrower than K+V (h < 2*h_kv: multi-head attention, OPT,
Llama-2); for grouped-query attention with h >= 2*h_kv (Llama-3: h = 4*h_kv) the best l is 0.
The planner evaluates T at the breakpoints (rounded to `granularity` tokens) and keeps the least;
it is told no model family, only shapes and measured rates.

Torch-free: bytes, FLOPs and seconds in, token counts out.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class KVPRShape:
    """One layer's recomputation shape: `batch` far sequences, hidden size `hidden`, K/V width
    `kv_width` (= KV heads x head_dim), `bytes_per_element` of activations and K/V on the link."""
    batch: int
    hidden: int
    kv_width: int
    bytes_per_element: int

    def __post_init__(self) -> None:
        if min(self.batch, self.hidden, self.kv_width, self.bytes_per_element) <= 0:
            raise ValueError(f"every dimension of {self} must be positive")


@dataclasses.dataclass(frozen=True)
class KVPRRates:
    """Measured: the host link's bytes/s toward the GPU, and the GPU's FLOP/s at the recompute
    GEMM's shape (skinny: rows = the recomputed tokens, K = hidden, N = 2 * kv_width)."""
    link_bytes_per_s: float
    recompute_flops_per_s: float

    def __post_init__(self) -> None:
        if min(self.link_bytes_per_s, self.recompute_flops_per_s) <= 0:
            raise ValueError(f"rates must be positive, got {self}")


def step_seconds(shape: KVPRShape, rates: KVPRRates, num_tokens: int, num_recomputed: int) -> float:
    """T(l): one layer's far context of `num_tokens` with the first `num_recomputed` sent as
    activations and recomputed."""
    if not 0 <= num_recomputed <= num_tokens:
        raise ValueError(f"num_recomputed {num_recomputed} must lie in [0, num_tokens = {num_tokens}]")
    b, h, h_kv, p = shape.batch, shape.hidden, shape.kv_width, shape.bytes_per_element
    link, flops = rates.link_bytes_per_s, rates.recompute_flops_per_s
    activations = b * num_recomputed * h * p / link
    recompute = 4 * b * num_recomputed * h * h_kv / flops
    transfer = 2 * b * (num_tokens - num_recomputed) * h_kv * p / link
    return activations + max(recompute, transfer)


def crossover(shape: KVPRShape, rates: KVPRRates, num_tokens: int) -> float:
    """l_x: the split at which recomputing the first l tokens takes as long as sending the rest."""
    h, h_kv, p = shape.hidden, shape.kv_width, shape.bytes_per_element
    per_token_transfer = 2 * h_kv * p / rates.link_bytes_per_s
    per_token_recompute = 4 * h * h_kv / rates.recompute_flops_per_s
    return num_tokens * per_token_transfer / (per_token_recompute + per_token_transfer)


def best_split(shape: KVPRShape, rates: KVPRRates, num_tokens: int, granularity: int = 1) -> int:
    """The l in [0, num_tokens], a multiple of `granularity` (or num_tokens), that minimizes T(l);
    the smaller l on a tie (nothing recomputed when it does not pay)."""
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    if num_tokens <= 0:
        return 0
    x = crossover(shape, rates, num_tokens) / granularity
    near = (math.floor(x) * granularity, math.ceil(x) * granularity)  # the grid points around l_x
    candidates = sorted({0, num_tokens, *(min(n, num_tokens) for n in near)})
    times = [step_seconds(shape, rates, num_tokens, n) for n in candidates]
    # a flat T (h = 2 * h_kv) ties up to rounding: the smallest l within it
    return next(n for n, t in zip(candidates, times) if t <= min(times) * (1 + 1e-9))
