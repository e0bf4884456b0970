"""Fused elementwise kernels for the Llama layer: add + RMSNorm, rotary embedding, SiLU-and-mul.

At decode batch sizes each of these is a few microseconds of work spread over many tiny kernels
(RMSNorm alone is eight in eager PyTorch); one Triton kernel each removes ~1000 launches per step.
Every op has a pure-torch reference with HF's order of operations; the public functions use the
reference on the CPU (or when `use_triton=False`) and the kernel (`_fused_kernels`, imported only
then, so kvtier runs where Triton is not installed) on a GPU.

This module imports nothing from kvtier.
"""

from __future__ import annotations

import torch

# -- references ---------------------------------------------------------------------------------

def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, h) -> (weight * normalized(x + residual), x + residual), HF's casts."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q (T, Hq, D), k (T, Hkv, D), cos_sin (P, D) fp32 = [cos | sin] halves."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # (T, D/2)
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    return rotate(q), rotate(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) = [gate | up] -> silu(gate) * up (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


SILU_BLOCK = 1024  # columns per program; any size works, 1024 keeps enough programs at batch 1


# -- launchers ----------------------------------------------------------------------------------

def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D (T, h) with a contiguous last dimension, got "
                         f"shape {tuple(x.shape)} strides {x.stride()}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (x + residual) and RMSNorm; returns (normed, x + residual)."""
    if not (x.is_cuda if use_triton is None else use_triton):
        return rmsnorm_ref(x, weight, eps, residual)
    _check_rows(x, "x")
    if weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rmsnorm shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"residual {None if residual is None else tuple(residual.shape)}")
    from kvtier.ops._fused_kernels import _rmsnorm_kernel, next_power_of_2
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _rmsnorm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out, res_out,
                                   x.shape[1], eps, x.stride(0),
                                   residual.stride(0) if residual is not None else 0, out.stride(0),
                                   HAS_RES=residual is not None, BLOCK=next_power_of_2(x.shape[1]))
    return out, res_out


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
           use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (T, Hq, D) and k (T, Hkv, D); the kernel rotates them in place."""
    if not (q.is_cuda if use_triton is None else use_triton):
        return rotary_ref(q, k, positions, cos_sin)
    head_dim = q.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or k.shape[-1] != head_dim or head_dim & (head_dim - 1):
        raise ValueError(f"rotary needs q, k (T, H, D) with contiguous, equal power-of-two D; "
                         f"got q {tuple(q.shape)} k {tuple(k.shape)}")
    if cos_sin.dtype != torch.float32 or cos_sin.shape[1] != head_dim:
        raise ValueError(f"cos_sin must be fp32 (P, {head_dim}), got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    from kvtier.ops._fused_kernels import _rotary_kernel, next_power_of_2
    _rotary_kernel[(q.shape[0],)](q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0),
                                  k.stride(1), q.shape[1], k.shape[1], HALF=head_dim // 2,
                                  HEADS_PAD=next_power_of_2(max(q.shape[1], k.shape[1])))
    return q, k


def silu_and_mul(x: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    if not (x.is_cuda if use_triton is None else use_triton):
        return silu_and_mul_ref(x)
    _check_rows(x, "x")
    from kvtier.ops._fused_kernels import _silu_mul_kernel
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _silu_mul_kernel[(x.shape[0], -(-n // SILU_BLOCK))](x, out, n, x.stride(0), out.stride(0),
                                                               BLOCK=SILU_BLOCK)
    return out


def precompile(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
               head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the kernels of a Llama-family layer before serving: one variant each, rmsnorm two
    (with and without a residual). Their keys hold only model-constant sizes, so one-row inputs
    laid out like the model's (q and k as views of one qkv row) key like any step. No-op off CUDA."""
    if device.type != "cuda":
        return
    like = dict(dtype=dtype, device=device)
    x, weight = torch.zeros(1, hidden_size, **like), torch.ones(hidden_size, **like)
    rmsnorm(x, weight, 1e-6)
    rmsnorm(x, weight, 1e-6, residual=x)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.zeros(1, q_size + 2 * kv_size, **like)
    q = qkv[:, :q_size].view(1, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(1, num_kv_heads, head_dim)
    cos_sin = torch.zeros(1, head_dim, dtype=torch.float32, device=device)
    rotary(q, k, torch.zeros(1, dtype=torch.int64, device=device), cos_sin)
    silu_and_mul(torch.zeros(1, 2 * intermediate_size, **like))
