"""kernels.sim Tensor Engine: nisa.nc_matmul (accumulate None/True/False), nisa.nc_transpose, nl.matmul.

Docs (spec 2.3, nki.isa.nc_matmul): dst[M, N] (PSUM, fp32 on NeuronCore-v2) = stationary[K, M].T @ moving[K, N];
K = partition dim of both (<= 128), M <= 128, N <= 512; accumulation in fp32. accumulate=False overwrites,
True adds to what a matmul wrote before, None = the first write overwrites and later ones accumulate.
Reference: float64 numpy of the exact (already bf16/fp32-rounded) inputs; tolerance = fp32 accumulation
error bound K * 2^-23 * (|A|.T @ |B|) per element (plus one fp32 rounding).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import BF16, F32, f64, float_dtypes, load, nisa, nl, nl_dt, rand, run, store


def _mm_tol(a, b, k):
    return (k + 2) * 2.0 ** -23 * (np.abs(f64(a)).T @ np.abs(f64(b))) + 1e-30


def _evict(ps, shape):
    t = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t, src=ps)
    return store(t)


@given(K=st.integers(1, 128), M=st.integers(1, 128), N=st.integers(1, 512), dt=float_dtypes,
       seed=st.integers(0, 999))
@settings(max_examples=15)
def test_nc_matmul_vs_float64(K, M, N, dt, seed):
    a = rand((K, M), dt, seed=seed)
    b = rand((K, N), dt, seed=seed + 1)

    def k(x, y):
        ps = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(x), moving=load(y))
        return _evict(ps, (M, N))

    out = run(k, a, b)
    ref = f64(a).T @ f64(b)
    assert out.shape == (M, N) and out.dtype == F32
    assert (np.abs(out - ref) <= _mm_tol(a, b, K)).all()


def test_nc_matmul_accumulate_semantics():
    """None: first write overwrites, later accumulate; False overwrites; True adds to the matmul-written value."""
    K, M, N = 64, 32, 48
    a = [rand((K, M), BF16, seed=i) for i in range(3)]
    b = [rand((K, N), BF16, seed=10 + i) for i in range(3)]

    def k(a0, a1, a2, b0, b1, b2):
        A = [load(a0), load(a1), load(a2)]
        B = [load(b0), load(b1), load(b2)]
        p_none = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
        for i in range(3):
            nisa.nc_matmul(dst=p_none, stationary=A[i], moving=B[i])          # accumulate=None
        p_false = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=p_false, stationary=A[0], moving=B[0], accumulate=False)
        nisa.nc_matmul(dst=p_false, stationary=A[1], moving=B[1], accumulate=False)
        p_true = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=p_true, stationary=A[0], moving=B[0], accumulate=False)
        nisa.nc_matmul(dst=p_true, stationary=A[2], moving=B[2], accumulate=True)
        return _evict(p_none, (M, N)), _evict(p_false, (M, N)), _evict(p_true, (M, N))

    o_none, o_false, o_true = run(k, *a, *b)
    prods = [f64(a[i]).T @ f64(b[i]) for i in range(3)]
    np.testing.assert_allclose(o_none, prods[0] + prods[1] + prods[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_false, prods[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_true, prods[0] + prods[2], rtol=1e-5, atol=1e-5)


def test_nc_matmul_accumulates_in_fp32_not_bf16():
    """Summing many small bf16 products: the fp32 PSUM keeps what a bf16 accumulator would lose."""
    K, M, N = 128, 4, 4
    a = np.full((K, M), 1.0, dtype=BF16)
    b = np.full((K, N), 2.0 ** -9, dtype=BF16)
    b[0, :] = 1.0

    def k(x, y):
        ps = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
        for _ in range(2):
            nisa.nc_matmul(dst=ps, stationary=load(x), moving=load(y))
        return _evict(ps, (M, N))

    np.testing.assert_array_equal(run(k, a, b), np.full((M, N), 2.0 * (1.0 + 127 * 2.0 ** -9), np.float32))


@given(P=st.integers(1, 128), F=st.integers(1, 128), dt=float_dtypes, seed=st.integers(0, 999))
@settings(max_examples=10)
def test_nc_transpose_tensor_engine(P, F, dt, seed):
    """TensorE transpose: SBUF [P, F] -> PSUM [F, P] of the data's dtype ("The output dst tile must have the same
    data type as that of data", nki.isa.nc_transpose); exact for finite values."""
    a = rand((P, F), dt, seed=seed)

    def k(x):
        ps = nl.ndarray((F, P), dtype=nl_dt(dt), buffer=nl.psum)
        nisa.nc_transpose(dst=ps, data=load(x), engine=nisa.engine.tensor)
        return _evict(ps, (F, P))

    np.testing.assert_array_equal(run(k, a), a.T.astype(np.float32))


@given(P=st.integers(1, 32), F=st.integers(1, 32), dt=float_dtypes, seed=st.integers(0, 999))
@settings(max_examples=10)
def test_nc_transpose_vector_engine(P, F, dt, seed):
    """VectorE transpose (<= [32, 32]) SBUF -> SBUF, same dtype, bit exact."""
    a = rand((P, F), dt, seed=seed)

    def k(x):
        t = nl.ndarray((F, P), dtype=nl_dt(dt), buffer=nl.sbuf)
        nisa.nc_transpose(dst=t, data=load(x), engine=nisa.engine.vector)
        return store(t)

    out = run(k, a)
    assert out.dtype == dt
    np.testing.assert_array_equal(out.astype(np.float32), a.T.astype(np.float32))


def test_nl_matmul_transpose_x():
    """nl.matmul(x, y, transpose_x=True) -> PSUM tile x.T @ y."""
    a = rand((96, 64), BF16, seed=1)
    b = rand((96, 200), BF16, seed=2)

    def k(x, y):
        ps = nl.matmul(load(x), load(y), transpose_x=True)
        assert tuple(ps.shape) == (64, 200)
        return _evict(ps, (64, 200))

    out = run(k, a, b)
    assert (np.abs(out - f64(a).T @ f64(b)) <= _mm_tol(a, b, 96)).all()


def test_matmul_into_psum_slice_and_partial_partitions():
    """dst may be a view of a larger PSUM tile (one bank); stationary/moving may be partition slices from 0."""
    a = rand((128, 128), F32, seed=3)
    b = rand((128, 256), F32, seed=4)

    def k(x, y):
        X, Y = load(x), load(y)
        ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps[0:32, 256:512], stationary=X[0:64, 0:32], moving=Y[0:64, :])
        return _evict(ps[0:32, 256:512], (32, 256))

    out = run(k, a, b)
    ref = f64(a[:64, :32]).T @ f64(b[:64])
    assert (np.abs(out - ref) <= _mm_tol(a[:64, :32], b[:64], 64)).all()
