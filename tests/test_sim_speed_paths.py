"""kernels.sim fast paths (issue 12, interpreter speed): each one against the plain numpy / ml_dtypes computation it
replaces, bit for bit.

* dtypes.to_f32 (bf16 -> fp32 by a 16-bit shift) vs ml_dtypes' astype: all 2^16 bf16 patterns.
* dtypes.f32_to_bf16 (round-to-nearest-even on the uint32 bits, NaN -> sign | 0x7FC0) vs ml_dtypes' astype: every
  high half (2^16) with the rounding-relevant low halves (0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF) and random ones.
  (All 2^32 patterns were compared once outside the suite: 0 mismatches, 57 s.)
* dtypes.cast to bf16, dtypes.cast_into, dtypes.full, dtypes.same_dtype_roundtrip: against astype / np.full / the fp32 round trip,
  on arbitrary shapes and strided views (hypothesis).
* isa._rank1 (contraction-size-1 matmul as an outer product + 0.0) vs np.matmul, special values and random.
* isa._disjoint (when nc_matmul may accumulate in place): sound against enumerating the view's offsets.
* NkiTensor.__getitem__ (fast path) vs NkiTensor._getitem (the general rules), results and errors.
* engines.emit's inlined byte spans vs engines.rec / span_of.
* nc_matmul accumulation into a view whose elements alias (zero stride): still out + res, then assigned.
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.sim import dtypes as dt
from kernels.sim import engines, isa, tensor, trace
from kernels.sim.tensor import DynSlice
from sim_helpers import nisa, nl, nl_dt

BF16 = np.dtype(ml_dtypes.bfloat16)
U16, U32 = np.dtype(np.uint16), np.dtype(np.uint32)


def _ref_bf16(f):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # ml_dtypes warns "invalid value" on NaN
        return f.astype(BF16)


def _bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    w = {1: np.dtype(np.uint8), 2: U16, 4: U32}[a.dtype.itemsize]
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(w), np.ascontiguousarray(b).view(w))


ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(U16).view(BF16)


@pytest.fixture(autouse=True)
def _bit_paths_for_every_size(monkeypatch):
    """dtypes takes its bit-level paths from _BITS_MIN elements on (smaller arrays go through ml_dtypes): 0 here,
    so that the small and 0-d arrays below exercise the bit paths too."""
    monkeypatch.setattr(dt, "_BITS_MIN", 0)


def test_threshold_paths_agree(monkeypatch):
    """Around the production threshold (1024 elements): ml_dtypes below, bits from it on; the same results."""
    monkeypatch.setattr(dt, "_BITS_MIN", 1024)
    f = (np.arange(1 << 16, dtype=np.uint32) * np.uint32(65521)).view(np.float32)[:3000]
    for n in (1, 5, 1023, 1024, 3000):
        a = f[:n]
        b = _ref_bf16(a)
        _bits_equal(dt.f32_to_bf16(a), b)
        _bits_equal(dt.to_f32(b), b.astype(np.float32))
        _bits_equal(dt.same_dtype_roundtrip(b), _ref_bf16(b.astype(np.float32)))
        out = np.zeros(n, BF16)
        dt.cast_into(out, a, dt.bfloat16)
        _bits_equal(out, b)


# ------------------------------------------------------------------------------------------------ conversions
def test_to_f32_all_bf16_patterns():
    _bits_equal(dt.to_f32(ALL_BF16), ALL_BF16.astype(np.float32))
    v = ALL_BF16.reshape(256, 256)[::3, 1::2]                   # a strided view
    _bits_equal(dt.to_f32(v), v.astype(np.float32))


@pytest.mark.parametrize("low", [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000])
def test_f32_to_bf16_every_high_half(low):
    u = (np.arange(1 << 16, dtype=np.uint32) << 16) | np.uint32(low)
    f = u.view(np.float32)
    _bits_equal(dt.f32_to_bf16(f), _ref_bf16(f))


def test_f32_to_bf16_random_patterns_and_nans():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    f = u.view(np.float32)
    _bits_equal(dt.f32_to_bf16(f), _ref_bf16(f))
    # every NaN exponent/sign with random payloads, and NaNs next to finite values in one array
    nan = (rng.integers(1, 1 << 23, size=1 << 16, dtype=np.uint64).astype(np.uint32) | np.uint32(0x7F800000))
    nan[::2] |= np.uint32(0x80000000)
    mixed = np.concatenate([nan, u[: 1 << 16]]).view(np.float32)
    _bits_equal(dt.f32_to_bf16(mixed), _ref_bf16(mixed))
    assert set(dt.f32_to_bf16(nan.view(np.float32)).view(U16).tolist()) == {0x7FC0, 0xFFC0}


_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def _f32_views(draw):
    """float32 arrays of random shape and bits (specials included), as strided views part of the time."""
    shape = draw(_shapes)
    n = int(np.prod(shape, dtype=np.int64)) * 4
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1 << 32, size=max(n, 1), dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 1, 0x807FFFFF, 0x3F808000,
                        0x3F818000, 0x7F7FFFFF], np.uint32)
    k = min(len(special), base.size)
    base[rng.choice(base.size, size=k, replace=False)] = special[:k]
    a = base.view(np.float32)
    if draw(st.booleans()) and shape:
        return a[: int(np.prod(shape)) * 4].reshape(shape[:-1] + (shape[-1] * 4,))[..., ::4]
    return a[: int(np.prod(shape, dtype=np.int64))].reshape(shape)


@given(_f32_views())
@settings(max_examples=200, deadline=None)
def test_cast_to_bf16_matches_ml_dtypes(a):
    _bits_equal(dt.cast(a, dt.bfloat16), _ref_bf16(a))
    _bits_equal(dt.f32_to_bf16(a), _ref_bf16(a))


@given(_f32_views())
@settings(max_examples=100, deadline=None)
def test_same_dtype_roundtrip(a):
    _bits_equal(dt.same_dtype_roundtrip(a), dt.cast(a.astype(np.float32), dt.float32))
    b = _ref_bf16(a)
    _bits_equal(dt.same_dtype_roundtrip(b), _ref_bf16(b.astype(np.float32)))


@given(_f32_views(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_cast_into(a, strided_out):
    for d in (dt.bfloat16, dt.float32, dt.tfloat32, dt.float16, dt.int32):
        sdt = dt.float32 if d is dt.tfloat32 else d
        if strided_out and a.ndim:
            out = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), sdt)[..., ::2]
        else:
            out = np.zeros(a.shape, sdt)
        want = np.zeros(a.shape, sdt)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")         # ml_dtypes / fp16 casts of NaN and overflow warn
            want[...] = dt.cast(a, d)
            dt.cast_into(out, a, d)
        _bits_equal(out, want)


def test_cast_into_aliasing_values():
    """values that share memory with out (an fp32 tile reinterpreted as pairs of bf16 halves)."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal(4096).astype(np.float32)
    f[::97] = np.nan
    want = _ref_bf16(f[:2048])
    buf = f.copy()
    out = buf.view(BF16)[:2048]                       # overlaps buf[:1024], which values[:1024] read
    dt.cast_into(out, buf[:2048], dt.bfloat16)
    _bits_equal(out, want)


