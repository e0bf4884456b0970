"""KVPR's runtime (--kvpr): what a step reads from the CPU tier -- far blocks of running requests
(--kv-expansion), prefix hits, swap-ins -- partly arrives as kept layer inputs whose K/V the GPU
recomputes. Greedy tokens equal KVPR off (fp32) for OPT, a multi-head Llama (Llama-2's shape) and a
GQA Llama; blocks were really recomputed where the split asked for it; both tiers' accounting holds
after every step; the planner recomputes nothing for grouped-query attention."""

from __future__ import annotations

import pytest

from kvtier.cache.storage import Tier
from kvtier.config import ConfigError, EngineConfig
from test_far_tier import ROOMY, TIGHT, run, waves


def recomputed(engine) -> tuple[int, int]:
    """(blocks recomputed into the staging ring or GPU blocks, blocks the steps read from the CPU tier)."""
    stats = engine.stats()
    return stats["kvpr_recomputed_blocks_total"], stats["kvpr_candidate_blocks_total"]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama2", "tiny-llama"])
@pytest.mark.parametrize("kvpr", ["0.5", "1.0"])
def test_all_far_recomputed_equals_off(tiny_model_dir, name, kvpr):
    """FlexGen's regime: every full block of every running request far; half or all of each
    request's far blocks recomputed from kept inputs each step."""
    path = tiny_model_dir(name)[0]
    ref, _, _ = run(path, waves(), **ROOMY)
    got, engine, shares = run(path, waves(), kv_expansion="1.0", kvpr=kvpr, **ROOMY)
    assert got == ref
    done, candidates = recomputed(engine)
    assert sum(far for far, _, _ in shares) > 0 and candidates > 0
    assert done >= 0.8 * float(kvpr) * candidates  # only blocks loaded from a swap or hit lack kept inputs
    assert engine.worker.transfers.num_recomputed_blocks == done


@pytest.mark.parametrize("name, async_scheduling, kvpr", [("tiny-opt", False, "1.0"), ("tiny-opt", True, "1.0"),
                                                          ("tiny-opt", False, "0.5"), ("tiny-llama2", True, "0.5")])
def test_prefix_reloads_and_swap_ins_recomputed_equal_off(tiny_model_dir, name, async_scheduling, kvpr):
    """A tight GPU pool: prefixes evicted to the CPU tier come back as hits, and preempted requests
    swap out and in; with --kvpr 1.0 every such block with kept inputs is recomputed instead of
    loaded; with 0.5 half are, and the rest load layer by layer behind the recomputed inputs."""
    path = tiny_model_dir(name)[0]
    ref, _, _ = run(path, waves(), async_scheduling=async_scheduling, **TIGHT)
    got, engine, _ = run(path, waves(), kvpr=kvpr, async_scheduling=async_scheduling, **TIGHT)
    assert got == ref
    done, candidates = recomputed(engine)
    assert done > 0 and engine.stats()["num_preemptions_total"] > 0
    assert done == engine.worker.transfers.num_recomputed_blocks


def test_planner_recomputes_nothing_for_gqa(tiny_model_dir):
    """Grouped-query attention with h >= 2 h_kv: the layer inputs are as wide as K+V, so the
    planner's split is 0 whatever the measured rates."""
    path = tiny_model_dir("tiny-llama")[0]
    _, engine, _ = run(path, waves(), kv_expansion="1.0", kvpr="auto", **ROOMY)
    done, candidates = recomputed(engine)
    assert candidates > 0 and done == 0


def test_planner_recomputes_part_for_multi_head(tiny_model_dir, monkeypatch):
    """A multi-head model's inputs are half as wide as its K+V: with a GPU that recomputes as fast
    as the link carries K/V (rates fixed here: the CPU's own vary with load), the planner recomputes
    a share between 0 and all, and tokens still equal KVPR off."""
    import kvtier.engine.llm_engine as llm_engine
    hidden, kv_width = 64, 64  # tiny-opt; T(l)'s crossover is then at l / s = 2 / 3
    monkeypatch.setattr(llm_engine, "host_link_bandwidth", lambda device: 1e9)
    flops = 4 * hidden * kv_width * 1e9 / (2 * kv_width * 4)  # a token recomputed as fast as its K/V cross
    monkeypatch.setattr(llm_engine, "skinny_matmul_flops", lambda *a, **k: flops)
    path = tiny_model_dir("tiny-opt")[0]
    ref, _, _ = run(path, waves(), **ROOMY)
    got, engine, _ = run(path, waves(), kv_expansion="1.0", kvpr="auto", **ROOMY)
    assert got == ref
    done, candidates = recomputed(engine)
    assert 0 < done < candidates


