"""The CPU tier: same greedy tokens with it on and off under heavy demotion, reload and swapping;
both tiers' accounting after every step; CPU hits counted and not recomputed; a full CPU pool
evicting only blocks nobody uses; a failed pinned allocation degrading to a smaller tier."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import pytest
import torch

from conftest import MIXED_LENGTHS, greedy, random_prompts
from kvtier import LLM
from kvtier.cache.hashing import hash_full_blocks
from kvtier.cache.kv_cache_manager import KVCacheManager
from kvtier.cache.storage import Kind, Layout, StorageSpec, Tier
from kvtier.cache.transfers import Move, Stage, TransferPlan
from kvtier.engine import host_kv_pool
from kvtier.offload.cost_model import HardwareRates, SwapCostModel
from kvtier.offload.policies import ALWAYS_SWAP, CostModelSwap
from kvtier.request import Request
from kvtier.sampling_params import SamplingParams

# 2-token blocks, a pool of 80 tokens (a 64-token prompt and its answer barely fit) and 8-token
# steps: nearly every step allocates blocks (evicting and demoting cached ones) and running
# requests keep preempting (swapping) each other.
TIGHT = dict(block_size=2, num_gpu_blocks_override=40, max_model_len=80, max_num_seqs=4,
             max_num_batched_tokens=8)
NEW_TOKENS = 6


def waves(seed: int = 5) -> list[list[list[int]]]:
    """Three waves: fresh prompts; the same prompts with new endings (prefix hits, by then
    evicted from the small GPU pool) and a few repeated whole; some of those extended again."""
    first = random_prompts(MIXED_LENGTHS, seed=seed)
    tails = random_prompts([3] * len(first), seed=seed + 1)
    second = [p + t for p, t in zip(first, tails)] + first[:3]
    return [first, second, [p + [9, 9] for p in second[:6]]]


def run_waves(path, prompt_waves, new_tokens: int = NEW_TOKENS, **engine_args):
    """Step the engine by hand: check both tiers after every step, count steps that move KV.

    Preemptions always swap (when the CPU pool has room): on a GPU the measured rates make a tiny
    model cheaper to recompute, and the swap path is what this exercises (the cost model's choice
    is tested on its own)."""
    # synchronous: the share of steps that move KV is what this workload was sized for (async
    # scheduling moves the same blocks in fewer steps; tests/test_async_scheduling.py covers the tier there)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", async_scheduling=False,
              **{**TIGHT, **engine_args})
    engine, moved_steps, steps, outs = llm.engine, 0, 0, {}
    engine.kv_cache.swap_policy = ALWAYS_SWAP
    execute = engine.worker.execute_async

    def counting_execute(plan):
        nonlocal moved_steps, steps
        steps += 1
        moved_steps += not plan.transfers.is_empty
        return execute(plan)
    engine.worker.execute_async = counting_execute
    for w, prompts in enumerate(prompt_waves):
        for i, p in enumerate(prompts):
            engine.add_request(p, greedy(new_tokens), request_id=f"{w}-{i}")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
            engine.check_integrity()
    assert engine.num_held_blocks() == 0 and engine.kv_cache.num_held_cpu_blocks() == 0
    tokens = {k: v.outputs[0].token_ids for k, v in outs.items()}
    return tokens, outs, engine, moved_steps / steps


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def model_path(request, tiny_model_dir):
    return tiny_model_dir(request.param)[0]


_REFERENCE: dict = {}


def tier_off_reference(path):
    """Tokens with the tier off (computed once per model)."""
    if path not in _REFERENCE:
        tokens, _, off, _ = run_waves(path, waves())
        assert off.scheduler.num_preemptions > 0  # the pool is tight enough to preempt without a tier
        _REFERENCE[path] = tokens
    return _REFERENCE[path]


@pytest.mark.parametrize("policy", ["write-back", "write-through"])
def test_tier_on_equals_off_under_heavy_movement(model_path, policy):
    prompt_waves = waves()
    ref = tier_off_reference(model_path)
    got, outs, engine, moved = run_waves(model_path, prompt_waves, kv_offloading_size=0.002,
                                         kv_offloading_policy=policy)
    assert got == ref
    stats = engine.stats()
    assert stats["num_swaps_out_total"] > 0 and stats["num_swaps_in_total"] > 0
    assert stats["prefix_hit_tokens_cpu_total"] > 0 and stats["blocks_to_gpu_total"] > 0
    if policy == "write-back":
        assert stats["num_demotions_total"] > 0
    assert stats["bytes_to_cpu_total"] == stats["blocks_to_cpu_total"] * engine.host_pool.block_bytes
    assert moved > 0.5, f"only {moved:.0%} of steps moved KV between tiers"
    transfers = engine.worker.transfers
    assert 0 < transfers.num_split_loads  # some loads went layer group by layer group
    assert any(o.metrics.num_cached_tokens_by_tier["cpu"] > 0 for o in outs.values())


def test_tier_on_equals_off_smollm2(smollm2):
    ref, _, _, _ = run_waves(smollm2, waves())
    got, _, engine, moved = run_waves(smollm2, waves(), kv_offloading_size=0.05)
    assert got == ref
    stats = engine.stats()
    assert stats["num_swaps_out_total"] > 0 and stats["prefix_hit_tokens_cpu_total"] > 0
    assert moved > 0.5


def test_cpu_hit_is_counted_and_not_recomputed(tiny_model_dir):
    path, _ = tiny_model_dir("tiny-llama")
    prompt = random_prompts([70], seed=3)[0]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", num_gpu_blocks_override=6,
              max_model_len=96, kv_offloading_size=0.002)
    first = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
    llm.generate(random_prompts([80, 80], seed=4), greedy(8), use_tqdm=False)  # evicts the prompt's blocks
    first_hash = hash_full_blocks(prompt, 16)[0]
    assert llm.engine.kv_cache.pool.lookup(first_hash) is None  # gone from the GPU ...
    assert llm.engine.kv_cache.cpu_pool.lookup(first_hash) is not None  # ... kept on the CPU
    before = llm.engine.runner.num_computed_tokens
    second = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
    assert second.metrics.num_cached_tokens_by_tier == {"gpu": 0, "cpu": 64}
    assert second.metrics.num_cached_tokens == 64
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.runner.num_computed_tokens - before == 70 - 64 + 7  # the 64 came back by copy
    llm.engine.check_integrity()


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4, ignore_eos=True))


def test_full_cpu_pool_evicts_only_unused_blocks():
    """Swapped requests hold CPU blocks; demotions into a full pool evict cached blocks in LRU
    order and never a held one."""
    mgr = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    held = _request("held", list(range(10, 18)))  # 2 full blocks
    assert mgr.allocate_slots(held, 8)
    held.num_computed_tokens = 8
    assert mgr.swap_out(held)
    mgr.complete_transfers(mgr.take_transfers(0).step_id)
    held_cpu = [b.block_id for b in mgr.swapped["held"][0]]
    for i in range(3):  # each request fills all 4 GPU blocks, evicting (demoting) the last one's
        req = _request(f"r{i}", [100 * (i + 1) + t for t in range(16)])
        assert mgr.allocate_slots(req, 16, mgr.get_computed_blocks(req))
        req.num_computed_tokens = 16
        mgr.free(req)
        mgr.complete_transfers(mgr.take_transfers(i + 1).step_id)
        mgr.check_integrity()
        assert [b.block_id for b in mgr.swapped["held"][0]] == held_cpu
        assert all(mgr.cpu_pool.blocks[b].ref_cnt == 1 for b in held_cpu)
    assert mgr.cpu_pool.num_evictions > 0
    assert mgr.num_demotions > 2  # only 2 free CPU blocks: later demotions evicted earlier ones
    # the swapped request comes back from its own blocks
    hit = mgr.get_computed_blocks(held)
    held.num_computed_tokens = 0
    assert hit.swapped and hit.num_tokens == 8 and [b.block_id for b in hit.cpu] == held_cpu
    assert mgr.allocate_slots(held, 1, hit)
    assert [c for c, _ in mgr.take_transfers(9).pairs(Tier.CPU, Tier.GPU)] == held_cpu
    mgr.complete_transfers(9)
    mgr.free(held)
    mgr.check_integrity()


def test_swap_decision_follows_the_cost_model(tiny_model_dir):
    cost = SwapCostModel(HardwareRates(link_bytes_per_s=50e9, flops_per_s=700e12),
                         kv_bytes_per_token=131072, flops_per_token=16e9)  # Llama-3-8B on an H100
    assert cost.swap_pays(2048) and cost.swap_seconds(1000) < cost.recompute_seconds(1000)
    cheap_kv = SwapCostModel(HardwareRates(1e9, 1e15), kv_bytes_per_token=131072, flops_per_token=1e6)
    assert not cheap_kv.swap_pays(2048)
    # an engine whose cost model prefers recomputation preempts by recompute, with equal tokens
    path, _ = tiny_model_dir("tiny-llama")
    ref = tier_off_reference(path)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **TIGHT, kv_offloading_size=0.002)
    llm.engine.kv_cache.swap_policy = CostModelSwap(cheap_kv)
    outs = llm.generate(waves()[0], greedy(NEW_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [ref[f"0-{i}"] for i in range(len(outs))]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.kv_cache.num_swaps_out == 0


def test_failed_pinning_degrades_with_a_warning(monkeypatch, caplog, tiny_model_dir):
    calls = []

    def register(ptr, num_bytes):
        calls.append(num_bytes)
        return len(calls) <= 2  # the third chunk fails

    monkeypatch.setattr(host_kv_pool, "_register", register)
    monkeypatch.setattr(host_kv_pool, "_unregister", lambda ptr: None)
    monkeypatch.setattr(host_kv_pool, "PIN_CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(host_kv_pool, "pinning_available", lambda: True)
    path, _ = tiny_model_dir("tiny-llama")
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **TIGHT, kv_offloading_size=0.002)
    pool = llm.engine.host_pool
    per_chunk = (1 << 16) // pool.block_bytes
    assert len(calls) == 3
    assert pool.pinned and pool.num_blocks == 2 * per_chunk
    assert llm.engine.kv_cache.cpu_pool.num_blocks == 2 * per_chunk
    assert "could pin only" in caplog.text
    outs = llm.generate(waves()[0], greedy(8), use_tqdm=False)  # and it serves
    assert all(o.finished for o in outs)
    pool.close()  # while _unregister is the stand-in: the fake registrations must not reach CUDA later

    monkeypatch.setattr(host_kv_pool, "_register", lambda ptr, n: False)
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **TIGHT, kv_offloading_size=0.002)
    assert llm.engine.host_pool is None and llm.engine.kv_cache.cpu_pool is None
    assert "running without it" in caplog.text


def test_bad_offloading_size_is_a_clear_error(tiny_model_dir):
    path, _ = tiny_model_dir("tiny-llama")
    with pytest.raises(ValueError, match="kv_offloading_size"):
        LLM(str(path), skip_tokenizer_init=True, kv_offloading_size=-1)
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(str(path), skip_tokenizer_init=True, kv_offloading_size=1e-9)
    with pytest.raises(ValueError, match="kv_offloading_policy"):
        LLM(str(path), skip_tokenizer_init=True, kv_offloading_policy="sometimes")


def transfer_engine_over(gpu: torch.Tensor, cpu: torch.Tensor, cpu_blocks_per_chunk: int | None = None):
    """A TransferEngine between a GPU-tier tensor (L, 2, Ng, bs, Hkv, D) and a CPU tier holding a
    copy of `cpu` (Nc, L, 2, bs, Hkv, D); returns it and the CPU tier's tensor."""
    from kvtier.engine.host_kv_pool import HostKVPool
    from kvtier.engine.kv_storage import KVStorage
    from kvtier.engine.transfer_engine import TransferEngine
    num_layers, _, _, block_size, heads, head_dim = gpu.shape
    spec = StorageSpec(Tier.GPU, Kind.KV, num_layers, block_size, heads, head_dim,
                       str(gpu.dtype).removeprefix("torch."), Layout.LAYER_MAJOR)
    pool = HostKVPool(cpu.shape[0], spec.on(Tier.CPU), pin=False)
    pool.kv.copy_(cpu)
    pool.blocks_per_chunk = cpu_blocks_per_chunk or pool.blocks_per_chunk
    return TransferEngine(KVStorage(spec, gpu, pool)), pool.kv


