"""Every trn1 (NeuronCore-v2) rule the interpreter enforces has a test here that breaks it and expects a
ConstraintError whose message names the instruction (and, where the wording is stable, the rule).

Rules and their sources: spec sections 2.1-2.8 and the checklist in section 6 of /work/shared/docs/nki-spec.md
(from the official nki.isa docs). A neighbouring legal call is run first where that makes the test sharper
(the breaking call then differs from a passing one in exactly the broken rule).
"""
from __future__ import annotations

import numpy as np
import pytest

from sim_helpers import (F32, ConstraintError, hbm_out, load, nisa, nki, nl, rand, run, store)
from kernels.sim import trace

X = rand((128, 512), F32, seed=0)


def breaks(match, kernel, *args):
    """Run kernel(*args) and require a ConstraintError whose message matches the regex (case-insensitive)."""
    with pytest.raises(ConstraintError, match="(?i)" + match):
        run(kernel, *args)


def sb(shape, dt=None):
    return nl.ndarray(shape, dtype=dt or nl.float32, buffer=nl.sbuf)


def ps(shape, dt=None):
    return nl.ndarray(shape, dtype=dt or nl.float32, buffer=nl.psum)


# ---------------------------------------------------------------- partitions
def test_more_than_128_partitions():
    def k():
        t = sb((129, 4))
        nisa.memset(dst=t, value=0.0)
        return store(t[0:1, :])
    breaks("128|partition", k)


@pytest.mark.parametrize("start,n,legal", [
    (0, 128, True), (0, 65, True), (32, 65, False), (1, 100, False),         # 64 < n <= 128: start 0
    (64, 64, True), (0, 64, True), (32, 64, False), (32, 33, False),          # 32 < n <= 64: start 0 or 64
    (96, 32, True), (32, 32, True), (64, 1, True), (16, 32, False), (8, 8, False),   # n <= 32: 0/32/64/96
])
def test_partition_start_alignment(start, n, legal):
    def k(a):
        t = load(a)
        u = sb((128, 512))
        nisa.memset(dst=u, value=0.0)
        nisa.tensor_copy(dst=u[start:start + n, :], src=t[start:start + n, :])
        return store(u)
    if legal:
        out = run(k, X)
        ref = np.zeros_like(X)
        ref[start:start + n] = X[start:start + n]
        np.testing.assert_array_equal(out, ref)
    else:
        breaks("partition", k, X)


# ---------------------------------------------------------------- nc_matmul
def _mm(stat_shape, mov_shape, dst_shape, sdt=None, mdt=None, ddt=None, dst_view=None, **kw):
    def k():
        s, m = sb(stat_shape, sdt or nl.bfloat16), sb(mov_shape, mdt or nl.bfloat16)
        nisa.memset(dst=s, value=1.0)
        nisa.memset(dst=m, value=1.0)
        d = ps(dst_shape, ddt)
        dv = d if dst_view is None else dst_view(d)
        nisa.nc_matmul(dst=dv, stationary=s, moving=m, **kw)
        o = sb(tuple(dv.shape))
        nisa.tensor_copy(dst=o, src=dv)
        return store(o)
    return k


def test_matmul_legal_limits_pass():
    out = run(_mm((128, 128), (128, 512), (128, 512)))
    np.testing.assert_array_equal(out, np.full((128, 512), 128.0, np.float32))


def test_matmul_contraction_mismatch():
    breaks("nc_matmul", _mm((128, 64), (64, 64), (64, 64)))


def test_matmul_stationary_free_over_128():
    breaks("nc_matmul|stationary", _mm((64, 129), (64, 64), (128, 64)))


def test_matmul_moving_free_over_512():
    breaks("nc_matmul", _mm((64, 64), (64, 513), (64, 513)))


def test_matmul_dst_crosses_psum_bank():
    """fp32 [*, 512] fits one 2 KiB bank only when bank-aligned: ps[:, 256:768] straddles two banks."""
    run(_mm((64, 64), (64, 512), (64, 1024), dst_view=lambda d: d[:, 512:1024]))      # aligned: legal
    breaks("nc_matmul|bank", _mm((64, 64), (64, 512), (64, 1024), dst_view=lambda d: d[:, 256:768]))


def test_matmul_dst_not_fp32_on_gen2():
    breaks("nc_matmul", _mm((64, 64), (64, 64), (64, 64), ddt=nl.bfloat16))