@pytest.mark.parametrize("bits", [0x7FC00001, 0xFFA00000, 0x3F808000, 0x3F818000, 0x80000000, 0x7F7FFFFF])
def test_zero_d_arrays(bits):
    f = np.array(bits, np.uint32).view(np.float32).reshape(())
    _bits_equal(dt.cast(f, dt.bfloat16), _ref_bf16(f))
    b = _ref_bf16(f)
    _bits_equal(dt.to_f32(b), b.astype(np.float32))
    _bits_equal(dt.same_dtype_roundtrip(b), _ref_bf16(b.astype(np.float32)))
    _bits_equal(dt.same_dtype_roundtrip(f), f.copy())


def test_same_dtype_roundtrip_all_bf16_patterns():
    _bits_equal(dt.same_dtype_roundtrip(ALL_BF16), _ref_bf16(ALL_BF16.astype(np.float32)))


@pytest.mark.parametrize("fill", [np.nan, 4, 0.0, -0.0, 1.5, -np.inf, 3.0e38])
@pytest.mark.parametrize("dtype", [dt.bfloat16, dt.float32, dt.float16, dt.int32, dt.uint8])
def test_full(fill, dtype):
    if dtype.kind in "iu" and not float(fill).is_integer():
        return
    if dtype.kind in "iu" and abs(fill) > 255:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.full(1000, fill, dtype=dtype)
        got = dt.full(1000, fill, dtype)
    _bits_equal(got, want)