def run_plan(eng, plan: TransferPlan) -> None:
    """Issue a step's moves as the worker does around a forward that reads nothing."""
    pipeline = eng.begin_step(plan)
    pipeline.finish()


def moves(step_id: int, src: Tier, dst: Tier, pairs: list[tuple[int, int]]) -> TransferPlan:
    """A plan of one BEFORE move of whole KV blocks, pairs (src_block_id, dst_block_id)."""
    return TransferPlan(step_id, (Move(src, dst, Kind.KV, tuple(pairs), Stage.BEFORE),))


@pytest.mark.parametrize("cpu_ids,split", [([1, 4], False), ([3, 4], True)])
def test_transfer_round_trip_is_byte_exact(cpu_ids, split):
    """Stores, then loads: scattered CPU blocks move whole, runs of them layer group by group."""
    gpu = torch.randn(4, 2, 8, 4, 2, 8)  # (L, 2, Ng, bs, Hkv, D)
    eng, cpu = transfer_engine_over(gpu, torch.randn(5, 4, 2, 4, 2, 8))  # (Nc, L, 2, bs, Hkv, D)
    assert len(eng.group_layers) == 2 and eng.can_split
    before = gpu.clone()
    run_plan(eng, moves(0, Tier.GPU, Tier.CPU, [(6, cpu_ids[0]), (2, cpu_ids[1])]))
    assert torch.equal(cpu[cpu_ids[0]], before[:, :, 6]) and torch.equal(cpu[cpu_ids[1]], before[:, :, 2])
    run_plan(eng, moves(1, Tier.CPU, Tier.GPU, [(cpu_ids[0], 0), (cpu_ids[1], 7)]))
    assert eng.num_split_loads == split
    assert torch.equal(gpu[:, :, 0], before[:, :, 6]) and torch.equal(gpu[:, :, 7], before[:, :, 2])
    untouched = [i for i in range(8) if i not in (0, 7)]
    assert torch.equal(gpu[:, :, untouched], before[:, :, untouched])
    assert eng.bytes == {"to_cpu": 2 * gpu[:, :, 0].nbytes, "to_gpu": 2 * gpu[:, :, 0].nbytes}


