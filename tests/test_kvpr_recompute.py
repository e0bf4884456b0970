"""KVPR's recomputation: each attention layer's `kv_from_input` (the layer input -> K, V at the
tokens' positions) gives the K/V the forward wrote into the paged cache, for Llama (RoPE, GQA) and
OPT (learned positions, biases)."""

from __future__ import annotations

import pytest
import torch

from conftest import greedy, random_prompts
from kvtier import LLM


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_kv_from_input_equals_the_cached_kv(tiny_model_dir, name):
    llm = LLM(str(tiny_model_dir(name)[0]), skip_tokenizer_init=True, dtype="float32", block_size=4,
              async_scheduling=False)
    engine, inputs = llm.engine, {}
    model = engine.runner.model.model
    attentions = [layer.self_attn for layer in (model.layers if name == "tiny-llama" else model.decoder.layers)]
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args))
             for i, a in enumerate(attentions)]
    prompt = random_prompts([23], seed=4)[0]
    engine.add_request(prompt, greedy(8), request_id="r")
    engine.step()  # the prompt's prefill: every layer's inputs captured, its K/V cached
    for h in hooks:
        h.remove()
    table = engine.kv_cache.block_ids("r")
    positions = torch.arange(len(prompt))
    slots = torch.tensor(table)[positions // 4] * 4 + positions % 4
    for i, attention in enumerate(attentions):
        x = inputs[i][1] if name == "tiny-llama" else inputs[i][0]  # Llama: (positions, x, ...); OPT: (x, ...)
        k, v = attention.kv_from_input(positions, x)
        k_cache, v_cache = engine.runner.kv_caches[i]
        torch.testing.assert_close(k, k_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)
