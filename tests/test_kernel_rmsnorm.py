"""Property tests of the RMSNorm NKI kernels (kernels/rmsnorm.py) run by the interpreter (backend "sim").

Independent reference: Llama's RMSNorm formula (checked bit-identical to transformers' LlamaRMSNorm in bf16
and fp32), run in float64 (truth) and in the kernel's dtype (PyTorch's own error), gradients by autograd;
criterion in tests/kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernels import ops, rmsnorm
from kernels.sim import trace
import kernel_helpers
from kernel_helpers import DTYPES, assert_close_2x, randn

EPS = 1e-5


def rms_norm_formula(x, w, eps=EPS):
    """Llama's RMSNorm with statistics in max(x.dtype, fp32): float64 stays float64 (a true float64
    reference; Hugging Face's module casts float64 input down to fp32), bf16/fp32 match LlamaRMSNorm."""
    xs = x.to(torch.promote_types(x.dtype, torch.float32))
    xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    return w * xs.to(x.dtype)


def ref_fwd_bwd(x, w, dy):
    """y, dx, dweight of rms_norm_formula at x's dtype via autograd."""
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    y = rms_norm_formula(xr, wr)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_formula_is_hugging_face_llama_rms_norm(dtype):
    """The low-precision reference used below is bit-identical to transformers' LlamaRMSNorm."""
    x, w, _ = make_inputs(37, 300, dtype, 5)
    mod = LlamaRMSNorm(300, eps=EPS).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
    assert torch.equal(mod(x), rms_norm_formula(x, w))


def grad_scales(x, w, dy):
    """Magnitudes of the terms combined into dx (rstd * dy * w, which cancels against the projection term
    when hidden is small) and dweight (per-column sums of |dy * x_hat|); see kernel_helpers."""
    x, w, dy = x.double(), w.double(), dy.double()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    dx_scale = (dy * w * rstd).abs().max().item()
    dw_scale = (dy * x * rstd).abs().sum(0).max().item()
    return dx_scale, dw_scale


def make_inputs(n, h, dtype, seed):
    x = randn((n, h), dtype, seed, scale=2.0)
    w = randn((h,), dtype, seed + 1, scale=0.2, shift=1.0)
    dy = randn((n, h), dtype, seed + 2)
    return x, w, dy


@settings(max_examples=12)
@given(n=st.integers(1, 300), h=st.one_of(st.integers(1, 1200), st.integers(2000, 4300)), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_launchers_match_float64(n, h, dtype, seed):
    x, w, dy = make_inputs(n, h, dtype, seed)
    y64, dx64, dw64 = ref_fwd_bwd(x.double(), w.double(), dy.double())
    y_pt, dx_pt, dw_pt = ref_fwd_bwd(x, w, dy)

    y, rstd = rmsnorm.rms_norm_fwd(x, w, EPS)
    assert_close_2x("y", y, y64, y_pt)
    rstd64 = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    rstd_pt = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)        # PyTorch's fp32 statistics
    assert rstd.shape == (n,)
    assert_close_2x("rstd", rstd, rstd64, rstd_pt)

    dx, dw = rmsnorm.rms_norm_bwd(dy, x, w, rstd)
    dx_scale, dw_scale = grad_scales(x, w, dy)
    assert_close_2x("dx", dx, dx64, dx_pt, dx_scale)
    assert_close_2x("dweight", dw, dw64, dw_pt, dw_scale)