def test_matmul_dst_not_psum():
    def k():
        s, m = sb((64, 64), nl.bfloat16), sb((64, 64), nl.bfloat16)
        nisa.memset(dst=s, value=1.0)
        nisa.memset(dst=m, value=1.0)
        d = sb((64, 64))
        nisa.nc_matmul(dst=d, stationary=s, moving=m)
        return store(d)
    breaks("nc_matmul", k)


@pytest.mark.parametrize("sdt,mdt", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_matmul_fp32_must_pair(sdt, mdt):
    run(_mm((64, 64), (64, 64), (64, 64), sdt=nl.float32, mdt=nl.float32))               # fp32 x fp32 legal
    breaks("nc_matmul", _mm((64, 64), (64, 64), (64, 64), sdt=getattr(nl, sdt), mdt=getattr(nl, mdt)))


def test_matmul_perf_mode_refused_on_trn1():
    breaks("nc_matmul|perf", _mm((64, 64), (64, 64), (64, 64), perf_mode=nisa.matmul_perf_mode.double_row))


def test_matmul_accumulate_true_into_unwritten_psum():
    """accumulate=True on PSUM no matmul wrote is undefined on hardware: refused (spec checklist 2)."""
    breaks("nc_matmul|accumulate", _mm((64, 64), (64, 64), (64, 64), accumulate=True))


def test_tensor_engine_transpose_over_128_and_vector_over_32():
    def k_te():
        t = sb((128, 129))
        nisa.memset(dst=t, value=1.0)
        d = ps((129, 128))
        nisa.nc_transpose(dst=d, data=t, engine=nisa.engine.tensor)
        return store(t[:, 0:1])

    def k_ve():
        t = sb((32, 33))
        nisa.memset(dst=t, value=1.0)
        d = sb((33, 32))
        nisa.nc_transpose(dst=d, data=t, engine=nisa.engine.vector)
        return store(d[0:1, :])
    breaks("transpose|128|partition", k_te)
    breaks("transpose", k_ve)


# ---------------------------------------------------------------- GpSimd / DMA never touch PSUM
def test_iota_into_psum():
    def k():
        d = ps((32, 16))
        nisa.iota(dst=d, pattern=[[1, 16]], offset=0, channel_multiplier=16)
        return store(sb((1, 1)))
    breaks("iota", k)


def test_affine_select_psum_operands():
    def k_src(a):
        p = ps((128, 64))
        nisa.tensor_copy(dst=p, src=load(a[:, 0:64]))
        o = sb((128, 64))
        nisa.affine_select(dst=o, pattern=[[-1, 64]], offset=0, channel_multiplier=1, on_true_tile=p,
                           on_false_value=0.0, cmp_op=nl.greater_equal)
        return store(o)

    def k_dst(a):
        o = ps((128, 64))
        nisa.affine_select(dst=o, pattern=[[-1, 64]], offset=0, channel_multiplier=1, on_true_tile=load(a[:, 0:64]),
                           on_false_value=0.0, cmp_op=nl.greater_equal)
        return store(sb((1, 1)))
    breaks("affine_select", k_src, X)
    breaks("affine_select", k_dst, X)


def test_int32_tensor_tensor_in_psum_falls_back_to_vector():
    """int32 tensor_tensor defaults to GpSimd, but "the automatic GpSimd dispatch for int32/uint32 falls back to
    Vector Engine when any operand resides in PSUM" (nki.isa.tensor_tensor): fp32 math, so the sum is exact for
    these small values and the instruction runs on the Vector engine. Asking for GpSimd explicitly is refused."""
    ai = np.arange(128 * 16, dtype=np.int32).reshape(128, 16)

    def k(a, eng=None):
        t = load(a)
        p = ps((128, 16), nl.int32)
        nisa.tensor_copy(dst=p, src=t)
        o = sb((128, 16), nl.int32)
        nisa.tensor_tensor(dst=o, data1=p, data2=t, op=nl.add, **({"engine": eng} if eng else {}))
        return store(o)
    with trace.record() as tr:
        out = run(k, ai)
    np.testing.assert_array_equal(out, 2 * ai)
    assert [i.engine for i in tr.instructions if i.op == "tensor_tensor"] == ["vector"]
    breaks("tensor_tensor", lambda a: k(a, nisa.engine.gpsimd), ai)


def test_dma_copy_psum_endpoints():
    def k_src():
        p = ps((32, 16))
        o = hbm_out((32, 16), nl.float32)
        nisa.dma_copy(dst=o, src=p)
        return o

    def k_dst(a):
        p = ps((32, 16))
        nisa.dma_copy(dst=p, src=a[0:32, 0:16])
        return store(sb((1, 1)))
    breaks("dma_copy", k_src)
    breaks("dma_copy", k_dst, X)


def test_dma_element_count_mismatch():
    def k(a):
        t = sb((128, 32))
        nisa.dma_copy(dst=t, src=a[:, 0:64])
        return store(t)
    breaks("dma_copy", k, X)


# ---------------------------------------------------------------- Scalar engine
def test_activation_scalar_bias_refused_on_trn1():
    def k(a):
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]), bias=0.5)
        return store(o)
    breaks("activation.*bias|bias.*activation", k, X)


