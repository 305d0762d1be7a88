"""kernels.sim.cost (the NeuronCore-v2 timeline cost model): calibration against published figures and the
dependency / port / formula rules, with expected times computed here from the documented formulas
(kernels/sim/cost_constants.py cites each source; the numbers below restate the documented values, so a changed
constant fails here rather than silently moving every estimate).

Documented values used: TensorE 2.8 GHz, nc_matmul max(64, N_moving) cycles (4x fp32); VectorE 1.12 GHz, ScalarE
1.4 GHz; MIN_II 64 cycles; dependent back-to-back tiny ScalarE instructions 189 ns (264 cycles) each; "+~100
VectorE cycles" when dependent; 16 DMA engines of 27.2 GB/s, HBM 820 GB/s per 2 NeuronCores, ~1300 ns DMA fixed
cost, 32 KiB on one engine = 1416 ns; the optimized matmul tutorial's 85.24% of TensorE peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from kernels import calibration as cal
from kernels.sim import cost, trace
from kernels.sim.trace import Instruction, Operand

REPO = Path(__file__).absolute().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)

TENSOR_GHZ, VECTOR_GHZ, SCALAR_GHZ = 2.8, 1.12, 1.4      # cycles per ns
MIN_II = 64
HBM_GBPS = 820 / 2                                       # per NeuronCore = B/ns
DMA_ENGINE_GBPS = 27.2
DMA_FIXED_NS = 1300.0
DMA_SETUP_NS = 1416 - 32768 / DMA_ENGINE_GBPS            # documented 32 KiB single-engine example minus its bytes
PUBLISHED_MATMUL_PCT = 85.24


def _estimate(kernel, *args):
    with trace.record() as tr:
        out = kernel(*args)
    return out, tr, cost.estimate(tr)


# ------------------------------------------------------------------------------------------------ calibration
def test_blocked_matmul_is_tensor_bound_at_the_published_utilisation():
    M, K, N = 1024, 2048, 2048          # the tutorial's 4096 x 8192 x 8192 scaled by 1/4 per dimension
    rng = np.random.default_rng(0)
    a = rng.standard_normal((K, M)).astype(BF16)
    b = rng.standard_normal((K, N)).astype(BF16)
    c, tr, r = _estimate(cal.blocked_matmul_kernel, a, b)
    ref = a.astype(np.float64).T @ b.astype(np.float64)
    np.testing.assert_allclose(c.astype(np.float64), ref, rtol=2 ** -7, atol=1e-2 * np.abs(ref).max())
    n_mm = (M // 128) * (N // 512) * (K // 128)
    assert tr.counts_by_op()["nc_matmul"] == n_mm
    assert r.flops == 2 * M * K * N
    busy_us = n_mm * max(64, 512) / TENSOR_GHZ / 1e3
    assert r.busy_us["tensor"] == pytest.approx(busy_us, rel=1e-9)
    assert r.total_us >= busy_us
    peak_tflops = 128 * 128 * 2 * TENSOR_GHZ / 1e3
    assert r.tensor_util["flops_pct"] == pytest.approx(100 * 2 * M * K * N / (r.total_us * 1e6 * peak_tflops), rel=1e-9)
    assert r.bound == "tensor", r.summary()
    assert abs(r.tensor_util["flops_pct"] - PUBLISHED_MATMUL_PCT) <= 5.0, r.summary()


def test_copy_kernel_is_dma_bound_near_the_hbm_floor():
    x = np.random.default_rng(1).standard_normal((2048, 4096)).astype(BF16)      # 16 tiles of 1 MiB
    out, tr, r = _estimate(cal.copy_kernel, x)
    np.testing.assert_array_equal(out, x)
    floor_us = 2 * x.nbytes / HBM_GBPS / 1e3
    assert cost.roofline_floor_us(0, 2 * x.nbytes) == pytest.approx(floor_us, rel=1e-9)
    # 32 transfers of 1 MiB over all 16 engines (8 partitions each), HBM shared by 16 busy engines:
    per_engine_ns = DMA_SETUP_NS + (x.nbytes / 16 / 16) / min(DMA_ENGINE_GBPS, HBM_GBPS / 16)
    expected_us = (DMA_FIXED_NS + 32 * per_engine_ns) / 1e3
    assert r.total_us == pytest.approx(expected_us, rel=0.01), r.summary()
    assert r.bound == "dma", r.summary()
    assert floor_us <= r.total_us <= floor_us / 0.85
    assert r.hbm_bytes == (x.nbytes, x.nbytes)
    assert r.hbm_gbps == pytest.approx(2 * x.nbytes / (r.total_us * 1e3), rel=1e-9)


def test_dependent_tiny_chain_is_latency_bound_at_the_documented_overhead():
    steps = 200
    x = np.ones((128, 1), np.float32)
    out, tr, r = _estimate(cal.dependent_chain_kernel, x, steps)
    np.testing.assert_array_equal(out, x)
    acts = [i for i, ins in enumerate(tr.instructions) if ins.op == "activation"]
    assert len(acts) == steps
    gaps = np.diff([r.start_us[i] for i in acts]) * 1e3
    np.testing.assert_allclose(gaps, 189.0, rtol=0.01)          # the documented observation
    assert r.bound == "latency", r.summary()
    assert r.busy_pct["scalar"] == pytest.approx(100 * steps * MIN_II / SCALAR_GHZ / (r.total_us * 1e3), rel=1e-9)
    assert r.critical_path[-steps - 1:-1] == acts               # the chain is the critical path


# ------------------------------------------------------------------------------------- rules on built traces
_space_ids = iter(range(10 ** 6, 2 * 10 ** 6))


def _tile(parts, free, dtype="float32", buffer="sbuf"):
    """(space, shape, dtype, buffer, itemsize) of a fresh on-chip tile."""
    return (next(_space_ids), (parts, free), dtype, buffer, 4 if dtype == "float32" else 2)


def _op(tile, role, access):
    space, shape, dtype, buffer, isz = tile
    return Operand(role, shape, dtype, buffer, shape[0] * shape[1] * isz, space,
                   (0, shape[0], 0, shape[1] * isz), access)


def _ins(engine, op, dst=None, *srcs, roles=None):
    ops = [_op(dst, "dst", "rw" if op == "nc_matmul" else "w")] if dst is not None else []
    for k, s in enumerate(srcs):
        ops.append(_op(s, (roles or ("data", "data2", "data3"))[k], "r"))
    return Instruction(engine, op, ops)


def _vec_ns(n):
    return max(MIN_II, n) / VECTOR_GHZ


def _act_ns(n):
    return max(MIN_II, n) / SCALAR_GHZ


def test_raw_chain_serialises_with_the_dependent_latency():
    a, b, c, d = (_tile(128, 256) for _ in range(4))
    r = cost.estimate([_ins("vector", "tensor_scalar", b, a), _ins("vector", "tensor_scalar", c, b),
                       _ins("vector", "tensor_scalar", d, c)])
    step = _vec_ns(256) + 100 / VECTOR_GHZ
    assert [s * 1e3 for s in r.start_us] == pytest.approx([0, step, 2 * step])
    assert r.total_us * 1e3 == pytest.approx(2 * step + _vec_ns(256))
    assert r.critical_path == [0, 1, 2]


def test_independent_instructions_pipeline_and_engines_overlap():
    a, b, c, d = (_tile(128, 2048) for _ in range(4))
    same = cost.estimate([_ins("vector", "tensor_scalar", b, a), _ins("vector", "tensor_scalar", d, c)])
    assert same.start_us[1] * 1e3 == pytest.approx(_vec_ns(2048))      # back to back, no dependent latency
    cross = cost.estimate([_ins("vector", "tensor_scalar", b, a), _ins("scalar", "activation", d, c)])
    assert cross.start_us == [0.0, 0.0]
    assert cross.total_us * 1e3 == pytest.approx(max(_vec_ns(2048), _act_ns(2048)))


def test_war_hazard_waits_for_the_reader():
    a, b, c = _tile(128, 4096), _tile(128, 4096), _tile(128, 64)
    # ScalarE reads a (long); VectorE then overwrites a: it must wait until the read is done.
    r = cost.estimate([_ins("scalar", "activation", b, a), _ins("vector", "memset", a)])
    assert r.start_us[1] * 1e3 == pytest.approx(_act_ns(4096))
    # The same write to another tile does not wait.
    r2 = cost.estimate([_ins("scalar", "activation", b, a), _ins("vector", "memset", c)])
    assert r2.start_us[1] == 0.0


def test_waw_orders_two_writes_of_one_tile():
    a, b = _tile(128, 4096), _tile(128, 4096)
    r = cost.estimate([_ins("scalar", "activation", a, b), _ins("vector", "memset", a)])
    assert r.start_us[1] * 1e3 == pytest.approx(_act_ns(4096))


def test_disjoint_byte_ranges_of_one_tile_do_not_depend():
    space, isz = next(_space_ids), 4
    half = lambda lo, role, acc: Operand(role, (128, 512), "float32", "sbuf", 128 * 512 * isz, space,
                                         (0, 128, lo, lo + 512 * isz), acc)
    other = _tile(128, 512)
    r = cost.estimate([Instruction("scalar", "activation", [half(0, "dst", "w"), _op(other, "data", "r")]),
                       Instruction("vector", "tensor_scalar", [_op(_tile(128, 512), "dst", "w"),
                                                               half(2048, "data", "r")])])
    assert r.start_us == [0.0, 0.0]
    # partitions 0..63 vs 64..127 of the same bytes are disjoint too
    top = Operand("dst", (64, 512), "float32", "sbuf", 64 * 2048, space, (0, 64, 0, 2048), "w")
    bot = Operand("data", (64, 512), "float32", "sbuf", 64 * 2048, space, (64, 64, 0, 2048), "r")
    r = cost.estimate([Instruction("scalar", "activation", [top, _op(other, "data", "r")]),
                       Instruction("vector", "tensor_scalar", [_op(_tile(64, 512), "dst", "w"), bot])])
    assert r.start_us == [0.0, 0.0]


def test_vector_and_gpsimd_share_the_sbuf_port():
    a, b, c, d = (_tile(128, 2048) for _ in range(4))
    r = cost.estimate([_ins("vector", "tensor_scalar", b, a), _ins("gpsimd", "iota", d)])
    assert r.start_us[1] * 1e3 == pytest.approx(_vec_ns(2048))
    assert r.total_us * 1e3 == pytest.approx(_vec_ns(2048) + (150 + 2048) / 1.4)


def test_vector_and_scalar_cannot_access_psum_in_parallel():
    ps1, ps2 = _tile(128, 512, buffer="psum"), _tile(128, 512, buffer="psum")
    o1, o2 = _tile(128, 512), _tile(128, 512)
    r = cost.estimate([_ins("vector", "tensor_copy", o1, ps1, roles=("src",)), _ins("scalar", "activation", o2, ps2)])
    assert r.start_us[1] * 1e3 == pytest.approx(_vec_ns(512))
    s1, s2 = _tile(128, 512), _tile(128, 512)                    # VectorE on PSUM, ScalarE on SBUF: overlap
    r = cost.estimate([_ins("vector", "tensor_copy", o1, ps1, roles=("src",)), _ins("scalar", "activation", s2, s1)])
    assert r.start_us == [0.0, 0.0]


@pytest.mark.parametrize("dtype,n,m,cycles", [("bfloat16", 512, 128, 512), ("bfloat16", 32, 128, 64),
                                              ("bfloat16", 32, 16, 64), ("float32", 512, 128, 4 * 512),
                                              ("float32", 8, 128, 4 * 64)])
def test_matmul_cycles_follow_the_documented_formula(dtype, n, m, cycles):
    st, mv, ps = _tile(128, m, dtype), _tile(128, n, dtype), _tile(m, n, buffer="psum")
    r = cost.estimate([_ins("tensor", "nc_matmul", ps, st, mv, roles=("stationary", "moving"))])
    assert r.total_us * 1e3 == pytest.approx(cycles / TENSOR_GHZ)
    assert r.flops == 2 * 128 * m * n


def test_psum_accumulation_pipelines_on_tensore():
    st, mv, ps = _tile(128, 128, "bfloat16"), _tile(128, 512, "bfloat16"), _tile(128, 512, buffer="psum")
    r = cost.estimate([_ins("tensor", "nc_matmul", ps, st, mv, roles=("stationary", "moving"))] * 4)
    assert r.total_us * 1e3 == pytest.approx(4 * 512 / TENSOR_GHZ)
    assert r.bound == "tensor"


def test_one_small_dma_costs_the_fixed_latency_plus_its_packets():
    hbm = (next(_space_ids), (16, 256), "float32", "hbm", 4)
    sb = _tile(16, 256)
    nbytes = 16 * 256 * 4
    ins = Instruction("dma", "dma_copy", [_op(sb, "dst", "w"),
                                          Operand("src", (16, 256), "float32", "hbm", nbytes, hbm[0],
                                                  (0, 1, 0, nbytes), "r")], nbytes, 0)
    r = cost.estimate([ins])
    engines = 2                                                   # 16 partitions / 8 per engine
    expected = DMA_FIXED_NS + DMA_SETUP_NS + nbytes / engines / min(DMA_ENGINE_GBPS, HBM_GBPS / engines)
    assert r.total_us * 1e3 == pytest.approx(expected)
    assert sorted({e.queue for e in r.timeline}) == ["dma0", "dma1"]


def test_report_fields_summary_and_chrome_trace():
    a, b = _tile(128, 512), _tile(128, 512)
    r = cost.estimate([_ins("vector", "tensor_scalar", b, a), _ins("scalar", "activation", a, b)])
    text = r.summary()
    assert "estimated" in text and "bound:" in text and "busy:" in text
    ct = r.chrome_trace()
    json.dumps(ct)
    xs = [e for e in ct["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 2 and all(e["dur"] > 0 for e in xs)
    assert r.n_instructions == 2 and len(r.start_us) == 2 and r.end_us[1] == pytest.approx(r.total_us)
    assert set(r.busy_pct) >= {"tensor", "vector", "scalar", "gpsimd", "dma", "dma0", "dma15"}
    with pytest.raises(ValueError, match="trn2"):
        cost.estimate([], target="trn2")


def test_operand_without_span_is_a_clear_error():
    old = Instruction("vector", "memset", [Operand("dst", (128, 4), "float32", "sbuf", 2048)])
    with pytest.raises(ValueError, match="no byte span"):
        cost.estimate([old])


# -------------------------------------------------------------------------------- a public kernel, estimated
USER_SCRIPT = textwrap.dedent("""
    from kernels.sim import install_as_nki
    install_as_nki()
    import numpy as np
    import nki
    import nki.isa as nisa
    import nki.language as nl
    from kernels.sim import cost, trace

    @nki.jit
    def scaled_exp(x):
        n, d = x.shape
        out = nl.ndarray((n, d), dtype=x.dtype, buffer=nl.shared_hbm)
        for r in range(0, n, 128):
            t = nl.ndarray((128, d), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=t, src=x[r:r + 128])
            e = nl.ndarray((128, d), dtype=x.dtype, buffer=nl.sbuf)
            nisa.activation(dst=e, op=nl.exp, data=t, scale=0.5)
            nisa.dma_copy(dst=out[r:r + 128], src=e)
        return out

    x = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    out = nki.simulate(scaled_exp)(x)
    assert np.allclose(out, np.exp(0.5 * x), rtol=1e-5)
    r = cost.estimate(trace.last())
    print("RESULT", r.n_instructions, r.total_us, r.bound, r.busy_us["scalar"])
