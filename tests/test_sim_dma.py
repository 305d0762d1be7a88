"""kernels.sim DMA: nisa.dma_copy, nl.load, nl.store, dtype casts, HBM views (spec 2.2).

dma_copy: dst = src, element counts must match, dtype conversion src -> fp32 -> dst (RNE).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import (BF16, F32, float_dtypes, frees, hbm_out, nisa, nl, nl_dt, parts, rand, run)


@given(P=parts, F=frees, src_dt=float_dtypes, dst_dt=float_dtypes, seed=st.integers(0, 999))
@settings(max_examples=15)
def test_dma_roundtrip_with_cast(P, F, src_dt, dst_dt, seed):
    """HBM(src_dt) -> SBUF(dst_dt) -> HBM(dst_dt): equals numpy's cast src -> fp32 -> dst (RNE)."""
    a = rand((P, F), src_dt, seed=seed, lo=-300.0, hi=300.0)

    def k(x):
        t = nl.ndarray((P, F), dtype=nl_dt(dst_dt), buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        o = hbm_out((P, F), nl_dt(dst_dt))
        nisa.dma_copy(dst=o, src=t)
        return o

    out = run(k, a)
    ref = a.astype(np.float32).astype(dst_dt)
    assert out.dtype == dst_dt
    np.testing.assert_array_equal(out.astype(np.float32), ref.astype(np.float32))


@given(N=st.integers(2, 300), F=st.integers(2, 96), seed=st.integers(0, 999))
@settings(max_examples=12)
def test_dma_hbm_views(N, F, seed):
    """Strided and offset HBM views on both sides of a DMA (rows r0:r0+p:2 of the input, a column window)."""
    a = rand((N, F), F32, seed=seed)
    r0 = N // 3
    rows = a[r0::2][:128]
    c0, c1 = F // 4, F - F // 4
    p = rows.shape[0]

    def k(x):
        t = nl.ndarray((p, c1 - c0), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[r0:r0 + 2 * (p - 1) + 1:2, c0:c1])
        o = hbm_out((N, F), nl.float32)
        z = nl.ndarray((min(N, 128), F), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=z, value=0.0)
        for q0 in range(0, N, 128):
            q = min(128, N - q0)
            nisa.dma_copy(dst=o[q0:q0 + q, :], src=z[0:q, :])
        nisa.dma_copy(dst=o[0:p, c0:c1], src=t)
        return o

    out = run(k, a)
    ref = np.zeros((N, F), np.float32)
    ref[:p, c0:c1] = rows[:, c0:c1]
    np.testing.assert_array_equal(out, ref)


def test_dma_reshaping_copy_same_element_count():
    """Shapes may differ when element counts match; elements are taken row-major over each view."""
    a = rand((4, 96), F32, seed=2)

    def k(x):
        t = nl.ndarray((4, 8, 12), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        o = hbm_out((4, 96), nl.float32)
        nisa.dma_copy(dst=o, src=t)
        return o

    np.testing.assert_array_equal(run(k, a), a)


def test_dma_sbuf_to_sbuf():
    a = rand((64, 40), F32, seed=4)

    def k(x):
        t = nl.ndarray((64, 40), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        u = nl.ndarray((64, 40), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=u, src=t)
        o = hbm_out((64, 40), nl.bfloat16)
        nisa.dma_copy(dst=o, src=u)
        return o

    np.testing.assert_array_equal(run(k, a).view(np.uint16), a.astype(BF16).view(np.uint16))


@given(P=parts, F=frees, dt=float_dtypes)
@settings(max_examples=10)
def test_nl_load_store(P, F, dt):
    """nl.load(src, dtype=None) -> SBUF tile of src's shape; nl.load(dtype=) casts; nl.store(dst, value)."""
    a = rand((P, F), F32, seed=P + F)

    def k(x):
        t = nl.load(x)
        assert tuple(t.shape) == (P, F)
        c = nl.load(x, dtype=nl_dt(dt))
        o1 = hbm_out((P, F), nl.float32)
        nl.store(o1, t)
        o2 = hbm_out((P, F), nl_dt(dt))
        nl.store(dst=o2, value=c)
        return o1, o2

    o1, o2 = run(k, a)
    np.testing.assert_array_equal(o1, a)
    np.testing.assert_array_equal(o2.astype(np.float32), a.astype(dt).astype(np.float32))


def test_input_hbm_not_modified_by_reads():
    a = rand((16, 16), F32, seed=9)
    keep = a.copy()

    def k(x):
        t = nl.load(x)
        nisa.memset(dst=t, value=0.0)          # changing the SBUF copy must not touch the HBM input
        o = hbm_out((16, 16), nl.float32)
        nl.store(o, t)
        return o

    np.testing.assert_array_equal(run(k, a), np.zeros((16, 16), np.float32))
    np.testing.assert_array_equal(a, keep)


@given(P=st.integers(1, 128), F=st.integers(1, 128), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=6)
def test_load_transpose2d(P, F, dt, seed):
    """nl.load_transpose2d(src) = DMA transpose of a 2-D HBM tensor (legal on trn1, spec 2.2): SBUF [F, P]."""
    a = rand((P, F), dt, seed=seed)

    def k(x):
        t = nl.load_transpose2d(x)
        assert tuple(t.shape) == (F, P)
        o = hbm_out((F, P), nl_dt(dt))
        nisa.dma_copy(dst=o, src=t)
        return o

    np.testing.assert_array_equal(run(k, a).astype(np.float32), a.T.astype(np.float32))


@given(p0=st.integers(0, 127), n=st.integers(1, 128), q0=st.integers(0, 127))
@settings(max_examples=10)
def test_dma_any_partition_range(p0, n, q0):
    """The partition-start rule binds the compute engines, not DMA: a DMA may read/write any partition range."""
    n = min(n, 128 - p0, 128 - q0)
    a = rand((128, 24), F32, seed=p0 * 131 + q0)

    def k(x):
        t = nl.ndarray((128, 24), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        u = nl.ndarray((128, 24), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=u, value=0.0)
        nisa.dma_copy(dst=u[q0:q0 + n], src=t[p0:p0 + n])
        o = hbm_out((128, 24), nl.float32)
        nisa.dma_copy(dst=o, src=u)
        return o

    ref = np.zeros_like(a)
    ref[q0:q0 + n] = a[p0:p0 + n]
    np.testing.assert_array_equal(run(k, a), ref)