def test_activation_bias_must_be_p_by_1():
    def k(a):
        b = sb((128, 2))
        nisa.memset(dst=b, value=0.0)
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]), bias=b)
        return store(o)
    breaks("activation|bias", k, X)


def test_activation_reduce_op_must_be_add_on_v2():
    def k(a):
        o, r = sb((128, 64)), sb((128, 1))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]), reduce_op=nl.maximum, reduce_res=r,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
        return store(r)
    breaks("activation|reduce", k, X)


def test_activation_reduce_legacy_api_op_must_be_add():
    def k(a):
        o, r = sb((128, 64)), sb((128, 1))
        nisa.activation_reduce(dst=o, op=nl.exp, data=load(a[:, 0:64]), reduce_op=nl.maximum, reduce_res=r)
        return store(r)
    breaks("activation|reduce", k, X)


def test_activation_reciprocal_takes_no_bias_on_v2():
    def k(a):
        b = sb((128, 1))
        nisa.memset(dst=b, value=0.0)
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.reciprocal, data=load(a[:, 0:64]), bias=b)
        return store(o)
    breaks("activation|reciprocal|bias", k, X)


def test_tensor_copy_on_scalar_engine():
    def k(a):
        o = sb((128, 64))
        nisa.tensor_copy(dst=o, src=load(a[:, 0:64]), engine=nisa.engine.scalar)
        return store(o)
    breaks("tensor_copy", k, X)


# ---------------------------------------------------------------- Vector engine
def test_rng_only_on_vector_engine():
    def k():
        o = sb((128, 64), nl.uint32)
        nisa.rng(dst=o, engine=nisa.engine.gpsimd)
        return store(o)
    breaks("rng", k)


@pytest.mark.parametrize("case", ["wide_tile", "bf16_tile", "full_tile"])
def test_tensor_scalar_operand_kinds(case):
    """operand0 must be an fp32 scalar or an fp32 [P,1] tile."""
    def k(a):
        shape, dt = {"wide_tile": ((128, 2), nl.float32), "bf16_tile": ((128, 1), nl.bfloat16),
                     "full_tile": ((128, 64), nl.float32)}[case]
        v = sb(shape, dt)
        nisa.memset(dst=v, value=1.0)
        o = sb((128, 64))
        nisa.tensor_scalar(dst=o, data=load(a[:, 0:64]), op0=nl.multiply, operand0=v)
        return store(o)
    breaks("tensor_scalar", k, X)


def test_tensor_tensor_partition_mismatch():
    def k(a):
        o = sb((64, 64))
        nisa.tensor_tensor(dst=o, data1=load(a[0:64, 0:64]), data2=load(a[0:32, 0:64]), op=nl.add)
        return store(o)
    breaks("tensor_tensor", k, X)


def test_tensor_tensor_element_count_mismatch():
    def k(a):
        o = sb((64, 64))
        nisa.tensor_tensor(dst=o, data1=load(a[0:64, 0:64]), data2=load(a[0:64, 0:32]), op=nl.add)
        return store(o)
    breaks("tensor_tensor", k, X)


