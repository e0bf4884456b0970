"""Tier-typed storage specs: block bytes from one formula, layouts, sizes per tier from the tier's own
spec, scales counted, specs that pickle, and layer views that alias the cache."""

from __future__ import annotations

import pickle

import pytest
import torch

from kvtier.cache.storage import Kind, Layout, ScaleSpec, StorageSpec, Tier, allocate, layer_views
from kvtier.models.config import model_config_from_hf
from kvtier.models.registry import DUMMY_CONFIGS


def llama3_8b():
    return model_config_from_hf(dict(DUMMY_CONFIGS["llama3-8b"]))


def test_llama3_8b_block_bytes_and_layouts():
    cfg = llama3_8b()  # 32 layers, 8 KV heads of 128, hidden 4096
    gpu = StorageSpec.for_model(cfg, Tier.GPU, 16, "bfloat16")
    assert gpu.bytes_per_block == 2 * 32 * 16 * 8 * 128 * 2 == 2 << 20  # 2 MiB, as the transfer notes say
    assert gpu.bytes_per_token == 128 << 10
    assert gpu.layout is Layout.LAYER_MAJOR and gpu.shape(10) == (32, 2, 10, 16, 8, 128)
    cpu = gpu.on(Tier.CPU)
    assert cpu.layout is Layout.BLOCK_MAJOR and cpu.shape(10) == (10, 32, 2, 16, 8, 128)
    assert cpu.bytes_per_block == gpu.bytes_per_block
    v_only = StorageSpec.for_model(cfg, Tier.CPU, 16, "bfloat16", Kind.V)
    assert v_only.bytes_per_block == gpu.bytes_per_block // 2
    acts = StorageSpec.for_model(cfg, Tier.CPU, 16, "bfloat16", Kind.ACTIVATIONS)
    assert acts.bytes_per_block == 32 * 16 * 4096 * 2  # h wide: 2x the K+V of GQA with h_kv = h/4


def test_each_tier_counts_blocks_from_its_own_spec():
    cfg = llama3_8b()
    gpu = StorageSpec.for_model(cfg, Tier.GPU, 16, "bfloat16")
    int8 = StorageSpec.for_model(cfg, Tier.CPU, 16, "int8", scale=ScaleSpec(group_size=32, values_per_group=2))
    data = 2 * 32 * 16 * 8 * 128
    assert int8.bytes_per_block == data + data // 32 * 2 * 2  # int8 values + fp16 scale and zero per 32
    gib = 1 << 30
    assert gpu.num_blocks_in(gib) == 512
    assert int8.num_blocks_in(gib) == gib // int8.bytes_per_block > 512


def test_specs_pickle_and_refuse_what_they_cannot_hold():
    spec = StorageSpec.for_model(llama3_8b(), Tier.CPU, 16, "int8", Kind.K, scale=ScaleSpec(64))
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValueError, match="unsupported storage dtype"):
        StorageSpec(Tier.GPU, Kind.KV, 1, 16, 1, 64, "int3", Layout.LAYER_MAJOR)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        StorageSpec(Tier.GPU, Kind.KV, 1, 16, 1, 64, "int8", Layout.LAYER_MAJOR, ScaleSpec(48))


def test_allocation_and_layer_views_alias_one_tensor():
    cfg = model_config_from_hf(dict(DUMMY_CONFIGS["tiny-llama"]))
    spec = StorageSpec.for_model(cfg, Tier.GPU, 4, "float32")
    data = allocate(spec, 6)
    assert data.shape == spec.shape(6) and not data.any()
    assert data.numel() * data.element_size() == 6 * spec.bytes_per_block
    views = layer_views(spec, data)
    assert len(views) == cfg.num_layers and all(len(v) == 2 for v in views)
    views[1][1][3].fill_(7.0)  # layer 1, V, block 3
    assert data[1, 1, 3].eq(7.0).all() and data.sum() == 7.0 * spec.row_elements
    with pytest.raises(ValueError, match="layer-major"):
        layer_views(spec.on(Tier.CPU), allocate(spec.on(Tier.CPU), 2))
    assert spec.torch_dtype() is torch.float32