def test_cpu_tier_counts_kept_inputs(tiny_model_dir):
    """A CPU block with kept inputs costs its K/V plus h / (2 h_kv) of it: fewer fit the same GiB."""
    from kvtier import LLM
    path = tiny_model_dir("tiny-opt")[0]
    plain = LLM(str(path), skip_tokenizer_init=True, dtype="float32", **ROOMY).engine
    kvpr = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kvpr="auto", **ROOMY).engine
    num_plain, num_kvpr = (e.worker.num_blocks(Tier.CPU) for e in (plain, kvpr))
    assert num_kvpr == int(num_plain * 2 / 3) or abs(num_kvpr - num_plain * 2 / 3) <= 1


@pytest.mark.parametrize("bad, match", [("sometimes", "invalid kvpr"), ("1.5", "invalid kvpr")])
def test_bad_kvpr_values_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(kvpr=bad, kv_offloading_size=1)


def test_kvpr_needs_the_cpu_tier():
    with pytest.raises(ConfigError, match="--kv-offloading-size"):
        EngineConfig(kvpr="auto")


def test_kept_inputs_are_whole_only_for_blocks_the_gpu_computed():
    """The marks: a block whose first slot a forward wrote is whole; K/V loaded alone make a GPU
    block not whole, and a CPU block takes the mark of the GPU block stored into it (a BEFORE store
    reads the block before this step's forward rewrites it). Only leading whole blocks recompute."""
    import numpy as np

    from kvtier.cache.storage import Kind
    from kvtier.cache.transfers import Move, Recompute, Stage, TransferPlan
    from kvtier.engine.kvpr_runtime import KVPRRuntime
    from kvtier.offload.kvpr import KVPRRates, KVPRShape

    rt = KVPRRuntime(8, 8, 4, KVPRShape(1, 64, 64, 4), KVPRRates(1e9, 1e9), fraction=1.0)

    def move(src, dst, pairs, stage=Stage.AFTER):
        return Move(src, dst, Kind.KV, tuple(pairs), stage)
    rt.rewrite(TransferPlan(0, (move(Tier.GPU, Tier.CPU, [(1, 2)]),)), (), (), np.array([1]), None)
    assert rt.cpu_whole[2]
    plan = rt.rewrite(TransferPlan(1, (move(Tier.CPU, Tier.GPU, [(2, 3)], Stage.BEFORE),)), (), (), None, {})
    assert plan.operations == (move(Tier.CPU, Tier.GPU, [(2, 3)], Stage.BEFORE),)  # no position: loaded
    assert not rt.gpu_whole[3]
    rt.rewrite(TransferPlan(2, (move(Tier.GPU, Tier.CPU, [(3, 4)]),)), (), (), None, None)
    rt.rewrite(TransferPlan(3, (move(Tier.GPU, Tier.CPU, [(5, 7)], Stage.BEFORE),)), (), (), np.array([5]), None)
    assert not rt.cpu_whole[4] and not rt.cpu_whole[7] and rt.gpu_whole[5]
    # a far sequence [cpu 2 | cpu 4]: only the leading whole block is recomputed
    plan = rt.rewrite(TransferPlan(4), ((2, 0), (4, 1)), (0, 4), None, None)
    assert plan.operations == (Move(Tier.CPU, Tier.GPU, Kind.KV, ((4, 1),), Stage.PER_LAYER, ephemeral=True),
                               Recompute(((2, 0),), (0,), ephemeral=True))
    # a prefix hit placed in the step's tables: recomputed, and its GPU block whole again
    plan = rt.rewrite(TransferPlan(5, (move(Tier.CPU, Tier.GPU, [(2, 6)], Stage.BEFORE),)), (), (), None,
                      {6: (0, 0)})
    assert plan.operations == (Recompute(((2, 6),), (0,)),) and rt.gpu_whole[6]
    # a hit of [cpu 2 | cpu 4]: the whole one recomputed, the other loaded layer by layer behind it
    rt.num_layers = 2
    plan = rt.rewrite(TransferPlan(6, (move(Tier.CPU, Tier.GPU, [(2, 6), (4, 7)], Stage.BEFORE),)), (), (), None,
                      {6: (0, 0), 7: (0, 4)})
    assert plan.operations == (Recompute(((2, 6),), (0,)),
                               *(Move(Tier.CPU, Tier.GPU, Kind.KV, ((4, 7),), Stage.PER_LAYER, (i, i + 1))
                                 for i in range(2)))
