"""KVPR's recomputation: each attention layer's `kv_from_input` (the layer input -> K, V at the
tokens' positions) gives the K/V the forward wrote into the paged cache, for Llama (RoPE, GQA) and
OPT (learned positions, biases); the inputs the forward keeps per KV slot (`saved_inputs`) are the
ones it attended with, chunked prefill and decode steps included."""

from __future__ import annotations

import pytest
import torch

from conftest import greedy, random_prompts
from kvtier import LLM


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_kv_from_input_equals_the_cached_kv(tiny_model_dir, name):
    # eager: on a GPU a short prefill replays a CUDA graph, where module hooks do not run
    llm = LLM(str(tiny_model_dir(name)[0]), skip_tokenizer_init=True, dtype="float32", block_size=4,
              async_scheduling=False, enforce_eager=True)
    engine, inputs = llm.engine, {}
    attentions = engine.runner.model.attention_modules()
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args))
             for i, a in enumerate(attentions)]
    prompt = random_prompts([23], seed=4)[0]
    engine.add_request(prompt, greedy(8), request_id="r")
    engine.step()  # the prompt's prefill: every layer's inputs captured, its K/V cached
    for h in hooks:
        h.remove()
    table = engine.kv_cache.block_ids("r")
    positions = torch.arange(len(prompt), device=engine.runner.device)
    slots = torch.tensor(table, device=positions.device)[positions // 4] * 4 + positions % 4
    for i, attention in enumerate(attentions):
        x = inputs[i][1] if name == "tiny-llama" else inputs[i][0]  # Llama: (positions, x, ...); OPT: (x, ...)
        k, v = attention.kv_from_input(positions, x)
        k_cache, v_cache = engine.runner.kv_caches[i]
        torch.testing.assert_close(k, k_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_saved_inputs_recompute_the_cached_kv(tiny_model_dir, name):
    """Kept inputs, written by every step (a prompt in chunks of 8, then decodes), recompute every
    cached token's K/V; padding rows never land in a slot."""
    llm = LLM(str(tiny_model_dir(name)[0]), skip_tokenizer_init=True, dtype="float32", block_size=4,
              async_scheduling=False, max_num_batched_tokens=8)
    engine = llm.engine
    rows = engine.worker.kv.activation_rows(engine.model_config.hidden_size)
    engine.runner.save_layer_inputs(rows)
    prompt = random_prompts([21], seed=6)[0]
    engine.add_request(prompt, greedy(6), request_id="r")
    for _ in range(5):  # 3 prefill chunks, then decodes
        engine.step()
    num_tokens = engine.scheduler.requests["r"].num_computed_tokens
    assert num_tokens > len(prompt)
    positions = torch.arange(num_tokens, device=engine.runner.device)
    slots = torch.tensor(engine.kv_cache.block_ids("r"), device=positions.device)[positions // 4] * 4 + positions % 4
    for i, attention in enumerate(engine.runner.model.attention_modules()):
        k, v = attention.kv_from_input(positions, rows[i][slots])
        k_cache, v_cache = engine.runner.kv_caches[i]
        torch.testing.assert_close(k, k_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v_cache.flatten(0, 1)[slots], rtol=1e-5, atol=1e-6)