def test_tensor_tensor_both_inputs_psum():
    def k(a):
        p1, p2 = ps((64, 64)), ps((64, 64))
        nisa.tensor_copy(dst=p1, src=load(a[0:64, 0:64]))
        nisa.tensor_copy(dst=p2, src=load(a[0:64, 0:64]))
        o = sb((64, 64))
        nisa.tensor_tensor(dst=o, data1=p1, data2=p2, op=nl.add)
        return store(o)
    breaks("tensor_tensor", k, X)


def test_tensor_reduce_over_partition_axis():
    """axis 0 (partitions) is never a tensor_reduce axis; dst keeps 128 partitions so only the axis rule breaks."""
    def k(a):
        o = sb((128, 64))
        nisa.tensor_reduce(dst=o, op=nl.add, data=load(a[:, 0:64]), axis=0)
        return store(o)
    breaks("tensor_reduce.*axis|axis.*tensor_reduce", k, X)


def test_tensor_reduce_non_trailing_axes():
    def k(a):
        o = sb((128, 8))
        nisa.tensor_reduce(dst=o, op=nl.add, data=load(a[:, 0:64]).reshape((128, 8, 8)), axis=(1,))
        return store(o)
    breaks("tensor_reduce", k, X)


def test_bn_stats_over_512_elements():
    def k():
        t = sb((128, 513))
        nisa.memset(dst=t, value=1.0)
        s = sb((128, 6))
        nisa.bn_stats(dst=s, data=t)
        return store(s)
    breaks("bn_stats", k)


# ---------------------------------------------------------------- v3/v4-only instructions on trn1
def test_exponential_refused_on_trn1():
    def k(a):
        o = sb((128, 64))
        nisa.exponential(dst=o, src=load(a[:, 0:64]))
        return store(o)
    breaks("exponential", k, X)


def test_range_select_refused_on_trn1():
    def k(a):
        o = sb((128, 64))
        b = sb((128, 1))
        nisa.memset(dst=b, value=10.0)
        nisa.range_select(dst=o, on_true_tile=load(a[:, 0:64]), comp_op0=nl.greater_equal, comp_op1=nl.less,
                          bound0=b, bound1=b)
        return store(o)
    breaks("range_select", k, X)


def test_dma_transpose_on_trn1_only_hwdge_refused():
    """dma_transpose exists on trn1: only the hardware-DGE mode is NeuronCore-v3+ ("Hardware based DGE is only
    supported for NeuronCore-v3 or newer", nki.isa.dma_transpose); the 2-D permutation is (1, 0)."""
    def k(a, mode=None):
        o = sb((64, 128))
        nisa.dma_transpose(dst=o, src=a[:, 0:64], **({"dge_mode": mode} if mode else {}))
        return store(o)
    np.testing.assert_array_equal(run(k, X), X[:, 0:64].T)
    breaks("platform", lambda a: k(a, nisa.dge_mode.hwdge), X)


# ---------------------------------------------------------------- platform switch
def test_trn2_override_relaxes_scalar_bias(monkeypatch):
    def k(a):
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]), bias=0.5)
        return store(o)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    out = run(k, X)
    np.testing.assert_allclose(out, np.exp(X[:, 0:64].astype(np.float64) + 0.5), rtol=2.0 ** -17)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    breaks("activation.*bias|bias.*activation", k, X)


def test_error_message_names_operand_and_limit():
    """The message names the instruction, the operand and the limit (here: moving free size 513 > 512)."""
    with pytest.raises(ConstraintError) as ei:
        run(_mm((64, 64), (64, 513), (64, 513)))
    msg = str(ei.value)
    assert "nc_matmul" in msg and "moving" in msg and "512" in msg, msg
    assert isinstance(ei.value, ValueError)


def test_bf16_is_accepted_where_fp32_pairs():
    """Sanity of the pairing rule's other side: bf16 x bf16 is legal."""
    out = run(_mm((32, 16), (32, 8), (16, 8), sdt=nl.bfloat16, mdt=nl.bfloat16))
    np.testing.assert_array_equal(out, np.full((16, 8), 32.0, np.float32))


# ---------------------------------------------------------------- operand kinds, dtypes, ranks, buffers
def test_activation_scale_tile_must_be_fp32():
    def k(a):
        sc = sb((128, 1), nl.bfloat16)
        nisa.memset(dst=sc, value=1.0)
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]), scale=sc)
        return store(o)
    breaks("activation|scale", k, X)