def test_layer_groups_and_host_pool_layout():
    from kvtier.engine.host_kv_pool import HostKVPool
    from kvtier.engine.transfer_engine import layer_groups
    assert [layer_groups(n) for n in (1, 2, 3, 30, 32, 7)] == [1, 2, 1, 2, 2, 1]
    spec = StorageSpec(Tier.CPU, Kind.KV, 32, 16, 8, 128, "bfloat16", Layout.BLOCK_MAJOR)
    pool = HostKVPool(5, spec, pin=False)
    assert pool.kv.shape == (5, 32, 2, 16, 8, 128) and pool.num_blocks == 5
    assert pool.block_bytes == 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB: all layers' K and V of one block


def test_dma_runs_merge_consecutive_blocks_within_a_pinned_chunk():
    from kvtier.engine.transfer_engine import _runs
    assert _runs([3, 4, 5, 9, 10], chunk=100) == [(0, 3, 3), (3, 9, 2)]
    assert _runs([6, 7, 8, 9], chunk=8) == [(0, 6, 2), (2, 8, 2)]  # 8 starts a new registration


def test_staged_copies_split_by_staging_size_and_chunks(monkeypatch):
    """More blocks than the staging buffer holds, across pinned-chunk boundaries: still exact."""
    from kvtier.engine import transfer_engine
    gpu = torch.randn(2, 2, 16, 4, 1, 4)
    monkeypatch.setattr(transfer_engine, "STAGING_BYTES", 3 * gpu[:, :, 0].nbytes)  # 3 blocks
    eng, cpu = transfer_engine_over(gpu, torch.randn(12, 2, 2, 4, 1, 4), cpu_blocks_per_chunk=4)
    assert eng.staging["to_cpu"].shape[0] == 3
    pairs = [(g, c) for g, c in zip([1, 5, 2, 9, 14, 0, 7, 3], [3, 4, 5, 6, 2, 1, 11, 0])]
    before = gpu.clone()
    run_plan(eng, moves(0, Tier.GPU, Tier.CPU, pairs))
    for g, c in pairs:
        assert torch.equal(cpu[c], before[:, :, g])
    gpu.zero_()
    run_plan(eng, moves(1, Tier.CPU, Tier.GPU, [(c, g) for g, c in pairs]))
    assert eng.num_split_loads == 1  # runs 0-3, 4-6 and 11: layer group by layer group
    for g, _ in pairs:
        assert torch.equal(gpu[:, :, g], before[:, :, g])


