"""ModelConfig: the normalized shape of a supported model, read from an HF config.json dict.

Supported architectures map onto two model families:

    llama  <- LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (SmolLM2 is a Llama)
    opt    <- OPTForCausalLM
"""

from __future__ import annotations

import dataclasses
from typing import Any

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
OPT_ARCHITECTURES = ("OPTForCausalLM",)
SUPPORTED_ARCHITECTURES = LLAMA_ARCHITECTURES + OPT_ARCHITECTURES


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # "llama" or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict items
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None
    # OPT only
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hf_config: tuple[tuple[str, Any], ...] = ()  # the raw config items, for saving

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def hf_config_dict(self) -> dict[str, Any]:
        """The original config.json items (lists restored; nested dicts are not kept)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.hf_config}


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                        if not isinstance(v, dict)))


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Normalize an HF config.json dict; raises UnsupportedModelError for other architectures."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; kvtier supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch in OPT_ARCHITECTURES:
        return _opt_config(arch, cfg)
    return _llama_config(arch, cfg)


def _arch_from_model_type(model_type: str | None) -> str | None:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}.get(model_type or "")


def _llama_config(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests rope settings here
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in ("llama3", "default", None):
        raise UnsupportedModelError(f"unsupported rope_scaling {rope_scaling!r}; kvtier supports llama3 scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    use_sw = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    return ModelConfig(
        architecture=arch, family="llama", vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta or 10000.0),
        rope_scaling=_freeze(rope_scaling) if rope_scaling else None,
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        sliding_window=cfg.get("sliding_window") if use_sw else None,
        eos_token_ids=_eos_ids(cfg), bos_token_id=cfg.get("bos_token_id"), hf_config=_freeze(cfg))


def _opt_config(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("activation_function", "relu") != "relu":
        raise UnsupportedModelError(f"unsupported OPT activation {cfg['activation_function']!r}")
    return ModelConfig(
        architecture=arch, family="opt", vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg["ffn_dim"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm_eps=1e-5,
        word_embed_proj_dim=cfg.get("word_embed_proj_dim", hidden),
        do_layer_norm_before=cfg.get("do_layer_norm_before", True),
        enable_bias=cfg.get("enable_bias", True),
        layer_norm_elementwise_affine=cfg.get("layer_norm_elementwise_affine", True),
        eos_token_ids=_eos_ids(cfg), bos_token_id=cfg.get("bos_token_id"), hf_config=_freeze(cfg))
