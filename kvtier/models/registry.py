"""Model classes by family, and named configs for `--load-format dummy` (random weights)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvtier.models.config import ModelConfig
from kvtier.models.llama import LlamaForCausalLM
from kvtier.models.opt import OPTForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[cfg.family]


def _llama(**kw: Any) -> dict[str, Any]:
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    return {**base, **kw}


def _opt(**kw: Any) -> dict[str, Any]:
    base = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272,
            "max_position_embeddings": 2048, "do_layer_norm_before": True, "activation_function": "relu",
            "word_embed_proj_dim": kw["hidden_size"], "bos_token_id": 2, "eos_token_id": 2,
            "enable_bias": True, "tie_word_embeddings": True}
    return {**base, **kw}


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=1024)

DUMMY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3-1b": _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                        rope_scaling=_LLAMA31_SCALING, bos_token_id=128000, eos_token_id=128001),
    "opt-13b": _opt(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40),
    # OPT-13B's shape with 8192 learned positions (OPT has 2048): for dummy-weight timings of longer
    # contexts (KVPR's 4096-token prefix hit), where the values of the weights do not matter
    "opt-13b-8k": _opt(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                       max_position_embeddings=8192),
    "opt-30b": _opt(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56),
    # Tiny shapes for tests: GQA + tied embeddings, multi-head attention, Llama-3.1 RoPE scaling, Qwen2 biases, OPT.
    "tiny-llama": _llama(**_TINY, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "tiny-llama2": _llama(**_TINY, num_key_value_heads=4, rope_theta=10000.0),  # multi-head, as Llama-2
    "tiny-llama31": _llama(**{**_TINY, "max_position_embeddings": 4096}, num_key_value_heads=2,
                           rope_scaling={**_LLAMA31_SCALING, "factor": 8.0,
                                         "original_max_position_embeddings": 256}),
    "tiny-qwen2": {**_llama(**_TINY, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6),
                   "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "tiny-mistral": {**_llama(**_TINY, num_key_value_heads=1, rope_theta=10000.0),
                     "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                     "sliding_window": None},
    "tiny-opt": _opt(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=1024),
}
