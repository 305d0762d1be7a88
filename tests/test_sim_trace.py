"""kernels.sim trace (docs/interfaces.md): one Instruction record per executed instruction with engine, op,
operands (role, shape, dtype, buffer, nbytes) and the HBM bytes it moved; counts_by_engine, hbm_bytes, last()."""
from __future__ import annotations

import numpy as np

from kernels.sim import trace
from sim_helpers import BF16, F32, nisa, nki, nl, rand


@nki.jit
def _traced(a, b):
    """2 loads, 1 transpose-free matmul, 1 PSUM eviction, 1 activation, 1 tensor_tensor, 1 store."""
    ta = nl.ndarray((64, 32), dtype=nl.bfloat16, buffer=nl.sbuf)
    tb = nl.ndarray((64, 96), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.dma_copy(dst=ta, src=a)
    nisa.dma_copy(dst=tb, src=b)
    p = nl.ndarray((32, 96), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=p, stationary=ta, moving=tb)
    s = nl.ndarray((32, 96), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=s, src=p)
    e = nl.ndarray((32, 96), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=e, op=nl.exp, data=s)
    nisa.tensor_tensor(dst=e, data1=e, data2=s, op=nl.add)
    out = nl.ndarray((32, 96), dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=e)
    return out


def test_trace_records_instructions_and_bytes():
    a, b = rand((64, 32), BF16, seed=1), rand((64, 96), BF16, seed=2)
    with trace.record() as tr:
        _traced(a, b)
    ops = [i.op for i in tr.instructions]
    for op in ("dma_copy", "nc_matmul", "tensor_copy", "activation", "tensor_tensor"):
        assert op in ops, ops
    assert ops.count("dma_copy") == 3
    counts = tr.counts_by_engine()
    assert counts["tensor"] == 1 and counts["scalar"] == 1 and counts["vector"] == 2, counts
    assert counts.get("dma", 0) == 3, counts
    rd, wr = tr.hbm_bytes()
    assert rd == a.nbytes + b.nbytes and wr == 32 * 96 * 4
    mm = next(i for i in tr.instructions if i.op == "nc_matmul")
    roles = {o.role: o for o in mm.operands}
    assert tuple(roles["stationary"].shape) == (64, 32) and tuple(roles["moving"].shape) == (64, 96)
    assert tuple(roles["dst"].shape) == (32, 96) and "psum" in str(roles["dst"].buffer).lower()
    assert roles["dst"].nbytes == 32 * 96 * 4 and roles["stationary"].nbytes == 64 * 32 * 2
    assert mm.bytes_hbm_read == 0 and mm.bytes_hbm_written == 0
    load = next(i for i in tr.instructions if i.op == "dma_copy")
    assert load.engine == "dma" and load.bytes_hbm_read == a.nbytes and load.bytes_hbm_written == 0
    assert trace.last() is not None and len(trace.last().instructions) == len(tr.instructions)


def test_trace_counts_scale_with_loop():
    @nki.jit
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a)
        for _ in range(50):
            nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=1.0)
        nisa.dma_copy(dst=out, src=t)
        return out

    x = rand((128, 128), F32)
    with trace.record() as tr:
        np.testing.assert_array_equal(k(x), x)
    assert sum(1 for i in tr.instructions if i.op == "tensor_scalar") == 50


@nki.jit
def _sliced(a):
    """A strided HBM read into a partition/byte window of a tile, a PSUM matmul with an activation reduce."""
    t = nl.ndarray((128, 256), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(dst=t, value=0.0)
    nisa.dma_copy(dst=t[32:64, 128:256], src=a[0:32, 0:128])
    p = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=p, stationary=t[:, 0:128], moving=t[:, 128:256])
    s = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)
    red = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=s, op=nl.exp, data=p, reduce_op=nl.add, reduce_res=red,
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    out = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=red)
    return out


def test_operands_record_space_span_and_access():
    """span = (partition_start, partition_count, byte_lo, byte_hi): expected values worked out by hand from the
    views' element offsets (row-major storages; on-chip storages [partitions, free])."""
    a = rand((64, 256), BF16, seed=3)
    with trace.record() as tr:
        _sliced(a)
    mset, load, mm, act, store = tr.instructions
    t_space = mset.operand("dst").space
    assert mset.operand("dst").span == (0, 128, 0, 512) and mset.operand("dst").access == "w"
    assert load.operand("dst").space == t_space and load.operand("dst").span == (32, 32, 256, 512)
    # HBM a[0:32, 0:128] of a [64, 256] bf16 array: elements 0 .. 31*256+127, bytes [0, 16128)
    src = load.operand("src")
    assert src.span == (0, 1, 0, (31 * 256 + 127 + 1) * 2) and src.access == "r" and src.space != t_space
    assert mm.operand("stationary").span == (0, 128, 0, 256) and mm.operand("moving").span == (0, 128, 256, 512)
    assert mm.operand("dst").access == "rw" and mm.operand("dst").span == (0, 128, 0, 512)
    assert act.operand("data").space == mm.operand("dst").space and act.operand("data").access == "r"
    assert act.operand("reduce_res").access == "w" and act.operand("reduce_res").span == (0, 128, 0, 4)
    assert store.operand("dst").access == "w" and store.bytes_hbm_written == 128 * 4


def test_span_is_relative_to_the_storage_base():
    from kernels.sim.engines import span_of
    from kernels.sim.tensor import allocate
    t = allocate((64, 32), nl.float32, "sbuf", name="placed")
    t._st.base = (64, 1024)              # as a tile placed at partition 64, byte 1024 of a shared space
    t._st.space = ("addr", "sbuf")
    v = t[0:16, 8:16]
    assert span_of(v) == (64, 16, 1024 + 8 * 4, 1024 + 16 * 4)
    assert span_of(t) == (64, 64, 1024, 1024 + 32 * 4)