""")


def test_public_style_kernel_via_install_as_nki_can_be_estimated(tmp_path):
    script = tmp_path / "user_kernel.py"
    script.write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT"))
    _, n, total, bound, scalar_busy = line.split()
    assert int(n) == 12
    assert float(scalar_busy) == pytest.approx(4 * 256 / SCALAR_GHZ / 1e3, rel=1e-6)
    assert float(total) > float(scalar_busy) and bound in ("dma", "latency", "scalar")


# ------------------------------------------------------------------------ VectorE formulas by ALU op (trace .alu)
def _alu_kernel(kind, op0, op1=None):
    from kernels.sim import nisa, nki, nl

    @nki.jit
    def k(a):
        out = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        x = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.sbuf)
        y = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.sbuf)
        r = nl.ndarray((128, 1), dtype=a.dtype, buffer=nl.sbuf)
        rf = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=x, src=a)
        if kind == "tensor_tensor":
            nisa.tensor_tensor(dst=y, data1=x, data2=x, op=op0)
        elif kind == "tensor_reduce":
            nisa.tensor_reduce(dst=r, op=op0, data=x, axis=1)
        else:
            nisa.scalar_tensor_tensor(dst=y, data=x, op0=op0, operand0=0.5, op1=op1, operand1=x)
        nisa.tensor_copy(dst=rf, src=r)
        nisa.dma_copy(dst=out, src=rf)
        return out
    return k


@pytest.mark.parametrize("kind, ops, cycles", [
    ("tensor_tensor", ("multiply",), 2048), ("tensor_tensor", ("maximum",), 2 * 2048),
    ("tensor_reduce", ("add",), 2048 // 2), ("tensor_reduce", ("minimum",), 2048),
    ("scalar_tensor_tensor", ("subtract", "multiply"), 2048), ("scalar_tensor_tensor", ("multiply", "add"), 2 * 2048),
])
def test_vector_fast_paths_follow_the_recorded_alu_op(kind, ops, cycles):
    """[ISA] bf16 SBUF: tensor_tensor N for add/multiply/subtract else 2N; tensor_reduce N/2 for add/max else N;
    scalar_tensor_tensor N for subtract->multiply else 2N (nki-spec 3.2)."""
    from kernels.sim import nl
    a = np.ones((128, 2048), BF16)
    _, tr, r = _estimate(_alu_kernel(kind, *(getattr(nl, o) for o in ops)), a)
    (i,) = [k for k, ins in enumerate(tr.instructions) if ins.op == kind]
    assert tr.instructions[i].alu == ops
    assert (r.end_us[i] - r.start_us[i]) * 1e3 == pytest.approx(cycles / VECTOR_GHZ)
    assert not any(kind in k for k in r.assumptions)          # the op is known: nothing assumed
