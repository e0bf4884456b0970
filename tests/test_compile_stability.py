"""No Triton kernel compiles a new variant once the engine has started and warmed up, however the
steps vary: batch sizes, prompt lengths (1, 17, odd), long contexts, prefix hits, chunked prefills,
short chunks over long contexts (the per-token decode view), split decodes, the CPU tier, sampling
with top_p (the attention kernels, the fused ops, the block copy and the top-p search are all
precompiled: ModelRunner, TransferEngine and Sampler at start-up).

A variant compiled mid-serving stalls every request in flight for ~1 s on an H100 (what makes a
variant: the top of kvtier/ops/triton_attention.py). The counter and the precompile launches are
checked on the CPU (interpreted); the engine runs need a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import MIXED_LENGTHS, greedy, random_prompts
from kvtier import LLM, SamplingParams
from kvtier.ops import triton_attention as ta
from kvtier.ops.kernel_variants import compiled_variants, num_compiled_variants

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled variants need a CUDA GPU "
                               "(on the CPU the kernels run in Triton's interpreter, which compiles nothing)")
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreted (CPU) case")



@needs_interpreter
def test_counter_is_none_when_interpreted():
    assert ta._INTERPRETED
    assert compiled_variants() is None and num_compiled_variants() is None


@needs_interpreter
def test_precompile_launches_pass_the_launchers_checks():
    """The dummy problems are valid launches (run interpreted here); precompile itself is a no-op."""
    k_cache = torch.zeros(3, 16, 2, 16)
    v_cache = torch.zeros(3, 16, 2, 16)
    ta.precompile(k_cache, v_cache, num_heads=4)
    ta._launch_each_variant(k_cache, v_cache, 4, torch.int64)
    assert not k_cache.any() and not v_cache.any()  # slot -1: nothing written


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}


@needs_gpu
def test_counter_sees_new_variants_and_only_them():
    cache = torch.zeros(4, 16, 1, 32, dtype=torch.float16, device="cuda")  # a shape no engine here uses
    before = compiled_variants()
    ta.precompile(cache, cache.clone(), num_heads=2)
    after = compiled_variants()
    assert sum(_delta(before, after).values()) == 8  # write_kv 1, prefill 4, decode 2, reduce 1
    ta.precompile(cache, cache.clone(), num_heads=2)
    assert compiled_variants() == after


def varied_workload(llm: LLM) -> None:
    """Steps of every composition the scheduler makes: see the module docstring."""
    long_prefix = random_prompts([600], seed=11)[0]
    llm.generate([random_prompts([17], seed=2)[0]], greedy(9), use_tqdm=False)  # one sequence
    llm.generate(random_prompts([1]), greedy(3), use_tqdm=False)  # a one-token prompt
    llm.generate(random_prompts(MIXED_LENGTHS + (3, 100, 127, 129, 255, 31, 47), seed=3), greedy(21),
                 use_tqdm=False)
    llm.generate([long_prefix], greedy(40), use_tqdm=False)  # chunked prefill, then split decodes
    for n in (7, 13, 16, 19, 70):  # prefix hits: short chunks over a long context, longer ones
        llm.generate([long_prefix + random_prompts([n], seed=n)[0]], greedy(5), use_tqdm=False)
    prompts = [long_prefix[:64 * (i + 1)] + random_prompts([i + 1], seed=40 + i)[0] for i in range(9)]
    llm.generate(prompts, greedy(12), use_tqdm=False)  # prefix hits of many lengths, batched
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=17, seed=5, ignore_eos=True)
    llm.generate(random_prompts([5, 9, 300, 2, 61], seed=50), sampled, use_tqdm=False)
    for batch in (2, 3, 5, 11, 16, 20):  # decode batch sizes across the CUDA-graph sizes and past them
        llm.generate(random_prompts([8 + i for i in range(batch)], seed=batch), greedy(6), use_tqdm=False)


ENGINES = {
    "graphs": {},
    "eager": {"enforce_eager": True},
    "cpu-tier": {"kv_offloading_size": 0.05, "num_gpu_blocks_override": 160},  # evicts, then loads
}


@needs_gpu
@pytest.mark.parametrize("name", list(ENGINES))
def test_no_compiles_after_start_up(name):
    """The engine compiles every variant while it starts (ModelRunner: triton_attention.precompile,
    the model's precompile, the CUDA graphs); then neither first requests nor varied steps compile."""
    llm = LLM("tiny-llama", load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_memory="64MiB",
              **ENGINES[name])
    counts = [compiled_variants()]
    llm.generate(random_prompts([5, 40, 90]), greedy(4), use_tqdm=False)  # first requests
    counts.append(compiled_variants())
    llm.engine.step_log = []
    varied_workload(llm)
    steps, llm.engine.step_log = llm.engine.step_log, None
    counts.append(compiled_variants())
    first, later = _delta(counts[0], counts[1]), _delta(counts[1], counts[2])
    print(f"{name}: {sum(counts[0].values())} variants after the engine's start, {first or 'none'} by the "
          f"first requests, {later or 'none'} by {len(steps)} varied steps")
    assert not first, f"compiled by the first requests: {first}"
    assert not later, f"compiled by the varied steps: {later}"
    assert {s.compiled_variants for s in steps} == {sum(counts[0].values())}  # the step log sees it too
