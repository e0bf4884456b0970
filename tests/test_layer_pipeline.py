"""The shared decoder loop: per-layer attention backend objects and the before/after layer hooks,
for both model families (on the CPU, random weights)."""

from __future__ import annotations

import pytest
import torch

from kvtier.models.attention_backends import AttentionBackend, TorchAttention, make_attention_backend
from kvtier.models.loader import load_model, model_config, resolve_model
from kvtier.ops.attention import AttentionMetadata, LayerHooks

BLOCK_SIZE = 16


class RecordingAttention(AttentionBackend):
    """Wraps another backend; notes each call (with the KV cache it got) in a shared event log."""

    def __init__(self, inner: AttentionBackend, events: list):
        self.inner, self.events = inner, events

    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window):
        self.events.append(("attend", kv_cache))
        return self.inner.forward(q, k, v, kv_cache, meta, scale, sliding_window)


def _model(name: str):
    source = resolve_model(name, "dummy")
    cfg = model_config(source)
    return load_model(source, cfg, torch.device("cpu"), torch.float32), cfg


def _prefill(cfg, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list, AttentionMetadata]:
    """One sequence's whole prompt in blocks 0, 1, ...: (input_ids, positions, kv_caches, meta)."""
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens), block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32), max_query_len=num_tokens,
        max_seq_len=num_tokens, seq_lens_list=[num_tokens], query_lens_list=[num_tokens])
    input_ids = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0))
    return input_ids, torch.arange(num_tokens), kv_caches, meta


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_each_layer_holds_its_own_backend(name):
    model, cfg = _model(name)
    layers = model.attention_layers()
    assert len(layers) == cfg.num_layers >= 2
    assert all(type(layer.backend) is TorchAttention for layer in layers)
    assert len({id(layer.backend) for layer in layers}) == cfg.num_layers
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_attention_backend("flash")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("swapped", [0, 1])
def test_swapped_backend_serves_only_its_layer_between_that_layers_hooks(name, swapped):
    model, cfg = _model(name)
    input_ids, positions, kv_caches, meta = _prefill(cfg, 37)
    with torch.inference_mode():
        expected = model(input_ids, positions, kv_caches, meta)
        events: list = []
        layer = model.attention_layers()[swapped]
        layer.backend = RecordingAttention(layer.backend, events)
        meta.hooks = LayerHooks(before=lambda i: events.append(("before", i)),
                                after=lambda i: events.append(("after", i)))
        got = model(input_ids, positions, kv_caches, meta)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # a wrapping backend changes nothing
    attends = [i for i, event in enumerate(events) if event[0] == "attend"]
    assert len(attends) == 1 and events[attends[0]][1] is kv_caches[swapped]
    names = [event if event[0] != "attend" else ("attend", swapped) for event in events]
    order = [(step, i) for i in range(cfg.num_layers) for step in ("before", "after")]
    order.insert(order.index(("after", swapped)), ("attend", swapped))
    assert names == order  # before(i), [layer i], after(i): once per layer, in order


def test_no_hooks_by_default():
    model, cfg = _model("tiny-llama")
    input_ids, positions, kv_caches, meta = _prefill(cfg, 5)
    assert meta.hooks.before is None and meta.hooks.after is None
    with torch.inference_mode():
        assert model(input_ids, positions, kv_caches, meta).shape == (5, cfg.hidden_size)
