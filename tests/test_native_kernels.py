"""Native RMSNorm and SwiGLU (kernels/native) against kernels/reference.py and float64.

Exactness, where the op order allows it: the native kernels repeat the reference's elementwise op order, so
  * SwiGLU forward and backward equal the reference bit for bit whenever torch runs the reference as one chunk
    (<= 32768 elements, or one thread): same formulas, same SLEEF exp in the vector body, same scalar exp on the
    tail that torch's vectorised loop leaves (numel % (2 x vector width));
  * RMSNorm's rstd, y and dx equal the reference bit for bit: the row sums repeat torch's CPU sum order (its
    cascade sum over 8-float vectors; kernels_isa.cpp). dw is a sum over rows, whose order in torch depends on
    how torch splits the columns between threads; it is held to the float64 criterion of tests/kernel_helpers.py.
Every kernel result is also bitwise identical for 1 and 2 threads.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference as ref
from tests.kernel_helpers import DTYPES, assert_close_2x
from tests.native_helpers import isa, require_native, threads

OPS = torch.ops.llama_kernels


@pytest.fixture(scope="module", autouse=True)
def _native():
    return require_native()


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def assert_bitwise(name, a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    diff = (_bits(a.contiguous()) != _bits(b.contiguous()))
    assert not bool(diff.any()), f"{name}: {int(diff.sum())} of {a.numel()} elements differ"


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------- SwiGLU

@settings(max_examples=30)
@given(n=st.integers(0, 5000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_swiglu_fwd_bwd_bitwise_equal_to_reference(n, dtype, seed):
    g, u, d = _rand(n, dtype, seed, 3.0), _rand(n, dtype, seed + 1), _rand(n, dtype, seed + 2)
    assert_bitwise("swiglu fwd", OPS.native_swiglu_fwd(g, u), ref.swiglu_ref(g, u))
    dg, du = OPS.native_swiglu_bwd(d, g, u)
    rg, ru = ref.swiglu_bwd_ref(d, g, u)
    assert_bitwise("swiglu dgate", dg, rg)
    assert_bitwise("swiglu dup", du, ru)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_float64_criterion_and_extremes(dtype):
    g = torch.cat([_rand(4000, dtype, 1, 4.0), torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0]).to(dtype)])
    u, d = _rand(g.numel(), dtype, 2), _rand(g.numel(), dtype, 3)
    g64, u64, d64 = g.double(), u.double(), d.double()
    s64 = torch.sigmoid(g64)
    assert_close_2x("swiglu", OPS.native_swiglu_fwd(g, u), g64 * s64 * u64, ref.swiglu_ref(g, u))
    dg, du = OPS.native_swiglu_bwd(d, g, u)
    rg, ru = ref.swiglu_bwd_ref(d, g, u)
    assert_close_2x("dgate", dg, d64 * u64 * s64 * (1 + g64 * (1 - s64)), rg)
    assert_close_2x("dup", du, d64 * g64 * s64, ru)


def test_swiglu_non_contiguous_and_zero_size():
    base = _rand((64, 96), torch.bfloat16, 4)
    g, u = base.t(), _rand((96, 64), torch.bfloat16, 5)          # a transposed view and a contiguous tensor
    out = OPS.native_swiglu_fwd(g, u)
    assert out.is_contiguous()
    assert_bitwise("non-contiguous", out, OPS.native_swiglu_fwd(g.contiguous(), u))
    torch.testing.assert_close(out, ref.swiglu_ref(g, u), rtol=2 ** -7, atol=0)
    for shape in ((0,), (3, 0), (0, 5)):
        z = torch.empty(shape, dtype=torch.float32)
        assert OPS.native_swiglu_fwd(z, z).shape == shape
        assert all(t.shape == shape for t in OPS.native_swiglu_bwd(z, z, z))


# --------------------------------------------------------------------------- RMSNorm

@settings(max_examples=30)
@given(rows=st.integers(0, 40), h=st.integers(1, 2100), dtype=st.sampled_from(DTYPES),
       wdtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_rms_norm_fwd_and_dx_bitwise_equal_to_reference(rows, h, dtype, wdtype, seed):
    x, w = _rand((rows, h), dtype, seed, 2.0), _rand(h, wdtype, seed + 1)
    dy = _rand((rows, h), dtype, seed + 2)
    y, rstd = OPS.native_rms_norm_fwd(x, w, 1e-5)
    y_ref, rstd_ref = ref.rms_norm_ref(x, w, 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,)
    assert_bitwise("rms rstd", rstd, rstd_ref)
    assert_bitwise("rms y", y, y_ref)
    dx, dw = OPS.native_rms_norm_bwd(dy, x, w, rstd)
    dx_ref, dw_ref = ref.rms_norm_bwd_ref(dy, x, w, rstd_ref)
    assert_bitwise("rms dx", dx, dx_ref)
    assert dw.dtype == wdtype and dw.shape == (h,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1024, 64), (8, 4096), (3, 7, 33)])
def test_rms_norm_float64_criterion(dtype, shape):
    h = shape[-1]
    x, w, dy = _rand(shape, dtype, 7, 3.0), _rand(h, dtype, 8), _rand(shape, dtype, 9)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    r64 = x64.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    y, rstd = OPS.native_rms_norm_fwd(x, w, 1e-5)
    y_ref, rstd_ref = ref.rms_norm_ref(x, w, 1e-5)
    assert_close_2x("rms y", y, x64 * r64 * w64, y_ref)
    dx, dw = OPS.native_rms_norm_bwd(dy, x, w, rstd)
    dx_ref, dw_ref = ref.rms_norm_bwd_ref(dy, x, w, rstd_ref)
    xh, g = x64 * r64, dy64 * w64
    assert_close_2x("rms dx", dx, r64 * (g - xh * (g * xh).mean(-1, keepdim=True)), dx_ref,
                    scale=(r64 * g.abs()).max().item())
    dw64 = (dy64 * xh).reshape(-1, h).sum(0)
    assert_close_2x("rms dw", dw, dw64, dw_ref, scale=(dy64 * xh).abs().reshape(-1, h).sum(0).max().item())


def test_rms_norm_non_contiguous_zero_size_and_bad_input():
    x = _rand((48, 80), torch.float32, 10).t()                   # [80, 48] view, rows not contiguous
    w = _rand(48, torch.float32, 11)
    y, rstd = OPS.native_rms_norm_fwd(x, w, 1e-6)
    y2, rstd2 = OPS.native_rms_norm_fwd(x.contiguous(), w, 1e-6)
    assert_bitwise("non-contiguous y", y, y2)
    assert_bitwise("non-contiguous rstd", rstd, rstd2)
    dx, dw = OPS.native_rms_norm_bwd(x, x, w, rstd)
    dx2, dw2 = OPS.native_rms_norm_bwd(x.contiguous(), x.contiguous(), w, rstd2)
    assert_bitwise("non-contiguous dx", dx, dx2)
    assert_bitwise("non-contiguous dw", dw, dw2)
    z = torch.empty((0, 16))
    y, rstd = OPS.native_rms_norm_fwd(z, torch.ones(16), 1e-5)
    assert y.shape == (0, 16) and rstd.shape == (0,)
    dx, dw = OPS.native_rms_norm_bwd(z, z, torch.ones(16), rstd)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16))
    with pytest.raises(RuntimeError, match="weight has shape"):
        OPS.native_rms_norm_fwd(torch.ones(4, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS.native_rms_norm_fwd(torch.ones(4, 8, dtype=torch.float64), torch.ones(8), 1e-5)


# --------------------------------------------------------------------------- threads, variants, compile

def _all_outputs(x, w, dy, g, u):
    y, rstd = OPS.native_rms_norm_fwd(x, w, 1e-5)
    return (y, rstd, *OPS.native_rms_norm_bwd(dy, x, w, rstd), OPS.native_swiglu_fwd(g, u),
            *OPS.native_swiglu_bwd(dy.reshape(g.shape), g, u))


def test_bitwise_identical_for_1_and_2_threads():
    x, dy = _rand((3000, 257), torch.bfloat16, 12), _rand((3000, 257), torch.bfloat16, 13)
    w = _rand(257, torch.bfloat16, 14)
    g, u = _rand((3000, 257), torch.bfloat16, 15), _rand((3000, 257), torch.bfloat16, 16)
    with threads(1):
        one = _all_outputs(x, w, dy, g, u)
    with threads(2):
        two = _all_outputs(x, w, dy, g, u)
    for i, (a, b) in enumerate(zip(one, two)):
        assert_bitwise(f"output {i}", a, b)


def test_every_compiled_variant_agrees_with_the_reference():
    x, w, dy = _rand((64, 200), torch.float32, 17), _rand(200, torch.float32, 18), _rand((64, 200), torch.float32, 19)
    g, u = _rand((64, 200), torch.float32, 20), _rand((64, 200), torch.float32, 21)
    expect = (*ref.rms_norm_ref(x, w, 1e-5), *ref.rms_norm_bwd_ref(dy, x, w, ref.rms_norm_ref(x, w, 1e-5)[1]),
              ref.swiglu_ref(g, u), *ref.swiglu_bwd_ref(dy, g, u))
    for name in ("DEFAULT", "AVX2", "AVX512"):
        with isa(name) as got:
            outs = _all_outputs(x, w, dy, g, u)
        for i, (a, b) in enumerate(zip(outs, expect)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"variant {got}, output {i}: {m}")


def test_opcheck_and_torch_compile():
    import kernels.native as native
    x, w = _rand((16, 32), torch.float32, 22), _rand(32, torch.float32, 23)
    g, u = _rand((16, 32), torch.float32, 24), _rand((16, 32), torch.float32, 25)
    torch.library.opcheck(OPS.native_rms_norm_fwd, (x, w, 1e-5))
    torch.library.opcheck(OPS.native_rms_norm_bwd, (x, x, w, OPS.native_rms_norm_fwd(x, w, 1e-5)[1]))
    torch.library.opcheck(OPS.native_swiglu_fwd, (g, u))
    torch.library.opcheck(OPS.native_swiglu_bwd, (x, g, u))
    torch.library.opcheck(OPS.native_sr_bf16, (x, 123))

    def f(x, w, g, u):
        return native.rms_norm(x, w, 1e-5) * native.swiglu(g, u)

    inputs = [t.clone().requires_grad_() for t in (x, w, g, u)]
    eager = f(*inputs)
    eager.sum().backward()
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    compiled = torch.compile(f, backend="eager", fullgraph=True)(*inputs)
    compiled.sum().backward()
    assert_bitwise("compiled forward", compiled.detach(), eager.detach())
    for a, b in zip([t.grad for t in inputs], grads):
        assert_bitwise("compiled grad", a, b)


def test_kernels_ops_reference_backend_runs_native_when_enabled(monkeypatch):
    import kernels.native as kn
    from kernels import ops
    calls = []
    for name in ("native_rms_norm_fwd", "native_swiglu_fwd"):
        op = getattr(OPS, name)
        monkeypatch.setattr(OPS, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    x, w, dy = _rand((32, 64), torch.bfloat16, 30), _rand(64, torch.bfloat16, 31), _rand((32, 64), torch.bfloat16, 32)
    outs = {}
    for mode in ("on", "off"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with kn.use_mode(mode), ops.use_backend("reference"):
            y = ops.rms_norm(xs, ws)
            s = ops.swiglu(xs, xs)
        (y * s).backward(dy)
        outs[mode] = (y.detach(), s.detach(), xs.grad, ws.grad)
    assert calls == ["native_rms_norm_fwd", "native_swiglu_fwd"]            # "on" only
    y_ref, _rstd = ref.rms_norm_ref(x, w)
    for mode in ("on", "off"):
        assert_bitwise(f"rms_norm ({mode})", outs[mode][0], y_ref)
        assert_bitwise(f"swiglu ({mode})", outs[mode][1], ref.swiglu_ref(x, x))
    for a, b in zip(outs["on"][2:], outs["off"][2:]):                        # gradients: same formulas, bf16 ulps
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7 * float(b.abs().max()))
