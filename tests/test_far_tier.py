"""Pie's far-resident KV (--kv-expansion FRACTION): running requests' oldest full blocks live only in
the CPU tier and reach the attention through the staging ring, layer by layer. Greedy tokens equal
expansion off, with prefix caching, the CPU tier, preemption by swap and async scheduling; the
far share is what was asked; both tiers' accounting holds after every step."""

from __future__ import annotations

import pytest

from conftest import MIXED_LENGTHS, greedy, random_prompts
from kvtier import LLM
from kvtier.cache.kv_cache_manager import FAR_BLOCK_ID
from kvtier.config import ConfigError, EngineConfig
from kvtier.offload.policies import ALWAYS_SWAP

NEW_TOKENS = 12
ROOMY = dict(block_size=4, num_gpu_blocks_override=256, max_model_len=128, max_num_seqs=8,
             max_num_batched_tokens=64, kv_offloading_size=0.02)
# a GPU pool of 96 tokens for 8 running prompts of up to 69 + 12: even with half their blocks far,
# running requests preempt (swap) each other
TIGHT = dict(ROOMY, block_size=2, num_gpu_blocks_override=48, max_model_len=96, max_num_seqs=8,
             max_num_batched_tokens=16)


def waves(seed: int = 3) -> list[list[list[int]]]:
    """Fresh prompts, then the same with new endings and a few repeated whole (prefix hits)."""
    first = random_prompts(MIXED_LENGTHS, seed=seed)
    tails = random_prompts([5] * len(first), seed=seed + 1)
    return [first, [p + t for p, t in zip(first, tails)] + first[:3]]


