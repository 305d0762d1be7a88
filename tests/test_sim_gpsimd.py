"""kernels.sim GpSimd Engine: nisa.iota and nisa.affine_select (spec 2.6, nki.isa.affine_select pseudocode).

For partition c and a pattern [[step, num], ...] (padded to 4-D with size 1, row-major over the free elements):
value = offset + c * channel_multiplier + sum_i idx_i * step_i.  iota writes the value (int32 math, cast to
dst.dtype); affine_select writes on_true_tile where cmp_op(value, 0) else on_false_value (fp32).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import BF16, F32, I32, float_dtypes, load, nisa, nl, nl_dt, parts, rand, run, store


def affine_values(P, pattern, offset, channel_multiplier):
    """float64 [P, prod(nums)] of the affine expression, row-major over the pattern dims."""
    val = np.zeros([n for _, n in pattern], dtype=np.int64)
    for d, (step, num) in enumerate(pattern):
        shape = [1] * len(pattern)
        shape[d] = num
        val = val + (np.arange(num).reshape(shape) * step)
    c = np.arange(P).reshape(P, 1)
    return offset + c * channel_multiplier + val.reshape(1, -1)


pattern_st = st.lists(st.tuples(st.integers(-8, 8), st.integers(1, 8)), min_size=1, max_size=3)


@given(P=parts, pattern=pattern_st, offset=st.integers(-100, 100), cm=st.integers(-4, 4),
       dt=st.sampled_from([I32, F32]))
@settings(max_examples=20)
def test_iota(P, pattern, offset, cm, dt):
    n = int(np.prod([num for _, num in pattern]))
    pat = [[int(s), int(num)] for s, num in pattern]

    def k():
        o = nl.ndarray((P, n), dtype=nl_dt(dt), buffer=nl.sbuf)
        nisa.iota(dst=o, pattern=pat, offset=offset, channel_multiplier=cm)
        return store(o)

    out = run(k)
    np.testing.assert_array_equal(out, affine_values(P, pat, offset, cm).astype(dt))


CMP = {"greater_equal": np.greater_equal, "greater": np.greater, "equal": np.equal, "less": np.less}


@given(P=parts, F=st.integers(1, 256), offset=st.integers(-200, 200), cm=st.integers(-2, 2),
       step=st.integers(-2, 2), cmp=st.sampled_from(sorted(CMP)), dt=float_dtypes, seed=st.integers(0, 99))
@settings(max_examples=20)
def test_affine_select(P, F, offset, cm, step, cmp, dt, seed):
    x = rand((P, F), dt, seed=seed)
    fill = -9984.0

    def k(d):
        o = nl.ndarray((P, F), dtype=nl_dt(dt), buffer=nl.sbuf)
        nisa.affine_select(dst=o, pattern=[[step, F]], offset=offset, channel_multiplier=cm,
                           on_true_tile=load(d), on_false_value=fill, cmp_op=getattr(nl, cmp))
        return store(o)

    out = run(k, x)
    pred = CMP[cmp](affine_values(P, [[step, F]], offset, cm), 0)
    ref = np.where(pred, x.astype(np.float32), np.float32(fill)).astype(dt)
    np.testing.assert_array_equal(out.astype(np.float32), ref.astype(np.float32))


def test_affine_select_causal_mask_pattern_fp32_min_to_bf16():
    """The documented causal pattern (q on partitions, k on the free axis): keep q_pos >= k_pos.
    fp32 min on_false_value cast to a bf16 dst becomes -inf (spec 2.9)."""
    P, F, q0, k0 = 128, 128, 128, 64
    x = rand((P, F), BF16, seed=3)

    def k(d):
        o = nl.ndarray((P, F), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.affine_select(dst=o, pattern=[[-1, F]], offset=q0 - k0, channel_multiplier=1, on_true_tile=load(d),
                           on_false_value=-3.4028235e38, cmp_op=nl.greater_equal)
        return store(o)

    out = run(k, x).astype(np.float32)
    q = q0 + np.arange(P)[:, None]
    kk = k0 + np.arange(F)[None, :]
    keep = q >= kk
    np.testing.assert_array_equal(out[keep], x.astype(np.float32)[keep])
    assert np.isneginf(out[~keep]).all()


@given(P=parts, pattern=pattern_st, offset=st.integers(-30, 30), cm=st.integers(-2, 2), seed=st.integers(0, 99))
@settings(max_examples=15)
def test_affine_select_multi_dim_pattern(P, pattern, offset, cm, seed):
    """A pattern of up to 3 free dims over a dst of the same dims (row-major), bf16 data through fp32."""
    dims = tuple(num for _, num in pattern)
    pat = [[int(s), int(num)] for s, num in pattern]
    x = rand((P,) + dims, BF16, seed=seed)

    def k(d):
        o = nl.ndarray((P,) + dims, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.affine_select(dst=o, pattern=pat, offset=offset, channel_multiplier=cm, on_true_tile=load(d),
                           on_false_value=-1.5, cmp_op=nl.greater_equal)
        return store(o)

    pred = (affine_values(P, pat, offset, cm) >= 0).reshape((P,) + dims)
    ref = np.where(pred, x.astype(np.float32), np.float32(-1.5)).astype(BF16)
    np.testing.assert_array_equal(run(k, x).view(np.uint16), ref.view(np.uint16))


@given(P=parts, F=st.integers(1, 128), op=st.sampled_from(["add", "maximum"]), seed=st.integers(0, 99))
@settings(max_examples=8)
def test_tensor_partition_reduce(P, F, op, seed):
    """GpSimd reduction across partitions: dst [1, F] = reduce over axis 0 (fp32)."""
    x = rand((P, F), F32, seed=seed)

    def k(d):
        o = nl.ndarray((1, F), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_partition_reduce(dst=o, op=getattr(nl, op), data=load(d))
        return store(o)

    out = run(k, x)
    if op == "add":
        np.testing.assert_allclose(out, x.astype(np.float64).sum(0, keepdims=True), rtol=0,
                                   atol=(P + 1) * 2.0 ** -23 * 2 * P)
    else:
        np.testing.assert_array_equal(out, x.max(0, keepdims=True))
