"""OPT: multi-head attention with biases, learned positions (offset 2), LayerNorm, ReLU MLP.

Parameter names equal HF's `OPTForCausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.models.config import ModelConfig
from kvtier.models.decoder import KVCache, run_layers
from kvtier.models.layers import PagedAttention, save_inputs
from kvtier.ops.attention import AttentionMetadata

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.enable_bias
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, cfg.head_dim ** -0.5)
        self.saved_inputs: torch.Tensor | None = None  # KVPR: this layer's activation rows (save_inputs)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.saved_inputs is not None:
            save_inputs(x, self.saved_inputs, meta.slot_mapping)
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, H, D)
        k = self.k_proj(x).view(t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q, k, v, kv_cache, meta))

    def kv_from_input(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (T, H, D) of the layer inputs x (T, h), as the forward writes them (positions are
        in x already: OPT adds learned ones before the first layer); for KVPR's recomputation."""
        t = x.shape[0]
        return (self.k_proj(x).view(t, self.num_heads, self.head_dim),
                self.v_proj(x).view(t, self.num_heads, self.head_dim))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)
        self.fc1 = nn.Linear(h, cfg.intermediate_size, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, h, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """x (T, h) -> (T, h); positions unused (OPT adds learned positions before the first layer)."""
        norm1, norm2 = self.self_attn_layer_norm, self.final_layer_norm
        h = self.self_attn(norm1(x) if self.pre_norm else x, kv_cache, meta)
        x = x + h if self.pre_norm else norm1(x + h)
        h = self.fc2(F.relu(self.fc1(norm2(x) if self.pre_norm else x)))
        return x + h if self.pre_norm else norm2(x + h)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, proj = cfg.hidden_size, cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, h)
        self.project_in = nn.Linear(proj, h, bias=False) if proj != h else None
        self.project_out = nn.Linear(h, proj, bias=False) if proj != h else None
        self.final_layer_norm = (nn.LayerNorm(h, elementwise_affine=cfg.layer_norm_elementwise_affine)
                                 if cfg.do_layer_norm_before else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, proj)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)  # (T, h)
        x = run_layers(self.layers, positions, x, kv_caches, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        self.lm_head = nn.Linear(proj, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        self.packed_modules: dict[str, tuple[str, int, int]] = {}  # OPT keeps HF's modules as they are

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (T,) -> hidden states (T, proj)"""
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def attention_layers(self) -> list[PagedAttention]:
        """Each decoder layer's attention, in layer order: where its backend object is set."""
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def attention_modules(self) -> list[OPTAttention]:
        """Each decoder layer's attention module (projections included), in layer order: KVPR's
        recomputation (`kv_from_input`) and the inputs it keeps (`saved_inputs`)."""
        return [layer.self_attn for layer in self.model.decoder.layers]

    def precompile(self, dtype: torch.dtype, device: torch.device) -> None:
        """OPT runs no fused kernels (LayerNorm, learned positions, ReLU are torch's)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, proj) -> (N, vocab) fp32"""
        return self.lm_head(hidden).float()
