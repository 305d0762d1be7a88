"""Small whole kernels in the new NKI API, run by kernels.sim, against numpy (float64 references).

- tiled add (row tiles of 128 with a min()-clamped tail, column tiles of 512)
- tiled matmul: A tiles transposed on TensorE, K accumulated in one PSUM bank per output tile
- row softmax (VectorE max, ScalarE exp with [P,1] bias and add-reduce, VectorE reciprocal)
- causal attention probabilities: scores on TensorE, causal mask through affine_select, softmax
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import BF16, F32, f64, float_dtypes, nisa, nki, nl, rand

P = 128


@nki.jit
def tiled_add(a, b):
    n, f = a.shape
    out = nl.ndarray((n, f), dtype=a.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, n, P):
        rows = min(P, n - r0)
        for c0 in range(0, f, 512):
            cols = min(512, f - c0)
            ta = nl.ndarray((P, 512), dtype=a.dtype, buffer=nl.sbuf)
            tb = nl.ndarray((P, 512), dtype=b.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=ta[0:rows, 0:cols], src=a[r0:r0 + rows, c0:c0 + cols])
            nisa.dma_copy(dst=tb[0:rows, 0:cols], src=b[r0:r0 + rows, c0:c0 + cols])
            tc = nl.ndarray((P, 512), dtype=a.dtype, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=tc[0:rows, 0:cols], data1=ta[0:rows, 0:cols], data2=tb[0:rows, 0:cols],
                               op=nl.add)
            nisa.dma_copy(dst=out[r0:r0 + rows, c0:c0 + cols], src=tc[0:rows, 0:cols])
    return out


@given(n=st.integers(1, 300), f=st.integers(1, 700), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=8)
def test_tiled_add(n, f, dt, seed):
    a, b = rand((n, f), dt, seed=seed), rand((n, f), dt, seed=seed + 1)
    out = tiled_add(a, b)
    ref = (a.astype(np.float32) + b.astype(np.float32)).astype(dt)
    assert out.dtype == dt and out.shape == (n, f)
    np.testing.assert_array_equal(out.astype(np.float32), ref.astype(np.float32))


@nki.jit
def tiled_matmul(a, b):
    """a [M, K], b [K, N] (bf16) -> a @ b [M, N] fp32. A tiles are transposed on TensorE (fp32 PSUM, then cast
    back to bf16, exact), K is accumulated in PSUM (accumulate=None: the first matmul overwrites)."""
    m, kdim = a.shape
    n = b.shape[1]
    out = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for m0 in range(0, m, P):
        mr = min(P, m - m0)
        # A^T tiles for this row block: [k, m] per 128-wide K chunk
        a_t = []
        for k0 in range(0, kdim, P):
            kr = min(P, kdim - k0)
            at = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=at[0:mr, 0:kr], src=a[m0:m0 + mr, k0:k0 + kr])
            tp = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.psum)   # nc_transpose keeps the data's dtype
            nisa.nc_transpose(dst=tp[0:kr, 0:mr], data=at[0:mr, 0:kr])
            att = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=att[0:kr, 0:mr], src=tp[0:kr, 0:mr])
            a_t.append(att)
        for n0 in range(0, n, 512):
            nr = min(512, n - n0)
            acc = nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.psum)
            for ki, k0 in enumerate(range(0, kdim, P)):
                kr = min(P, kdim - k0)
                bt = nl.ndarray((P, 512), dtype=b.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=bt[0:kr, 0:nr], src=b[k0:k0 + kr, n0:n0 + nr])
                nisa.nc_matmul(dst=acc[0:mr, 0:nr], stationary=a_t[ki][0:kr, 0:mr], moving=bt[0:kr, 0:nr])
            res = nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res[0:mr, 0:nr], src=acc[0:mr, 0:nr])
            nisa.dma_copy(dst=out[m0:m0 + mr, n0:n0 + nr], src=res[0:mr, 0:nr])
    return out


@given(m=st.integers(1, 260), k=st.integers(1, 300), n=st.integers(1, 600), seed=st.integers(0, 99))
@settings(max_examples=5)
def test_tiled_matmul(m, k, n, seed):
    a, b = rand((m, k), BF16, seed=seed), rand((k, n), BF16, seed=seed + 1)
    out = tiled_matmul(a, b)
    ref = f64(a) @ f64(b)
    tol = (k + 2) * 2.0 ** -23 * (np.abs(f64(a)) @ np.abs(f64(b)))   # fp32 accumulation bound
    assert out.shape == (m, n) and out.dtype == F32
    assert (np.abs(out - ref) <= tol).all()


def _softmax_rows(x_t, rows, d, out_dtype):
    """Softmax along the free axis of x_t[0:rows, 0:d] (fp32 SBUF); returns an SBUF tile of out_dtype."""
    mx = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=mx[0:rows], op=nl.maximum, data=x_t[0:rows, 0:d], axis=1, negate=True, keepdims=True)
    e = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.sbuf)
    ssum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=e[0:rows], op=nl.exp, data=x_t[0:rows, 0:d], bias=mx[0:rows], reduce_op=nl.add,
                    reduce_res=ssum[0:rows], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    rs = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=rs[0:rows], data=ssum[0:rows])
    y = nl.ndarray((P, d), dtype=out_dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=y[0:rows], data=e[0:rows], op0=nl.multiply, operand0=rs[0:rows])
    return y


@nki.jit
def row_softmax(x):
    n, d = x.shape
    out = nl.ndarray((n, d), dtype=x.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, n, P):
        rows = min(P, n - r0)
        xt = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt[0:rows], src=x[r0:r0 + rows, :])
        y = _softmax_rows(xt, rows, d, x.dtype)
        nisa.dma_copy(dst=out[r0:r0 + rows, :], src=y[0:rows])
    return out


def _np_softmax(x64):
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@given(n=st.integers(1, 300), d=st.integers(1, 512), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=6)
def test_row_softmax(n, d, dt, seed):
    x = rand((n, d), dt, seed=seed, lo=-8.0, hi=8.0)
    out = row_softmax(x)
    ref = _np_softmax(f64(x))
    rtol = 2.0 ** -8 if dt == BF16 else 2.0 ** -17
    assert out.dtype == dt
    assert (np.abs(out.astype(np.float64) - ref) <= rtol * ref + 2.0 ** -24).all()


@nki.jit
def causal_probs(q_t, k_t):
    """q_t, k_t [D, S] (D <= 128, heads' dim on partitions) -> softmax(mask(q @ k.T / sqrt(D))) [S, S] fp32."""
    d, s = q_t.shape
    out = nl.ndarray((s, s), dtype=nl.float32, buffer=nl.shared_hbm)
    qs = nl.ndarray((d, s), dtype=q_t.dtype, buffer=nl.sbuf)
    ks = nl.ndarray((d, s), dtype=k_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=qs, src=q_t)
    nisa.dma_copy(dst=ks, src=k_t)
    for q0 in range(0, s, P):
        qr = min(P, s - q0)
        sc_ps = nl.ndarray((P, s), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=sc_ps[0:qr], stationary=qs[:, q0:q0 + qr], moving=ks)
        sc = nl.ndarray((P, s), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sc[0:qr], op=nl.copy, data=sc_ps[0:qr], scale=1.0 / float(np.sqrt(d)))
        masked = nl.ndarray((P, s), dtype=nl.float32, buffer=nl.sbuf)
        # keep k_pos <= q_pos: value = (q0 + partition) - k >= 0
        nisa.affine_select(dst=masked[0:qr], pattern=[[-1, s]], offset=q0, channel_multiplier=1,
                           on_true_tile=sc[0:qr], on_false_value=-3.4028235e38, cmp_op=nl.greater_equal)
        y = _softmax_rows(masked, qr, s, nl.float32)
        nisa.dma_copy(dst=out[q0:q0 + qr, :], src=y[0:qr])
    return out


@given(s=st.integers(1, 300), d=st.integers(1, 128), seed=st.integers(0, 99))
@settings(max_examples=4)
def test_causal_mask_softmax(s, d, seed):
    q_t, k_t = rand((d, s), BF16, seed=seed), rand((d, s), BF16, seed=seed + 1)
    out = causal_probs(q_t, k_t)
    sc = f64(q_t).T @ f64(k_t) / np.sqrt(d)
    sc[np.triu(np.ones((s, s), bool), k=1)] = -np.inf
    ref = _np_softmax(sc)
    assert (out[np.triu(np.ones((s, s), bool), k=1)] == 0).all()
    assert (np.abs(out - ref) <= 2.0 ** -16 * ref + 2.0 ** -22).all()
