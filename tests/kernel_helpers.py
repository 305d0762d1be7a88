"""Shared pieces of the kernel tests (RMSNorm, RoPE, SwiGLU): the accuracy criterion and input makers.

Criterion (FlashAttention's test criterion): against a float64 reference computed from the same inputs,
the kernel's max abs error must be at most 2x the max abs error of the PyTorch reference run in the
kernel's dtype, and the kernel output must hold no NaN/Inf.

One floor, and why: the kernels compute in fp32 inside the engines, so no kernel can be more accurate than
a couple of fp32 roundings at the magnitude of the terms it combines. When PyTorch's own error happens to
be smaller than that (fp32 outputs with few elements, where the max error is the max of a handful of
ulp-sized round-offs, or zero), "2x PyTorch" would demand luck, not accuracy. So the bound is
max(2 x PyTorch error, FLOOR_ULPS x fp32 eps x scale), where scale is the magnitude of the combined
terms (default: max |reference|). For bf16 outputs the floor is ~2^-15 of a bf16 rounding, i.e. the bf16
criterion is the plain 2x rule; for fp32 outputs it is a few fp32 ulps.
"""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16)


def max_err(a, ref64):
    return (a.double() - ref64).abs().max().item() if a.numel() else 0.0


FLOOR_ULPS = 2
_EPS32 = torch.finfo(torch.float32).eps


def assert_close_2x(name, out, ref64, ref_lowp, scale=None):
    """Assert the criterion above for one output tensor; scale = magnitude of the terms combined into it."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != expected {ref_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{name}: kernel output has NaN/Inf"
    err_k = max_err(out, ref64)
    err_pt = max_err(ref_lowp, ref64)
    if scale is None:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = FLOOR_ULPS * _EPS32 * scale
    bound = max(2.0 * err_pt, floor)
    assert err_k <= bound, (f"{name} ({out.dtype}): kernel max error {err_k:.3e} > bound {bound:.3e} = max(2 x "
                            f"PyTorch {out.dtype} error {err_pt:.3e}, fp32 floor {floor:.3e})")


def randn(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def hf_cos_sin(batch, seq, head_dim, dtype, theta=10000.0, offset=0):
    """cos/sin [B, S, D] exactly as Hugging Face Llama builds them (emb = cat(freqs, freqs)), cast to dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(offset, offset + seq, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos()[None].expand(batch, seq, head_dim).to(dtype).contiguous()
    sin = emb.sin()[None].expand(batch, seq, head_dim).to(dtype).contiguous()
    return cos, sin