def test_memset_value_type_must_match_int_dst():
    def k():
        t = sb((128, 8), nl.int32)
        nisa.memset(dst=t, value=1.5)
        return store(t)
    breaks("memset", k)


def test_bitvec_op_needs_integer_operands():
    def k(a):
        t = load(a[:, 0:64])
        o = sb((128, 64))
        nisa.tensor_tensor(dst=o, data1=t, data2=t, op=nl.bitwise_and)
        return store(o)
    breaks("tensor_tensor|bitwise|integer", k, X)


def test_tensor_scalar_ops_same_class():
    ai = np.arange(128 * 8, dtype=np.int32).reshape(128, 8)

    def k(a):
        o = sb((128, 8), nl.int32)
        nisa.tensor_scalar(dst=o, data=load(a), op0=nl.add, operand0=1.0, op1=nl.bitwise_and, operand1=1)
        return store(o)
    breaks("tensor_scalar", k, ai)


@pytest.mark.parametrize("role", ["stationary", "moving"])
def test_matmul_operands_must_be_sbuf(role):
    def k():
        s = sb((64, 64), nl.bfloat16)
        nisa.memset(dst=s, value=1.0)
        p = ps((64, 64), nl.bfloat16)
        nisa.memset(dst=p, value=1.0)
        d = ps((64, 64))
        kw = {"stationary": s, "moving": s}
        kw[role] = p
        nisa.nc_matmul(dst=d, **kw)
        return store(s)
    breaks("nc_matmul", k)


def test_tensor_engine_transpose_dst_must_be_psum():
    def k(a):
        d = sb((64, 128))
        nisa.nc_transpose(dst=d, data=load(a[:, 0:64]), engine=nisa.engine.tensor)
        return store(d)
    breaks("nc_transpose", k, X)


def test_onchip_tensor_of_one_dim_is_one_element_per_partition():
    """A 1-D on-chip tensor is its partition dim with one element each: the nki.isa.register_load/register_store
    pages allocate ``nl.ones([1], dtype=nl.int32, buffer=nl.sbuf)`` / ``nl.ndarray([1], ...)``."""
    def k():
        t = sb((128,))
        nisa.memset(dst=t, value=3.0)
        o = nl.ndarray((128,), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=t)
        return o
    np.testing.assert_array_equal(run(k), np.full(128, 3.0, np.float32))


def test_partition_dim_stride_refused():
    def k(a):
        t = load(a[:, 0:8])
        u = sb((64, 8))
        nisa.tensor_copy(dst=u, src=t[0:128:2, :])
        return store(u)
    breaks("partition|stride", k, X)


def test_instruction_element_count_mismatch():
    def k_act(a):
        o = sb((128, 32))
        nisa.activation(dst=o, op=nl.exp, data=load(a[:, 0:64]))
        return store(o)

    def k_red(a):
        o = sb((128, 2))
        nisa.tensor_reduce(dst=o, op=nl.add, data=load(a[:, 0:64]), axis=1)
        return store(o)
    breaks("activation", k_act, X)
    breaks("tensor_reduce", k_red, X)


def test_iota_pattern_must_cover_dst():
    def k():
        t = sb((128, 64), nl.int32)
        nisa.iota(dst=t, pattern=[[1, 32]], offset=0, channel_multiplier=0)
        return store(t)
    breaks("iota", k)


def test_gpsimd_tensor_scalar_never_touches_psum():
    def k(a):
        o = ps((128, 64))
        nisa.tensor_scalar(dst=o, data=load(a[:, 0:64]), op0=nl.add, operand0=1.0, engine=nisa.engine.gpsimd)
        return store(sb((1, 1)))
    breaks("tensor_scalar|gpsimd|psum", k, X)


def test_kernel_outputs_are_hbm_tensors():
    """A kernel returns HBM tensors: nl.shared_hbm or nl.hbm allocations (the nki.jit page's own example returns an
    ``nl.hbm`` tensor) or an input it updated in place; an on-chip tile is refused, naming the output."""
    def k_hbm(a):
        o = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.hbm)
        nisa.dma_copy(dst=o, src=load(a[:, 0:8]))
        return o
    np.testing.assert_array_equal(run(k_hbm, X), X[:, 0:8])
    with pytest.raises(ValueError, match="rule output.buffer"):
        run(lambda a: load(a[:, 0:8]), X)