def test_operations_without_a_handler_fail_before_anything_moves():
    """Each Move goes to the handler of its (src, dst) tiers; what none executes is refused whole."""
    from kvtier.cache.transfers import Recompute
    gpu = torch.randn(2, 2, 4, 4, 1, 4)
    eng, cpu = transfer_engine_over(gpu, torch.zeros(3, 2, 2, 4, 1, 4))
    store = Move(Tier.GPU, Tier.CPU, Kind.KV, ((1, 0),), Stage.BEFORE)
    for bad, match in [(Move(Tier.GPU, Tier.DISK, Kind.KV, ((1, 0),), Stage.BEFORE), "gpu -> disk"),
                       (Recompute(((0, 1),), (0,)), "--kvpr"),
                       (dataclasses.replace(store, layers=(1, 3)), "layers must be"),
                       (dataclasses.replace(store, stage=Stage.PER_LAYER), "names its layers"),
                       (dataclasses.replace(store, ephemeral=True), "into the staging ring"),
                       (Move(Tier.CPU, Tier.GPU, Kind.KV, ((0, 0),), Stage.PER_LAYER, ephemeral=True),
                        "--kv-expansion")]:
        with pytest.raises((NotImplementedError, ValueError), match=match):
            run_plan(eng, TransferPlan(0, (store, bad)))
        assert not cpu.any(), "nothing was issued"
    run_plan(eng, TransferPlan(1, (store,)))
    assert torch.equal(cpu[0], gpu[:, :, 1])


