"""KVPR's planner (kvtier/offload/kvpr.py): its split against a brute-force search of T(l) over a grid
of shapes and rates, and no recomputation for grouped-query attention with h >= 2 * h_kv."""

from __future__ import annotations

import itertools
import random

import pytest

from kvtier.offload.kvpr import KVPRRates, KVPRShape, best_split, crossover, step_seconds

# (hidden, kv width): OPT-13B and Llama-2-13B (multi-head), Llama-3-8B and -70B (GQA 4 and 8), a tiny
# multi-head model, and a mild GQA (h = 1.5 h_kv, where activations are still narrower than K+V)
SHAPES = [(5120, 5120), (5120, 5120), (4096, 1024), (8192, 1024), (64, 64), (768, 512)]
LINKS = [12e9, 26e9, 54e9, 394e9]  # PCIe Gen4 x8 .. NVLink, bytes/s
FLOPS = [20e12, 150e12, 700e12]  # a skinny GEMM's rate, small to large


def brute_force(shape: KVPRShape, rates: KVPRRates, num_tokens: int, granularity: int = 1) -> float:
    grid = list(range(0, num_tokens + 1, granularity)) + [num_tokens]
    return min(step_seconds(shape, rates, num_tokens, n) for n in grid)


@pytest.mark.parametrize("granularity", [1, 16])
def test_planner_within_5_percent_of_brute_force(granularity):
    rng = random.Random(0)
    for (h, h_kv), link, flops in itertools.product(SHAPES, LINKS, FLOPS):
        for _ in range(3):
            shape = KVPRShape(rng.choice([1, 8, 64]), h, h_kv, bytes_per_element=rng.choice([2, 4]))
            rates = KVPRRates(link, flops)
            s = rng.choice([1, 17, 512, 2048, 4096])
            split = best_split(shape, rates, s, granularity)
            assert 0 <= split <= s and (split % granularity == 0 or split == s)
            assert step_seconds(shape, rates, s, split) <= 1.05 * brute_force(shape, rates, s, granularity)


def test_planner_recomputes_nothing_for_gqa():
    """h >= 2 * h_kv: activations are at least as wide as K+V, so sending them never pays."""
    for (h, h_kv), link, flops in itertools.product([(4096, 1024), (8192, 1024), (4096, 2048)], LINKS, FLOPS):
        for s in (1, 100, 4096):
            assert best_split(KVPRShape(64, h, h_kv, 2), KVPRRates(link, flops), s) == 0


def test_multi_head_attention_recomputes_the_crossover_share():
    """OPT-13B over PCIe with a fast GPU: recompute is cheap, so l sits at the crossover, where
    recomputing the first l tokens takes as long as sending the rest's K/V, and beats full transfer."""
    shape, rates, s = KVPRShape(64, 5120, 5120, 2), KVPRRates(54e9, 400e12), 512
    split = best_split(shape, rates, s)
    assert split == pytest.approx(crossover(shape, rates, s), abs=1) and 0 < split < s
    assert step_seconds(shape, rates, s, split) < 0.75 * step_seconds(shape, rates, s, 0)  # 29.5% less here


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="positive"):
        KVPRShape(0, 64, 64, 2)
    with pytest.raises(ValueError, match="positive"):
        KVPRRates(0.0, 1e12)
    with pytest.raises(ValueError, match="in \\[0"):
        step_seconds(KVPRShape(1, 64, 64, 2), KVPRRates(1e9, 1e12), 10, 11)
    with pytest.raises(ValueError, match="granularity"):
        best_split(KVPRShape(1, 64, 64, 2), KVPRRates(1e9, 1e12), 10, 0)


def test_skinny_matmul_rate_is_measured():
    """The recompute GEMM's rate, measured (CPU here): positive, and a wider problem does more FLOPs a second."""
    import torch

    from kvtier.offload.hardware import skinny_matmul_flops
    small = skinny_matmul_flops(torch.device("cpu"), torch.float32, 1, 64, 128, iters=5)
    large = skinny_matmul_flops(torch.device("cpu"), torch.float32, 256, 512, 1024, iters=5)
    assert 0 < small < large
    with pytest.raises(ValueError, match="positive"):
        skinny_matmul_flops(torch.device("cpu"), torch.float32, 0, 64, 128)