def test_out_of_bounds_slice_is_an_error_not_a_clamp():
    def k(a):
        t = sb((128, 8))
        nisa.dma_copy(dst=t, src=a[100:228, 0:8])
        return store(t)
    with pytest.raises((IndexError, ConstraintError), match="100|228|bounds"):
        run(k, X)


def test_trn2_override_relaxes_rng_engine_and_bf16_matmul_dst(monkeypatch):
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    out = run(_mm((64, 64), (64, 64), (64, 64), ddt=nl.bfloat16))
    np.testing.assert_array_equal(out, np.full((64, 64), 64.0, np.float32))

    def k():
        o = sb((128, 64), nl.uint32)
        nisa.rng(dst=o, engine=nisa.engine.gpsimd)
        return store(o)
    run(k)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "gen2")
    breaks("rng", k)


def test_dropout_dst_dtype_must_match_data():
    def k(a):
        o = sb((128, 64), nl.bfloat16)
        nisa.dropout(dst=o, data=load(a[:, 0:64]), prob=0.5)
        return store(o)
    breaks("dropout", k, X)


def test_max8_needs_8_to_16384_elements():
    def k(a):
        o = sb((128, 8))
        nisa.max8(dst=o, src=load(a[:, 0:7]))
        return store(o)
    breaks("max8", k, X)


def test_scalar_tensor_tensor_not_both_psum():
    def k(a):
        p1, p2 = ps((128, 64)), ps((128, 64))
        nisa.tensor_copy(dst=p1, src=load(a[:, 0:64]))
        nisa.tensor_copy(dst=p2, src=load(a[:, 0:64]))
        o = sb((128, 64))
        nisa.scalar_tensor_tensor(dst=o, data=p1, op0=nl.add, operand0=1.0, op1=nl.add, operand1=p2)
        return store(o)
    breaks("scalar_tensor_tensor", k, X)


def test_hwdge_dma_refused_on_trn1():
    def k(a):
        t = sb((128, 64))
        nisa.dma_copy(dst=t, src=a[:, 0:64], dge_mode=nisa.dge_mode.hwdge)
        return store(t)
    breaks("dma_copy|hwdge", k, X)


def test_matmul_tile_size_32_refused_on_v2():
    """PE tiling on NeuronCore-v2: row/column tiles of 64 only (spec 2.3)."""
    def k():
        s = sb((64, 64), nl.bfloat16)
        nisa.memset(dst=s, value=1.0)
        d = ps((64, 64))
        nisa.nc_matmul(dst=d, stationary=s, moving=s, tile_position=(0, 0), tile_size=(32, 32))
        return store(s)
    breaks("nc_matmul|tile", k)


def test_nl_rsqrt_takes_no_psum_input():
    """NKI 0.5: nl.rsqrt runs on GpSimd, so its input cannot be in PSUM (spec 1.1, 2.7)."""
    def k(a):
        p = ps((128, 64))
        nisa.tensor_copy(dst=p, src=load(a[:, 0:64]))
        return store(nl.rsqrt(p))
    breaks("rsqrt|psum|gpsimd", k, X)


def test_lnc_degree_two_and_grids_refused_on_trn1(monkeypatch):
    """NKI >= 0.3: the launch bracket is the LNC degree; LNC 2 is trn2/trn3 only (spec 1.2)."""
    def k(a):
        o = hbm_out((2, 4), nl.float32)
        t = sb((1, 4))
        pid = nl.program_id(0)
        nisa.memset(dst=t, value=float(pid + 1))
        nisa.dma_copy(dst=o[pid:pid + 1, :], src=t)
        return o
    x = np.zeros((1, 1), np.float32)
    with pytest.raises(ConstraintError, match="(?i)lnc"):
        nki.jit(k)[2](x)
    with pytest.raises(ConstraintError, match="(?i)lnc"):
        nki.jit(k)[2, 2](x)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    np.testing.assert_array_equal(nki.jit(k)[2](x), np.repeat([[1.0], [2.0]], 4, axis=1).astype(np.float32))


def test_reshape_of_noncontiguous_view_says_why():
    def k(a):
        a[:, 0:64:2].reshape((128 * 32,))
        return store(sb((1, 1)))
    with pytest.raises(ValueError, match="contiguous") as ei:
        run(k, X)
    assert "copy with the desired shape" not in str(ei.value)
