"""kernels.sim tensors: allocation, fresh-memory sentinels, indexing rank rules, views, reshape, memset, RNE.

Docs (spec 2.1, 4.1): new allocations are uninitialized, and the official simulator fills them with NaN
(floats) / 4 (ints); SBUF/PSUM tensors stay >= 2-D (integer index on the partition dim keeps it at size 1,
an integer index on a free dim drops it unless that would leave < 2 dims, then the last one stays at 1);
HBM tensors drop indexed dims like numpy; every write of a bf16 tensor rounds to nearest even.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import (BF16, F32, I32, cast, hbm_out, load, nisa, nl, nl_dt, parts, frees, rand, run, store)


@given(P=parts, F=st.integers(1, 64), dt=st.sampled_from([F32, BF16, I32]))
@settings(max_examples=10)
def test_fresh_memory_sentinel(P, F, dt):
    """An output DMA'd from a never-written SBUF tile shows the simulator's sentinel: NaN for floats, 4 for ints."""
    def k():
        t = nl.ndarray((P, F), dtype=nl_dt(dt), buffer=nl.sbuf)
        return store(t)
    out = run(k)
    assert out.shape == (P, F) and out.dtype == dt
    if dt == I32:
        assert (out == 4).all()
    else:
        assert np.isnan(out.astype(np.float32)).all()


def test_fresh_psum_is_nan_after_eviction():
    def k():
        ps = nl.ndarray((32, 16), dtype=nl.float32, buffer=nl.psum)
        t = nl.ndarray((32, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t, src=ps)
        return store(t)
    assert np.isnan(run(k)).all()


def test_sbuf_indexing_rank_rules():
    """t[0,:,:] of (128,64,32) -> (1,64,32); t[:,0,10] -> (128,1); slices keep dims; h[0] on HBM drops it."""
    seen = {}

    def k(h):
        t = nl.ndarray((128, 64, 32), dtype=nl.float32, buffer=nl.sbuf)
        seen["p_int"] = tuple(t[0, :, :].shape)
        seen["free_ints"] = tuple(t[:, 0, 10].shape)
        seen["one_free_int"] = tuple(t[:, 3, :].shape)
        seen["slices"] = tuple(t[0:64, 1:5, 2:10:2].shape)
        seen["ellipsis"] = tuple(t[..., 0:7].shape)
        p2 = nl.ndarray((16, 8), dtype=nl.float32, buffer=nl.psum)
        seen["psum_int"] = tuple(p2[:, 3].shape)
        seen["hbm_int"] = tuple(h[0, :, :].shape)
        seen["hbm_two_ints"] = tuple(h[1, 2, :].shape)
        s = load(h[2])
        return store(s)

    h = rand((4, 128, 32), F32, seed=1)
    out = run(k, h)
    assert seen == {"p_int": (1, 64, 32), "free_ints": (128, 1), "one_free_int": (128, 32),
                    "slices": (64, 4, 4), "ellipsis": (128, 64, 7), "psum_int": (16, 1),
                    "hbm_int": (128, 32), "hbm_two_ints": (32,)}
    np.testing.assert_array_equal(out, h[2])


@given(P=parts, F=frees)
@settings(max_examples=8)
def test_views_share_storage(P, F):
    """A write through a slice is visible through the parent tile (views share storage)."""
    def k(a):
        t = load(a)
        sub = t[:, 0:(F + 1) // 2]
        nisa.memset(dst=sub, value=7.0)
        return store(t)
    a = rand((P, F), F32, seed=P * 1000 + F)
    out = run(k, a)
    ref = a.copy()
    ref[:, :(F + 1) // 2] = 7.0
    np.testing.assert_array_equal(out, ref)


def test_hbm_reshape_and_sbuf_reshape():
    """HBM reshape is a row-major view; an SBUF (P, a*b) tile reshaped to (P, a, b) keeps element order."""
    def k(a):
        v = a.reshape((8, 128))
        t = load(v)                                  # (8, 128)
        t3 = t.reshape((8, 16, 8))
        u = nl.ndarray((8, 16, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=u, src=t3)
        return store(u)
    a = rand((4, 256), F32, seed=3)
    np.testing.assert_array_equal(run(k, a), a.reshape(8, 16, 8))


@given(P=parts, F=st.integers(1, 128), dt=st.sampled_from([F32, BF16, I32]), v=st.integers(-100, 100))
@settings(max_examples=10)
def test_memset(P, F, dt, v):
    def k():
        t = nl.ndarray((P, F), dtype=nl_dt(dt), buffer=nl.sbuf)
        # Since 0.3 the value's Python type must match the dst dtype (int literal for int tensors).
        nisa.memset(dst=t, value=(int(v) if dt == I32 else float(v) / 8.0))
        return store(t)
    out = run(k)
    ref = np.full((P, F), v if dt == I32 else v / 8.0).astype(dt)
    np.testing.assert_array_equal(out, ref)


def _ties():
    """fp32 values exactly halfway between two bf16 values (both even and odd lower neighbours) + randoms."""
    base = np.arange(1, 257, dtype=np.uint32) << 16 | 0x3F800000   # bf16-representable, odd and even mantissas
    halfway = (base | 0x8000).view(np.float32)                      # exact ties
    above = (base | 0x8001).view(np.float32)
    below = (base | 0x7FFF).view(np.float32)
    rnd = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    return np.stack([halfway, above, below, -halfway, rnd]).astype(np.float32)   # (5, 256)


def test_bf16_round_to_nearest_even_on_every_write():
    """fp32 -> bf16 writes by DMA, tensor_copy, activation(copy) and tensor_scalar all equal ml_dtypes RNE casts."""
    x = _ties()

    def k(a):
        t = load(a)
        d = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=d, src=a)
        c = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=c, src=t)
        s = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.activation(dst=s, op=nl.copy, data=t)
        m = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=m, data=t, op0=nl.multiply, operand0=1.0)
        return store(d), store(c), store(s), store(m)

    ref = x.astype(BF16)
    for name, out in zip(("dma_copy", "tensor_copy", "activation", "tensor_scalar"), run(k, x)):
        assert out.dtype == BF16, name
        np.testing.assert_array_equal(out.view(np.uint16), ref.view(np.uint16), err_msg=name)


def test_fp32_internal_math_then_one_rounding():
    """bf16 a + bf16 b into bf16 = bf16(fp32(a) + fp32(b)): one rounding of the fp32 sum, not of a bf16 sum."""
    a = rand((128, 256), BF16, seed=5)
    b = (rand((128, 256), BF16, seed=6).astype(np.float32) * 2.0 ** -9).astype(BF16)  # small addends: rounding matters

    def k(x, y):
        tx, ty = load(x), load(y)
        o = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=tx, data2=ty, op=nl.add)
        o32 = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o32, data1=tx, data2=ty, op=nl.add)
        return store(o), store(o32)

    o, o32 = run(k, a, b)
    s32 = a.astype(np.float32) + b.astype(np.float32)
    np.testing.assert_array_equal(o.view(np.uint16), cast(s32, BF16).view(np.uint16))
    np.testing.assert_array_equal(o32, s32)


def test_hbm_output_keeps_shape_and_dtype():
    def k(a):
        o = hbm_out((3, 5, 7), nl.bfloat16)
        t = load(a.reshape((3, 35)), dtype=nl.bfloat16)
        nisa.dma_copy(dst=o.reshape((3, 35)), src=t)
        return o
    a = rand((3, 35), F32, seed=2).reshape(3, 5, 7)
    out = run(k, a)
    assert out.shape == (3, 5, 7) and out.dtype == BF16
    np.testing.assert_array_equal(out.view(np.uint16), a.astype(BF16).view(np.uint16))


def test_view_methods():
    """NkiTensor views (NKI >= 0.5): slice, select, permute, broadcast, expand_dim, reshape_dim, flatten_dims,
    view(dtype) -- each compared with the numpy view of the same data."""
    x = rand((64, 96), F32, seed=8)
    outs = {}

    def k(a):
        t = load(a)                                           # (64, 96)
        t3 = t.reshape((64, 8, 12))
        cases = {
            "slice": t.slice(1, 10, 70, 3),                   # columns 10:70:3
            "select": t3.select(1, 5),                        # (64, 12)
            "permute": t3.permute((0, 2, 1)),                 # (64, 12, 8)
            "broadcast": t[:, 7:8].broadcast(1, 40),          # (64, 40), stride 0
            "expand_dim": t.expand_dim(1),                    # (64, 1, 96)
            "reshape_dim": t.reshape_dim(1, (4, 24)),         # (64, 4, 24)
            "flatten_dims": t3.flatten_dims(1, 2),            # (64, 96)
            "view_u32": t.view(nl.uint32),                    # bit reinterpretation
        }
        res = []
        for name, v in cases.items():
            o = nl.ndarray(tuple(v.shape), dtype=v.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=o, src=v)
            outs[name] = tuple(v.shape)
            res.append(store(o))
        return tuple(res)

    got = dict(zip(["slice", "select", "permute", "broadcast", "expand_dim", "reshape_dim", "flatten_dims",
                    "view_u32"], run(k, x)))
    x3 = x.reshape(64, 8, 12)
    ref = {"slice": x[:, 10:70:3], "select": x3[:, 5, :], "permute": x3.transpose(0, 2, 1),
           "broadcast": np.broadcast_to(x[:, 7:8], (64, 40)), "expand_dim": x[:, None, :],
           "reshape_dim": x.reshape(64, 4, 24), "flatten_dims": x, "view_u32": x.view(np.uint32)}
    for name, r in ref.items():
        assert outs[name] == r.shape, (name, outs[name], r.shape)
        np.testing.assert_array_equal(got[name], r, err_msg=name)


def test_access_pattern_ap():
    """.ap([[stride, count], ...], offset) addresses the underlying storage; for SBUF the first pair is the
    partition step (= the storage's free size)."""
    x = rand((32, 64), F32, seed=9)

    def k(a):
        t = load(a)
        odd = t.ap([[64, 32], [2, 32]], offset=1)             # every odd column
        o = nl.ndarray((32, 32), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=odd)
        return store(o)

    np.testing.assert_array_equal(run(k, x), x[:, 1::2])


@given(src0=st.sampled_from([0, 32, 64, 96]), dst0=st.sampled_from([0, 32, 64, 96]), n=st.sampled_from([1, 16, 32]))
@settings(max_examples=10)
def test_cross_quadrant_movement_n_le_32(src0, dst0, n):
    """n <= 32 partitions may move between quadrants one-to-one (spec 2.1), and land on the right partitions."""
    x = rand((128, 16), F32, seed=src0 + dst0 + n)

    def k(a):
        t = load(a)
        u = nl.ndarray((128, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=u, value=0.0)
        nisa.tensor_copy(dst=u[dst0:dst0 + n], src=t[src0:src0 + n])
        return store(u)

    ref = np.zeros_like(x)
    ref[dst0:dst0 + n] = x[src0:src0 + n]
    np.testing.assert_array_equal(run(k, x), ref)


def test_cross_half_movement_n_le_64():
    x = rand((128, 16), F32, seed=4)

    def k(a):
        t = load(a)
        u = nl.ndarray((128, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=u[0:64], op=nl.copy, data=t[64:128])
        nisa.activation(dst=u[64:128], op=nl.copy, data=t[0:64])
        return store(u)

    np.testing.assert_array_equal(run(k, x), np.concatenate([x[64:], x[:64]]))