def run(path, prompt_waves, fractions: dict[int, float] | None = None, **engine_args):
    """Step by hand; check both tiers after every step; record each plan's far share.
    fractions: step index -> the far fraction from that step on (as the controller would set it).

    Returns (tokens by request, engine, [(far blocks, full blocks, requests) of each plan's scheduled])."""
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **engine_args)
    engine, shares, outs = llm.engine, [], {}
    engine.kv_cache.swap_policy = ALWAYS_SWAP
    execute = engine.worker.execute_async

    def recording_execute(plan):
        bs = engine.config.block_size
        shares.append((sum(len(s.far_block_ids) for s in plan.scheduled),
                       sum(s.start_pos // bs for s in plan.scheduled), len(plan.scheduled)))
        return execute(plan)
    engine.worker.execute_async = recording_execute
    for w, prompts in enumerate(prompt_waves):
        for i, p in enumerate(prompts):
            engine.add_request(p, greedy(NEW_TOKENS), request_id=f"{w}-{i}")
        while engine.has_unfinished_requests():
            if fractions and len(shares) in fractions:
                engine.kv_cache.far_fraction = fractions[len(shares)]
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
            engine.check_integrity()
    assert engine.num_held_blocks() == 0 and engine.kv_cache.num_held_cpu_blocks() == 0
    return {k: v.outputs[0].token_ids for k, v in outs.items()}, engine, shares


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def model_path(request, tiny_model_dir):
    return tiny_model_dir(request.param)[0]


def assert_half_far(shares, fraction: float = 0.5) -> None:
    """Once running, plans read about `fraction` of their full blocks from the far tier (a block
    goes far a step after its CPU copy lands, so a plan may lag; each request's share is rounded
    up or down by its own offset, so a plan may hold up to a block a request more)."""
    busy = [(far, full) for far, full, _ in shares if full >= 16]
    assert busy, "no step with enough full blocks to check"
    assert max(far for far, _ in busy) > 0
    assert sum(far for far, _ in busy) >= 0.8 * fraction * sum(full for _, full in busy)
    assert all(far <= fraction * full + n for far, full, n in shares)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_half_far_equals_off(model_path, async_scheduling):
    ref, _, _ = run(model_path, waves(), kv_expansion="off", async_scheduling=async_scheduling, **ROOMY)
    got, engine, shares = run(model_path, waves(), kv_expansion="0.5", async_scheduling=async_scheduling, **ROOMY)
    assert got == ref
    assert_half_far(shares)
    assert engine.kv_cache.prefix_hits > 0  # the second wave shared blocks, some of them far


def test_all_far_equals_off(model_path):
    """FlexGen's regime: every full block of every running request far (the one being written stays)."""
    ref, _, _ = run(model_path, waves(), kv_expansion="off", async_scheduling=True, **ROOMY)
    got, _, shares = run(model_path, waves(), kv_expansion="1.0", async_scheduling=True, **ROOMY)
    assert got == ref
    busy = [(far, full, n) for far, full, n in shares if full >= 16]
    assert sum(far for far, _, _ in busy) >= 0.8 * sum(full for _, full, _ in busy)


def test_half_far_with_swap_preemption(model_path):
    ref, _, _ = run(model_path, waves(), kv_expansion="off", async_scheduling=False, **TIGHT)
    got, engine, shares = run(model_path, waves(), kv_expansion="0.5", async_scheduling=False, **TIGHT)
    assert got == ref
    assert engine.kv_cache.num_swaps_out > 0 and engine.kv_cache.num_swaps_in > 0
    assert max(far for far, _, _ in shares) > 0


def test_half_far_equals_off_smollm2(smollm2):
    args = dict(ROOMY, block_size=16, num_gpu_blocks_override=64, max_model_len=256, max_num_batched_tokens=128,
                kv_offloading_size=0.1)
    prompts = [random_prompts([70, 130], vocab=4000, seed=7)]
    ref, _, _ = run(smollm2, prompts, kv_expansion="off", **args)
    got, _, shares = run(smollm2, prompts, kv_expansion="0.5", **args)
    assert got == ref
    assert max(far for far, _, _ in shares) > 0


@pytest.mark.parametrize("async_scheduling, config", [(False, ROOMY), (True, ROOMY), (False, TIGHT)])
def test_fraction_cut_brings_blocks_back(tiny_model_dir, async_scheduling, config):
    """The controller's cut: far blocks come back (shares of blocks the GPU still caches, or,
    with a tight GPU pool that evicted them, loads), then go far again; tokens unchanged,
    accounting whole after every step."""
    path = tiny_model_dir("tiny-llama")[0]
    cuts = {6: 0.1, 9: 0.0, 12: 0.4} if config is ROOMY else {20: 0.1, 30: 0.0, 40: 0.4}
    ref, _, _ = run(path, waves(), kv_expansion="off", async_scheduling=async_scheduling, **config)
    got, engine, shares = run(path, waves(), cuts, kv_expansion="0.5", async_scheduling=async_scheduling, **config)
    assert got == ref
    far = [f for f, _, _ in shares]
    first, none, again = sorted(cuts)
    assert max(far[first - 2:first + 1]) > max(far[none:again]) and far[again - 1] == 0  # all came back
    assert max(far[again + 2:]) > 0  # and went far again


def test_far_blocks_are_the_oldest_and_table_marks_them(tiny_model_dir):
    """Mid-run: each running request's far blocks are its first ones, their table entries
    FAR_BLOCK_ID, and the CPU blocks hold copies registered under the same hashes."""
    llm = LLM(str(tiny_model_dir("tiny-llama")[0]), skip_tokenizer_init=True, dtype="float32",
              kv_expansion="0.5", async_scheduling=False, **ROOMY)
    engine = llm.engine
    engine.add_request(random_prompts([60], seed=9)[0], greedy(NEW_TOKENS), request_id="a")
    for _ in range(4):
        engine.step()
        engine.check_integrity()
    kv = engine.kv_cache
    far = kv.req_far["a"]
    assert 0 < len(far) <= 0.5 * (engine.scheduler.requests["a"].num_computed_tokens // 4)
    table = kv.block_ids("a")
    assert table[:len(far)] == [FAR_BLOCK_ID] * len(far)
    assert [b.block_hash for b in far] == kv.req_hashes["a"][:len(far)]


@pytest.mark.parametrize("value, message", [("1.5", r"in \[0, 1\]"), ("abc", r"in \[0, 1\]"), ("-0.1", r"in \[0, 1\]")])
def test_bad_expansion_values(value, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(kv_expansion=value, kv_offloading_size=1)


def test_expansion_needs_cpu_tier_and_prefix_caching():
    with pytest.raises(ConfigError, match="--kv-offloading-size"):
        EngineConfig(kv_expansion="0.1")
    with pytest.raises(ConfigError, match="enable-prefix-caching"):
        EngineConfig(kv_expansion="0.1", kv_offloading_size=1, enable_prefix_caching=False)


def test_adaptive_expansion_runs_the_controller(tiny_model_dir):
    """--kv-expansion adaptive: the controller gets each decode step (the host's clock on the
    CPU) and the cache manager follows its fraction; tokens equal expansion off."""
    path = tiny_model_dir("tiny-llama")[0]
    ref, _, _ = run(path, waves(), kv_expansion="off", async_scheduling=False, **ROOMY)
    got, engine, _ = run(path, waves(), kv_expansion="adaptive", async_scheduling=False, **ROOMY)
    assert got == ref
    assert engine.expansion is not None and engine.expansion.reference_ready
    assert "kv_expansion_fraction" in engine.stats()
    # update() ran: the probe grew the fraction from 0, or a slow step ended the probe
    assert engine.expansion.controller.fraction > 0 or not engine.expansion.controller.probing
