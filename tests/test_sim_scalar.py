"""kernels.sim Scalar Engine: nisa.activation (every op, scale/bias), activation_reduce, reduce registers.

Docs (spec 2.4, nki.isa.activation): out = op(data * scale + bias), fp32 math, cast to dst.dtype; bias a
[P,1] tile on NeuronCore-v2; scale an fp32 scalar or [P,1] tile. After the op, a free-axis add-reduction goes
to 128 internal fp32 registers under reduce_cmd: reset (zero only), idle (untouched), reduce (accumulate onto),
reset_reduce (zero then accumulate); reduce_res [P,1] reads the registers out.
Reference: float64 numpy of op(x*scale+bias); tolerance one rounding of dst.dtype plus fp32 internal error
amplified by the op's condition number over the tested input range (stated per op below).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import (ACT_REF, BF16, F32, POSITIVE_OPS, assert_close, f64, float_dtypes, frees, load, nisa, nl,
                         nl_dt, parts, rand, run, store)

# Input range per op (inside the documented valid range) and the relative tolerance of an fp32 dst:
# the inputs data*scale+bias carry two fp32 roundings, amplified by |x f'(x)/f(x)| <= ~8 on these ranges.
RANGES = {op: ((0.25, 4.0) if op in POSITIVE_OPS else (-4.0, 4.0)) for op in ACT_REF}
FP32_RTOL = 2.0 ** -17
ABS_TOL = 2.0 ** -18           # for ops crossing zero (tanh, silu, gelu, ...)


@pytest.mark.parametrize("op", sorted(ACT_REF))
@given(P=parts, F=st.integers(1, 256), dt=float_dtypes, dto=float_dtypes, vec_scale=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 999))
@settings(max_examples=5)
def test_activation_ops(op, P, F, dt, dto, vec_scale, with_bias, seed):
    lo, hi = RANGES[op]
    with_bias = with_bias and op != "reciprocal"      # v2: activation(reciprocal) takes no bias (test_sim_rules)
    x = rand((P, F), dt, seed=seed, lo=lo, hi=hi)
    # scale in [0.5, 1] and a small bias keep data*scale+bias inside the op's range.
    scale_v = rand((P, 1), F32, seed=seed + 1, lo=0.5, hi=1.0)
    bias_v = rand((P, 1), F32, seed=seed + 2, lo=0.0, hi=0.1)

    def k(d, sv, bv):
        o = nl.ndarray((P, F), dtype=nl_dt(dto), buffer=nl.sbuf)
        kw = dict(dst=o, op=getattr(nl, op), data=load(d), scale=load(sv) if vec_scale else 0.75)
        if with_bias:
            kw["bias"] = load(bv)
        nisa.activation(**kw)
        return store(o)

    out = run(k, x, scale_v, bias_v)
    z = f64(x) * (f64(scale_v) if vec_scale else 0.75) + (f64(bias_v) if with_bias else 0.0)
    ref = ACT_REF[op](z)
    rtol = 2.0 ** -8 if dto == BF16 else FP32_RTOL
    assert_close(out, ref, dto, rtol=rtol, atol=ABS_TOL, what=op)


def test_activation_gelu_is_erf_form_not_tanh():
    """nl.gelu is the exact (erf) GELU; the tanh approximation is the separate op nl.gelu_apprx_tanh."""
    x = np.linspace(-3, 3, 128 * 64, dtype=np.float32).reshape(128, 64)

    def k(d):
        o = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.gelu, data=load(d))
        o2 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o2, op=nl.gelu_apprx_tanh, data=load(d))
        return store(o), store(o2)

    g, gt = run(k, x)
    xf = f64(x)
    assert_close(g, ACT_REF["gelu"](xf), F32, rtol=FP32_RTOL, atol=ABS_TOL)
    tanh_ref = 0.5 * xf * (1 + np.tanh(np.sqrt(2 / np.pi) * (xf + 0.044715 * xf ** 3)))
    assert_close(gt, tanh_ref, F32, rtol=FP32_RTOL, atol=ABS_TOL)


def test_activation_psum_in_and_out():
    x = rand((32, 64), F32, seed=1)

    def k(d):
        ps = nl.ndarray((32, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.tensor_copy(dst=ps, src=load(d))
        po = nl.ndarray((32, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.activation(dst=po, op=nl.exp, data=ps)
        o = nl.ndarray((32, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.copy, data=po)
        return store(o)

    assert_close(run(k, x), np.exp(f64(x)), F32, rtol=FP32_RTOL)


@given(P=parts, F=frees, dt=float_dtypes, seed=st.integers(0, 999))
@settings(max_examples=10)
def test_activation_reduce(P, F, dt, seed):
    """activation_reduce = activation with reduce_cmd=reset_reduce + readout; the sum is over fp32 op results."""
    x = rand((P, F), dt, seed=seed)
    bias_v = rand((P, 1), F32, seed=seed + 1, lo=-0.5, hi=0.5)

    def k(d, bv):
        o = nl.ndarray((P, F), dtype=nl_dt(dt), buffer=nl.sbuf)
        r = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(dst=o, op=nl.exp, data=load(d), reduce_op=nl.add, reduce_res=r, bias=load(bv),
                               scale=-1.0)
        return store(o), store(r)

    o, r = run(k, x, bias_v)
    e = np.exp(-f64(x) + f64(bias_v))
    assert_close(o, e, dt, rtol=2.0 ** -8 if dt == BF16 else FP32_RTOL)
    assert_close(r, e.sum(axis=1, keepdims=True), F32, rtol=(F + 8) * 2.0 ** -23)


def test_activation_reduce_registers_across_calls():
    """reset_reduce / reduce / idle / reset: the registers persist across activation calls (doc pseudocode)."""
    P, F = 128, 96
    xs = [rand((P, F), F32, seed=s) for s in range(3)]

    def k(a0, a1, a2):
        X = [load(a0), load(a1), load(a2)]
        o = nl.ndarray((P, F), dtype=nl.float32, buffer=nl.sbuf)
        r = [nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf) for _ in range(5)]
        cmd = nisa.reduce_cmd
        nisa.activation(dst=o, op=nl.square, data=X[0], reduce_op=nl.add, reduce_res=r[0],
                        reduce_cmd=cmd.reset_reduce)                       # regs = s0
        nisa.activation(dst=o, op=nl.square, data=X[1], reduce_op=nl.add, reduce_res=r[1],
                        reduce_cmd=cmd.reduce)                             # regs = s0 + s1
        nisa.activation(dst=o, op=nl.square, data=X[2], reduce_op=nl.add, reduce_res=r[2],
                        reduce_cmd=cmd.idle)                               # regs untouched
        nisa.activation(dst=o, op=nl.square, data=X[2], reduce_op=nl.add, reduce_res=r[3],
                        reduce_cmd=cmd.reset)                              # regs = 0
        nisa.activation(dst=o, op=nl.square, data=X[2], reduce_op=nl.add, reduce_res=r[4],
                        reduce_cmd=cmd.reduce)                             # regs = 0 + s2
        return tuple(store(t) for t in r) + (store(o),)

    r0, r1, r2, r3, r4, o = run(k, *xs)
    s = [np.square(f64(x)).sum(axis=1, keepdims=True) for x in xs]
    tol = 200 * 2.0 ** -23
    assert_close(r0, s[0], F32, rtol=tol)
    assert_close(r1, s[0] + s[1], F32, rtol=tol)
    assert_close(r2, s[0] + s[1], F32, rtol=tol)
    np.testing.assert_array_equal(r3, np.zeros((P, 1), np.float32))
    assert_close(r4, s[2], F32, rtol=tol)
    assert_close(o, np.square(f64(xs[2])), F32, rtol=2.0 ** -22)
