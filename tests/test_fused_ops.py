"""Fused elementwise kernels (Triton, interpreted on the CPU) against their torch references."""

from __future__ import annotations

import pytest
import torch

from kvtier.ops import fused

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype)
    res = torch.randn(5, 96, generator=g).to(dtype) if with_residual else None
    w = (torch.rand(96, generator=g) + 0.5).to(dtype)
    out, new_res = fused.rmsnorm(x, w, 1e-6, res, use_triton=True)
    ref_out, ref_res = fused.rmsnorm_ref(x, w, 1e-6, res)
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    torch.testing.assert_close(new_res, ref_res, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_strided_views(dtype):
    g = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 6, 6, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    positions = torch.tensor([0, 3, 7, 100, 5, 1])
    ang = torch.outer(torch.arange(128).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)
    ref_q, ref_k = fused.rotary_ref(q.clone(), k.clone(), positions, cos_sin)
    fused.rotary(q, k, positions, cos_sin, use_triton=True)
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    torch.testing.assert_close(k, ref_k, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(4, 2 * 1500, generator=torch.Generator().manual_seed(2)).to(dtype)  # 2 column blocks
    torch.testing.assert_close(fused.silu_and_mul(x, use_triton=True), fused.silu_and_mul_ref(x), **_tol(dtype))


def test_launcher_errors():
    with pytest.raises(ValueError, match="rmsnorm shapes"):
        fused.rmsnorm(torch.randn(2, 8), torch.ones(4), 1e-6, use_triton=True)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fused.silu_and_mul(torch.randn(8, 4).t(), use_triton=True)