# ------------------------------------------------------------------------------------------------ matmul paths
_SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-40, 3e38, -3e38, 1.5e-38, 2.5,
                     -7.125e-20, 65504.0, 0.1], np.float32)


def _matmul_ref(s, mv):
    with np.errstate(all="ignore"):
        return np.matmul(s.T, mv)


def test_rank1_special_values():
    s = _SPECIAL.reshape(1, -1)
    with np.errstate(all="ignore"):
        _bits_equal(isa._rank1(s, s), _matmul_ref(s, s))


@given(m=st.integers(1, 128), n=st.integers(1, 512), seed=st.integers(0, 2 ** 31), scale=st.sampled_from(
    [1.0, 1e-20, 1e20, 1e-38]))
@settings(max_examples=60, deadline=None)
def test_rank1_random(m, n, seed, scale):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((1, m)) * scale).astype(np.float32)
    mv = (rng.standard_normal((1, n)) * scale).astype(np.float32)
    s[0, rng.integers(0, m)] = rng.choice(_SPECIAL)
    with np.errstate(all="ignore"):
        _bits_equal(isa._rank1(s, mv), _matmul_ref(s, mv))


def test_rank1_declines_nan_operands():
    s = np.array([[1.0, np.nan]], np.float32)
    assert isa._rank1(s, np.ones((1, 3), np.float32)) is None
    assert isa._rank1(np.ones((1, 3), np.float32), s) is None


def _disjoint_brute(shape, strides):
    offs = np.zeros((), np.int64)
    for c, s in zip(shape, strides):
        offs = np.add.outer(offs, np.arange(c, dtype=np.int64) * s)
    offs = offs.reshape(-1)
    return len(np.unique(offs)) == offs.size


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 40)), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_disjoint(dims):
    shape = tuple(c for c, _ in dims)
    strides = tuple(s for _, s in dims)
    # sound (True only when no two elements share memory); it may say False for an interleaved disjoint view, which
    # only costs the in-place shortcut
    if isa._disjoint(shape, strides):
        assert _disjoint_brute(shape, strides)


def test_disjoint_on_tile_layouts():
    assert isa._disjoint((128, 512), (512, 1)) and isa._disjoint((128, 4, 128), (2048, 512, 1))
    assert isa._disjoint((64, 3, 100), (2048, 100, 1)) and isa._disjoint((128, 1), (512, 0))
    assert not isa._disjoint((128, 4), (512, 0)) and not isa._disjoint((128, 3, 4), (512, 2, 1))


