"""The engine on the CPU: the torch backend's fused-SDPA attention against the plain reference (no
Triton), and --cpu-threads."""

import pytest
import torch

from kvtier import LLM
from kvtier.config import ConfigError, EngineConfig, default_cpu_threads
from kvtier.ops.attention import AttentionMetadata, paged_attention_ref, paged_attention_sdpa, write_kv_ref

FP32_ATOL = 1e-5


def _step(seq_lens, q_lens, num_kv_heads, group, head_dim=32, block_size=16, seed=0):
    """Random caches under shuffled block tables, this step's K/V written -> (q, k_cache, v_cache, meta)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks: garbage that must never be read
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[sum(blocks_per_seq[:b]):sum(blocks_per_seq[:b + 1])]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size
             for b, (s, n) in enumerate(zip(seq_lens, q_lens)) for p in range(s - n, s)]
    starts = torch.tensor([0] + q_lens).cumsum(0)
    meta = AttentionMetadata(torch.tensor(slots), tables, torch.tensor(seq_lens, dtype=torch.int32),
                             starts.to(torch.int32), max(q_lens), max(seq_lens), list(seq_lens), list(q_lens))
    k, v = (torch.randn(len(slots), num_kv_heads, head_dim, generator=gen) for _ in range(2))
    write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(len(slots), num_kv_heads * group, head_dim, generator=gen)
    return q, k_cache, v_cache, meta


STEPS = {
    "uncached prefill": ([37], [37]),
    "chunk over a cached prefix": ([70], [21]),
    "decode batch": ([5, 40, 17, 64], [1, 1, 1, 1]),
    "mixed: prefills, chunks, decodes": ([33, 50, 9, 81, 16], [33, 1, 4, 1, 16]),
    "mixed: one decode": ([20, 45], [20, 1]),
}


@pytest.mark.parametrize("step", STEPS, ids=list(STEPS))
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("window", [None, 8])
def test_sdpa_matches_reference(step, group, window):
    q, k_cache, v_cache, meta = _step(*STEPS[step], num_kv_heads=2, group=group)
    scale = q.shape[-1] ** -0.5
    ref = paged_attention_ref(q, k_cache, v_cache, meta, scale, window)
    out = paged_attention_sdpa(q, k_cache, v_cache, meta, scale, window)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)


def test_sdpa_runs_the_fused_kernel_on_cpu():
    """The point of the path: no unfused math fallback (which builds the whole score matrix)."""
    q, k_cache, v_cache, meta = _step([64], [64], num_kv_heads=2, group=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        paged_attention_sdpa(q, k_cache, v_cache, meta, 0.125)
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names, names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, names


def test_cpu_threads_applied_and_validated(monkeypatch):
    before = torch.get_num_threads()
    try:
        LLM("tiny-llama", load_format="dummy", device="cpu", skip_tokenizer_init=True, cpu_threads=1)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        LLM("tiny-llama", load_format="dummy", device="cpu", skip_tokenizer_init=True)
        assert torch.get_num_threads() == default_cpu_threads()
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_cpu_threads() == 3
    for bad in (0, -2, 1.5, "4"):
        with pytest.raises(ConfigError, match="cpu_threads"):
            EngineConfig(cpu_threads=bad)
