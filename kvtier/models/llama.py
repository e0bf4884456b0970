"""Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU.

Parameter names equal HF's except two fusions: q/k/v_proj -> qkv_proj and gate/up_proj ->
gate_up_proj (rows concatenated in that order); `packed_modules` maps HF names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.models.config import ModelConfig
from kvtier.models.decoder import KVCache, run_layers
from kvtier.models.layers import PagedAttention, RMSNorm, RotaryEmbedding, save_inputs
from kvtier.ops import fused
from kvtier.ops.attention import AttentionMetadata


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        # q, k, v in one GEMM: at decode batch sizes one wide matmul streams weights faster than three
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.rotary = [rotary]  # shared; a list keeps it out of this module's state dict
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, d, d ** -0.5, cfg.sliding_window)
        self.saved_inputs: torch.Tensor | None = None  # KVPR: this layer's activation rows (save_inputs)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.saved_inputs is not None:
            save_inputs(x, self.saved_inputs, meta.slot_mapping)
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary[0](positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))

    def kv_from_input(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (T, Hkv, D) of the layer inputs x (T, h) at `positions`, as the forward writes them
        (the K/V rows of qkv_proj, RoPE on K): KVPR recomputes far tokens' K/V from kept inputs."""
        t, bias = x.shape[0], self.qkv_proj.bias
        kv = F.linear(x, self.qkv_proj.weight[self.q_size:], None if bias is None else bias[self.q_size:])
        k, v = (part.reshape(t, self.num_kv_heads, self.head_dim) for part in kv.split(self.kv_size, dim=-1))
        k, _ = self.rotary[0](positions, k, k[:, :1].clone())  # the kernel rotates pairs: a throwaway second
        return k, v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor | None],
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream kept apart so each norm fuses the preceding add: hidden is
        (x, residual), residual None at the first layer; returns (mlp output, residual), which
        the next norm adds."""
        x, residual = hidden
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling_dict())
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, h)
        x, residual = run_layers(self.layers, positions, (x, None), kv_caches, meta)
        return self.norm(x, residual)[0]


def packed_modules(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF module name -> (our fused module, first row, end row) for the weights we concatenate."""
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_size
    return {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, q + kv),
            "v_proj": ("qkv_proj", q + kv, q + 2 * kv),
            "gate_proj": ("gate_up_proj", 0, i), "up_proj": ("gate_up_proj", i, 2 * i)}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.packed_modules = packed_modules(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (T,) -> hidden states (T, h)"""
        return self.model(input_ids, positions, kv_caches, meta)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def attention_layers(self) -> list[PagedAttention]:
        """Each decoder layer's attention, in layer order: where its backend object is set."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def attention_modules(self) -> list[LlamaAttention]:
        """Each decoder layer's attention module (projections included), in layer order: KVPR's
        recomputation (`kv_from_input`) and the inputs it keeps (`saved_inputs`)."""
        return [layer.self_attn for layer in self.model.layers]

    def precompile(self, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the fused kernels' variants before serving (kvtier/ops/fused.py)."""
        c = self.config
        fused.precompile(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype, device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, h) -> (N, vocab) fp32"""
        return self.lm_head(hidden).float()