@settings(max_examples=6)
@given(b=st.integers(1, 2), s=st.integers(1, 140), h=st.integers(1, 600), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_op_autograd_sim_backend(b, s, h, dtype, seed):
    """kernels.ops.rms_norm with backend "sim": forward and torch.autograd backward run the kernels."""
    x = randn((b, s, h), dtype, seed, scale=2.0)
    w = randn((h,), dtype, seed + 1, scale=0.2, shift=1.0)
    dy = randn((b, s, h), dtype, seed + 2)
    y64, dx64, dw64 = ref_fwd_bwd(x.double(), w.double(), dy.double())
    y_pt, dx_pt, dw_pt = ref_fwd_bwd(x, w, dy)

    xk = x.clone().requires_grad_(True)
    wk = w.clone().requires_grad_(True)
    with ops.use_backend("sim"):
        y = ops.rms_norm(xk, wk, EPS)
        y.backward(dy)
    dx_scale, dw_scale = grad_scales(x.reshape(-1, h), w, dy.reshape(-1, h))
    assert_close_2x("op y", y.detach(), y64, y_pt)
    assert_close_2x("op dx", xk.grad, dx64, dx_pt, dx_scale)
    assert_close_2x("op dweight", wk.grad, dw64, dw_pt, dw_scale)


def test_hbm_bytes_are_minimal():
    """Each input read once, each output written once (w broadcast on-chip, not re-read per tile)."""
    n, h = 300, 1000
    x, w, dy = make_inputs(n, h, torch.bfloat16, 0)
    with trace.record() as tr:
        y, rstd = rmsnorm.rms_norm_fwd(x, w, EPS)
    read, written = tr.hbm_bytes()
    assert (read, written) == (2 * n * h + 2 * h, 2 * n * h + 4 * n)
    with trace.record() as tr:
        rmsnorm.rms_norm_bwd(dy, x, w, rstd)
    read, written = tr.hbm_bytes()
    assert (read, written) == (2 * 2 * n * h + 2 * h + 4 * n, 2 * n * h + 2 * h)


@pytest.mark.parametrize("n,hidden,dtype", [(1100, 1500, torch.bfloat16), (1100, 700, torch.float32)],
                         ids=["bf16", "fp32"])
def test_backward_paired_loads_and_tail(n, hidden, dtype):
    """Shapes the property tests above do not reach (they stop at 300 rows): eight full row tiles, so that the
    backward loads pairs of tiles with one DMA, a 76-row tail tile, and rows of two units (several transposed
    PSUM banks per row, the row sum on TensorE). dx and dweight against float64 on every element."""
    x, w, dy = make_inputs(n, hidden, dtype, 11)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    dx, dw = rmsnorm.rms_norm_bwd(dy, x, w, rstd)
    _, dx64, dw64 = ref_fwd_bwd(x.double(), w.double(), dy.double())
    _, dx_pt, dw_pt = ref_fwd_bwd(x, w, dy)
    dx_scale, dw_scale = grad_scales(x, w, dy)
    assert_close_2x("dx", dx, dx64, dx_pt, dx_scale)
    assert_close_2x("dweight", dw, dw64, dw_pt, dw_scale)


@pytest.mark.parametrize("n,hidden,dtype", [(4096, 4096, torch.bfloat16), (4096, 5120, torch.bfloat16),
                                            (4096, 8192, torch.bfloat16), (300, 8192, torch.float32)],
                         ids=["7b", "13b", "70b", "70b-fp32-300rows"])
def test_llama_per_rank_shapes_pass_trn1_checks(n, hidden, dtype):
    """Llama 2 7B/13B/70B at TP=8, seq 4096, micro-batch 1: 4096 rows x hidden 4096/5120/8192 in bf16, plus
    fp32 at hidden 8192 (the largest SBUF footprint, ~152 KiB of 176 KiB per partition) on 300 rows (two
    full row tiles and a tail; SBUF use does not depend on the row count). The interpreter checks trn1
    rules and SBUF/PSUM capacity on every instruction; y and dx are compared with float64 on sampled rows,
    dweight (a reduction over all rows) on the full tensor."""
    x, w, dy = make_inputs(n, hidden, dtype, 7)
    y, rstd = rmsnorm.rms_norm_fwd(x, w, EPS)
    dx, dw = rmsnorm.rms_norm_bwd(dy, x, w, rstd)
    rows = torch.tensor([0, 1, 127, 128, n // 2, n - 1])
    y64, dx64, _ = ref_fwd_bwd(x[rows].double(), w.double(), dy[rows].double())
    y_pt, dx_pt, _ = ref_fwd_bwd(x[rows], w, dy[rows])
    assert_close_2x("y[sampled rows]", y[rows], y64, y_pt)
    dx_scale, _ = grad_scales(x[rows], w, dy[rows])
    assert_close_2x("dx[sampled rows]", dx[rows], dx64, dx_pt, dx_scale)
    _, _, dw_pt = ref_fwd_bwd(x, w, dy)
    dw64 = torch.zeros(hidden, dtype=torch.float64)
    for r0 in range(0, n, 512):           # float64 dweight in row blocks to bound memory
        xb, dyb = x[r0:r0 + 512].double(), dy[r0:r0 + 512].double()
        dw64 += (dyb * xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + EPS)).sum(0)
    assert_close_2x("dweight", dw, dw64, dw_pt, grad_scales(x, w, dy)[1])


@pytest.mark.parametrize("bad", ["dtype", "hidden", "weight_shape", "weight_dtype", "rank", "rstd"])
def test_unsupported_inputs_raise_before_launch(bad):
    x, w, dy = make_inputs(4, 8, torch.float32, 0)
    rstd = torch.ones(4)
    with pytest.raises(ValueError) as exc:
        if bad == "dtype":
            rmsnorm.rms_norm_fwd(x.half(), w.half(), EPS)
        elif bad == "hidden":
            rmsnorm.rms_norm_fwd(torch.zeros(2, rmsnorm.MAX_HIDDEN + 1), torch.ones(rmsnorm.MAX_HIDDEN + 1), EPS)
        elif bad == "weight_shape":
            rmsnorm.rms_norm_fwd(x, w[:-1], EPS)
        elif bad == "weight_dtype":
            rmsnorm.rms_norm_fwd(x, w.bfloat16(), EPS)
        elif bad == "rank":
            rmsnorm.rms_norm_fwd(x[0], w, EPS)
        elif bad == "rstd":
            rmsnorm.rms_norm_bwd(dy, x, w, rstd[:-1])
    msg = str(exc.value)
    assert "kernels/rmsnorm.py" in msg
    if bad == "hidden":
        assert str(rmsnorm.MAX_HIDDEN) in msg and "8193" in msg


# --------------------------------------------------------------------------- dx under cancellation (small H)
#
# At H = 1, dx = rstd * g * eps / (x^2 + eps): the two terms of dx (rstd * g and the projection term) cancel
# to ~eps / x^2 of their size. PyTorch's bf16 autograd of the formula does that cancellation in fp32 (the
# statistics are fp32) and rounds only the tiny result to bf16, so its error against float64 is a few fp32
# ulps of rstd * |g|; the bound is then an fp32 floor on the magnitude of the cancelling terms (grad_scales),
# with the rstd rounding added to kernel_helpers' floor (CANCEL_FLOOR_ULPS below). Inputs with
# |x| >= 0.5 * scale (no row where eps dominates) make every row cancel; with x ~ randn a few small |x| rows,
# where dx is large and its bf16 rounding dominates the max error, hide the cancellation (why the property
# test above stays green).
# Measured before the fix (c = -rstd^2 * s / H carried in two bf16 pieces, ~16 bits), bounds as below: bf16
# H = 1, 300 rows, |x| in [0.5, inf) * 1: kernel 1.209e-05 > bound 1.241e-06 (9.7x); * 100: 7.735e-08 >
# 1.239e-08 (6.2x); dy = x, w = 1, H = 2: 1.035e-05 > 9.814e-06; the explicit example of the property test
# 2.665e-08 > 1.958e-09 (13.6x).

def make_inputs_scaled(n, h, dtype, seed, x_scale, x_offset):
    """x = sign(z) * (x_offset + |z|) * x_scale (z ~ N(0, 1)): x_offset > 0 keeps |x| away from 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, h), generator=g, dtype=torch.float64)
    x = (z.sign() * (x_offset + z.abs()) * x_scale).to(dtype)
    w = randn((h,), dtype, seed + 1, scale=0.2, shift=1.0)
    dy = randn((n, h), dtype, seed + 2)
    return x, w, dy


# The floor under cancellation, and why it is FLOOR_ULPS + 2 fp32 eps x rstd * |g| (kernel_helpers' floor has
# FLOOR_ULPS): dx is computed from the fp32 rstd the forward hands over, which is itself rounded (measured
# ~1.1 fp32 eps relative, kernel and PyTorch alike), and at H = 1 dx = rstd * g * (1 - rstd^2 * x^2) turns a
# relative error d of rstd into 2 * d * rstd * |g| whoever computes the backward. The 2 extra eps are that
# input rounding, not the kernel's arithmetic. Measured (bf16, H = 1, |x| >= 0.5, 4000 rows, in fp32 half-ulps
# of rstd * |g|): max error against float64 kernel 5.71, PyTorch 6.56, kernels.reference 5.45; where both
# maxima are a handful of such round-offs (few rows), "2x PyTorch" compares two random maxima of the same law
# (a 27-row draw gave the fixed kernel 2.3x PyTorch's max, 8.44e-07 vs bound 7.45e-07, at 4.5 half-ulps).
CANCEL_FLOOR_ULPS = kernel_helpers.FLOOR_ULPS + 2


def check_dx(x, w, dy):
    """dx of the backward kernel (rstd from the forward kernel) against the criterion with the floor above."""
    _, dx64, _ = ref_fwd_bwd(x.double(), w.double(), dy.double())
    _, dx_pt, _ = ref_fwd_bwd(x, w, dy)
    _, rstd = rmsnorm.rms_norm_fwd(x, w, EPS)
    dx, _ = rmsnorm.rms_norm_bwd(dy, x, w, rstd)
    # assert_close_2x's floor is FLOOR_ULPS x fp32 eps x scale: a scale grown by the ratio gives CANCEL_FLOOR_ULPS
    scale = grad_scales(x, w, dy)[0] * CANCEL_FLOOR_ULPS / kernel_helpers.FLOOR_ULPS
    assert_close_2x("dx", dx, dx64, dx_pt, scale)


@pytest.mark.parametrize("x_scale", [1.0, 100.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dx_hidden_one_cancellation(dtype, x_scale):
    """H = 1, every row |x| >= 0.5 * x_scale: dx is pure cancellation (failed at bf16 before c got three pieces)."""
    check_dx(*make_inputs_scaled(300, 1, dtype, 3, x_scale, 0.5))


@pytest.mark.parametrize("h", [2, 16, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dx_radial_gradient(dtype, h):
    """dy = x with w = 1 (g parallel to x: RMSNorm's scale invariance makes dx ~ 0 at any H) on rows of one unit,
    where the row sum is exact (bf16 H = 2 failed before the fix: 1.035e-05 > 9.814e-06)."""
    x = randn((200, h), dtype, 5)
    check_dx(x, torch.ones(h, dtype=dtype), x.clone())


@pytest.mark.xfail(strict=True, reason="known defect, not fixed: rows over one unit (bf16 H > 1024) take the row "
                   "sum s from p = bf16(dy * x), whose rounding (~2^-9 / sqrt(H) of s) survives when g is parallel "
                   "to x and dx ~ 0: dy = x, w = 1, 200 rows: H = 1100 kernel 1.31e-03 vs bound 2.18e-06, H = 2048 "
                   "1.08e-03 vs 2.28e-06 (random dy are within the bound)")
def test_backward_dx_radial_gradient_wide_rows_bf16():
    x = randn((200, 1100), torch.bfloat16, 5)
    check_dx(x, torch.ones(1100, dtype=torch.bfloat16), x.clone())


@settings(max_examples=40, deadline=None)
@example(n=1, h=1, dtype=torch.bfloat16, x_scale=100.0, x_offset=0.0, seed=3)     # 13.6x the bound before the fix
@given(n=st.integers(1, 300), h=st.one_of(st.integers(1, 3), st.integers(1, 16)), dtype=st.sampled_from(DTYPES),
       x_scale=st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 100.0]), x_offset=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 2**16))
def test_backward_dx_small_hidden(n, h, dtype, x_scale, x_offset, seed):
    """Small H over x magnitudes from eps-dominated (|x| ~ 1e-3, x^2 < eps) to 100, |x| kept away from 0 or not
    (fp32 too: an fp32 draw, n = 195, H = 6, x_scale 1, offset 0.5, seed 47679, came to 1.01x the plain
    bound, and kernels.reference.rms_norm_bwd_ref fed the forward kernel's rstd has the same error, 8.31e-07
    vs 8.26e-07: the rstd rounding of the floor above)."""
    check_dx(*make_inputs_scaled(n, h, dtype, seed, x_scale, x_offset))