def test_per_layer_moves_run_at_their_layers():
    """PER_LAYER loads of layer l are issued before layer l - PREFETCH_DEPTH (the first layers' at
    the start) and have landed when layer l runs; PER_LAYER stores of layers [a, b) run after
    layer b - 1 wrote them; a BEFORE move of a layer range moves those layers only."""
    from kvtier.engine import transfer_engine
    num_layers = 4
    gpu = torch.randn(num_layers, 2, 6, 4, 1, 4)
    eng, cpu = transfer_engine_over(gpu, torch.randn(5, num_layers, 2, 4, 1, 4))
    before_gpu, before_cpu = gpu.clone(), cpu.clone()
    loads = [Move(Tier.CPU, Tier.GPU, Kind.KV, ((2, 3),), Stage.PER_LAYER, (layer, layer + 1))
             for layer in range(num_layers)]
    stores = [Move(Tier.GPU, Tier.CPU, Kind.KV, ((1, 4),), Stage.PER_LAYER, (0, 2)),
              Move(Tier.GPU, Tier.CPU, Kind.KV, ((1, 4),), Stage.PER_LAYER, (2, 4))]
    partial = Move(Tier.GPU, Tier.CPU, Kind.KV, ((5, 0),), Stage.BEFORE, (1, 3))
    pipeline = eng.begin_step(TransferPlan(0, (partial, *loads, *stores)))
    assert torch.equal(cpu[0, 1:3], before_gpu[1:3, :, 5]) and torch.equal(cpu[0, [0, 3]], before_cpu[0, [0, 3]])
    depth = transfer_engine.PREFETCH_DEPTH
    for layer in range(num_layers):  # a forward: each layer reads its KV of block 3, writes block 1
        pipeline.hooks.before_layer(layer)
        landed = [torch.equal(gpu[i, :, 3], before_cpu[2, i]) for i in range(num_layers)]
        assert landed == [i <= layer + depth for i in range(num_layers)], (layer, landed)
        gpu[layer, :, 1] += 1
        pipeline.hooks.after_layer(layer)
        stored = [torch.equal(cpu[4, i], gpu[i, :, 1]) for i in range(num_layers)]
        assert stored == [i <= {0: -1, 1: 1, 2: 1, 3: 3}[layer] for i in range(num_layers)], (layer, stored)
    pipeline.finish()
    assert eng.bytes["to_gpu"] == eng.block_bytes and eng.bytes["to_cpu"] == eng.block_bytes * 3 // 2


