"""Property tests of the SwiGLU NKI kernels (kernels/swiglu.py) run by the interpreter (backend "sim").

Independent reference: ``torch.nn.functional.silu(gate) * up`` (what Hugging Face LlamaMLP computes), run
in float64 (truth) and in the kernel's dtype (PyTorch's own error); gradients by torch.autograd.
Criterion in tests/kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import ops, swiglu
from kernels.sim import trace
from kernel_helpers import DTYPES, assert_close_2x, randn


def ref_fwd_bwd(gate, up, dout):
    g = gate.detach().clone().requires_grad_(True)
    u = up.detach().clone().requires_grad_(True)
    out = F.silu(g) * u
    out.backward(dout)
    return out.detach(), g.grad, u.grad


def make_inputs(shape, dtype, seed):
    # gate spread over [-12, 12]-ish so silu's tails and silu' sign change are exercised.
    return randn(shape, dtype, seed, scale=4.0), randn(shape, dtype, seed + 1), randn(shape, dtype, seed + 2)


def check_all(gate, up, dout, outs, prefix=""):
    ref64 = ref_fwd_bwd(gate.double(), up.double(), dout.double())
    ref_pt = ref_fwd_bwd(gate, up, dout)
    for name, out, r64, rpt in zip(("out", "d_gate", "d_up"), outs, ref64, ref_pt):
        assert_close_2x(prefix + name, out, r64, rpt)


@settings(max_examples=14)
@given(n=st.integers(1, 300), f=st.one_of(st.integers(1, 1200), st.integers(2000, 4500)),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_launchers_match_float64(n, f, dtype, seed):
    gate, up, dout = make_inputs((n, f), dtype, seed)
    out = swiglu.swiglu_fwd(gate, up)
    dg, du = swiglu.swiglu_bwd(dout, gate, up)
    check_all(gate, up, dout, (out, dg, du))


@settings(max_examples=5)
@given(b=st.integers(1, 2), s=st.integers(1, 140), f=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_op_autograd_sim_backend(b, s, f, dtype, seed):
    """kernels.ops.swiglu with backend "sim" on 3-D activations; backward through torch.autograd."""
    gate, up, dout = make_inputs((b, s, f), dtype, seed)
    gk = gate.clone().requires_grad_(True)
    uk = up.clone().requires_grad_(True)
    with ops.use_backend("sim"):
        out = ops.swiglu(gk, uk)
        out.backward(dout)
    check_all(gate, up, dout, (out.detach(), gk.grad, uk.grad), "op ")


def test_hbm_bytes_are_minimal():
    n, f = 300, 2100
    gate, up, dout = make_inputs((n, f), torch.bfloat16, 0)
    one = 2 * n * f
    with trace.record() as tr:
        swiglu.swiglu_fwd(gate, up)
    assert tr.hbm_bytes() == (2 * one, one)
    with trace.record() as tr:
        swiglu.swiglu_bwd(dout, gate, up)
    assert tr.hbm_bytes() == (3 * one, 2 * one)


@pytest.mark.parametrize("n,f", [(4096, 1376), (4096, 1728), (4096, 3584), (300, 28672)],
                         ids=["7b-tp8", "13b-tp8", "70b-tp8", "70b-tp1-width"])
def test_llama_shapes_pass_trn1_checks(n, f):
    """Llama 2 7B/13B/70B FFN per rank at TP=8, seq 4096 ([4096, 1376|1728|3584]), and 70B's full FFN width
    28672 (TP=1) on 300 rows (two full row tiles and a tail; 4096 rows would only repeat the same tiles and
    need GBs for the float64 reference). The interpreter checks trn1 rules and capacity on every
    instruction; results are compared with float64 on the full tensors."""
    gate, up, dout = make_inputs((n, f), torch.bfloat16, 11)
    out = swiglu.swiglu_fwd(gate, up)
    dg, du = swiglu.swiglu_bwd(dout, gate, up)
    check_all(gate, up, dout, (out, dg, du), f"[{n}, {f}] ")


@pytest.mark.parametrize("bad", ["dtype", "shape", "dtype_mismatch", "rank"])
def test_unsupported_inputs_raise_before_launch(bad):
    gate, up, dout = make_inputs((4, 8), torch.float32, 0)
    with pytest.raises(ValueError) as exc:
        if bad == "dtype":
            swiglu.swiglu_fwd(gate.half(), up.half())
        elif bad == "shape":
            swiglu.swiglu_bwd(dout[:, :4], gate, up)
        elif bad == "dtype_mismatch":
            swiglu.swiglu_fwd(gate, up.bfloat16())
        elif bad == "rank":
            swiglu.swiglu_fwd(gate[0], up[0])
    assert "kernels/swiglu.py" in str(exc.value)