@pytest.mark.parametrize("accumulate", [True, None])
def test_matmul_accumulate_into_aliasing_view(accumulate):
    """A PSUM dst whose free dim has stride 0 (every column is one element): accumulation computes out + res for
    the whole view, then assigns (the last column's sum wins), as the general path does (nc_matmul adds in place
    only on views isa._disjoint accepts)."""
    from kernels.sim import nki

    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal((8, 3)).astype(np.float32)

    @nki.jit
    def k(a_h, b_h):
        out = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        at = nl.ndarray((8, 4), dtype=nl.float32, buffer=nl.sbuf)
        bt = nl.ndarray((8, 3), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=at, src=a_h)
        nisa.dma_copy(dst=bt, src=b_h)
        ps = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps.broadcast(1, 3), stationary=at, moving=bt, accumulate=False)
        nisa.nc_matmul(dst=ps.broadcast(1, 3), stationary=at, moving=bt, accumulate=accumulate)
        res = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=ps)
        nisa.dma_copy(dst=out, src=res)
        return out

    r = np.matmul(a.T, b)
    want = (r[:, 2] + r[:, 2]).reshape(4, 1)          # first write leaves column 2's value; then out + res, last wins
    _bits_equal(np.asarray(k(a, b)), want.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("layout", ["bank_slice", "strided_rows", "inner_stride_2", "vector_m1", "vector_n1", "3d"])
@pytest.mark.parametrize("accumulate", [False, None])
def test_matmul_overwrite_straight_into_psum(dtype, layout, accumulate):
    """nc_matmul overwrites (accumulate=False, or None on never-matmul-written elements) with the product written
    straight into the PSUM view when isa._gemm_out_ok allows it (C-blasable 2-d view), through a temporary
    otherwise: the same bits as np.matmul into a fresh array either way, close to the float64 product, the rest of
    the PSUM tile untouched (still NaN), and the elements flagged as matmul-written (accumulate=True then adds)."""
    from kernels.sim import nki

    rng = np.random.default_rng(3)
    (m, n), kk = {"vector_m1": (1, 40), "vector_n1": (24, 1)}.get(layout, (24, 40)), 17
    a = rng.standard_normal((kk, m)).astype(np.float32).astype(dtype)
    b = rng.standard_normal((kk, n)).astype(np.float32).astype(dtype)
    a[0, 0], b[1, 0] = -0.0, np.inf if m > 1 and n > 1 else b[1, 0]
    idx = {"bank_slice": (slice(0, m), 1, slice(0, n)), "strided_rows": (slice(0, m), 2, slice(10, 10 + n)),
           "inner_stride_2": (slice(0, m), 0, slice(0, 2 * n, 2)), "vector_m1": (slice(0, m), 2, slice(3, 3 + n)),
           "vector_n1": (slice(0, m), 1, slice(5, 5 + n)), "3d": (slice(0, m), 0, slice(0, n))}[layout]

    def sl(ps):                                                           # the PSUM view of this layout
        v = ps[idx]
        return v.reshape((m, 4, n // 4)) if layout == "3d" else v

    @nki.jit
    def k(a_h, b_h):
        out = nl.ndarray((m, 3, 128), dtype=nl.float32, buffer=nl.shared_hbm)
        at = nl.ndarray((kk, m), dtype=nl_dt(dtype), buffer=nl.sbuf)
        bt = nl.ndarray((kk, n), dtype=nl_dt(dtype), buffer=nl.sbuf)
        nisa.dma_copy(dst=at, src=a_h)
        nisa.dma_copy(dst=bt, src=b_h)
        ps = nl.ndarray((m, 3, 128), dtype=nl.float32, buffer=nl.psum)
        d = sl(ps)
        nisa.nc_matmul(dst=d, stationary=at, moving=bt, accumulate=accumulate)
        nisa.nc_matmul(dst=d, stationary=at, moving=bt, accumulate=True)      # needs the matmul-written flags
        res = nl.ndarray((m, 3, 128), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=ps)
        nisa.dma_copy(dst=out, src=res)
        return out

    got = np.asarray(k(a, b))
    r = np.matmul(a.astype(np.float32).T, b.astype(np.float32))           # fresh C-contiguous result
    r = r + r
    want = np.full((m, 3, 128), np.nan, np.float32)
    want[idx] = r
    _bits_equal(got, want)
    ref = 2 * (a.astype(np.float64).T @ b.astype(np.float64))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[idx][fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_gemm_out_ok():
    f = np.zeros((8, 3, 64), np.float32)
    assert isa._gemm_out_ok(f[:, 1, :], 8, 64) and isa._gemm_out_ok(f[:, 0, 0:10], 8, 10)
    assert not isa._gemm_out_ok(f[:, 0, ::2], 8, 32)                       # inner stride 2
    assert not isa._gemm_out_ok(f[0:1, 0, :], 1, 64) and not isa._gemm_out_ok(f[:, 0, 0:1], 8, 1)
    assert not isa._gemm_out_ok(f[:, 0:2, 0:4], 8, 8)                      # 3-d view
    assert not isa._gemm_out_ok(f[:, 0, :].T, 64, 8)                       # column-major


def test_disjoint_memo_matches_definition():
    isa._disjoint.cache_clear()
    for n, (shape, strides) in enumerate((((128, 512), (512, 1)), ((128, 4), (512, 0)), ((4, 3, 2), (6, 2, 1)),
                                          ((4, 3), (1, 1)))):
        want = isa._disjoint_of(shape, strides)
        assert isa._disjoint(shape, strides) == want                       # computed and stored
        assert isa._disjoint.cache_info().misses == n + 1
        assert isa._disjoint(shape, strides) == want                       # from the memo
        assert isa._disjoint.cache_info().hits == n + 1
    assert [isa._disjoint_of(*a) for a in (((4, 3), (1, 1)), ((128, 4), (512, 0)))] == [False, False]


def test_clear_mm_flags_helper():
    """engines.clear_mm_flags: every later accumulate=True matmul into an element written by another instruction
    is refused (the flags were cleared), for each instruction that used the inlined two-line pattern."""
    from kernels.sim import nki, ConstraintError

    writers = {
        "tensor_copy": lambda d, s_: nisa.tensor_copy(dst=d, src=s_),
        "memset": lambda d, s_: nisa.memset(dst=d, value=0.0),
        "activation_copy": lambda d, s_: nisa.activation(dst=d, op=nl.copy, data=s_),
        "transpose": lambda d, s_: nisa.nc_transpose(dst=d, data=s_, engine=nisa.engine.vector),
    }
    for wname, w in writers.items():
        @nki.jit
        def k(a_h, w=w):
            out = nl.ndarray((32, 32), dtype=nl.float32, buffer=nl.shared_hbm)
            at = nl.ndarray((32, 32), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=at, src=a_h)
            ps = nl.ndarray((32, 32), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_matmul(dst=ps, stationary=at, moving=at, accumulate=False)
            w(ps[0:32, 0:32], at)
            nisa.nc_matmul(dst=ps, stationary=at, moving=at, accumulate=True)
            res = nl.ndarray((32, 32), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res, src=ps)
            nisa.dma_copy(dst=out, src=res)
            return out
        with pytest.raises(ConstraintError, match="matmul.accumulate"):
            k(np.ones((32, 32), np.float32))


@pytest.mark.parametrize("view", ["bank_slice", "transposed", "step2", "3d_slice"])
def test_bf16_bits_on_strided_views(view):
    """dtypes._bf16_bits copies a non-C-contiguous input to C order first: the same bits as ml_dtypes' conversion of
    the view (NaN -> sign | 0x7FC0, ties to even, overflow to Inf), and the input left unchanged."""
    u = (np.arange(128 * 3 * 160, dtype=np.uint64) * 2654435761 % (1 << 32)).astype(U32)
    u[:8] = [0x7F800001, 0xFF800001, 0x7FC00000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x80000000, 0x00008000]
    big = u.view(np.float32).reshape(128, 3, 160)
    v = {"bank_slice": big[:, 1, :], "transposed": big[:, 0, 0:128].T, "step2": big[:, 0, ::2],
         "3d_slice": big[:, 0:2, 0:100]}[view]
    assert not v.flags.c_contiguous
    before = v.copy()
    got = dt._bf16_bits(v).astype(U16).view(BF16)
    _bits_equal(got, _ref_bf16(np.ascontiguousarray(v)))
    _bits_equal(v, before)
    out = np.zeros(v.shape, BF16)
    dt.cast_into(out, v, dt.bfloat16)
    _bits_equal(out, _ref_bf16(np.ascontiguousarray(v)))


# ------------------------------------------------------------------------------------------------ views, trace
def _outcome(f, key):
    try:
        v = f(key)
        return ("ok", v.shape, v.strides, v.offset)
    except Exception as e:              # noqa: BLE001  (the two paths must raise the same thing)
        return ("err", type(e).__name__, str(e))


_index = st.one_of(
    st.integers(-8, 8),
    st.builds(slice, st.none() | st.integers(-8, 9), st.none() | st.integers(-8, 9),
              st.sampled_from([None, None, 1, 2, 3, 0, -1])),
    st.just(Ellipsis),
    st.integers(0, 3).map(np.int64),
    st.builds(DynSlice, st.integers(0, 3), st.integers(1, 3)),
)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), buf=st.sampled_from(["sbuf", "hbm"]),
       key=st.lists(_index, max_size=5), as_tuple=st.booleans(), pre=st.booleans())
@settings(max_examples=400, deadline=None)
def test_getitem_fast_path_matches_general(shape, buf, key, as_tuple, pre):
    t = tensor.allocate(shape, np.float32, buf)
    if pre and shape[0] > 1:
        t = t._getitem((slice(1, None),))
    k = tuple(key) if (as_tuple or len(key) != 1) else key[0]
    assert _outcome(t.__getitem__, k) == _outcome(t._getitem, k)


@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple), buf=st.sampled_from(["sbuf", "hbm"]),
       key=st.lists(st.one_of(st.integers(0, 5), st.builds(slice, st.none() | st.integers(0, 5),
                                                            st.none() | st.integers(1, 6),
                                                            st.sampled_from([None, 1, 2]))), max_size=4))
@settings(max_examples=200, deadline=None)
def test_emit_spans_match_rec(shape, buf, key):
    t = tensor.allocate(shape, np.float32, buf)
    try:
        v = t._getitem(tuple(key))
    except IndexError:
        return
    with trace.record() as tr:
        engines.emit("vector", "tensor_copy", (("dst", v), ("src", t), ("bias", None)))
    assert list(tr.instructions[0].operands) == [engines.rec("dst", v, "tensor_copy"),
                                                 engines.rec("src", t, "tensor_copy")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_activation_copy_and_transpose_fast_paths(dtype):
    """activation(copy) into data's dtype and the TensorE transpose: the general path's bits, i.e. the values
    widened to fp32 by ml_dtypes and cast back (bf16 NaNs become sign | 0x7FC0; fp32 bits, signaling NaNs
    included, unchanged). For bf16 also the path with a [P,1] scale tile of ones (x * 1.0 is exact)."""
    from kernels.sim import nki

    if dtype == "bfloat16":
        x = ALL_BF16.reshape(128, 512)
    else:
        rng = np.random.default_rng(5)
        x = rng.integers(0, 1 << 32, size=(128, 512), dtype=np.uint64).astype(np.uint32).view(np.float32)
    ndt = getattr(nl, dtype)
    sdt = x.dtype

    @nki.jit
    def k(x_h, ones_h):
        fast = nl.ndarray((128, 512), dtype=ndt, buffer=nl.shared_hbm)
        slow = nl.ndarray((128, 512), dtype=ndt, buffer=nl.shared_hbm)
        tr = nl.ndarray((128, 128), dtype=ndt, buffer=nl.shared_hbm)
        xt = nl.ndarray((128, 512), dtype=ndt, buffer=nl.sbuf)
        ones = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x_h)
        nisa.dma_copy(dst=ones, src=ones_h)
        a = nl.ndarray((128, 512), dtype=ndt, buffer=nl.sbuf)
        b = nl.ndarray((128, 512), dtype=ndt, buffer=nl.sbuf)
        nisa.activation(dst=a, op=nl.copy, data=xt)
        nisa.activation(dst=b, op=nl.copy, data=xt, scale=ones)
        nisa.dma_copy(dst=fast, src=a)
        nisa.dma_copy(dst=slow, src=b)
        tp = nl.ndarray((128, 128), dtype=ndt, buffer=nl.psum)
        nisa.nc_transpose(dst=tp, data=xt[:, 128:256])
        t_sb = nl.ndarray((128, 128), dtype=ndt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t_sb, src=tp)
        nisa.dma_copy(dst=tr, src=t_sb)
        return fast, slow, tr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, slow, tr = k(x, np.ones((128, 1), np.float32))
        want = x.astype(np.float32).astype(sdt)
        want_t = np.ascontiguousarray(x[:, 128:256].astype(np.float32).T).astype(sdt)
    _bits_equal(np.asarray(fast), want)
    _bits_equal(np.asarray(tr), want_t)
    if dtype == "bfloat16":
        _bits_equal(np.asarray(slow), want)