def test_offload_policies_are_plain_data():
    from kvtier.offload.policies import ALWAYS_SWAP, NEVER_SWAP, WRITE_BACK, WRITE_THROUGH, CostModelSwap
    cost = SwapCostModel(HardwareRates(50e9, 700e12), kv_bytes_per_token=131072, flops_per_token=16e9)
    assert ALWAYS_SWAP.swap_pays(1) and not NEVER_SWAP.swap_pays(1) and CostModelSwap(cost).swap_pays(2048)
    assert WRITE_BACK.store_stage is Stage.BEFORE and WRITE_THROUGH.store_stage is Stage.AFTER
    for policy in (ALWAYS_SWAP, CostModelSwap(cost), WRITE_THROUGH):
        assert pickle.loads(pickle.dumps(policy)) == policy


def test_a_transfer_plan_pickles():
    from kvtier.cache.transfers import Recompute
    mgr = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    req = _request("r", list(range(10, 18)))
    assert mgr.allocate_slots(req, 8)
    req.num_computed_tokens = 8
    assert mgr.swap_out(req)
    plan = mgr.take_transfers(0)
    plan = TransferPlan(plan.step_id, plan.operations + (Recompute(((0, 1), (1, 0)), (0, 4), ephemeral=True),))
    assert plan.pairs(Tier.GPU, Tier.CPU, Stage.BEFORE) == [(0, 0), (1, 1)]
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_a_step_plan_from_a_running_engine_pickles(tiny_model_dir):
    """A plan taken mid-run, with moves between tiers in it, round-trips through pickle and holds
    no live list: pickled when it was made, it still equals the plan after the run went on."""
    path, _ = tiny_model_dir("tiny-llama")
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **TIGHT, kv_offloading_size=0.002)
    engine = llm.engine
    engine.kv_cache.swap_policy = ALWAYS_SWAP
    execute, taken = engine.worker.execute_async, []

    def taking(plan):
        if not plan.transfers.is_empty and plan.scheduled:
            taken.append((plan, pickle.dumps(plan)))
        return execute(plan)
    engine.worker.execute_async = taking
    llm.generate(random_prompts(MIXED_LENGTHS), greedy(NEW_TOKENS, repetition_penalty=1.3), use_tqdm=False)
    assert taken, "no step moved KV between tiers"
    assert any(not s.reset_block_table for plan, _ in taken for s in plan.scheduled)
    for plan, pickled in taken:
        assert pickle.loads(pickled) == plan
        assert all(s.all_token_ids for s in plan.scheduled)  # penalized: the sampler's snapshot
