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
