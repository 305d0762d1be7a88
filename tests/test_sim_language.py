"""kernels.sim nki / nki.language surface: jit and simulate, torch at the boundary, nl.* wrappers,
program_id / num_programs, device_print (spec 1.2, 2.7, 4.1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import BF16, F32, assert_close, f64, float_dtypes, frees, nisa, nki, nl, parts, rand, run, store


def _add_kernel(a, b):
    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
    ta = nl.load(a)
    tb = nl.load(b)
    tc = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=tc, data1=ta, data2=tb, op=nl.add)
    nl.store(out, tc)
    return out


def test_jit_and_simulate_numpy():
    a, b = rand((64, 32), F32, seed=1), rand((64, 32), F32, seed=2)
    k = nki.jit(_add_kernel)
    out = k(a, b)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, a + b)
    np.testing.assert_array_equal(nki.simulate(k)(a, b), a + b)
    # decorator with keyword arguments, as nki.jit(fn=None, **kw) allows
    np.testing.assert_array_equal(nki.jit()(_add_kernel)(a, b), a + b)


def test_torch_tensors_in_and_out():
    a = torch.randn(32, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    b = torch.randn(32, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    out = nki.simulate(nki.jit(_add_kernel))(a, b)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and tuple(out.shape) == (32, 16)
    assert torch.equal(out, (a.float() + b.float()).to(torch.bfloat16))


UNARY = {"exp": np.exp, "tanh": np.tanh, "sigmoid": lambda x: 0.5 * (1 + np.tanh(0.5 * x)),
         "square": np.square, "relu": lambda x: np.maximum(x, 0), "negative": np.negative, "abs": np.abs}
BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
          "minimum": np.minimum}


@given(P=parts, F=st.integers(1, 128), op=st.sampled_from(sorted(UNARY)), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=12)
def test_nl_unary(P, F, op, dt, seed):
    x = rand((P, F), dt, seed=seed)

    def k(a):
        t = getattr(nl, op)(nl.load(a))
        assert tuple(t.shape) == (P, F)
        return store(t)

    out = run(k, x)
    assert_close(out, UNARY[op](f64(x)), dt, rtol=2.0 ** -8 if dt == BF16 else 2.0 ** -18, atol=2.0 ** -18)


@given(P=parts, F=st.integers(1, 128), op=st.sampled_from(sorted(BINARY)), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=12)
def test_nl_binary(P, F, op, dt, seed):
    x, y = rand((P, F), dt, seed=seed), rand((P, F), dt, seed=seed + 1)

    def k(a, b):
        t = getattr(nl, op)(nl.load(a), nl.load(b), dtype=nl.float32)
        return store(t)

    out = run(k, x, y)
    np.testing.assert_array_equal(out, BINARY[op](x.astype(np.float32), y.astype(np.float32)))


@given(P=parts, F=frees, seed=st.integers(0, 99))
@settings(max_examples=8)
def test_nl_reductions(P, F, seed):
    x = rand((P, F), F32, seed=seed)

    def k(a):
        t = nl.load(a)
        s = nl.sum(t, axis=1, keepdims=True)
        m = nl.max(t, axis=1, keepdims=True)
        n = nl.min(t, axis=1, keepdims=True)
        mu = nl.mean(t, axis=1, keepdims=True)
        return store(s), store(m), store(n), store(mu)

    s, m, n, mu = run(k, x)
    x64 = f64(x)
    assert_close(s, x64.sum(1, keepdims=True), F32, rtol=0, atol=(F + 1) * 2.0 ** -23 * 2 * F)
    np.testing.assert_array_equal(m, x.max(1, keepdims=True))
    np.testing.assert_array_equal(n, x.min(1, keepdims=True))
    assert_close(mu, x64.mean(1, keepdims=True), F32, rtol=0, atol=(F + 1) * 2.0 ** -23 * 2)


def test_nl_zeros_full_copy_and_matmul_transpose():
    x = rand((64, 48), F32, seed=5)

    def k(a):
        z = nl.zeros((64, 48), dtype=nl.float32)
        f = nl.full((64, 48), 2.5, dtype=nl.float32)
        t = nl.load(a)
        s = nl.add(nl.add(z, f), nl.copy(t))
        tr = nl.transpose(t)              # PSUM tile [48, 64]
        tr_s = nl.ndarray((48, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=tr_s, src=tr)
        return store(s), store(tr_s)

    s, tr = run(k, x)
    np.testing.assert_array_equal(s, x + np.float32(2.5))
    np.testing.assert_array_equal(tr, x.T)


def test_tile_size_constants():
    ts = nl.tile_size
    assert (ts.pmax, ts.psum_fmax, ts.gemm_stationary_fmax, ts.gemm_moving_fmax, ts.bn_stats_fmax) == \
        (128, 512, 128, 512, 512)


def test_program_id_without_grid_and_lnc1():
    seen = []

    def k(a):
        seen.append((nl.program_id(axis=0), nl.num_programs(axes=0), nl.program_ndim()))
        return store(nl.load(a))

    x = rand((4, 4), F32)
    np.testing.assert_array_equal(run(k, x), x)
    np.testing.assert_array_equal(nki.jit(k)[1](x), x)      # bracket = LNC degree; 1 on trn1
    assert seen[0] == (0, 1, 0)
    assert seen[1][:2] == (0, 1)


def test_device_print_prints(capsys):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5

    def k(a):
        t = nl.load(a)
        nl.device_print("tile_x=", t)
        nl.device_print("hbm_x=", a)
        return store(t)

    run(k, x)
    outp = capsys.readouterr().out
    assert "tile_x=" in outp and "hbm_x=" in outp
    assert "11.5" in outp and "0.5" in outp


def _scaled_add(a, b, scale=2.0):
    t = nl.load(a)
    o = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=o, data=t, op0=nl.multiply, operand0=float(scale), op1=nl.add,
                              operand1=nl.load(b))
    return store(o)


def test_keyword_and_python_scalar_arguments():
    a, b = rand((8, 8), F32, seed=1), rand((8, 8), F32, seed=2)
    k = nki.jit(_scaled_add)
    np.testing.assert_array_equal(k(a=a, b=b, scale=3.0), a * np.float32(3.0) + b)
    np.testing.assert_array_equal(nki.simulate(k)(a, b=b), a * np.float32(2.0) + b)


def test_kernel_writes_into_its_input_in_place():
    """As the official simulator documents: HBM inputs the kernel writes are updated in place."""
    a = rand((8, 8), F32, seed=3)

    def k(x):
        t = nl.load(x)
        nisa.memset(dst=t, value=5.0)
        nisa.dma_copy(dst=x, src=t)
        return store(t)

    run(k, a)
    np.testing.assert_array_equal(a, np.full((8, 8), 5.0, np.float32))


def test_inputs_noncontiguous_and_unsupported_dtype():
    x = rand((8, 16), F32, seed=4)[:, ::2]
    np.testing.assert_array_equal(run(lambda a: store(nl.load(a)), x), x)
    with pytest.raises((TypeError, ValueError), match="float64"):
        run(lambda a: store(nl.load(a)), np.ones((4, 4)))


def test_unwritten_output_is_nan():
    def k(a):
        return nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    assert np.isnan(run(k, rand((4, 4), F32))).all()


def test_capacity_starts_fresh_each_launch_even_while_tracing():
    """Tiles of one launch do not count against the next (the trace keeps no tensors alive)."""
    from kernels.sim import trace

    def k():
        t = nl.ndarray((128, 150 * 1024 // 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=t, value=1.0)
        return store(t[:, 0:1])

    with trace.record() as tr:
        for _ in range(3):
            np.testing.assert_array_equal(run(k), np.ones((128, 1), np.float32))
    assert sum(1 for i in tr.instructions if i.op == "memset") == 3


@given(P=parts, F=st.integers(1, 256), seed=st.integers(0, 99))
@settings(max_examples=6)
def test_nl_softmax_where_broadcast_to(P, F, seed):
    x = rand((P, F), F32, seed=seed, lo=-6, hi=6)

    def k(a):
        t = nl.load(a)
        sm = nl.softmax(t, axis=-1)
        zero = nl.zeros((P, F), dtype=nl.float32)
        pos = nl.where(nl.greater(t, zero, dtype=nl.float32), t, zero)
        col = nl.broadcast_to(t[:, 0:1], (P, F))
        return store(sm), store(pos), store(col)

    sm, pos, col = run(k, x)
    x64 = f64(x)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    assert_close(sm, e / e.sum(-1, keepdims=True), F32, rtol=2.0 ** -18, atol=2.0 ** -26)
    np.testing.assert_array_equal(pos, np.maximum(x, 0))
    np.testing.assert_array_equal(col, np.broadcast_to(x[:, :1], (P, F)))


@given(P=parts, F=st.integers(2, 256), seed=st.integers(0, 99))
@settings(max_examples=6)
def test_nl_var_and_rms_norm(P, F, seed):
    """nl.var = population variance over the free axis; nl.rms_norm(x, w, axis, n, epsilon) = x / RMS(x) * w."""
    x = rand((P, F), F32, seed=seed)
    w = rand((P, F), F32, seed=seed + 1)

    def k(a, b):
        t, u = nl.load(a), nl.load(b)
        return store(nl.var(t, axis=1, keepdims=True)), store(nl.rms_norm(t, u, axis=1, n=F, epsilon=1e-6))

    v, r = run(k, x, w)
    x64 = f64(x)
    assert_close(v, x64.var(1, keepdims=True), F32, rtol=2.0 ** -16, atol=2.0 ** -20)
    ref = x64 / np.sqrt((x64 ** 2).sum(1, keepdims=True) / F + 1e-6) * f64(w)
    assert_close(r, ref, F32, rtol=2.0 ** -16, atol=2.0 ** -20)
