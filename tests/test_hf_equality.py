"""Greedy tokens equal HF transformers' greedy generate on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest

from conftest import MIXED_LENGTHS, assert_greedy_equal, greedy, hf_greedy, random_prompts
from kvtier import LLM

NEW_TOKENS = 32


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-qwen2", "tiny-llama31", "tiny-mistral"])
def test_tiny_models_match_hf(tiny_model_dir, name):
    path, hf = tiny_model_dir(name)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=256)
    prompts = random_prompts(MIXED_LENGTHS)
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref, logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert_greedy_equal(out.outputs[0].token_ids, ref, logits)
    llm.engine.check_integrity()
    assert llm.engine.num_held_blocks() == 0


def test_llama31_rope_scaling_is_exercised():
    """Guard against a silent fallback: the tiny Llama-3.1 config must scale its frequencies."""
    from kvtier.models.config import model_config_from_hf
    from kvtier.models.layers import RotaryEmbedding
    from kvtier.models.registry import DUMMY_CONFIGS
    cfg = model_config_from_hf(DUMMY_CONFIGS["tiny-llama31"])
    scaled = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta, cfg.rope_scaling_dict()).inv_freq()
    plain = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta, None).inv_freq()
    assert not (scaled == plain).all()
